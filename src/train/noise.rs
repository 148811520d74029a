//! A training step's Gaussian noise, drawn on the host one step ahead.
//!
//! DM-Deg's pixel noise, the posterior sample's and the diffusion noise eps come from
//! seeded host generators (`crate::rng`), so a resumed run draws the same bytes. At
//! 512 px with 3+3 images that is 4.8 M normals, 20-30 ms of one core: on a GPU the
//! device would sit idle for it at the start of every step. A worker thread draws step
//! d+1's noise while step d runs; the values do not depend on which thread drew them.

use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::rng::{normals, step_rng, Stream};

/// The element counts of a step's noise tensors: pixels, and latents (posterior and eps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoiseSizes {
    pub pixels: [usize; 4],
    pub latents: [usize; 4],
}

/// One step's standard normal noise on the host.
#[derive(Debug, PartialEq)]
pub struct StepNoise {
    step: usize,
    sizes: NoiseSizes,
    dm_deg: Vec<f32>,
    posterior: Vec<f32>,
    eps: Vec<f32>,
}

impl StepNoise {
    /// Step `d`'s noise, each tensor from its own (seed, d) stream.
    pub fn draw(seed: u64, d: usize, sizes: NoiseSizes) -> Self {
        let n = |dims: [usize; 4]| dims.iter().product();
        let draw = |stream, dims| normals(&mut step_rng(seed, d, stream), n(dims));
        Self {
            step: d,
            sizes,
            dm_deg: draw(Stream::DmDeg, sizes.pixels),
            posterior: draw(Stream::Posterior, sizes.latents),
            eps: draw(Stream::Eps, sizes.latents),
        }
    }

    /// The three tensors on `device`: DM-Deg's `[b, 3, h, w]`, the posterior's and eps
    /// `[b, c, h/8, w/8]`.
    pub fn upload(self, device: &Device) -> Result<[Tensor; 3]> {
        let (p, l) = (self.sizes.pixels, self.sizes.latents);
        Ok([
            Tensor::from_vec(self.dm_deg, p.as_slice(), device)?,
            Tensor::from_vec(self.posterior, l.as_slice(), device)?,
            Tensor::from_vec(self.eps, l.as_slice(), device)?,
        ])
    }
}

/// Hands out each step's noise and starts drawing the next step's in the background.
pub struct NoiseAhead {
    seed: u64,
    sizes: NoiseSizes,
    /// The run's last step: nothing is drawn past it.
    last: usize,
    next: Option<JoinHandle<StepNoise>>,
}

impl NoiseAhead {
    pub fn new(seed: u64, sizes: NoiseSizes, last: usize) -> Self {
        Self {
            seed,
            sizes,
            last,
            next: None,
        }
    }

    /// Step `d`'s noise (the one drawn ahead if it is for `d`, else drawn now); then
    /// starts drawing step `d + 1`'s.
    pub fn take(&mut self, d: usize) -> Result<StepNoise> {
        let ahead = match self.next.take() {
            Some(worker) => Some(
                worker
                    .join()
                    .map_err(|_| Error::internal("the noise worker thread panicked"))?,
            ),
            None => None,
        };
        let noise = match ahead {
            Some(n) if n.step == d => n,
            _ => StepNoise::draw(self.seed, d, self.sizes),
        };
        if d < self.last {
            let (seed, sizes) = (self.seed, self.sizes);
            self.next = Some(std::thread::spawn(move || {
                StepNoise::draw(seed, d + 1, sizes)
            }));
        }
        Ok(noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::normal;

    const SIZES: NoiseSizes = NoiseSizes {
        pixels: [2, 3, 8, 6],
        latents: [2, 4, 1, 1],
    };

    #[test]
    fn drawn_ahead_equals_drawn_in_place() {
        let mut ahead = NoiseAhead::new(7, SIZES, 6);
        for d in [1, 2, 3, 5, 6] {
            assert_eq!(
                ahead.take(d).unwrap(),
                StepNoise::draw(7, d, SIZES),
                "step {d}"
            );
        }
        assert!(ahead.next.is_none(), "drew past the last step");
    }

    #[test]
    fn each_tensor_is_its_own_stream() {
        let [g, z, eps] = StepNoise::draw(3, 4, SIZES).upload(&Device::Cpu).unwrap();
        let own = |stream, dims: [usize; 4]| {
            normal(&mut step_rng(3, 4, stream), dims.as_slice(), &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g.dims(), SIZES.pixels);
        assert_eq!(flat(g), own(Stream::DmDeg, SIZES.pixels));
        assert_eq!(flat(z), own(Stream::Posterior, SIZES.latents));
        assert_eq!(flat(eps), own(Stream::Eps, SIZES.latents));
    }
}
