//! The `q8` storage dtype: K and V as 8-bit integers with one f16 scale per block of
//! [`BLOCK`] channels of one token row of one head.
//!
//! Why blocks along head_dim rather than one scale per (head, token) row: keys carry a few
//! outlier channels (RoPE pairs with large magnitude) whose size would set the scale of the whole
//! row and leave the other channels with a handful of levels; a 32-channel block confines an
//! outlier to its block. Measured on SmolLM2, 3 MuSiQue prompts of ~6k tokens (docs/RESULTS.md,
//! "8-bit storage"; `q8_block_size_measurement` in tests/engine.rs): one scale per 64-channel
//! row gave a 1.2-2.3x larger first-token KL against the f32 store than 32-channel blocks, for
//! 3% fewer bytes (scales cost 1/16 of the data with blocks of 32, 1/32 with whole rows).
//! Why per token row rather than per channel across tokens (KIVI): a row's scales travel with
//! the row, so SamKV's row selection and a partial load pick data and scales with the same
//! index, and a document's rows never depend on each other.
//!
//! Layout: data `u8` holding `q + 128` for q in -127..=127 (candle has no i8), shape
//! (n_kv_heads, T, head_dim); scales `f16`, shape (n_kv_heads, T, head_dim / block). Value =
//! (data - 128) * scale; the error of each element is at most scale / 2. The block size is not
//! recorded: it is head_dim / scales.dim(2), so a reader takes any block that divides head_dim.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Channels per scale where head_dim allows (see the module docs for why 32).
pub const BLOCK: usize = 32;

/// Smallest scale written: f16's smallest normal number. A block of zeros (or of tiny values)
/// would otherwise get scale 0 (a division by zero) or a subnormal that loses precision.
const MIN_SCALE: f64 = 6.103_515_625e-5;

/// The block size used for a head of `head_dim` channels: [`BLOCK`] if it divides head_dim,
/// else the whole row.
pub fn block_for(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(BLOCK) {
        BLOCK
    } else {
        head_dim
    }
}

/// Quantizes `x` (n_kv_heads, T, head_dim), any float dtype on any device, with blocks of
/// `block` channels; returns (data u8, scales f16) on x's device.
pub fn quantize(x: &Tensor, block: usize) -> Result<(Tensor, Tensor)> {
    let (h, t, d) = x.dims3()?;
    if block == 0 || !d.is_multiple_of(block) {
        return Err(Error::InvalidInput(format!(
            "q8 block of {block} channels does not divide head_dim {d}"
        )));
    }
    let nb = d / block;
    let x = x.to_dtype(DType::F32)?.reshape((h, t, nb, block))?;
    let amax = x.abs()?.max_keepdim(D::Minus1)?;
    // The scale is rounded to f16 before dividing, so data and the stored scale agree exactly.
    let scale = (amax / 127.0)?
        .maximum(MIN_SCALE)?
        .to_dtype(DType::F16)?
        .to_dtype(DType::F32)?;
    let q = x
        .broadcast_div(&scale)?
        .round()?
        .clamp(-127f32, 127f32)?
        .affine(1.0, 128.0)?
        .to_dtype(DType::U8)?
        .reshape((h, t, d))?;
    let scale = scale.squeeze(D::Minus1)?.to_dtype(DType::F16)?;
    Ok((q, scale))
}

/// The values of (data, scales) as `dt`, on their device.
pub fn dequantize(q: &Tensor, scale: &Tensor, dt: DType) -> Result<Tensor> {
    let (h, t, d) = q.dims3()?;
    let nb = scale.dim(D::Minus1)?;
    check_shapes(q.dims(), scale.dims()).map_err(Error::InvalidInput)?;
    let x = q
        .to_dtype(DType::F32)?
        .affine(1.0, -128.0)?
        .reshape((h, t, nb, d / nb))?
        .broadcast_mul(&scale.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?)?
        .reshape((h, t, d))?;
    Ok(x.to_dtype(dt)?)
}

/// Whether data of shape `q` and scales of shape `s` belong together; the message says why not.
pub fn check_shapes(q: &[usize], s: &[usize]) -> std::result::Result<(), String> {
    match (q, s) {
        ([h, t, d], [sh, st, nb]) if h == sh && t == st && *nb > 0 && d.is_multiple_of(*nb) => {
            Ok(())
        }
        _ => Err(format!(
            "q8 scales of shape {s:?} do not fit data of shape {q:?} (need (n_kv_heads, T, \
             head_dim / block) with a block that divides head_dim)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn error_is_within_half_a_scale() -> Result<()> {
        let dev = Device::Cpu;
        // An outlier channel, a zero block and tiny values: the cases a scale can get wrong.
        let mut x = Tensor::randn(0f32, 1f32, (2, 5, 64), &dev)?.to_vec3::<f32>()?;
        x[0][0][3] = 40.0;
        x[1][2][32..].iter_mut().for_each(|v| *v = 0.0);
        x[1][3].iter_mut().for_each(|v| *v *= 1e-6);
        let x = Tensor::new(x, &dev)?;
        for block in [32, 64] {
            let (q, s) = quantize(&x, block)?;
            assert_eq!(q.dims(), &[2, 5, 64]);
            assert_eq!(q.dtype(), DType::U8);
            assert_eq!(s.dims(), &[2, 5, 64 / block]);
            assert_eq!(s.dtype(), DType::F16);
            let y = dequantize(&q, &s, DType::F32)?.to_vec3::<f32>()?;
            let xs = x.to_vec3::<f32>()?;
            let ss = s.to_dtype(DType::F32)?.to_vec3::<f32>()?;
            for h in 0..2 {
                for t in 0..5 {
                    for c in 0..64 {
                        let sc = ss[h][t][c / block];
                        let err = (xs[h][t][c] - y[h][t][c]).abs();
                        assert!(err <= sc / 2.0 + 1e-7, "({h},{t},{c}) err {err} scale {sc}");
                    }
                }
            }
            // The zero block comes back as zeros.
            assert!(y[1][2][32..].iter().all(|v| *v == 0.0));
        }
        // The outlier sets only its own block's scale.
        let (_, s) = quantize(&x, 32)?;
        let s = s.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        assert!(s[0][0][0] > 0.3 && s[0][0][1] < 0.1, "{:?}", s[0][0]);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_refused() -> Result<()> {
        let x = Tensor::zeros((1, 2, 48), DType::F32, &Device::Cpu)?;
        assert!(quantize(&x, 32).is_err());
        assert_eq!(block_for(48), 48);
        assert_eq!(block_for(128), 32);
        let q = Tensor::zeros((1, 2, 64), DType::U8, &Device::Cpu)?;
        let s = Tensor::zeros((1, 3, 2), DType::F16, &Device::Cpu)?;
        assert!(dequantize(&q, &s, DType::F32).is_err());
        assert!(check_shapes(&[1, 2, 64], &[1, 2, 3]).is_err());
        assert!(check_shapes(&[1, 2, 64], &[1, 2, 2]).is_ok());
        Ok(())
    }
}
