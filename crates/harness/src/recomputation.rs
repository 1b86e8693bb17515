//! The inner loop of the reference check: one channel plane of a
//! BatchNorm's input normalised two ways (`((x - mean) * factor + bias)`
//! in f64, rounded to f32), each held against the stored output: the
//! largest error of each and the largest |output|.
//!
//! Written for the instruction sets of [`Vectors`], like
//! [`crate::lane_sums`]: every value goes through the same IEEE operations
//! on each, and a maximum is the same in any order, so the figures are the
//! same bits on every CPU (a test holds each set to the scalar code). As
//! scalar code it cost ~10 cycles a value, 22 ms of CPU for ResNet50's 11
//! million BatchNorm inputs.

use crate::vectors::Vectors;

/// How a channel is normalised: `((x - mean) * factor + bias) as f32`.
#[derive(Clone, Copy, Debug)]
pub struct Normalisation {
    pub mean: f64,
    pub factor: f64,
    pub bias: f64,
}

/// A plane's (or several planes') largest errors, both ways, and largest
/// |output|. A NaN error counts as infinite: `max` would drop it, and a
/// recomputation that divides by a zero variance (batch statistics of one
/// value, eps 0) would reproduce anything. A NaN output is left out of the
/// scale.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlaneErrors {
    pub running: f64,
    pub batch: f64,
    pub scale: f64,
}

impl PlaneErrors {
    /// `input` normalised with `running` and with `batch`, against `output`.
    pub fn of(
        vectors: Vectors,
        input: &[f32],
        output: &[f32],
        running: Normalisation,
        batch: Normalisation,
    ) -> PlaneErrors {
        assert_eq!(input.len(), output.len());
        const GROUP: usize = 8;
        let whole = input.len() / GROUP * GROUP;
        let groups = (&input[..whole], &output[..whole]);
        let mut errors = PlaneErrors::default();
        match vectors {
            // SAFETY: the CPU has the set (asked); the groups are whole.
            #[cfg(target_arch = "x86_64")]
            Vectors::Avx512 if vectors.runs_here() => {
                errors = unsafe { groups_avx512(groups.0, groups.1, running, batch) }
            }
            #[cfg(target_arch = "x86_64")]
            Vectors::Avx2 if vectors.runs_here() => {
                errors = unsafe { groups_avx2(groups.0, groups.1, running, batch) }
            }
            _ => {
                for (&x, &y) in groups.0.iter().zip(groups.1) {
                    errors.add(x, y, running, batch);
                }
            }
        }
        for (&x, &y) in input[whole..].iter().zip(&output[whole..]) {
            errors.add(x, y, running, batch);
        }
        errors
    }

    /// The rule every set follows, one value at a time.
    fn add(&mut self, x: f32, y: f32, running: Normalisation, batch: Normalisation) {
        let (x, y) = (x as f64, y as f64);
        let error = |way: Normalisation| {
            let recomputed = ((x - way.mean) * way.factor + way.bias) as f32 as f64;
            let error = (recomputed - y).abs();
            if error.is_nan() {
                f64::INFINITY
            } else {
                error
            }
        };
        self.running = self.running.max(error(running));
        self.batch = self.batch.max(error(batch));
        self.scale = self.scale.max(y.abs());
    }

    /// The figures of both, as if one plane.
    pub fn merge(self, other: PlaneErrors) -> PlaneErrors {
        PlaneErrors {
            running: self.running.max(other.running),
            batch: self.batch.max(other.batch),
            scale: self.scale.max(other.scale),
        }
    }

    /// `max|recomputed - output| / max|output|`, with the running
    /// statistics and with the batch's; an all-zero output keeps both
    /// finite.
    pub fn relative(self) -> [f64; 2] {
        let scale = self.scale.max(f32::MIN_POSITIVE as f64);
        [self.running / scale, self.batch / scale]
    }

    /// Folds eight lanes (none NaN) into one.
    fn of_lanes(running: [f64; 8], batch: [f64; 8], scale: [f64; 8]) -> PlaneErrors {
        let largest = |lanes: [f64; 8]| lanes.into_iter().fold(0f64, f64::max);
        PlaneErrors {
            running: largest(running),
            batch: largest(batch),
            scale: largest(scale),
        }
    }
}

