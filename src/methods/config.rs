//! Every knob of every method, with the documented defaults, settable from the CLI, the HTTP
//! API (as JSON) and the library.

use serde::{Deserialize, Serialize};

use super::samkv::{Attend, SamKvParams, Score, Selection};
use super::{CacheBlend, Epic, Method, MultiInfLlm, Oracle, Recompute, Reuse, SamKv, Update};
use crate::{Error, Result};

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

    /// Checks every count knob against [`MAX_COUNT`], so that sums and products of them in
    /// the methods cannot overflow (a request's `kv` may hold any JSON number).
    fn check_counts(&self) -> Result<()> {
        let counts = [
            ("check_layer", Some(self.check_layer)),
            ("epic_k", Some(self.epic_k)),
            ("infllm_initial", Some(self.infllm_initial)),
            ("infllm_local", Some(self.infllm_local)),
            ("infllm_block", Some(self.infllm_block)),
            ("infllm_topk", Some(self.infllm_topk)),
            ("num_initial", self.num_initial),
            ("num_local", self.num_local),
            ("block_size", self.block_size),
            ("stable_layers", Some(self.stable_layers)),
        ];
        for (name, v) in counts {
            if let Some(v) = v.filter(|&v| v > MAX_COUNT) {
                return bad(format!(
                    "{name} is {v}; counts of tokens, blocks and layers must be at most {MAX_COUNT}"
                ));
            }
        }
        Ok(())
    }

    /// Builds the configured method; out-of-range knobs are rejected with the valid range.
    pub fn build(&self) -> Result<Box<dyn Method>> {
        self.check_counts()?;
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
            "infllm" => Ok(Box::new(self.infllm()?)),
            "samkv" => Ok(Box::new(SamKv::new(self.samkv_params()?))),
            // The oracle always reads the budget globally.
            "oracle" => Ok(Box::new(Oracle {
                params: SamKvParams {
                    selection: Selection::Global {
                        keep: self.checked_keep()?,
                        relative: false,
                    },
                    ..self.samkv_params()?
                },
            })),
            other if METHOD_NAMES.contains(&other) => Err(Error::InvalidInput(format!(
                "method `{other}` is not available in this build yet"
            ))),
            other => Err(Error::InvalidInput(format!(
                "unknown method `{other}`; choose one of {}",
                METHOD_NAMES.join(", ")
            ))),
        }
    }

    /// `(num_initial, num_local, block_size)`: the explicit values, else the preset's.
    pub fn samkv_anchors(&self) -> Result<(usize, usize, usize)> {
        let (i, l, b) = match self.samkv_preset.as_str() {
            "small" => (8, 16, 8),
            "large" => (64, 128, 64),
            other => {
                return bad(format!(
                    "samkv_preset `{other}` is unknown; use small or large"
                ))
            }
        };
        Ok((
            self.num_initial.unwrap_or(i),
            self.num_local.unwrap_or(l),
            self.block_size.unwrap_or(b),
        ))
    }

    /// The SamKV knobs, checked.
    pub fn samkv_params(&self) -> Result<SamKvParams> {
        let (num_initial, num_local, block_size) = self.samkv_anchors()?;
        if block_size == 0 {
            return bad("block_size must be at least 1".into());
        }
        if num_local == 0 {
            return bad(
                "num_local must be at least 1: the document query summary pools the last \
                 num_local tokens"
                    .into(),
            );
        }
        if self.stable_layers == 0 {
            return bad("stable_layers must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.theta) {
            return bad(format!("theta must be in [0, 1], got {}", self.theta));
        }
        let update = match (self.update.as_str(), self.fusion_rule.as_str()) {
            ("overwrite", _) => Update::Overwrite,
            ("fusion", "linear") => Update::Fusion { theta: self.theta },
            ("fusion", "cosine") => Update::CosineFusion { theta: self.theta },
            ("fusion", other) => {
                return bad(format!(
                    "fusion_rule `{other}` is unknown; use linear or cosine"
                ))
            }
            (other, _) => {
                return bad(format!(
                    "update `{other}` is unknown; use overwrite or fusion"
                ))
            }
        };
        let selection = match self.selection.as_str() {
            "per-doc" => Selection::PerDoc,
            g @ ("global" | "global-relative") => Selection::Global {
                keep: self.checked_keep()?,
                relative: g == "global-relative",
            },
            "coverage" => {
                if !(self.cover > 0.0 && self.cover <= 1.0) {
                    return bad(format!("cover must be in (0, 1], got {}", self.cover));
                }
                if self.samkv_score != "attention" {
                    return bad(
                        "selection `coverage` ranks blocks by their share of the question's \
                         attention: add samkv_score=attention"
                            .into(),
                    );
                }
                Selection::Coverage {
                    cover: self.cover,
                    keep: self.checked_keep()?,
                }
            }
            other => {
                return bad(format!(
                    "selection `{other}` is unknown; use per-doc, global, global-relative or \
                     coverage"
                ))
            }
        };
        let score = match self.samkv_score.as_str() {
            "dot" => Score::Dot,
            "attention" => Score::Attention,
            other => {
                return bad(format!(
                    "samkv_score `{other}` is unknown; use dot or attention"
                ))
            }
        };
        let attend = match self.samkv_attend.as_str() {
            "kept" => Attend::Kept,
            "all" => Attend::All,
            other => {
                return bad(format!(
                    "samkv_attend `{other}` is unknown; use kept or all"
                ))
            }
        };
        Ok(SamKvParams {
            attend,
            num_initial,
            num_local,
            block_size,
            stable_layers: self.stable_layers,
            update,
            selection,
            recompute: !self.no_recompute,
            score,
        })
    }

    /// `keep`, checked: a fraction in (0, 1].
    fn checked_keep(&self) -> Result<f64> {
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return bad(format!("keep must be in (0, 1], got {}", self.keep));
        }
        Ok(self.keep)
    }

    /// The Multi-InfLLM knobs, checked.
    pub fn infllm(&self) -> Result<MultiInfLlm> {
        if self.infllm_block == 0 {
            return bad("infllm_block must be at least 1".into());
        }
        Ok(MultiInfLlm {
            initial: self.infllm_initial,
            local: self.infllm_local,
            block: self.infllm_block,
            topk: self.infllm_topk,
        })
    }
}

