//! The instruction sets a comparison's inner loop ([`crate::lane_sums`]) is
//! written for, chosen at run time. The harness is built for baseline
//! x86-64 (SSE2), where the comparison's f64 arithmetic runs two values to
//! a register; with AVX2 or AVX-512 it runs four or eight. Every set gives
//! the same figures, bit for bit, so that nothing a report says depends on
//! the CPU that wrote it.

/// One of the instruction sets, from the narrowest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    Baseline,
    Avx2,
    Avx512,
}

impl Vectors {
    /// Every set this CPU runs, from the narrowest: the tests hold each to
    /// the same figures.
    pub fn available() -> Vec<Vectors> {
        let mut sets = vec![Vectors::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            // The std macro caches what the CPU has.
            if is_x86_feature_detected!("avx2") {
                sets.push(Vectors::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                sets.push(Vectors::Avx512);
            }
        }
        sets
    }

    /// The widest set this CPU runs.
    pub fn best() -> Vectors {
        *Self::available()
            .last()
            .expect("the baseline is always there")
    }
}
