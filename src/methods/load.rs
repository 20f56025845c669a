//! From the store into a request's cache: each document's stored rows moved to their global
//! positions (RoPE rotations compose, so a key stored at p is rotated by p' - p) and laid out
//! in position order. Reuse, CacheBlend, EPIC and Multi-InfLLM start from every row at every
//! layer ([`concat_caches`]); SamKV loads only the rows it reads ([`load_rows`]).
//!
//! On CUDA one kernel does it all (`crate::cuda::gather`); elsewhere, and as its reference,
//! candle's ops per (layer, segment).

use std::collections::HashMap;
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
    let cap = all.len() + room_after(ctx);
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
        return Err(Error::Internal(format!(
            "rows asked for {} layers, the model has {n_layers}",
            want.len()
        )));
    }
    let cap = cap.max(want.iter().map(Vec::len).max().unwrap_or(0));
    let mut rows = RowIndex::new(ctx, want)?;
    let sources = sources(model, ctx, want, &mut rows)?;
    // One rotation per segment: every row of a segment moves by the same delta.
    let deltas: Vec<i64> = ctx
        .segments
        .iter()
        .map(|s| s.start as i64 - s.kv.meta.positions.first().copied().unwrap_or(0) as i64)
        .collect();
    #[cfg(feature = "cuda")]
    if let Some(cache) = gather_on_device(model, want, &rows, &sources, &deltas, cap)? {
        // One kernel moves and rotates: its time is the load's.
        stats.load_ms += t0.elapsed().as_secs_f64() * 1e3;
        return Ok(cache);
    }
    let (cache, reposition) = load_by_ops(model, ctx, want, &rows, &sources, &deltas, cap)?;
    stats.reposition_ms += reposition * 1e3;
    stats.load_ms += (t0.elapsed().as_secs_f64() - reposition) * 1e3;
    Ok(cache)
}

/// Where each layer's rows come from: per layer (first entry, rows) in `ranges`, per entry
/// (segment, row in its stored cache) in `entries`, flattened. Layers asking for the same
/// rows share entries.
struct RowIndex {
    ranges: Vec<u32>,
    entries: Vec<u32>,
}

impl RowIndex {
    fn new(ctx: &Context, want: &[Vec<u32>]) -> Result<Self> {
        let mut ranges = Vec::with_capacity(2 * want.len());
        let mut entries: Vec<u32> = Vec::new();
        for (l, rows) in want.iter().enumerate() {
            match (0..l).find(|&e| want[e] == *rows) {
                Some(e) => ranges.extend_from_within(2 * e..2 * e + 2),
                None => {
                    ranges.extend([(entries.len() / 2) as u32, rows.len() as u32]);
                    entries.extend(locate(ctx, rows)?.into_iter().flatten());
                }
            }
        }
        Ok(Self { ranges, entries })
    }

    /// Rewrites the entries of the segments marked `away` to index their rows as picked, in
    /// order, per distinct range and segment; returns those picks (stored rows) by range.
    fn compact(&mut self, away: &[bool]) -> HashMap<(u32, u32), Vec<Vec<u32>>> {
        let mut picks: HashMap<(u32, u32), Vec<Vec<u32>>> = HashMap::new();
        for l in 0..self.ranges.len() / 2 {
            let range = self.range(l);
            if picks.contains_key(&range) {
                continue; // shared with an earlier layer: already rewritten
            }
            let mut lists = vec![Vec::new(); away.len()];
            let (first, n) = (range.0 as usize, range.1 as usize);
            for e in self.entries[2 * first..2 * (first + n)].chunks_mut(2) {
                let seg = e[0] as usize;
                if away[seg] {
                    lists[seg].push(e[1]);
                    e[1] = (lists[seg].len() - 1) as u32;
                }
            }
            picks.insert(range, lists);
        }
        picks
    }

    /// Layer l's (first entry, rows).
    fn range(&self, l: usize) -> (u32, u32) {
        (self.ranges[2 * l], self.ranges[2 * l + 1])
    }

    /// Layer l's (segment, stored row) entries.
    fn of(&self, l: usize) -> &[u32] {
        let (first, n) = self.range(l);
        &self.entries[2 * first as usize..2 * (first + n) as usize]
    }
}

