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
        [Vectors::Baseline, Vectors::Avx2, Vectors::Avx512]
            .into_iter()
            .filter(|set| set.runs_here())
            .collect()
    }

    /// Whether this CPU has the set. The loops written for a set ask
    /// before they run (the std macro caches what the CPU has), so that no
    /// value of this type can run an instruction the CPU lacks.
    pub fn runs_here(self) -> bool {
        match self {
            Vectors::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Vectors::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Vectors::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest set this CPU runs.
    pub fn best() -> Vectors {
        [Vectors::Avx512, Vectors::Avx2]
            .into_iter()
            .find(|set| set.runs_here())
            .unwrap_or(Vectors::Baseline)
    }
}
