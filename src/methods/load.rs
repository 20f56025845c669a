//! From the store into a request's cache: each document's stored rows moved to their global
//! positions (RoPE rotations compose, so a key stored at p is rotated by p' - p) and laid out
//! in position order. Reuse, CacheBlend, EPIC and Multi-InfLLM start from every row at every
//! layer ([`concat_caches`]); SamKV loads only the rows it reads ([`load_rows`]).
//!
//! On CUDA one kernel does it all (`model::cuda::gather`); elsewhere, and as its reference,
//! candle's ops per (layer, segment).

use std::time::Instant;

use candle_core::Tensor;

use super::{Context, Stats};
use crate::kv::{KvCache, LayerKv};
use crate::model::Model;
use crate::{Error, Result};

/// Spare rows [`concat_caches`] leaves after the question for the first decoded tokens.
const CONCAT_SPARE_ROWS: usize = 64;

/// The independent caches moved to their global positions and concatenated: what Reuse
/// decodes from and what CacheBlend, EPIC and Multi-InfLLM start from. Leaves room for the
/// question and a short answer, so neither regrows (copies) the buffers.
pub fn concat_caches(model: &Model, ctx: &Context, stats: &mut Stats) -> Result<KvCache> {
    let all: Vec<u32> = ctx.segments.iter().flat_map(|s| s.positions()).collect();
    let cap = all.len() + ctx.question.len() + CONCAT_SPARE_ROWS;
    load_rows(model, ctx, &vec![all; model.n_layers()], cap, stats)
}

/// Rows to hold after the context's: the question plus [`CONCAT_SPARE_ROWS`].
pub fn room_after(ctx: &Context) -> usize {
    ctx.question.len() + CONCAT_SPARE_ROWS
}

