//! CacheBlend (Yao et al., EuroSys 2025, arXiv 2405.16444): selective KV recompute.
//!
//! Start from the concatenated, re-positioned independent caches. Every context token and the
//! question are recomputed in the layers up to and including the check layer. At the check
//! layer each context token's fresh K (or V) is compared with its cached one; the tokens with
//! the largest squared L2 deviation (summed over KV heads) are the "HKVD" tokens. Only they
//! (plus the question) are carried into the later layers, where they attend over the full
//! merged KV and their fresh K/V overwrite the cached rows. Decoding keeps all the KV.
//!
//! Counts: the target is `floor(ratio * context_tokens)` rows (the preamble counts as
//! context; its cached KV is exact, so its deviation is only float noise and it is never
//! worth selecting, but it is not excluded by hand).
//!
//! Gradual filtering (the paper's Section 4.3): instead of fixing the set at the check
//! layer, select a larger set there and shrink it one layer later by the deviations measured
//! at that layer. Schedule used here: `floor(min(1, 1.5 * ratio) * context)` rows for layer
//! check+1, re-ranked at layer check+1 by their fresh-vs-cached deviation, then
//! `floor(ratio * context)` rows for every layer from check+2 on.

use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{
    concat_caches, ms, recompute_layers, Assembled, Context, LayerPlan, Method, Stats, Update,
};
use crate::kv::LayerKv;
use crate::model::Qkv;
use crate::{Error, Result};

/// Factor of the first (larger) selection under gradual filtering.
pub const GRADUAL_FACTOR: f64 = 1.5;

/// Which cached tensor the deviation is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deviation {
    K,
    V,
}

impl FromStr for Deviation {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "k" | "K" => Ok(Deviation::K),
            "v" | "V" => Ok(Deviation::V),
            other => Err(Error::InvalidInput(format!(
                "CacheBlend deviation `{other}` is unknown; use `k` or `v`"
            ))),
        }
    }
}

impl Deviation {
    pub fn as_str(self) -> &'static str {
        match self {
            Deviation::K => "k",
            Deviation::V => "v",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CacheBlend {
    /// Fraction of context tokens recomputed after the check layer, in [0, 1].
    pub ratio: f64,
    /// 0-based layer whose deviation selects the tokens; layers 0..=check_layer recompute all.
    pub check_layer: usize,
    pub deviation: Deviation,
    /// Gradual filtering (see the module docs for the schedule).
    pub gradual: bool,
}

impl CacheBlend {
    /// A validated CacheBlend; `check_layer` is checked against the model at assembly.
    pub fn new(
        ratio: f64,
        check_layer: usize,
        deviation: Deviation,
        gradual: bool,
    ) -> Result<Self> {
        let m = Self {
            ratio,
            check_layer,
            deviation,
            gradual,
        };
        m.validate(None)?;
        Ok(m)
    }

    /// Rejects a ratio outside [0, 1] and, given the model's depth, a check layer past it.
    pub fn validate(&self, n_layers: Option<usize>) -> Result<()> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(Error::InvalidInput(format!(
                "CacheBlend ratio {} is out of range; use a fraction in [0, 1] (0.15 is the paper's)",
                self.ratio
            )));
        }
        if let Some(n) = n_layers {
            if self.check_layer >= n {
                return Err(Error::InvalidInput(format!(
                    "CacheBlend check_layer {} is out of range: the model has {n} layers, so use 0..={}",
                    self.check_layer,
                    n.saturating_sub(1)
                )));
            }
        }
        Ok(())
    }

    /// Context rows recomputed at each layer after the check layer: `(from_layer, rows)`
    /// steps, where each applies from `from_layer` on.
    pub fn schedule(&self, context: usize) -> Vec<(usize, usize)> {
        let c = self.check_layer;
        let target = keep_count(self.ratio, context);
        if self.gradual {
            let first = keep_count((self.ratio * GRADUAL_FACTOR).min(1.0), context);
            vec![(c + 1, first), (c + 2, target)]
        } else {
            vec![(c + 1, target)]
        }
    }
}

/// `floor(ratio * n)`, clamped to n; the epsilon keeps products such as 0.29 * 100 from
/// rounding down to 28.
pub fn keep_count(ratio: f64, n: usize) -> usize {
    ((ratio * n as f64 + 1e-9).floor().max(0.0) as usize).min(n)
}

