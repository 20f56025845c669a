//! Every knob of every method, with the documented defaults, settable from the CLI, the HTTP
//! API (as JSON) and the library.

use serde::{Deserialize, Serialize};

use super::{CacheBlend, Epic, Method, Recompute, Reuse};
use crate::{Error, Result};

pub const METHOD_NAMES: &[&str] = &[
    "recompute",
    "reuse",
    "cacheblend",
    "epic",
    "infllm",
    "samkv",
];

#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodConfig {
    /// recompute | reuse | cacheblend | epic | infllm | samkv
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
    /// SamKV: sink tokens kept from every document.
    #[arg(long, default_value_t = 64)]
    pub num_initial: usize,
    /// SamKV: trailing tokens kept from every document (and pooled into its query summary).
    #[arg(long, default_value_t = 128)]
    pub num_local: usize,
    /// SamKV: block size for scoring the middle segment.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
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
    /// SamKV: block selection per document (keep ratio P_i) or a global top-k over all
    /// documents' blocks.
    #[arg(long, default_value = "per-doc", value_parser = ["per-doc", "global"])]
    pub selection: String,
    /// SamKV with global selection: fraction of middle blocks kept across all documents.
    #[arg(long, default_value_t = 0.15)]
    pub keep: f64,
    /// SamKV: skip the local recompute (sparsify only).
    #[arg(long)]
    pub no_recompute: bool,
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

    /// Builds the configured method; out-of-range knobs are rejected with the valid range.
    pub fn build(&self) -> Result<Box<dyn Method>> {
        match self.method.as_str() {
            "recompute" => Ok(Box::new(Recompute)),
            "reuse" => Ok(Box::new(Reuse)),
            // check_layer is validated against the model's depth when the method assembles.
            "cacheblend" => Ok(Box::new(CacheBlend::new(
                self.ratio,
                self.check_layer,
                self.deviation.parse()?,
                self.gradual,
            )?)),
            "epic" => Ok(Box::new(Epic { k: self.epic_k })),
            other if METHOD_NAMES.contains(&other) => Err(Error::InvalidInput(format!(
                "method `{other}` is not available in this build yet"
            ))),
            other => Err(Error::InvalidInput(format!(
                "unknown method `{other}`; choose one of {}",
                METHOD_NAMES.join(", ")
            ))),
        }
    }
}