/// `sources[layer][segment]`: the stored K and V on the model's device and dtype, for the
/// layers that get rows (others: none). A document held elsewhere (host memory, after a disk
/// read, while the model runs on a GPU) crosses row by row: only the rows this call reads are
/// picked and moved, and `rows` is rewritten to index them. Errors (rather than reading past
/// them) for caches that do not fit the model or the request.
fn sources(
    model: &Model,
    ctx: &Context,
    want: &[Vec<u32>],
    rows: &mut RowIndex,
) -> Result<Vec<Vec<(Tensor, Tensor)>>> {
    let (dt, dev) = (model.dtype(), model.device());
    for (l, s) in (0..model.n_layers()).flat_map(|l| ctx.segments.iter().map(move |s| (l, s))) {
        let fits = |t: Option<&Tensor>| t.is_some_and(|t| t.dim(1).ok() == Some(s.len()));
        if !fits(s.kv.k.get(l)) || !fits(s.kv.v.get(l)) {
            return Err(Error::InvalidInput(format!(
                "stored document {} has no K/V of {} rows at layer {l} (one per token of it in \
                 this request); re-ingest it with this model",
                s.kv.id,
                s.len()
            )));
        }
    }
    let away: Vec<bool> = ctx
        .segments
        .iter()
        .map(|s| !s.kv.k[0].device().same_device(dev))
        .collect();
    let picks = if away.contains(&true) {
        rows.compact(&away)
    } else {
        Default::default()
    };
    let cpu = |r: &[u32]| Tensor::new(r, &candle_core::Device::Cpu);
    (0..model.n_layers())
        .map(|l| {
            if want[l].is_empty() {
                return Ok(Vec::new());
            }
            let range = rows.range(l);
            let seg = ctx.segments.iter().enumerate();
            seg.map(|(i, s)| {
                match picks.get(&range).map(|p| p[i].as_slice()) {
                    // Every row (in order: entries are sorted) moves as it is. Row 0 where
                    // this layer reads none of it: the kernel's table wants an entry.
                    Some(p) if away[i] && p.len() < s.len() => {
                        let idx = cpu(if p.is_empty() { &[0] } else { p })?;
                        s.kv.layer_kv(l, Some(&idx), dev, dt)
                    }
                    _ => s.kv.layer_kv(l, None, dev, dt),
                }
            })
            .collect::<Result<Vec<_>>>()
        })
        .collect()
}