fn bad<T>(msg: String) -> Result<T> {
    Err(Error::InvalidInput(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(c: MethodConfig) -> String {
        match c.build() {
            Err(e) => e.to_string(),
            Ok(m) => panic!("{} was accepted", m.name()),
        }
    }

    #[test]
    fn presets_fill_only_what_is_not_given() {
        let mut c = MethodConfig::with_method("samkv");
        assert_eq!(c.samkv_anchors().unwrap(), (8, 16, 8));
        c.samkv_preset = "large".into();
        assert_eq!(c.samkv_anchors().unwrap(), (64, 128, 64));
        c.block_size = Some(32);
        assert_eq!(c.samkv_anchors().unwrap(), (64, 128, 32));
        assert!(c.build().unwrap().name().contains("block=32"));
    }

    #[test]
    fn out_of_range_knobs_are_rejected() {
        fn s(f: impl FnOnce(&mut MethodConfig)) -> String {
            let mut c = MethodConfig::with_method("samkv");
            f(&mut c);
            err(c)
        }
        assert!(s(|c| c.block_size = Some(0)).contains("block_size"));
        assert!(s(|c| c.num_local = Some(0)).contains("num_local"));
        assert!(s(|c| c.stable_layers = 0).contains("stable_layers"));
        assert!(s(|c| c.theta = 1.5).contains("theta"));
        assert!(s(|c| c.theta = f32::NAN).contains("theta"));
        let global = |c: &mut MethodConfig, keep: f64| {
            c.selection = "global".into();
            c.keep = keep;
        };
        assert!(s(|c| global(c, 0.0)).contains("keep"));
        assert!(s(|c| global(c, 1.01)).contains("keep"));
        assert!(s(|c| c.samkv_preset = "medium".into()).contains("small or large"));
        assert!(s(|c| c.selection = "local".into()).contains("global-relative or coverage"));
        assert!(s(|c| c.selection = "coverage".into()).contains("samkv_score=attention"));
        let coverage = |c: &mut MethodConfig, cover: f64| {
            c.selection = "coverage".into();
            c.samkv_score = "attention".into();
            c.cover = cover;
        };
        assert!(s(|c| coverage(c, 0.0)).contains("cover must be"));
        assert!(s(|c| coverage(c, f64::NAN)).contains("cover must be"));
        assert!(s(|c| c.samkv_attend = "some".into()).contains("kept or all"));
        assert!(s(|c| c.update = "blend".into()).contains("overwrite or fusion"));
        let mut c = MethodConfig::with_method("infllm");
        c.infllm_block = 0;
        assert!(err(c).contains("infllm_block"));
        assert!(MethodConfig::with_method("infllm").build().is_ok());
    }

    #[test]
    fn huge_counts_are_refused_before_any_arithmetic() {
        for name in [
            "check_layer",
            "epic_k",
            "infllm_initial",
            "infllm_local",
            "infllm_block",
            "infllm_topk",
            "num_initial",
            "num_local",
            "block_size",
            "stable_layers",
        ] {
            for v in [u64::MAX, (MAX_COUNT + 1) as u64] {
                for method in METHOD_NAMES {
                    let mut j = serde_json::to_value(MethodConfig::with_method(method)).unwrap();
                    j[name] = serde_json::json!(v);
                    let c: MethodConfig = serde_json::from_value(j).unwrap();
                    let e = err(c);
                    assert!(
                        e.contains(name) && e.contains("at most"),
                        "{method} {name}: {e}"
                    );
                }
            }
        }
        let mut c = MethodConfig::with_method("samkv");
        c.num_initial = Some(MAX_COUNT);
        assert!(c.build().is_ok());
    }
}
