//! Loss functions, with their formulas.

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::models::bert::log_softmax_last;

/// Mean cross-entropy of `logits` `(N, C)` against class ids `targets` `(N,)` (u32):
///
/// `L = -(1/N) Σᵢ log softmax(zᵢ)[yᵢ]`
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?;
    Ok(picked.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn cross_entropy_value_and_gradient() {
        // Reference: torch.nn.functional.cross_entropy on the same numbers.
        // z = [[1, 2, 3], [1, -1, 0]], y = [2, 0]
        let z = Var::from_vec(vec![1f32, 2., 3., 1., -1., 0.], (2, 3), &Device::Cpu).unwrap();
        let y = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let l = cross_entropy(z.as_tensor(), &y).unwrap();
        let v = l.to_scalar::<f32>().unwrap();
        // log-sum-exp(1,2,3) = 3.40760596; lse(1,-1,0) = 1.40760596
        let expect = ((3.407_605_964_4 - 3.0) + (1.407_605_964_4 - 1.0)) / 2.0;
        assert!((v as f64 - expect).abs() < 1e-6, "{v} vs {expect}");
        let g = l.backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // d/dz = (softmax(z) - onehot(y)) / N
        let sm0 = [0.090_030_57, 0.244_728_47, 0.665_240_96];
        let sm1 = [0.665_240_96, 0.090_030_57, 0.244_728_47];
        let want = [
            [sm0[0] / 2., sm0[1] / 2., (sm0[2] - 1.) / 2.],
            [(sm1[0] - 1.) / 2., sm1[1] / 2., sm1[2] / 2.],
        ];
        for r in 0..2 {
            for c in 0..3 {
                assert!((g[r][c] as f64 - want[r][c]).abs() < 1e-6);
            }
        }
    }
}
