//! The inner loop of a comparison: over a piece of finite values, each
//! lane's largest error, count of values outside the tolerance, and sums
//! of `r * c`, `r * r` and `c * c`, with element `i` in lane `i % LANES`.
//! Independent lanes, so that no f64 addition waits for the one before.
//!
//! Written three times, for the instruction sets of [`Vectors`]: eight
//! lanes are one AVX-512 register, two AVX2 ones, or scalar code. Each
//! does the same IEEE operations per lane in the same order (a product,
//! then a sum: never fused), so the figures are the same bits on every
//! CPU; a test holds each available set to the scalar one. The compiler
//! left to vectorise the scalar loop under `#[target_feature]` shuffled
//! values between registers lane by lane and gained only 1.5x.

use crate::vectors::Vectors;

/// Lanes of a comparison's sums.
pub const LANES: usize = 8;

/// Each lane's figures so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LaneSums {
    pub max_error: [f64; LANES],
    pub mismatched: [u64; LANES],
    pub dot: [f64; LANES],
    pub reference_norm: [f64; LANES],
    pub candidate_norm: [f64; LANES],
}

impl LaneSums {
    /// The sums of `reference` and `candidate` (finite, of one length), a
    /// value outside the tolerance where `|c - r| > atol + rtol * |r|`. The
    /// values after the last whole group of lanes all go to lane 0.
    pub fn of(
        vectors: Vectors,
        reference: &[f32],
        candidate: &[f32],
        atol: f64,
        rtol: f64,
    ) -> LaneSums {
        assert_eq!(reference.len(), candidate.len());
        let whole = reference.len() / LANES * LANES;
        let mut sums = LaneSums::default();
        let groups = (&reference[..whole], &candidate[..whole]);
        match vectors {
            // SAFETY: the CPU has the set (asked); the groups are whole.
            #[cfg(target_arch = "x86_64")]
            Vectors::Avx512 if vectors.runs_here() => unsafe {
                sums.add_groups_avx512(groups.0, groups.1, atol, rtol)
            },
            #[cfg(target_arch = "x86_64")]
            Vectors::Avx2 if vectors.runs_here() => unsafe {
                sums.add_groups_avx2(groups.0, groups.1, atol, rtol)
            },
            _ => {
                for (r, c) in groups
                    .0
                    .chunks_exact(LANES)
                    .zip(groups.1.chunks_exact(LANES))
                {
                    for lane in 0..LANES {
                        sums.add(lane, r[lane], c[lane], atol, rtol);
                    }
                }
            }
        }
        for (&r, &c) in reference[whole..].iter().zip(&candidate[whole..]) {
            sums.add(0, r, c, atol, rtol);
        }
        sums
    }

    /// One value into `lane`: the rule every set follows.
    #[inline(always)]
    fn add(&mut self, lane: usize, r: f32, c: f32, atol: f64, rtol: f64) {
        let (r, c) = (r as f64, c as f64);
        let error = (c - r).abs();
        // A select, as `vmaxpd error, max` is: the values are finite.
        if error > self.max_error[lane] {
            self.max_error[lane] = error;
        }
        self.mismatched[lane] += (error > atol + rtol * r.abs()) as u64;
        self.dot[lane] += r * c;
        self.reference_norm[lane] += r * r;
        self.candidate_norm[lane] += c * c;
    }