/// The CUDA path: every layer with rows in one `gather_kv` launch. None where the kernel does
/// not take the inputs (the caller falls back to [`load_by_ops`]).
#[cfg(feature = "cuda")]
fn gather_on_device(
    model: &Model,
    want: &[Vec<u32>],
    rows: &RowIndex,
    sources: &[Vec<(Tensor, Tensor)>],
    deltas: &[i64],
    cap: usize,
) -> Result<Option<KvCache>> {
    use crate::cuda::gather::{gather_kv, GatherPlan};
    let cpu = candle_core::Device::Cpu;
    let (cos, sin) = model.rope.tables(deltas, candle_core::DType::F32, &cpu)?;
    let rope = Tensor::cat(&[cos, sin], 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // Only layers with rows get room (SamKV's scoring loads 4 layers of 32).
    let used: Vec<usize> = (0..want.len()).filter(|&l| !want[l].is_empty()).collect();
    let used_sources: Vec<_> = used.iter().map(|&l| sources[l].clone()).collect();
    let used_ranges: Vec<u32> = used
        .iter()
        .flat_map(|&l| <[u32; 2]>::from(rows.range(l)))
        .collect();
    let plan = GatherPlan {
        sources: &used_sources,
        ranges: &used_ranges,
        entries: &rows.entries,
        rope: &rope,
        interleaved: model.rope.layout == crate::model::RopeLayout::Interleaved,
        cap,
    };
    let Some(all) = gather_kv(&plan)? else {
        return Ok(None);
    };
    let c = &model.cfg;
    let mut slot = 0;
    let layers = want.iter().map(|rows| {
        if rows.is_empty() {
            return LayerKv::empty(c.n_kv_heads, c.head_dim, model.dtype(), model.device());
        }
        let layer = all.get(slot)?;
        slot += 1;
        LayerKv::from_buffer(layer.get(0)?, layer.get(1)?, rows.clone())
    });
    Ok(Some(KvCache {
        layers: layers.collect::<Result<Vec<_>>>()?,
    }))
}

/// candle's ops per (layer, segment): the rows picked, keys rotated, appended in order.
/// Returns the cache and the seconds spent rotating.
fn load_by_ops(
    model: &Model,
    ctx: &Context,
    want: &[Vec<u32>],
    rows: &RowIndex,
    sources: &[Vec<(Tensor, Tensor)>],
    deltas: &[i64],
    cap: usize,
) -> Result<(KvCache, f64)> {
    let t = Instant::now();
    let (c, dt, dev) = (&model.cfg, model.dtype(), model.device());
    let mut tables = Vec::with_capacity(deltas.len());
    for (s, &d) in ctx.segments.iter().zip(deltas) {
        tables.push(match d {
            0 => None,
            d => Some(model.rope.tables(&vec![d; s.len()], dt, dev)?),
        });
    }
    let mut reposition = t.elapsed().as_secs_f64();
    let mut layers = Vec::with_capacity(want.len());
    for (l, pos) in want.iter().enumerate() {
        let mut layer = LayerKv::with_capacity(c.n_kv_heads, cap, c.head_dim, dt, dev)?;
        let mine = rows.of(l);
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
            let (k, v) = if n == k.dim(1)? {
                (k.clone(), v.clone())
            } else {
                let src: Vec<u32> = mine[2 * at..2 * (at + n)].chunks(2).map(|e| e[1]).collect();
                let idx = Tensor::new(src.as_slice(), dev)?;
                (k.index_select(&idx, 1)?, v.index_select(&idx, 1)?)
            };
            let t = Instant::now();
            let k = match table {
                Some((cos, sin)) => {
                    let (cos, sin) = (cos.narrow(0, 0, n)?, sin.narrow(0, 0, n)?);
                    model.rope.apply(&k, &cos, &sin)?
                }
                None => k,
            };
            reposition += t.elapsed().as_secs_f64();
            layer.append(&k, &v, &pos[at..at + n])?;
            at += n;
        }
        layers.push(layer);
    }
    Ok((KvCache { layers }, reposition))
}

/// (segment, row in its stored cache) of each position; errors for one outside the context
/// or out of order.
fn locate(ctx: &Context, rows: &[u32]) -> Result<Vec<[u32; 2]>> {
    if !rows.windows(2).all(|w| w[0] < w[1]) {
        return Err(Error::Internal(
            "rows to load must be sorted by position, each once".into(),
        ));
    }
    let starts: Vec<u32> = ctx.segments.iter().map(|s| s.start).collect();
    rows.iter()
        .map(|&p| {
            let seg = starts.partition_point(|&s| s <= p).checked_sub(1);
            match seg.map(|i| (i, &ctx.segments[i])) {
                Some((i, s)) if s.positions().contains(&p) => Ok([i as u32, p - s.start]),
                _ => Err(Error::Internal(format!(
                    "position {p} is in no document of the request"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_documents_held_elsewhere_are_reindexed_as_picked() {
        // Layers 0 and 1 share entries; segment 0 is on the model's device, 1 and 2 are not.
        let mut rows = RowIndex {
            ranges: vec![0, 3, 0, 3, 3, 2],
            entries: vec![0, 5, 1, 2, 1, 7, 1, 1, 2, 4],
        };
        let picks = rows.compact(&[false, true, true]);
        assert_eq!(rows.of(0), &[0, 5, 1, 0, 1, 1]);
        assert_eq!(rows.of(1), rows.of(0));
        assert_eq!(rows.of(2), &[1, 0, 2, 0]);
        assert_eq!(picks[&(0, 3)], vec![vec![], vec![2, 7], vec![]]);
        assert_eq!(picks[&(3, 2)], vec![vec![], vec![1], vec![4]]);
    }
}
