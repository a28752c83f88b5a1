//! Ops candle lacks for training with frozen weights.

use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

/// `x · w_t` for a frozen, pre-transposed weight `w_t` of shape `[in, out]` and `x` of shape
/// `[n, in]`.
///
/// candle's matmul backward always computes both operand gradients, so every frozen weight
/// would get a full-size gradient (the whole model's worth of memory and a third of the
/// backward FLOPs) that is then thrown away. When `x` is part of an autograd graph this op
/// records a backward that returns only `∂L/∂x = g · w_tᵀ`.
pub(crate) fn frozen_linear(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    if !x.track_op() || !x.device().is_cpu() {
        return Ok(x.matmul(w_t)?);
    }
    let x = x.contiguous()?;
    Ok(x.apply_op1(FrozenLinear { w_t: w_t.clone() })?)
}

struct FrozenLinear {
    w_t: Tensor,
}

fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("frozen_linear: input must be contiguous".into()))?;
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], layout.shape(), &Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], layout.shape(), &Device::Cpu),
        _ => candle_core::bail!("frozen_linear: only f32 and f64 are supported"),
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_tensor(storage, layout)?;
        // Neither operand tracks gradients here, so this matmul records nothing.
        let y = x.matmul(&self.w_t)?;
        let shape = y.shape().clone();
        let flat = y.flatten_all()?;
        let out = match y.dtype() {
            DType::F32 => CpuStorage::F32(flat.to_vec1()?),
            DType::F64 => CpuStorage::F64(flat.to_vec1()?),
            dt => candle_core::bail!("frozen_linear: unsupported dtype {dt:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.w_t.t()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn frozen_linear_matches_matmul_and_its_input_gradient() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let y1 = frozen_linear(x.as_tensor(), &w.t().unwrap()).unwrap();
        let y2 = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let d = (&y1 - &y2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6);
        let g1 = (y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let a = g1.get(x.as_tensor()).unwrap();
        let b = g2.get(x.as_tensor()).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5);
        // The point of the op: no gradient is computed for the frozen weight.
        assert!(g1.get(&w).is_none());
        assert!(g1.get_ids().count() < g2.get_ids().count());
    }
}