    /// Whole groups of eight, one AVX-512 register a lane group.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_groups_avx512(
        &mut self,
        reference: &[f32],
        candidate: &[f32],
        atol: f64,
        rtol: f64,
    ) {
        use std::arch::x86_64::*;
        let load = |values: &[f64; LANES]| _mm512_loadu_pd(values.as_ptr());
        let (atol, rtol) = (_mm512_set1_pd(atol), _mm512_set1_pd(rtol));
        let mut max_error = load(&self.max_error);
        let mut mismatched = _mm512_loadu_epi64(self.mismatched.as_ptr().cast());
        let (mut dot, mut reference_norm, mut candidate_norm) = (
            load(&self.dot),
            load(&self.reference_norm),
            load(&self.candidate_norm),
        );
        let one = _mm512_set1_epi64(1);
        for (r, c) in reference
            .chunks_exact(LANES)
            .zip(candidate.chunks_exact(LANES))
        {
            let r = _mm512_cvtps_pd(_mm256_loadu_ps(r.as_ptr()));
            let c = _mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr()));
            let error = _mm512_abs_pd(_mm512_sub_pd(c, r));
            max_error = _mm512_max_pd(error, max_error);
            let allowed = _mm512_add_pd(atol, _mm512_mul_pd(rtol, _mm512_abs_pd(r)));
            let outside = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(error, allowed);
            mismatched = _mm512_mask_add_epi64(mismatched, outside, mismatched, one);
            dot = _mm512_add_pd(dot, _mm512_mul_pd(r, c));
            reference_norm = _mm512_add_pd(reference_norm, _mm512_mul_pd(r, r));
            candidate_norm = _mm512_add_pd(candidate_norm, _mm512_mul_pd(c, c));
        }
        let store = |values: &mut [f64; LANES], lanes: __m512d| {
            _mm512_storeu_pd(values.as_mut_ptr(), lanes)
        };
        store(&mut self.max_error, max_error);
        _mm512_storeu_epi64(self.mismatched.as_mut_ptr().cast(), mismatched);
        store(&mut self.dot, dot);
        store(&mut self.reference_norm, reference_norm);
        store(&mut self.candidate_norm, candidate_norm);
    }

    /// Whole groups of eight, two AVX2 registers a lane group (lanes 0-3
    /// and 4-7).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn add_groups_avx2(
        &mut self,
        reference: &[f32],
        candidate: &[f32],
        atol: f64,
        rtol: f64,
    ) {
        use std::arch::x86_64::*;
        const HALF: usize = LANES / 2;
        let halves = |values: &[f64; LANES]| {
            [0, 1].map(|half| _mm256_loadu_pd(values[half * HALF..].as_ptr()))
        };
        let (atol, rtol) = (_mm256_set1_pd(atol), _mm256_set1_pd(rtol));
        let sign = _mm256_set1_pd(-0.0);
        let abs = |values: __m256d| _mm256_andnot_pd(sign, values);
        let mut max_error = halves(&self.max_error);
        let mut mismatched =
            [0, 1].map(|half| _mm256_loadu_si256(self.mismatched[half * HALF..].as_ptr().cast()));
        let (mut dot, mut reference_norm, mut candidate_norm) = (
            halves(&self.dot),
            halves(&self.reference_norm),
            halves(&self.candidate_norm),
        );
        for (r, c) in reference
            .chunks_exact(LANES)
            .zip(candidate.chunks_exact(LANES))
        {
            for half in 0..2 {
                let r = _mm256_cvtps_pd(_mm_loadu_ps(r[half * HALF..].as_ptr()));
                let c = _mm256_cvtps_pd(_mm_loadu_ps(c[half * HALF..].as_ptr()));
                let error = abs(_mm256_sub_pd(c, r));
                max_error[half] = _mm256_max_pd(error, max_error[half]);
                let allowed = _mm256_add_pd(atol, _mm256_mul_pd(rtol, abs(r)));
                // All ones (-1) where outside: subtracted, it counts one.
                let outside = _mm256_castpd_si256(_mm256_cmp_pd::<_CMP_GT_OQ>(error, allowed));
                mismatched[half] = _mm256_sub_epi64(mismatched[half], outside);
                dot[half] = _mm256_add_pd(dot[half], _mm256_mul_pd(r, c));
                reference_norm[half] = _mm256_add_pd(reference_norm[half], _mm256_mul_pd(r, r));
                candidate_norm[half] = _mm256_add_pd(candidate_norm[half], _mm256_mul_pd(c, c));
            }
        }
        let store = |values: &mut [f64; LANES], lanes: [__m256d; 2]| {
            for (half, lanes) in lanes.into_iter().enumerate() {
                _mm256_storeu_pd(values[half * HALF..].as_mut_ptr(), lanes);
            }
        };
        store(&mut self.max_error, max_error);
        for (half, lanes) in mismatched.into_iter().enumerate() {
            _mm256_storeu_si256(self.mismatched[half * HALF..].as_mut_ptr().cast(), lanes);
        }
        store(&mut self.dot, dot);
        store(&mut self.reference_norm, reference_norm);
        store(&mut self.candidate_norm, candidate_norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::uniform;

    /// Every set this CPU has gives the scalar code's figures bit for bit,
    /// tails and all, errors inside and outside the tolerance.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        for length in [0, 3, 8, 13, 64, 1001] {
            let reference: Vec<f32> = (0..length)
                .map(|_| ((next() - 0.5) * 40.0) as f32)
                .collect();
            let candidate: Vec<f32> = reference
                .iter()
                .map(|&r| r + ((next() - 0.5) * 1e-2) as f32)
                .collect();
            let scalar = LaneSums::of(Vectors::Baseline, &reference, &candidate, 1e-3, 1e-4);
            if length > 100 {
                assert!(scalar.mismatched.iter().sum::<u64>() > 0);
                assert!(scalar.mismatched.iter().sum::<u64>() < length as u64);
            }
            for vectors in Vectors::available() {
                let sums = LaneSums::of(vectors, &reference, &candidate, 1e-3, 1e-4);
                let bits = |sums: &LaneSums| {
                    [
                        sums.max_error,
                        sums.dot,
                        sums.reference_norm,
                        sums.candidate_norm,
                    ]
                    .map(|lanes| lanes.map(f64::to_bits))
                };
                assert_eq!(bits(&sums), bits(&scalar), "{vectors:?}, {length} values");
                assert_eq!(
                    sums.mismatched, scalar.mismatched,
                    "{vectors:?}, {length} values"
                );
            }
        }
    }
}
