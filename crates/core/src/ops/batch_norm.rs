use super::ShapeError;
use crate::Tensor;

/// BatchNorm2d in its inference form: it normalises with the running
/// statistics stored in the weights, never with the statistics of the batch
/// it is given. (Using the batch's own mean and variance is what training
/// does, and what the seed's first BatchNorm wrongly did.)
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// `weight / sqrt(running_var + eps)`, per channel.
    scale: Vec<f32>,
    /// `bias - running_mean * scale`, per channel.
    shift: Vec<f32>,
}

impl BatchNorm {
    /// Folds the four per-channel parameters into one multiply-add, as
    /// PyTorch's CPU inference kernel does. The fold is computed in f64 and
    /// rounded once, so it adds no error of its own.
    pub fn from_running_statistics(
        weight: &[f32],
        bias: &[f32],
        running_mean: &[f32],
        running_var: &[f32],
        eps: f64,
    ) -> Self {
        let channels = weight.len();
        assert!(
            [bias.len(), running_mean.len(), running_var.len()]
                .iter()
                .all(|&len| len == channels),
            "BatchNorm parameters must all have one value per channel"
        );
        let mut scale = Vec::with_capacity(channels);
        let mut shift = Vec::with_capacity(channels);
        for c in 0..channels {
            let s = weight[c] as f64 / (running_var[c] as f64 + eps).sqrt();
            scale.push(s as f32);
            shift.push((bias[c] as f64 - running_mean[c] as f64 * s) as f32);
        }
        BatchNorm { scale, shift }
    }

    /// The per-channel `(scale, shift)` of `x * scale + shift`.
    pub fn scale_and_shift(&self) -> (&[f32], &[f32]) {
        (&self.scale, &self.shift)
    }

    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ShapeError> {
        let mut out = x.clone();
        self.forward_in_place(&mut out)?;
        Ok(out)
    }

    pub fn forward_in_place(&self, x: &mut Tensor) -> Result<(), ShapeError> {
        if x.channels() != self.channels() {
            return Err(ShapeError::Channels {
                expected: self.channels(),
                found: x.channels(),
            });
        }
        let channels = self.channels();
        // Whole pixels per task, so that each task's channels line up.
        let chunk = (super::activation::PARALLEL_CHUNK / channels).max(1) * channels;
        crate::parallel::for_each_chunk(
            crate::parallel::threads(),
            x.as_slice_mut(),
            chunk,
            |_, pixels| {
                for pixel in pixels.chunks_exact_mut(channels) {
                    for ((v, &s), &t) in pixel.iter_mut().zip(&self.scale).zip(&self.shift) {
                        *v = *v * s + t;
                    }
                }
            },
        );
        Ok(())
    }
}
