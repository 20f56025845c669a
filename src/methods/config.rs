//! Every knob of every method as command-line flags, with the documented defaults. A run's
//! method is the typed [`MethodSettings`] these flags (and a spec's or request's overrides)
//! resolve to.

use serde::{Deserialize, Serialize};

use super::{Method, MethodSettings};
use crate::Result;

/// Largest value of a count knob (tokens, blocks, layers): far above any context length,
/// small enough that sums and products of a few knobs fit in usize.
pub const MAX_COUNT: usize = 1 << 24;

pub const METHOD_NAMES: &[&str] = &[
    "recompute",
    "reuse",
    "cacheblend",
    "epic",
    "infllm",
    "samkv",
    "oracle",
];

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodConfig {
    /// recompute | reuse | cacheblend | epic | infllm | samkv | oracle (a diagnostic: SamKV's
    /// budget with the blocks Recompute's question attends to most; needs a full prefill)
    #[arg(long, default_value = "samkv")]
    pub method: String,

    // CacheBlend
    /// CacheBlend: fraction of context tokens recomputed after the check layer.
    #[arg(long, default_value_t = 0.15)]
    pub ratio: f64,
    /// CacheBlend: layer (0-based) whose K/V deviation selects the tokens; layers up to it
    /// are recomputed for every token.
    #[arg(long, default_value_t = 1)]
    pub check_layer: usize,
    /// CacheBlend: rank tokens by the deviation of K or of V.
    #[arg(long, default_value = "k", value_parser = ["k", "v"])]
    pub deviation: String,
    /// CacheBlend: gradual filtering (a larger ratio in the first layers after the check layer).
    #[arg(long)]
    pub gradual: bool,

    // EPIC
    /// EPIC: leading tokens recomputed in every document.
    #[arg(long, default_value_t = 16)]
    pub epic_k: usize,

    // Multi-InfLLM
    /// Multi-InfLLM: initial tokens kept.
    #[arg(long, default_value_t = 64)]
    pub infllm_initial: usize,
    /// Multi-InfLLM: local window (trailing context tokens) kept.
    #[arg(long, default_value_t = 128)]
    pub infllm_local: usize,
    /// Multi-InfLLM: block size.
    #[arg(long, default_value_t = 64)]
    pub infllm_block: usize,
    /// Multi-InfLLM: blocks kept per layer, ranked against the question's queries.
    #[arg(long, default_value_t = 4)]
    pub infllm_topk: usize,

    // SamKV
    /// SamKV: small (8 sink, 16 local, blocks of 8) or large (64, 128, 64), the
    /// re-implementation's two settings; fills whichever of --num-initial, --num-local and
    /// --block-size are not given. The default is `small`: MuSiQue passages are 530-690
    /// tokens with the SmolLM2 and Qwen2.5 tokenizers, so `large` keeps 192 anchor tokens
    /// (about a third) of every passage whole and splits the rest into ~6 blocks, which makes
    /// a 15% kept budget unreachable; `small` anchors 24 tokens and leaves ~70 blocks to choose
    /// from. Use `large` for documents of several thousand tokens.
    #[arg(long, default_value = "small", value_parser = ["small", "large"])]
    pub samkv_preset: String,
    /// SamKV: sink tokens kept from every document (default: from --samkv-preset).
    #[arg(long)]
    pub num_initial: Option<usize>,
    /// SamKV: trailing tokens kept from every document and pooled into its query summary
    /// (default: from --samkv-preset).
    #[arg(long)]
    pub num_local: Option<usize>,
    /// SamKV: block size for scoring the middle segment (default: from --samkv-preset).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// SamKV: number of last layers used for scoring.
    #[arg(long, default_value_t = 4)]
    pub stable_layers: usize,
    /// SamKV: overwrite | fusion.
    #[arg(long, default_value = "overwrite", value_parser = ["overwrite", "fusion"])]
    pub update: String,
    /// SamKV: fusion weight of the new KV.
    #[arg(long, default_value_t = 0.9)]
    pub theta: f32,
    /// SamKV: fusion rule, linear `(1-theta)*old + theta*new` or cosine-weighted.
    #[arg(long, default_value = "linear", value_parser = ["linear", "cosine"])]
    pub fusion_rule: String,
    /// SamKV: block selection per document (keep ratio P_i), or the best blocks of all
    /// documents within one budget (`--keep`), ranked by raw scores (global) or by each
    /// document's scores on Eq. 2's scale (global-relative).
    /// `coverage` (samkv's, needs `--samkv-score attention`): a per-request budget, the best
    /// blocks until they hold `--cover` of the question's attention, at most `--keep`.
    #[arg(long, default_value = "per-doc", value_parser = ["per-doc", "global", "global-relative", "coverage"])]
    pub selection: String,
    /// SamKV with global or coverage selection: fraction of the documents' tokens retained,
    /// anchors included (the paper's "15% of the sequence"); coverage's cap.
    #[arg(long, default_value_t = 0.15)]
    pub keep: f64,
    /// SamKV with coverage selection: share of the question's attention to the documents'
    /// middles that the kept blocks must hold, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    pub cover: f64,
    /// SamKV: skip the local recompute (sparsify only).
    #[arg(long)]
    pub no_recompute: bool,
    /// SamKV: how blocks are scored: `dot`, the paper's mean key against the personalized
    /// query, or `attention`, the block's share of the question's attention (samkv's
    /// alternative; docs/RESULTS.md compares them).
    #[arg(long, default_value = "dot", value_parser = ["dot", "attention"])]
    pub samkv_score: String,
    /// SamKV: what the local recompute attends to: `kept`, the retained rows only (the
    /// paper), or `all`, every context row (samkv's option: the rows not retained keep their
    /// stored K/V during the recompute and are dropped for decoding).
    #[arg(long, default_value = "kept", value_parser = ["kept", "all"])]
    pub samkv_attend: String,
}

impl Default for MethodConfig {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            c: MethodConfig,
        }
        Wrap::parse_from(["samkv"]).c
    }
}

impl MethodConfig {
    pub fn with_method(name: &str) -> Self {
        Self {
            method: name.to_string(),
            ..Self::default()
        }
    }

    /// The typed settings of the configured method.
    pub fn settings(&self) -> Result<MethodSettings> {
        MethodSettings::with_overrides(self, None, &[])
    }

    /// Builds the configured method; out-of-range knobs are rejected with the valid range.
    pub fn build(&self) -> Result<Box<dyn Method>> {
        self.settings()?.build()
    }
}