/// A cache holding at layer l exactly the context positions `want[l]` (sorted, each in some
/// segment), every key re-rotated to its global position, with room for `cap` rows per layer
/// (at least the longest `want[l]`). Load and re-position times go to `stats`.
pub fn load_rows(
    model: &Model,
    ctx: &Context,
    want: &[Vec<u32>],
    cap: usize,
    stats: &mut Stats,
) -> Result<KvCache> {
    let t0 = Instant::now();
    let n_layers = model.n_layers();
    if want.len() != n_layers {
        return Err(Error::InvalidInput(format!(
            "rows asked for {} layers, the model has {n_layers}",
            want.len()
        )));
    }
    let cap = cap.max(want.iter().map(Vec::len).max().unwrap_or(0));
    // Layers asking for the same rows share one list of (segment, stored row) entries.
    let mut ranges = Vec::with_capacity(2 * n_layers);
    let mut entries: Vec<u32> = Vec::new();
    let mut first_of: Vec<usize> = Vec::with_capacity(n_layers);
    for (l, rows) in want.iter().enumerate() {
        match (0..l).find(|&e| first_of[e] == e && want[e] == *rows) {
            Some(e) => {
                first_of.push(e);
                ranges.extend([ranges[2 * e], ranges[2 * e + 1]]);
            }
            None => {
                first_of.push(l);
                ranges.extend([(entries.len() / 2) as u32, rows.len() as u32]);
                entries.extend(locate(ctx, rows)?.into_iter().flatten());
            }
        }
    }
    // One rotation per segment: every row of a segment moves by the same delta.
    let t1 = Instant::now();
    let deltas: Vec<i64> = ctx
        .segments
        .iter()
        .map(|s| s.start as i64 - s.kv.meta.positions.first().copied().unwrap_or(0) as i64)
        .collect();
    let (dt, dev) = (model.dtype(), model.device());
    let sources = (0..n_layers)
        .map(|l| {
            let seg = ctx.segments.iter();
            seg.map(|s| {
                let k = s.kv.k[l].to_device(dev)?.to_dtype(dt)?;
                let v = s.kv.v[l].to_device(dev)?.to_dtype(dt)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    #[cfg(feature = "cuda")]
    {
        let (cos, sin) =
            model
                .rope
                .tables(&deltas, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let rope = Tensor::cat(&[cos, sin], 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Only layers with rows get room (SamKV's scoring loads 4 layers of 32).
        let used: Vec<usize> = (0..n_layers).filter(|&l| !want[l].is_empty()).collect();
        let used_sources: Vec<_> = used.iter().map(|&l| sources[l].clone()).collect();
        let used_ranges: Vec<u32> = used
            .iter()
            .flat_map(|&l| [ranges[2 * l], ranges[2 * l + 1]])
            .collect();
        let plan = crate::model::cuda::gather::GatherPlan {
            sources: &used_sources,
            ranges: &used_ranges,
            entries: &entries,
            rope: &rope,
            layout: model.rope.layout,
            cap,
        };
        if let Some(all) = crate::model::cuda::gather::gather_kv(&plan)? {
            // One kernel moves and rotates: its time is the load's.
            let c = &model.cfg;
            let mut slot = 0;
            let layers = want.iter().map(|rows| {
                if rows.is_empty() {
                    return LayerKv::empty(c.n_kv_heads, c.head_dim, dt, dev);
                }
                let layer = all.get(slot)?;
                slot += 1;
                LayerKv::from_buffer(layer.get(0)?, layer.get(1)?, rows.clone())
            });
            let cache = KvCache {
                layers: layers.collect::<Result<Vec<_>>>()?,
            };
            stats.load_ms += t0.elapsed().as_secs_f64() * 1e3;
            return Ok(cache);
        }
    }
    let mut reposition = t1.elapsed().as_secs_f64();
    let c = &model.cfg;
    let mut tables = Vec::with_capacity(deltas.len());
    for (s, &d) in ctx.segments.iter().zip(&deltas) {
        tables.push(match d {
            0 => None,
            d => Some(model.rope.tables(&vec![d; s.len()], dt, dev)?),
        });
    }
    let mut layers = Vec::with_capacity(n_layers);
    for (l, rows) in want.iter().enumerate() {
        let mut layer = LayerKv::with_capacity(c.n_kv_heads, cap, c.head_dim, dt, dev)?;
        let e = first_of[l];
        let span = ranges[2 * e] as usize..(ranges[2 * e] + ranges[2 * e + 1]) as usize;
        let mine = &entries[2 * span.start..2 * span.end];
        let mut at = 0;
        for (seg, ((k, v), table)) in sources[l].iter().zip(&tables).enumerate() {
            // This segment's rows are a consecutive run of the (position-sorted) entries.
            let n = mine[2 * at..]
                .chunks(2)
                .take_while(|e| e[0] as usize == seg)
                .count();
            if n == 0 {
                continue;
            }
            let src_rows: Vec<u32> = mine[2 * at..2 * (at + n)].chunks(2).map(|e| e[1]).collect();
            let (k, v) = if n == ctx.segments[seg].len() {
                (k.clone(), v.clone())
            } else {
                let idx = Tensor::new(src_rows.as_slice(), dev)?;
                (k.index_select(&idx, 1)?, v.index_select(&idx, 1)?)
            };
            let t2 = Instant::now();
            let k = match table {
                Some((cos, sin)) => {
                    model
                        .rope
                        .apply(&k, &cos.narrow(0, 0, n)?, &sin.narrow(0, 0, n)?)?
                }
                None => k,
            };
            reposition += t2.elapsed().as_secs_f64();
            layer.append(&k, &v, &rows[at..at + n])?;
            at += n;
        }
        layers.push(layer);
    }
    stats.reposition_ms += reposition * 1e3;
    stats.load_ms += (t0.elapsed().as_secs_f64() - reposition) * 1e3;
    Ok(KvCache { layers })
}

/// (segment, row in its stored cache) of each position; errors for one outside the context
/// or out of order.
fn locate(ctx: &Context, rows: &[u32]) -> Result<Vec<[u32; 2]>> {
    if !rows.windows(2).all(|w| w[0] < w[1]) {
        return Err(Error::InvalidInput(
            "rows to load must be sorted by position, each once".into(),
        ));
    }
    let starts: Vec<u32> = ctx.segments.iter().map(|s| s.start).collect();
    rows.iter()
        .map(|&p| {
            let seg = starts.partition_point(|&s| s <= p).checked_sub(1);
            match seg.map(|i| (i, &ctx.segments[i])) {
                Some((i, s)) if s.positions().contains(&p) => Ok([i as u32, p - s.start]),
                _ => Err(Error::InvalidInput(format!(
                    "position {p} is in no document of the request"
                ))),
            }
        })
        .collect()
}