/// Squared L2 deviation, summed over KV heads and head dimensions, between the fresh states
/// `fresh` (kv_heads, rows.len(), head_dim) and the cached K or V (`which`) of every row of
/// `rows` that `cached` holds. Returns `(position, deviation)` in the order of `rows`; rows
/// the cache does not hold (the question) are left out. Only those rows are read from the
/// cache (a gather, not a copy of the layer).
pub fn deviations(
    rows: &[u32],
    fresh: &Tensor,
    cached: &LayerKv,
    which: Deviation,
) -> Result<Vec<(u32, f32)>> {
    let held = cached.positions();
    let (mut fresh_idx, mut cached_rows, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    for (i, p) in rows.iter().enumerate() {
        if let Ok(r) = held.binary_search(p) {
            fresh_idx.push(i as u32);
            cached_rows.push(r);
            pos.push(*p);
        }
    }
    if pos.is_empty() {
        return Ok(Vec::new());
    }
    let dev = fresh.device();
    let f = fresh.index_select(&Tensor::new(fresh_idx.as_slice(), dev)?, 1)?;
    let c = match which {
        Deviation::K => cached.gather_keys(&cached_rows)?,
        Deviation::V => cached.gather_values(&cached_rows)?,
    };
    let d = (f.to_dtype(DType::F32)? - c.to_device(dev)?.to_dtype(DType::F32)?)?
        .sqr()?
        .sum(2)?
        .sum(0)?
        .to_vec1::<f32>()?;
    Ok(pos.into_iter().zip(d).collect())
}

/// The HKVD selection: of `rows`, keeps the `keep` cached rows with the largest deviation
/// (ties go to the earlier position; NaN ranks highest, so a broken row is recomputed) and
/// every row the cache does not hold (the question). Returns sorted positions.
pub fn select_hkvd(
    rows: &[u32],
    fresh: &Tensor,
    cached: &LayerKv,
    which: Deviation,
    keep: usize,
) -> Result<Vec<u32>> {
    let mut scored = deviations(rows, fresh, cached, which)?;
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(keep);
    let mut out: Vec<u32> = scored.into_iter().map(|x| x.0).collect();
    let held = cached.positions();
    out.extend(rows.iter().filter(|p| held.binary_search(p).is_err()));
    out.sort_unstable();
    Ok(out)
}

/// The [`LayerPlan`] CacheBlend drives [`recompute_layers`] with. Public so tests and
/// experiments can see which rows were chosen.
pub struct BlendPlan {
    deviation: Deviation,
    /// `(layer whose deviation decides, context rows to keep)`, in layer order.
    steps: Vec<(usize, usize)>,
    /// Rows chosen at each deciding layer (question included).
    pub chosen: Vec<(usize, Vec<u32>)>,
    pub select_ms: f64,
}

impl BlendPlan {
    pub fn new(m: &CacheBlend, context: usize) -> Self {
        // A step "rows for layer l on" is decided by layer l - 1's deviation.
        let steps = m
            .schedule(context)
            .into_iter()
            .map(|(from, keep)| (from - 1, keep))
            .collect();
        Self {
            deviation: m.deviation,
            steps,
            chosen: Vec::new(),
            select_ms: 0.0,
        }
    }
}

impl LayerPlan for BlendPlan {
    fn next_rows(
        &mut self,
        l: usize,
        rows: &[u32],
        qkv: &Qkv,
        cached: &LayerKv,
    ) -> Result<Vec<u32>> {
        let Some(&(_, keep)) = self.steps.iter().find(|s| s.0 == l) else {
            return Ok(rows.to_vec());
        };
        let t = Instant::now();
        let held = cached.positions();
        let in_cache = rows
            .iter()
            .filter(|p| held.binary_search(p).is_ok())
            .count();
        let next = if keep >= in_cache {
            rows.to_vec()
        } else {
            let fresh = match self.deviation {
                Deviation::K => &qkv.k,
                Deviation::V => &qkv.v,
            };
            select_hkvd(rows, fresh, cached, self.deviation, keep)?
        };
        self.chosen.push((l, next.clone()));
        self.select_ms += ms(t);
        Ok(next)
    }
}

impl Method for CacheBlend {
    fn name(&self) -> String {
        format!(
            "cacheblend(r={},check={},dev={}{})",
            self.ratio,
            self.check_layer,
            self.deviation.as_str(),
            if self.gradual { ",gradual" } else { "" }
        )
    }

    fn assemble(&self, ctx: &Context) -> Result<Assembled> {
        let model = ctx.model;
        self.validate(Some(model.n_layers()))?;
        if ctx.question.is_empty() {
            return Err(Error::InvalidInput(
                "CacheBlend needs at least one question token".into(),
            ));
        }
        let mut stats = Stats::for_method(self.name());
        let mut cache = concat_caches(model, ctx, &mut stats)?;
        let t = Instant::now();
        let (_, mut rows) = ctx.all_tokens();
        rows.sort_unstable();
        let mut plan = BlendPlan::new(self, ctx.context_len());
        let (logits, counts) =
            recompute_layers(model, ctx, &mut cache, rows, Update::Overwrite, &mut plan)?;
        stats.select_ms = plan.select_ms;
        stats.recompute_ms = ms(t) - plan.select_ms;
        stats.finish(ctx, &cache, counts);
        Ok(Assembled {
            cache,
            logits,
            stats,
        })
    }
}
