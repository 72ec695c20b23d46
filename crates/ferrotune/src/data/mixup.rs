//! timm's batch mixup and CutMix (`timm.data.Mixup` in `batch` mode): a training batch of
//! images is blended with itself reversed, and so are its targets.
//!
//! Per batch: with probability `mixup_prob` the batch is mixed; with both methods on,
//! CutMix is chosen with probability `mixup_switch_prob`. The weight `λ` of the batch's own
//! images is drawn from Beta(α, α) of the chosen method. Mixup takes `λ·x + (1 − λ)·x'`
//! (`x'` the batch reversed); CutMix pastes the box of `x'` whose sides are
//! `⌊side·√(1 − λ)⌋` around a uniformly drawn centre (clipped to the image), and sets `λ`
//! to the share of the image left unpasted. The loss is `λ·loss(y) + (1 − λ)·loss(y')`
//! ([`Targets::Mixed`]), which for cross-entropy equals the loss against timm's blended
//! soft targets (label smoothing applied to each).

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

use crate::error::{Error, Result};
use crate::loss::Targets;
use crate::nn::{Batch, PixelBatch};

/// The recipe's mixing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixConfig {
    /// Beta parameter of mixup (0: off).
    pub mixup_alpha: f64,
    /// Beta parameter of CutMix (0: off).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed.
    pub prob: f64,
    /// With both on, the probability of CutMix.
    pub switch_prob: f64,
}

/// What was done to a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mix {
    /// Left as it was.
    None,
    /// Blended with weight `λ`.
    Mixup(f64),
    /// The box `rows y0..y1, columns x0..x1` pasted in; `λ` the share left.
    CutMix {
        /// First row of the box.
        y0: usize,
        /// One past its last row.
        y1: usize,
        /// First column.
        x0: usize,
        /// One past its last column.
        x1: usize,
        /// Share of the image not pasted over.
        lam: f64,
    },
}

fn beta(alpha: f64, rng: &mut ChaCha8Rng) -> Result<f64> {
    let d = Beta::new(alpha, alpha)
        .map_err(|e| Error::Config(format!("mixup: Beta({alpha}, {alpha}): {e}")))?;
    Ok(d.sample(rng))
}

impl MixConfig {
    /// Draws what to do with a batch of `h × w` images, from `seed`.
    pub fn draw(&self, h: usize, w: usize, seed: u64) -> Result<Mix> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (m, c) = (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0);
        if !(m || c) || rng.random::<f64>() >= self.prob {
            return Ok(Mix::None);
        }
        let cutmix = match (m, c) {
            (true, true) => rng.random::<f64>() < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        if !cutmix {
            return Ok(Mix::Mixup(beta(self.mixup_alpha, &mut rng)?));
        }
        let lam = beta(self.cutmix_alpha, &mut rng)?;
        let ratio = (1.0 - lam).max(0.0).sqrt();
        let (ch, cw) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
        let cy = rng.random_range(0..h.max(1));
        let cx = rng.random_range(0..w.max(1));
        let y0 = cy.saturating_sub(ch / 2);
        let y1 = (cy + ch / 2).min(h);
        let x0 = cx.saturating_sub(cw / 2);
        let x1 = (cx + cw / 2).min(w);
        let area = (y1 - y0) * (x1 - x0);
        Ok(Mix::CutMix {
            y0,
            y1,
            x0,
            x1,
            lam: 1.0 - area as f64 / (h * w).max(1) as f64,
        })
    }
}