/// Whole groups of eight, one AVX-512 register each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn groups_avx512(
    input: &[f32],
    output: &[f32],
    running: Normalisation,
    batch: Normalisation,
) -> PlaneErrors {
    use std::arch::x86_64::*;
    let infinity = _mm512_set1_pd(f64::INFINITY);
    let ways = [running, batch].map(|way| {
        (
            _mm512_set1_pd(way.mean),
            _mm512_set1_pd(way.factor),
            _mm512_set1_pd(way.bias),
        )
    });
    let mut largest = [_mm512_setzero_pd(); 2];
    let mut scale = _mm512_setzero_pd();
    for (x, y) in input.chunks_exact(8).zip(output.chunks_exact(8)) {
        let x = _mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr()));
        let y = _mm512_cvtps_pd(_mm256_loadu_ps(y.as_ptr()));
        for (way, (mean, factor, bias)) in ways.iter().enumerate() {
            let normalised = _mm512_add_pd(_mm512_mul_pd(_mm512_sub_pd(x, *mean), *factor), *bias);
            let recomputed = _mm512_cvtps_pd(_mm512_cvtpd_ps(normalised));
            let error = _mm512_abs_pd(_mm512_sub_pd(recomputed, y));
            let nan = _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(error, error);
            let error = _mm512_mask_mov_pd(error, nan, infinity);
            largest[way] = _mm512_max_pd(error, largest[way]);
        }
        // `vmaxpd` gives its second operand where the first is NaN: a NaN
        // output is left out, as `f64::max` leaves it.
        scale = _mm512_max_pd(_mm512_abs_pd(y), scale);
    }
    let lanes = |register: __m512d| {
        let mut values = [0f64; 8];
        _mm512_storeu_pd(values.as_mut_ptr(), register);
        values
    };
    PlaneErrors::of_lanes(lanes(largest[0]), lanes(largest[1]), lanes(scale))
}

/// Whole groups of eight, two AVX2 registers each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn groups_avx2(
    input: &[f32],
    output: &[f32],
    running: Normalisation,
    batch: Normalisation,
) -> PlaneErrors {
    use std::arch::x86_64::*;
    let infinity = _mm256_set1_pd(f64::INFINITY);
    let sign = _mm256_set1_pd(-0.0);
    let abs = |values: __m256d| _mm256_andnot_pd(sign, values);
    let ways = [running, batch].map(|way| {
        (
            _mm256_set1_pd(way.mean),
            _mm256_set1_pd(way.factor),
            _mm256_set1_pd(way.bias),
        )
    });
    let mut largest = [[_mm256_setzero_pd(); 2]; 2];
    let mut scale = [_mm256_setzero_pd(); 2];
    for (x, y) in input.chunks_exact(8).zip(output.chunks_exact(8)) {
        for half in 0..2 {
            let x = _mm256_cvtps_pd(_mm_loadu_ps(x[half * 4..].as_ptr()));
            let y = _mm256_cvtps_pd(_mm_loadu_ps(y[half * 4..].as_ptr()));
            for (way, (mean, factor, bias)) in ways.iter().enumerate() {
                let normalised =
                    _mm256_add_pd(_mm256_mul_pd(_mm256_sub_pd(x, *mean), *factor), *bias);
                let recomputed = _mm256_cvtps_pd(_mm256_cvtpd_ps(normalised));
                let error = abs(_mm256_sub_pd(recomputed, y));
                let nan = _mm256_cmp_pd::<_CMP_UNORD_Q>(error, error);
                let error = _mm256_blendv_pd(error, infinity, nan);
                largest[way][half] = _mm256_max_pd(error, largest[way][half]);
            }
            scale[half] = _mm256_max_pd(abs(y), scale[half]);
        }
    }
    let lanes = |halves: [__m256d; 2]| {
        let mut values = [0f64; 8];
        _mm256_storeu_pd(values.as_mut_ptr(), halves[0]);
        _mm256_storeu_pd(values[4..].as_mut_ptr(), halves[1]);
        values
    };
    PlaneErrors::of_lanes(lanes(largest[0]), lanes(largest[1]), lanes(scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::uniform;

    /// Every set this CPU has gives the scalar code's figures bit for bit,
    /// on values that reproduce, that do not, and with NaN and infinities.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        let running = Normalisation {
            mean: 0.25,
            factor: 1.7,
            bias: -0.1,
        };
        let batch = Normalisation {
            mean: 0.3,
            factor: 1.5,
            bias: -0.1,
        };
        for length in [0, 5, 8, 21, 1000] {
            for special in [None, Some(f32::NAN), Some(f32::INFINITY)] {
                let input: Vec<f32> = (0..length).map(|_| ((next() - 0.5) * 8.0) as f32).collect();
                let mut output: Vec<f32> = input
                    .iter()
                    .map(|&x| ((x as f64 - 0.25) * 1.7 - 0.1) as f32 + (next() * 1e-6) as f32)
                    .collect();
                if let Some(value) = special.filter(|_| length > 8) {
                    output[length / 2] = value;
                    output[length - 1] = value;
                }
                let scalar = PlaneErrors::of(Vectors::Baseline, &input, &output, running, batch);
                if length > 0 && special.is_none() {
                    assert!(scalar.running < scalar.batch);
                }
                for vectors in Vectors::available() {
                    let errors = PlaneErrors::of(vectors, &input, &output, running, batch);
                    let bits = |e: PlaneErrors| [e.running, e.batch, e.scale].map(f64::to_bits);
                    assert_eq!(
                        bits(errors),
                        bits(scalar),
                        "{vectors:?}, {length} values, {special:?}"
                    );
                }
            }
        }
    }
}
