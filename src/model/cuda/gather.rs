//! The launcher of kernels.cu's `gather_kv`: stored per-document K/V rows laid out as one
//! request's cache, keys moved to their global positions, in one launch for every layer.
//! Built per (layer, segment) from candle's ops this was a RoPE and two copies each: 350
//! launches for ten documents on a 32-layer model, which made loading launch-bound.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_only, enabled, MODULE, PTX};
use crate::model::rope::RopeLayout;
use crate::Result;

/// Where every output row comes from; see [`gather_kv`].
pub struct GatherPlan<'a> {
    /// `sources[layer][segment]`: that segment's stored K and V, (kv_heads, T, head_dim).
    pub sources: &'a [Vec<(Tensor, Tensor)>],
    /// Per layer: (first entry, rows).
    pub ranges: &'a [u32],
    /// Per entry: (segment, row in the segment's stored cache), flattened.
    pub entries: &'a [u32],
    /// Per segment: cos then sin (head_dim / 2 each) of its position delta.
    pub rope: &'a [f32],
    pub layout: RopeLayout,
    /// Rows of room per layer in the output.
    pub cap: usize,
}

struct GatherKv<'a> {
    plan: &'a GatherPlan<'a>,
    h: usize,
    d: usize,
}

impl GatherKv<'_> {
    fn run<T: candle_core::cuda_backend::CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        dev: &CudaDevice,
        es: &CudaStorage,
        el: &Layout,
        name: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let p = self.plan;
        let (layers, nseg) = (p.sources.len(), p.sources[0].len());
        let stream = dev.cuda_stream();
        let size = std::mem::size_of::<T>() as u64;
        let guards: Vec<_> = p
            .sources
            .iter()
            .flatten()
            .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
            .collect();
        let mut table = Vec::with_capacity(4 * guards.len());
        // Held until the kernel is queued: they record the reads for candle's event tracking.
        let mut reads = Vec::with_capacity(2 * guards.len());
        for ((ks, kl), (vs, vl)) in &guards {
            let (kc, vc) = match (&**ks, &**vs) {
                (candle_core::Storage::Cuda(k), candle_core::Storage::Cuda(v)) => (k, v),
                _ => return Err(cuda_only("gather_kv sources")),
            };
            let (kp, kr) = kc.as_cuda_slice::<T>()?.device_ptr(&stream);
            let (vp, vr) = vc.as_cuda_slice::<T>()?.device_ptr(&stream);
            reads.push(kr);
            reads.push(vr);
            table.extend([
                (kp + kl.start_offset() as u64 * size) as i64,
                (vp + vl.start_offset() as u64 * size) as i64,
                kl.stride()[0] as i64,
                vl.stride()[0] as i64,
            ]);
        }
        let table = dev.clone_htod(&table)?;
        let ranges = dev.clone_htod(p.ranges)?;
        let rope = dev.clone_htod(p.rope)?;
        let entries = es.as_cuda_slice::<u32>()?.slice(el.start_offset()..);
        let out = dev.alloc_zeros::<T>(layers * 2 * self.h * p.cap * self.d)?;
        let (nseg_i, h_i, cap_i, d_i) = (nseg as i32, self.h as i32, p.cap as i32, self.d as i32);
        let il = (p.layout == RopeLayout::Interleaved) as i32;
        let func = dev.get_or_load_custom_func(&format!("gather_kv_{name}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&table)
            .arg(&ranges)
            .arg(&entries)
            .arg(&rope)
            .arg(&out);
        b.arg(&nseg_i).arg(&h_i).arg(&cap_i).arg(&d_i).arg(&il);
        let rows = p.ranges.chunks(2).map(|r| r[1]).max().unwrap_or(0);
        let cfg = LaunchConfig {
            grid_dim: (rows.clamp(1, 65535), layers as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        drop(reads);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((layers, 2, self.h, p.cap, self.d)),
        ))
    }
}

impl CustomOp1 for GatherKv<'_> {
    fn name(&self) -> &'static str {
        "samkv-gather-kv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_only(self.name()))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s.device().clone();
        match self.plan.sources[0][0].0.dtype() {
            DType::F32 => self.run::<f32>(&dev, s, l, "f32"),
            DType::BF16 => self.run::<bf16>(&dev, s, l, "bf16"),
            DType::F16 => self.run::<f16>(&dev, s, l, "f16"),
            dt => Err(candle_core::Error::Msg(format!(
                "samkv-gather-kv: {dt:?} is not supported"
            ))),
        }
    }
}

/// Every layer's rows gathered from the stored caches and rotated by their segment's delta:
/// (layers, 2, kv_heads, cap, head_dim), layer l's K in `[l][0]` and V in `[l][1]`, rows
/// `0..ranges[l].rows` valid and zeros after. None when the kernel does not take the inputs
/// (not CUDA, another dtype, sources not of one shape and dtype with packed rows).
pub fn gather_kv(plan: &GatherPlan) -> Result<Option<Tensor>> {
    let Some(first) = plan.sources.first().and_then(|s| s.first()) else {
        return Ok(None);
    };
    let dev = first.0.device();
    let dt = first.0.dtype();
    let (h, _, d) = first.0.dims3()?;
    let fits = |t: &Tensor| {
        t.device().same_device(dev)
            && t.dtype() == dt
            && t.rank() == 3
            && t.dim(0).ok() == Some(h)
            && t.dim(2).ok() == Some(d)
            && t.stride()[1] == d
            && t.stride()[2] == 1
    };
    let ok = enabled()
        && dev.is_cuda()
        && matches!(dt, DType::F32 | DType::BF16 | DType::F16)
        && d.is_multiple_of(2)
        && !plan.entries.is_empty()
        && plan.rope.len() == plan.sources[0].len() * d
        && plan.ranges.len() == 2 * plan.sources.len()
        && plan
            .sources
            .iter()
            .all(|l| l.len() == plan.sources[0].len())
        && plan
            .sources
            .iter()
            .flatten()
            .all(|(k, v)| fits(k) && fits(v));
    if !ok {
        return Ok(None);
    }
    let entries = Tensor::new(plan.entries, dev)?;
    Ok(Some(entries.apply_op1_no_bwd(&GatherKv { plan, h, d })?))
}
