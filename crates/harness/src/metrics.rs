//! How far a candidate activation is from the reference, in numbers a person
//! can act on: the largest error and where it is (NCHW coordinates), the
//! error relative to the reference's scale, the cosine similarity, and how
//! many elements break the tolerance.

use serde::Serialize;

use crate::Tolerance;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Succ,
    Fail,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Succ => "succ",
            Verdict::Fail => "fail",
        }
    }
}

/// The element that differs most.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorstElement {
    /// Coordinates in the reference's shape (NCHW for activations).
    pub index: Vec<usize>,
    pub reference: f32,
    pub candidate: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub verdict: Verdict,
    pub max_abs_error: f64,
    /// `max|cand - ref| / max|ref|`; with an all-zero reference the divisor
    /// is the smallest normal f32, so the figure stays finite.
    pub relative_error: f64,
    pub cosine_similarity: f64,
    /// Largest |ref| over the stage.
    pub scale: f64,
    /// Elements outside the tolerance (NaN and Inf mismatches included).
    pub mismatched: usize,
    pub elements: usize,
    pub worst: Option<WorstElement>,
    pub reference_nan: usize,
    pub candidate_nan: usize,
    pub reference_inf: usize,
    pub candidate_inf: usize,
}

/// Compares two arrays of the same length, both in the reference's order;
/// `shape` is the reference's, used to name the worst element.
pub fn compare(
    reference: &[f32],
    candidate: &[f32],
    shape: &[usize],
    tolerance: &Tolerance,
) -> Comparison {
    assert_eq!(
        reference.len(),
        candidate.len(),
        "compare needs arrays of equal length"
    );
    let scale = reference
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |max, &v| max.max((v as f64).abs()));
    let atol = tolerance.atol_for(scale);

    let (mut max_abs_error, mut worst_at) = (0f64, None);
    let (mut dot, mut reference_norm, mut candidate_norm) = (0f64, 0f64, 0f64);
    let mut mismatched = 0;
    let (mut reference_nan, mut candidate_nan, mut reference_inf, mut candidate_inf) = (0, 0, 0, 0);
    for (index, (&r, &c)) in reference.iter().zip(candidate).enumerate() {
        reference_nan += r.is_nan() as usize;
        candidate_nan += c.is_nan() as usize;
        reference_inf += r.is_infinite() as usize;
        candidate_inf += c.is_infinite() as usize;
        let (r, c) = (r as f64, c as f64);
        let matches = if r.is_nan() || c.is_nan() {
            tolerance.equal_nan && r.is_nan() && c.is_nan()
        } else if r.is_infinite() || c.is_infinite() {
            r == c
        } else {
            (c - r).abs() <= atol + tolerance.rtol * r.abs()
        };
        if !matches {
            mismatched += 1;
        }
        let error = if r.is_finite() && c.is_finite() {
            (c - r).abs()
        } else if matches {
            0.0
        } else {
            f64::INFINITY
        };
        if error > max_abs_error || (worst_at.is_none() && !matches) {
            max_abs_error = error;
            worst_at = Some(index);
        }
        if r.is_finite() && c.is_finite() {
            dot += r * c;
            reference_norm += r * r;
            candidate_norm += c * c;
        }
    }
    let cosine_similarity = match (reference_norm > 0.0, candidate_norm > 0.0) {
        (true, true) => dot / (reference_norm.sqrt() * candidate_norm.sqrt()),
        (false, false) => 1.0,
        _ => 0.0,
    };
    let worst = worst_at.map(|flat| WorstElement {
        index: unravel(flat, shape),
        reference: reference[flat],
        candidate: candidate[flat],
    });
    Comparison {
        verdict: if mismatched == 0 {
            Verdict::Succ
        } else {
            Verdict::Fail
        },
        max_abs_error,
        relative_error: max_abs_error / scale.max(f32::MIN_POSITIVE as f64),
        cosine_similarity,
        scale,
        mismatched,
        elements: reference.len(),
        worst,
        reference_nan,
        candidate_nan,
        reference_inf,
        candidate_inf,
    }
}