/// `batch` and `targets` mixed as `mix` says (the partner of image `i` is image
/// `n − 1 − i`).
pub fn apply(batch: Batch, targets: Targets, mix: Mix) -> Result<(Batch, Targets)> {
    let lam = match mix {
        Mix::None => return Ok((batch, targets)),
        Mix::Mixup(l) => l,
        Mix::CutMix { lam, .. } => lam,
    };
    let Batch::Pixels(PixelBatch { pixels }) = batch else {
        return Err(Error::Config(
            "mixup and CutMix apply to image models only".into(),
        ));
    };
    let (n, h, w, c) = pixels.dims4()?;
    let x = pixels.flatten_all()?.to_vec1::<f32>()?;
    let img = h * w * c;
    let mut out = x.clone();
    for i in 0..n {
        let (me, other) = (i * img, (n - 1 - i) * img);
        match mix {
            Mix::Mixup(l) => {
                let (a, b) = (l as f32, (1.0 - l) as f32);
                for k in 0..img {
                    out[me + k] = a * x[me + k] + b * x[other + k];
                }
            }
            Mix::CutMix { y0, y1, x0, x1, .. } => {
                for y in y0..y1 {
                    let row = (y * w + x0) * c..(y * w + x1) * c;
                    out[me + row.start..me + row.end]
                        .copy_from_slice(&x[other + row.start..other + row.end]);
                }
            }
            Mix::None => {}
        }
    }
    let pixels = Tensor::from_vec(out, (n, h, w, c), pixels.device())?;
    let reversed = match &targets {
        Targets::Classes(t) => Targets::Classes(t.flip(&[0])?),
        Targets::Multi(t) => Targets::Multi(t.flip(&[0])?),
        Targets::Values(_) | Targets::Tokens(_) | Targets::Mixed { .. } => {
            return Err(Error::Config(
                "mixup and CutMix apply to classification targets only".into(),
            ))
        }
    };
    Ok((
        Batch::Pixels(PixelBatch { pixels }),
        Targets::Mixed {
            a: Box::new(targets),
            b: Box::new(reversed),
            lam,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn batch() -> (Batch, Targets) {
        // 3 images of 4×5, 3 channels: image i's values are i·100 + position.
        let v: Vec<f32> = (0..3)
            .flat_map(|i| (0..60).map(move |p| (i * 100 + p) as f32))
            .collect();
        let pixels = Tensor::from_vec(v, (3, 4, 5, 3), &Device::Cpu).unwrap();
        let y = Targets::Classes(Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap());
        (Batch::Pixels(PixelBatch { pixels }), y)
    }

    fn pixels(b: &Batch) -> Vec<f32> {
        b.pixels()
            .unwrap()
            .pixels
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn mixup_blends_each_image_with_its_mirror() {
        let (b, y) = batch();
        let x = pixels(&b);
        let (m, t) = apply(b, y, Mix::Mixup(0.75)).unwrap();
        let got = pixels(&m);
        for i in 0..3 {
            for p in 0..60 {
                let want = 0.75 * x[i * 60 + p] + 0.25 * x[(2 - i) * 60 + p];
                assert!((got[i * 60 + p] - want).abs() < 1e-4);
            }
        }
        let Targets::Mixed { a, b, lam } = t else {
            panic!("not mixed")
        };
        assert_eq!(lam, 0.75);
        let ids = |t: &Targets| match t {
            Targets::Classes(t) => t.to_vec1::<u32>().unwrap(),
            _ => panic!("not classes"),
        };
        assert_eq!((ids(&a), ids(&b)), (vec![0, 1, 2], vec![2, 1, 0]));
    }

    #[test]
    fn cutmix_pastes_the_box_and_lambda_is_what_is_left() {
        let (b, y) = batch();
        let x = pixels(&b);
        let mix = Mix::CutMix {
            y0: 1,
            y1: 3,
            x0: 2,
            x1: 5,
            lam: 1.0 - 6.0 / 20.0,
        };
        let (m, _) = apply(b, y, mix).unwrap();
        let got = pixels(&m);
        for i in 0..3 {
            for yy in 0..4 {
                for xx in 0..5 {
                    let inside = (1..3).contains(&yy) && (2..5).contains(&xx);
                    let src = if inside { 2 - i } else { i };
                    for ch in 0..3 {
                        let p = (yy * 5 + xx) * 3 + ch;
                        assert_eq!(got[i * 60 + p], x[src * 60 + p]);
                    }
                }
            }
        }
        // Drawn boxes lie inside the image and λ is the share not pasted over.
        let cfg = MixConfig {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
        };
        for seed in 0..50 {
            match cfg.draw(7, 9, seed).unwrap() {
                Mix::CutMix {
                    y0,
                    y1,
                    x0,
                    x1,
                    lam,
                } => {
                    assert!(y0 <= y1 && y1 <= 7 && x0 <= x1 && x1 <= 9);
                    let want = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / 63.0;
                    assert!((lam - want).abs() < 1e-12);
                }
                other => panic!("expected CutMix, got {other:?}"),
            }
        }
    }

    #[test]
    fn draws_are_seeded_and_respect_the_probabilities() {
        let both = MixConfig {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
        };
        assert_eq!(both.draw(8, 8, 3).unwrap(), both.draw(8, 8, 3).unwrap());
        let kinds: Vec<Mix> = (0..200).map(|s| both.draw(8, 8, s).unwrap()).collect();
        let cut = kinds
            .iter()
            .filter(|m| matches!(m, Mix::CutMix { .. }))
            .count();
        assert!((60..140).contains(&cut), "{cut} of 200 CutMix");
        let never = MixConfig { prob: 0.0, ..both };
        assert!((0..50).all(|s| never.draw(8, 8, s).unwrap() == Mix::None));
        // Text batches and regression targets are refused.
        let (b, _) = batch();
        let v =
            Targets::Values(Tensor::zeros((3, 1), candle_core::DType::F32, &Device::Cpu).unwrap());
        assert!(apply(b, v, Mix::Mixup(0.5)).is_err());
    }
}