/// A row-major flat index as coordinates in `shape`.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (axis, &size) in shape.iter().enumerate().rev() {
        if size > 0 {
            index[axis] = flat % size;
            flat /= size;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tolerance::AbsoluteTolerance;

    fn fixed(rtol: f64, atol: f64) -> Tolerance {
        Tolerance {
            rtol,
            atol: AbsoluteTolerance::Fixed(atol),
            equal_nan: false,
        }
    }

    #[test]
    fn torch_rule_is_relative_to_the_reference() {
        // |1.05 - 1| = 0.05 <= 0 + 0.1 * |1|.
        assert_eq!(
            compare(&[1.0], &[1.05], &[1], &fixed(0.1, 0.0)).verdict,
            Verdict::Succ
        );
        // |1.2 - 1| = 0.2 > 0.1 * |1|.
        assert_eq!(
            compare(&[1.0], &[1.2], &[1], &fixed(0.1, 0.0)).verdict,
            Verdict::Fail
        );
        // The base is |ref|, not |cand|: |0 - 1| = 1 > 0.1 * |1| fails, and so does ref 0, cand 1.
        assert_eq!(
            compare(&[0.0], &[1.0], &[1], &fixed(10.0, 0.0)).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn worst_element_is_named_in_the_reference_shape() {
        let reference = vec![0.0f32; 24];
        let mut candidate = reference.clone();
        candidate[13] = 2.0; // row-major in [1, 2, 3, 4]: 13 = 1 * 12 + 0 * 4 + 1
        let result = compare(&reference, &candidate, &[1, 2, 3, 4], &fixed(0.0, 1e-3));
        assert_eq!(result.verdict, Verdict::Fail);
        assert_eq!(result.mismatched, 1);
        let worst = result.worst.unwrap();
        assert_eq!(worst.index, vec![0, 1, 0, 1]);
        assert_eq!((worst.reference, worst.candidate), (0.0, 2.0));
    }

    #[test]
    fn all_zero_reference_has_finite_relative_metrics() {
        let same = compare(&[0.0; 4], &[0.0; 4], &[4], &Tolerance::default());
        assert_eq!(same.verdict, Verdict::Succ);
        assert_eq!((same.relative_error, same.cosine_similarity), (0.0, 1.0));
        let off = compare(
            &[0.0; 4],
            &[0.0, 1.0, 0.0, 0.0],
            &[4],
            &Tolerance::default(),
        );
        assert_eq!(off.verdict, Verdict::Fail);
        assert!(off.relative_error.is_finite() && off.relative_error > 1.0);
    }

    #[test]
    fn nan_never_matches_unless_asked() {
        let nan = [f32::NAN, 1.0];
        let strict = compare(&nan, &nan, &[2], &Tolerance::default());
        assert_eq!(
            (
                strict.verdict,
                strict.mismatched,
                strict.reference_nan,
                strict.candidate_nan
            ),
            (Verdict::Fail, 1, 1, 1)
        );
        let lenient = compare(
            &nan,
            &nan,
            &[2],
            &Tolerance {
                equal_nan: true,
                ..Tolerance::default()
            },
        );
        assert_eq!(lenient.verdict, Verdict::Succ);
    }

    #[test]
    fn scale_relative_atol_follows_the_stage_magnitude() {
        let tolerance = Tolerance {
            rtol: 0.0,
            atol: AbsoluteTolerance::ScaleRelative(1e-3),
            equal_nan: false,
        };
        // max|ref| = 1000, so atol = 1: an error of 0.5 on a zero element passes.
        assert_eq!(
            compare(&[1000.0, 0.0], &[1000.0, 0.5], &[2], &tolerance).verdict,
            Verdict::Succ
        );
        assert_eq!(
            compare(&[1.0, 0.0], &[1.0, 0.5], &[2], &tolerance).verdict,
            Verdict::Fail
        );
    }
}
