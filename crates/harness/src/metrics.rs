//! How far a candidate activation is from the reference, in numbers a person
//! can act on: the largest error and where it is (NCHW coordinates), the
//! error relative to the reference's scale, the cosine similarity, and how
//! many elements break the tolerance.

use rayon::prelude::*;
use serde::Serialize;

use crate::lane_sums::{LaneSums, LANES};
use crate::tolerance::StageTolerance;
use crate::vectors::Vectors;
use crate::Tolerance;

/// The default is `Succ`: a run passes until a stage fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Succ,
    Fail,
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
    /// For a failure in a report: the smallest rtol under which it would
    /// pass, the run's atol kept (exact: with the next smaller f64 it
    /// fails); see [`compare_for_report`]. `None` when it passes
    /// or no rtol would.
    pub rtol_needed: Option<f64>,
    /// For a failure no rtol passes: why (under `--tol auto`: no multiple).
    pub beyond_rtol: Option<BeyondRtol>,
    /// Under `--tol auto`, for a failure: the smallest multiple of the
    /// stage's noise floor under which it would pass (exact, like
    /// `rtol_needed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiple_needed: Option<f64>,
}

/// Why no rtol makes a failure pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BeyondRtol {
    /// A NaN or an infinity that does not match.
    NonFinite,
    /// An error above atol where the reference is 0 (or so near it that
    /// no finite rtol covers it).
    ZeroReference,
    /// The candidate's shape is not the reference's: nothing was compared.
    Shape,
    /// Under `--tol auto`: an error above the ceiling (half the stage's
    /// max|ref|), which no multiple of the floor allows.
    AboveCeiling,
}

impl BeyondRtol {
    pub fn describe(self) -> &'static str {
        match self {
            // Each says which element it is about: it is seldom the worst,
            // which the line names just before.
            BeyondRtol::NonFinite => {
                "a NaN or Inf element that does not match: an infinity matches only itself, a NaN only a NaN under --equal-nan"
            }
            BeyondRtol::ZeroReference => "an element whose reference is 0 is off by more than atol",
            BeyondRtol::Shape => "a shape that differs",
            BeyondRtol::AboveCeiling => {
                "an element off by more than half the stage's max|ref|, which --tol auto never allows"
            }
        }
    }
}

/// [`compare`] as a report shows it: for a failure, also the smallest rtol
/// (under `--tol auto`, multiple of the floor) under which it would pass,
/// or why none would (the hypotheses' own comparisons, many per failure,
/// do without).
pub fn compare_for_report(
    reference: &[f32],
    candidate: &[f32],
    shape: &[usize],
    stage: &StageTolerance,
) -> Comparison {
    let tolerance = &stage.tolerance;
    let mut comparison = compare(reference, candidate, shape, tolerance);
    if comparison.verdict == Verdict::Fail {
        let needed = match stage.auto_unit {
            Some(unit) => multiple_needed(
                reference,
                candidate,
                unit,
                stage.auto_ceiling.unwrap_or(f64::INFINITY),
                tolerance.equal_nan,
            )
            .map(|multiple| comparison.multiple_needed = Some(multiple)),
            None => {
                let atol = tolerance.atol_for(comparison.scale);
                rtol_needed(reference, candidate, atol, tolerance.equal_nan)
                    .map(|rtol| comparison.rtol_needed = Some(rtol))
            }
        };
        if let Err(why) = needed {
            comparison.beyond_rtol = Some(why);
        }
    }
    comparison
}

/// The smallest multiple `m` under which every element passes `|c - r| <=
/// min(m * unit, ceiling)` as the comparison computes it (with the next
/// smaller f64 one fails): a bisection over the bits, as for the rtol.
fn multiple_needed(
    reference: &[f32],
    candidate: &[f32],
    unit: f64,
    ceiling: f64,
    equal_nan: bool,
) -> Result<f64, BeyondRtol> {
    let mut largest = 0f64;
    finite_pairs(reference, candidate, equal_nan, |r, c| {
        largest = largest.max((c - r).abs());
        Ok(())
    })?;
    let passes = |multiple: f64| largest <= (multiple * unit).min(ceiling);
    if passes(0.0) {
        return Ok(0.0);
    }
    if !(unit > 0.0 && unit.is_finite()) {
        return Err(BeyondRtol::ZeroReference);
    }
    if largest > ceiling {
        return Err(BeyondRtol::AboveCeiling);
    }
    let guess = largest / unit;
    if !guess.is_finite() {
        return Err(BeyondRtol::ZeroReference);
    }
    Ok(smallest_passing(passes, guess))
}

/// Calls `each` with every pair of finite values, as f64, in order; a NaN
/// or an infinity that does not match ends it with `NonFinite`.
fn finite_pairs(
    reference: &[f32],
    candidate: &[f32],
    equal_nan: bool,
    mut each: impl FnMut(f64, f64) -> Result<(), BeyondRtol>,
) -> Result<(), BeyondRtol> {
    for (&r, &c) in reference.iter().zip(candidate) {
        let (r, c) = (r as f64, c as f64);
        if r.is_finite() && c.is_finite() {
            each(r, c)?;
        } else if !non_finite_match(r, c, equal_nan) {
            return Err(BeyondRtol::NonFinite);
        }
    }
    Ok(())
}

/// Whether `r` and `c`, one of them NaN or infinite, count as equal: the
/// same infinity, or NaN against NaN with `equal_nan`.
fn non_finite_match(r: f64, c: f64, equal_nan: bool) -> bool {
    if r.is_nan() && c.is_nan() {
        equal_nan
    } else {
        r == c
    }
}

/// The smallest non-negative f64 `x` with `passes(x)`, for a `passes` that
/// only gets easier as `x` grows and fails at 0: from `guess`, doubled until
/// it passes, a bisection over the bits (non-negative f64s order as their
/// bits), so that the next smaller f64 fails.
fn smallest_passing(passes: impl Fn(f64) -> bool, guess: f64) -> f64 {
    let mut passing = guess.max(f64::MIN_POSITIVE);
    while !passes(passing) {
        passing *= 2.0;
    }
    let (mut fails, mut passing) = (0u64, passing.to_bits());
    while passing - fails > 1 {
        let middle = fails + (passing - fails) / 2;
        if passes(f64::from_bits(middle)) {
            passing = middle;
        } else {
            fails = middle;
        }
    }
    f64::from_bits(passing)
}

/// The largest |value| among the finite values (0 when none is): a
/// comparison's scale. In lanes, with a select for the maximum, so that it
/// vectorises: `filter(is_finite).fold(f32::max)` ran one value at a time
/// and took some 10% of verify's time on a ResNet50 dump.
pub fn largest_finite_magnitude(values: &[f32]) -> f32 {
    const WIDTH: usize = 16;
    let mut lanes = [0f32; WIDTH];
    let mut add = |lane: usize, value: f32| {
        let magnitude = if value.is_finite() { value.abs() } else { 0.0 };
        lanes[lane] = if magnitude > lanes[lane] {
            magnitude
        } else {
            lanes[lane]
        };
    };
    let whole = values.len() / WIDTH * WIDTH;
    for chunk in values[..whole].chunks_exact(WIDTH) {
        for (lane, &value) in chunk.iter().enumerate() {
            add(lane, value);
        }
    }
    for &value in &values[whole..] {
        add(0, value);
    }
    lanes.into_iter().fold(0f32, f32::max)
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
        .par_chunks(CHUNK)
        .map(largest_finite_magnitude)
        .reduce(|| 0f32, f32::max) as f64;
    let atol = tolerance.atol_for(scale);
    let vectors = Vectors::best();

    // In chunks, in parallel; the partial results are merged in order, so
    // that the figures do not depend on the number of threads.
    let partials: Vec<Partial> = reference
        .par_chunks(CHUNK)
        .zip(candidate.par_chunks(CHUNK))
        .enumerate()
        .map(|(chunk, (reference, candidate))| {
            let offset = chunk * CHUNK;
            let piece = Piece {
                reference,
                candidate,
                offset,
            };
            Partial::of(vectors, piece, atol, tolerance)
        })
        .collect();
    let Partial {
        max_abs_error,
        worst_at,
        dot,
        reference_norm,
        candidate_norm,
        mismatched,
        non_finite_pairs,
        reference_nan,
        candidate_nan,
        reference_inf,
        candidate_inf,
    } = partials.into_iter().fold(Partial::default(), Partial::then);
    let (dot, reference_norm, candidate_norm) = (
        dot.iter().sum::<f64>(),
        reference_norm.iter().sum::<f64>(),
        candidate_norm.iter().sum::<f64>(),
    );
    let cosine_similarity = match (reference_norm > 0.0, candidate_norm > 0.0) {
        // No pair finite on both sides: no direction to compare (NaN, which
        // the JSON writes null), not the 1.0 of two all-zero remainders.
        _ if non_finite_pairs == reference.len() && !reference.is_empty() => f64::NAN,
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
        rtol_needed: None,
        beyond_rtol: None,
        multiple_needed: None,
    }
}

/// The smallest rtol under which every element matches, atol kept: the
/// comparison's own test (`|c - r| <= atol + rtol * |r|`, in f64) passes
/// every element with it and fails one with the next smaller f64. Passing
/// only gets easier as rtol grows, and non-negative f64s order as their
/// bits, so it is a bisection over the bits: 64 checks of the elements
/// that come near binding (those within 1e-9 of the largest
/// `(|c - r| - atol) / |r|`; all those above atol if that is not enough).
fn rtol_needed(
    reference: &[f32],
    candidate: &[f32],
    atol: f64,
    equal_nan: bool,
) -> Result<f64, BeyondRtol> {
    let mut over_atol = Vec::new();
    let mut largest = 0f64;
    finite_pairs(reference, candidate, equal_nan, |r, c| {
        let error = (c - r).abs();
        if error > atol {
            let ratio = (error - atol) / r.abs();
            if !ratio.is_finite() {
                return Err(BeyondRtol::ZeroReference);
            }
            largest = largest.max(ratio);
            over_atol.push((r.abs(), error));
        }
        Ok(())
    })?;
    let least_rtol = |elements: &[(f64, f64)]| {
        let passes = |rtol: f64| elements.iter().all(|&(r, e)| e <= atol + rtol * r);
        if passes(0.0) {
            return 0.0;
        }
        smallest_passing(passes, largest)
    };
    let near: Vec<(f64, f64)> = over_atol
        .iter()
        .copied()
        .filter(|&(r, e)| (e - atol) / r >= largest * (1.0 - 1e-9))
        .collect();
    let needed = least_rtol(&near);
    if over_atol.iter().all(|&(r, e)| e <= atol + needed * r) {
        Ok(needed)
    } else {
        Ok(least_rtol(&over_atol))
    }
}

/// The largest `|cand - ref|` within each of `items` equal parts (batch
/// items, for arrays whose first axis is the batch); a NaN or infinity
/// that does not match counts as infinite (NaN against NaN matches only
/// with `equal_nan`, as in the comparison).
pub fn max_abs_error_by_item(
    reference: &[f32],
    candidate: &[f32],
    items: usize,
    equal_nan: bool,
) -> Vec<f64> {
    if items == 0 || !reference.len().is_multiple_of(items) {
        return Vec::new();
    }
    let per_item = reference.len() / items;
    reference
        .par_chunks(per_item.max(1))
        .zip(candidate.par_chunks(per_item.max(1)))
        .map(|(r, c)| {
            r.iter().zip(c).fold(0f64, |worst, (&r, &c)| {
                let error = if r.is_finite() && c.is_finite() {
                    (c as f64 - r as f64).abs()
                } else if non_finite_match(r as f64, c as f64, equal_nan) {
                    0.0
                } else {
                    f64::INFINITY
                };
                worst.max(error)
            })
        })
        .collect()
}

/// A failing stage looked at closely: its worst elements, the largest error
/// of each channel (a channel-order or BatchNorm-parameter mistake shows
/// as a pattern across channels), and how the errors spread.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailureDetail {
    /// The largest errors, largest first (NCHW coordinates).
    pub worst: Vec<WorstElement>,
    /// Per channel (axis 1), the largest |cand - ref|.
    pub channel_max_error: Vec<f64>,
    /// How many elements have |cand - ref| in each decade: `[0]` counts
    /// exact matches, `[k]` errors in `[1e(k-13), 1e(k-12))` for k = 1..=15
    /// (`[1]` also anything smaller than 1e-12), `[16]` 1e3 and above or
    /// not finite.
    pub histogram: Vec<usize>,
}

/// The number of worst elements a [`FailureDetail`] keeps.
pub const WORST_SHOWN: usize = 8;

/// [`FailureDetail`] of two arrays of the reference's shape (NCHW, or
/// `[N, C]`); NaN against NaN is a match only with `equal_nan`, as in the
/// comparison.
pub fn failure_detail(
    reference: &ndarray::ArrayD<f32>,
    candidate: &ndarray::ArrayD<f32>,
    equal_nan: bool,
) -> FailureDetail {
    let shape = reference.shape();
    let channels = shape.get(1).copied().unwrap_or(1).max(1);
    let inner: usize = shape.iter().skip(2).product();
    let mut channel_max_error = vec![0f64; channels];
    let mut histogram = vec![0usize; 17];
    let mut worst: Vec<(f64, usize)> = Vec::with_capacity(WORST_SHOWN + 1);
    let (reference_data, candidate_data) = (
        reference.as_standard_layout(),
        candidate.as_standard_layout(),
    );
    let (r, c) = (
        reference_data.as_slice().expect("standard layout"),
        candidate_data.as_slice().expect("standard layout"),
    );
    for (flat, (&r, &c)) in r.iter().zip(c).enumerate() {
        let error = if r == c || non_finite_match(r as f64, c as f64, equal_nan) {
            0.0
        } else {
            let error = (c as f64 - r as f64).abs();
            if error.is_nan() {
                f64::INFINITY
            } else {
                error
            }
        };
        let channel = (flat / inner.max(1)) % channels;
        channel_max_error[channel] = channel_max_error[channel].max(error);
        let bucket = if error == 0.0 {
            0
        } else if !error.is_finite() {
            16
        } else {
            (error.log10().floor() + 13.0).clamp(1.0, 16.0) as usize
        };
        histogram[bucket] += 1;
        if error > 0.0 && (worst.len() < WORST_SHOWN || error > worst[worst.len() - 1].0) {
            let at = worst.partition_point(|&(e, _)| e >= error);
            worst.insert(at, (error, flat));
            worst.truncate(WORST_SHOWN);
        }
    }
    FailureDetail {
        worst: worst
            .into_iter()
            .map(|(_, flat)| WorstElement {
                index: unravel(flat, shape),
                reference: r[flat],
                candidate: c[flat],
            })
            .collect(),
        channel_max_error,
        histogram,
    }
}

/// Elements per parallel piece of a comparison.
const CHUNK: usize = 1 << 16;

/// The figures of one piece of a comparison.
#[derive(Default)]
struct Partial {
    max_abs_error: f64,
    worst_at: Option<usize>,
    dot: [f64; LANES],
    reference_norm: [f64; LANES],
    candidate_norm: [f64; LANES],
    mismatched: usize,
    /// Pairs with a NaN or an infinity on either side: left out of the
    /// cosine.
    non_finite_pairs: usize,
    reference_nan: usize,
    candidate_nan: usize,
    reference_inf: usize,
    candidate_inf: usize,
}

/// A chunk of the two arrays, at `offset` in them.
#[derive(Clone, Copy)]
struct Piece<'a> {
    reference: &'a [f32],
    candidate: &'a [f32],
    offset: usize,
}

impl Partial {
    fn of(vectors: Vectors, piece: Piece<'_>, atol: f64, tolerance: &Tolerance) -> Self {
        let Piece {
            reference,
            candidate,
            offset,
        } = piece;
        let sums = LaneSums::of(vectors, reference, candidate, atol, tolerance.rtol);
        // The squares of finite f32 values sum to a finite f64 (each is
        // below 2^256), so a norm that is not finite means an Inf or a NaN
        // among the values: only then is the piece gone through again,
        // element by element. One pass in the common case.
        let finite = |norms: [f64; LANES]| norms.iter().all(|norm| norm.is_finite());
        if !(finite(sums.reference_norm) && finite(sums.candidate_norm)) {
            return Partial::with_non_finite(piece, atol, tolerance);
        }
        let mut part = Partial {
            dot: sums.dot,
            reference_norm: sums.reference_norm,
            candidate_norm: sums.candidate_norm,
            mismatched: sums.mismatched.iter().sum::<u64>() as usize,
            max_abs_error: sums.max_error.iter().copied().fold(0.0, f64::max),
            ..Partial::default()
        };
        // Where the largest error is, looked for only when there is one.
        if part.max_abs_error > 0.0 {
            part.worst_at = reference
                .iter()
                .zip(candidate)
                .position(|(&r, &c)| (c as f64 - r as f64).abs() == part.max_abs_error)
                .map(|index| offset + index);
        }
        part
    }

    /// Element by element, with NaN and Inf counted and matched as the
    /// tolerance says.
    fn with_non_finite(piece: Piece<'_>, atol: f64, tolerance: &Tolerance) -> Self {
        let Piece {
            reference,
            candidate,
            offset,
        } = piece;
        let mut part = Partial::default();
        for (index, (&r, &c)) in reference.iter().zip(candidate).enumerate() {
            let (r, c) = (r as f64, c as f64);
            part.reference_nan += r.is_nan() as usize;
            part.candidate_nan += c.is_nan() as usize;
            part.reference_inf += r.is_infinite() as usize;
            part.candidate_inf += c.is_infinite() as usize;
            let finite = r.is_finite() && c.is_finite();
            let matches = if finite {
                (c - r).abs() <= atol + tolerance.rtol * r.abs()
            } else if r.is_nan() && c.is_nan() {
                tolerance.equal_nan
            } else {
                // An infinity matches only itself; a NaN nothing but a NaN.
                r == c
            };
            part.mismatched += !matches as usize;
            let error = if finite {
                (c - r).abs()
            } else if matches {
                0.0
            } else {
                f64::INFINITY
            };
            // A mismatch always has an error above 0 (the tolerance is not
            // negative), so the largest error is never an unnamed mismatch.
            if error > part.max_abs_error {
                part.max_abs_error = error;
                part.worst_at = Some(offset + index);
            }
            if finite {
                part.dot[0] += r * c;
                part.reference_norm[0] += r * r;
                part.candidate_norm[0] += c * c;
            } else {
                part.non_finite_pairs += 1;
            }
        }
        part
    }

    /// This piece followed by `next`.
    fn then(self, next: Partial) -> Partial {
        let take_next = next.max_abs_error > self.max_abs_error;
        let add = |a: [f64; LANES], b: [f64; LANES]| std::array::from_fn(|lane| a[lane] + b[lane]);
        Partial {
            max_abs_error: if take_next {
                next.max_abs_error
            } else {
                self.max_abs_error
            },
            worst_at: if take_next {
                next.worst_at
            } else {
                self.worst_at
            },
            dot: add(self.dot, next.dot),
            reference_norm: add(self.reference_norm, next.reference_norm),
            candidate_norm: add(self.candidate_norm, next.candidate_norm),
            mismatched: self.mismatched + next.mismatched,
            non_finite_pairs: self.non_finite_pairs + next.non_finite_pairs,
            reference_nan: self.reference_nan + next.reference_nan,
            candidate_nan: self.candidate_nan + next.candidate_nan,
            reference_inf: self.reference_inf + next.reference_inf,
            candidate_inf: self.candidate_inf + next.candidate_inf,
        }
    }
}

/// A row-major flat index as coordinates in `shape`.
fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
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
    use crate::test_util::uniform;
    use crate::tolerance::AbsoluteTolerance;

    #[test]
    fn the_scale_is_the_largest_finite_magnitude_in_any_lane() {
        for len in [0, 1, 15, 16, 17, 100] {
            for at in 0..len {
                let mut values: Vec<f32> = (0..len).map(|i| (i % 7) as f32 - 3.0).collect();
                values[at] = -1e6;
                if len > 2 {
                    values[(at + 1) % len] = f32::NAN;
                    values[(at + 2) % len] = f32::NEG_INFINITY;
                }
                assert_eq!(
                    largest_finite_magnitude(&values),
                    1e6,
                    "{len} values, -1e6 at {at}"
                );
            }
        }
        assert_eq!(largest_finite_magnitude(&[f32::NAN, f32::INFINITY]), 0.0);
    }

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

    /// The cosine of the angle between two vectors, in f64, the slow way.
    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    }

    #[test]
    fn cosine_similarity_is_the_cosine_of_the_angle() {
        // 29 elements: three full lanes of 8 and a tail of 5, each lane used.
        let reference: Vec<f32> = (0..29).map(|i| (i as f32 * 0.7).sin() + 0.2).collect();
        let candidate: Vec<f32> = (0..29).map(|i| (i as f32 * 1.3).cos() - 0.1).collect();
        let result = compare(&reference, &candidate, &[29], &Tolerance::default());
        let expected = cosine(&reference, &candidate);
        assert!(expected.abs() < 0.9, "a test angle that tells: {expected}");
        assert!(
            (result.cosine_similarity - expected).abs() < 1e-12,
            "{} against {expected}",
            result.cosine_similarity
        );
        let opposite: Vec<f32> = reference.iter().map(|v| -2.0 * v).collect();
        let result = compare(&reference, &opposite, &[29], &Tolerance::default());
        assert!((result.cosine_similarity + 1.0).abs() < 1e-12);
        // Nothing against something is no similarity; nothing against nothing is equal.
        let zeros = [0f32; 29];
        assert_eq!(
            compare(&reference, &zeros, &[29], &Tolerance::default()).cosine_similarity,
            0.0
        );
        assert_eq!(
            compare(&zeros, &reference, &[29], &Tolerance::default()).cosine_similarity,
            0.0
        );
    }

    #[test]
    fn pieces_are_merged_in_order() {
        // Four parallel pieces; the largest error (2) is in the third, after
        // a smaller one in the first, and the same error again later in the
        // third and in the fourth: the first of equals is the one named.
        let length = 3 * CHUNK + 7;
        let mut reference: Vec<f32> = (0..length).map(|i| (i % 97) as f32 * 0.01).collect();
        let worst = 2 * CHUNK + 11;
        let ties = [worst + 100, 3 * CHUNK + 3];
        for at in [worst, ties[0], ties[1]] {
            reference[at] = 0.25;
        }
        let mut candidate = reference.clone();
        candidate[5] += 0.5;
        for at in [worst, ties[0], ties[1]] {
            candidate[at] = 2.25;
        }
        let result = compare(&reference, &candidate, &[length], &fixed(0.0, 1e-3));
        assert_eq!(result.mismatched, 4);
        assert_eq!(result.elements, length);
        assert_eq!(result.max_abs_error, 2.0);
        assert_eq!(result.worst.unwrap().index, vec![worst]);
        assert_eq!(result.scale, 0.96f32 as f64);
        assert!((result.cosine_similarity - cosine(&reference, &candidate)).abs() < 1e-12);
    }

    #[test]
    fn infinities_match_only_themselves_and_are_left_out_of_the_scale() {
        let reference = [f32::INFINITY, 2.0, f32::NEG_INFINITY, -4.0];
        let same = compare(&reference, &reference, &[4], &Tolerance::default());
        assert_eq!(
            (
                same.verdict,
                same.mismatched,
                same.max_abs_error,
                same.scale
            ),
            (Verdict::Succ, 0, 0.0, 4.0)
        );
        assert_eq!((same.reference_inf, same.candidate_inf), (2, 2));
        assert!(same.worst.is_none());
        // The finite elements count in the cosine, the infinite ones do not;
        // with no pair finite on both sides there is no cosine.
        assert!((same.cosine_similarity - 1.0).abs() < 1e-12);
        let none = compare(
            &[f32::NAN, 1.0],
            &[2.0, f32::INFINITY],
            &[2],
            &Tolerance::default(),
        );
        assert!(none.cosine_similarity.is_nan());
        let json = serde_json::to_value(&none).unwrap();
        assert!(json["cosine_similarity"].is_null());

        let candidate = [f32::INFINITY, 2.0, 7.0, -4.0];
        let off = compare(&reference, &candidate, &[4], &Tolerance::default());
        assert_eq!((off.verdict, off.mismatched), (Verdict::Fail, 1));
        assert_eq!((off.reference_inf, off.candidate_inf), (2, 1));
        assert_eq!(off.max_abs_error, f64::INFINITY);
        assert_eq!(off.worst.unwrap().index, vec![2]);
    }

    #[test]
    fn a_nan_mismatch_is_the_worst_element_even_beside_finite_errors() {
        let reference = [1.0, 2.0, 3.0, f32::NAN];
        let candidate = [1.0, 2.5, f32::NAN, f32::NAN];
        let result = compare(&reference, &candidate, &[4], &fixed(0.0, 1.0));
        // 0.5 is within atol 1; the NaNs are not.
        assert_eq!((result.verdict, result.mismatched), (Verdict::Fail, 2));
        assert_eq!((result.reference_nan, result.candidate_nan), (1, 2));
        assert_eq!(result.max_abs_error, f64::INFINITY);
        assert_eq!(result.worst.unwrap().index, vec![2]);
        assert_eq!(result.scale, 3.0);
        // Within tolerance, the first element that fails is still named.
        let first = compare(&[1.0, f32::NAN], &[1.0, 0.0], &[2], &fixed(0.0, 1.0));
        assert_eq!(first.worst.unwrap().index, vec![1]);
    }

    #[test]
    fn a_failure_in_detail_has_its_worst_elements_channels_and_spread() {
        // [N=1, C=3, H=1, W=2]: channel 1 is off by 0.5 and 2.0, channel 2 by 1e-6.
        let reference =
            ndarray::ArrayD::from_shape_vec(vec![1, 3, 1, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
                .unwrap();
        let candidate = ndarray::ArrayD::from_shape_vec(
            vec![1, 3, 1, 2],
            vec![1.0, 2.0, 3.5, 6.0, 5.0, 6.000001],
        )
        .unwrap();
        let detail = failure_detail(&reference, &candidate, false);
        assert_eq!(detail.worst.len(), 3);
        assert_eq!(detail.worst[0].index, vec![0, 1, 0, 1]);
        assert_eq!(detail.worst[1].index, vec![0, 1, 0, 0]);
        assert_eq!(detail.channel_max_error[0], 0.0);
        assert_eq!(detail.channel_max_error[1], 2.0);
        assert!(detail.channel_max_error[2] > 0.0 && detail.channel_max_error[2] < 1e-5);
        assert_eq!(detail.histogram.iter().sum::<usize>(), 6);
        assert_eq!(detail.histogram[0], 3);
        // 0.5 is in [1e-1, 1), 2.0 in [1, 10): buckets 12 and 13.
        assert_eq!((detail.histogram[12], detail.histogram[13]), (1, 1));
        // NaN against NaN: a match with equal_nan only, else the worst.
        let nan = ndarray::ArrayD::from_shape_vec(vec![1, 2], vec![f32::NAN, 1.0]).unwrap();
        let strict = failure_detail(&nan, &nan, false);
        assert_eq!((strict.histogram[16], strict.worst.len()), (1, 1));
        assert_eq!(strict.channel_max_error, vec![f64::INFINITY, 0.0]);
        let lenient = failure_detail(&nan, &nan, true);
        assert_eq!((lenient.histogram[0], lenient.worst.len()), (2, 0));
    }

    #[test]
    fn the_error_by_item_splits_the_batch_and_counts_a_nan_as_infinite() {
        let reference = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let candidate = [1.0, 2.5, 3.0, 4.0, f32::NAN, 6.25];
        assert_eq!(
            max_abs_error_by_item(&reference, &candidate, 3, false),
            vec![0.5, 0.0, f64::INFINITY]
        );
        let nan = [f32::NAN, 1.0];
        assert_eq!(max_abs_error_by_item(&nan, &nan, 2, true), vec![0.0, 0.0]);
        assert_eq!(
            max_abs_error_by_item(&nan, &nan, 2, false),
            vec![f64::INFINITY, 0.0]
        );
        // Not a whole number of items: nothing is made up.
        assert!(max_abs_error_by_item(&reference, &candidate, 4, false).is_empty());
    }

    #[test]
    fn the_multiple_of_the_floor_a_failure_needs_is_exact() {
        use crate::tolerance::{AutoTolerance, ToleranceRule};
        use resnet_dump::{NoiseFloor, Precision};
        let below = |value: f64| f64::from_bits(value.to_bits() - 1);
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        for (length, floor) in [(1usize, 3e-7), (64, 1e-6), (1000, 2.5e-5)] {
            let reference: Vec<f32> = (0..length).map(|_| ((next() - 0.5) * 8.0) as f32).collect();
            let candidate: Vec<f32> = reference
                .iter()
                .map(|&r| r + ((next() - 0.5) * 1e-3) as f32)
                .collect();
            let floor = NoiseFloor {
                max_abs: floor,
                scale: 4.0,
                relative: floor / 4.0,
                rms: floor / 3.0,
            };
            let with = |multiple| {
                let rule = ToleranceRule::Auto(AutoTolerance {
                    multiple,
                    candidate_dtype: Precision::Float32,
                    equal_nan: false,
                });
                let stage = rule.for_stage("s", Some(&floor)).unwrap();
                compare_for_report(&reference, &candidate, &[length], &stage)
            };
            let run = with(AutoTolerance::DEFAULT_MULTIPLE);
            assert_eq!(run.verdict, Verdict::Fail, "{length}");
            assert_eq!(run.rtol_needed, None);
            let needed = run.multiple_needed.unwrap();
            assert_eq!(with(needed).verdict, Verdict::Succ, "{length}: {needed}");
            assert_eq!(
                with(below(needed)).verdict,
                Verdict::Fail,
                "{length}: {needed}"
            );
            assert_eq!(with(below(needed)).multiple_needed, Some(needed));
        }
        // A floor of 0 on an all-zero stage: no multiple passes an error.
        let zero = NoiseFloor {
            max_abs: 0.0,
            scale: 0.0,
            relative: 0.0,
            rms: 0.0,
        };
        let stage = ToleranceRule::auto().for_stage("s", Some(&zero)).unwrap();
        let run = compare_for_report(&[0.0, 0.0], &[0.0, 1e-3], &[2], &stage);
        assert_eq!(
            (run.verdict, run.multiple_needed, run.beyond_rtol),
            (Verdict::Fail, None, Some(BeyondRtol::ZeroReference))
        );
        // Scaled to bfloat16, the floor would allow more than the stage
        // holds: zeros for ones still fail, at the ceiling.
        let coarse = NoiseFloor {
            max_abs: 1e-4,
            scale: 1.0,
            relative: 1e-4,
            rms: 1e-5,
        };
        let rule = ToleranceRule::Auto(AutoTolerance {
            multiple: AutoTolerance::DEFAULT_MULTIPLE,
            candidate_dtype: Precision::Bfloat16,
            equal_nan: false,
        });
        let stage = rule.for_stage("s", Some(&coarse)).unwrap();
        assert_eq!(stage.tolerance.atol_for(1.0), AutoTolerance::CEILING);
        let zeros = compare_for_report(&[1.0, -1.0], &[0.0, 0.0], &[2], &stage);
        assert_eq!(
            (zeros.verdict, zeros.beyond_rtol),
            (Verdict::Fail, Some(BeyondRtol::AboveCeiling))
        );
        let close = compare_for_report(&[1.0, -1.0], &[0.75, -1.0], &[2], &stage);
        assert_eq!(close.verdict, Verdict::Succ);
    }

    #[test]
    fn the_tolerance_a_failure_needs_is_exact() {
        fn reported(reference: &[f32], candidate: &[f32], tolerance: &Tolerance) -> Comparison {
            let stage = StageTolerance {
                tolerance: *tolerance,
                auto_unit: None,
                auto_ceiling: None,
            };
            compare_for_report(reference, candidate, &[reference.len()], &stage)
        }
        let below = |value: f64| f64::from_bits(value.to_bits() - 1);
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        for length in [1usize, 5, 64, 1000] {
            for atol in [0.0, 1e-4, 3e-3] {
                let reference: Vec<f32> =
                    (0..length).map(|_| ((next() - 0.5) * 8.0) as f32).collect();
                let candidate: Vec<f32> = reference
                    .iter()
                    .map(|&r| r * (1.0 + ((next() - 0.3) * 1e-2) as f32) + 1e-3)
                    .collect();
                let run = reported(&reference, &candidate, &fixed(1e-6, atol));
                assert_eq!(run.verdict, Verdict::Fail, "{length} {atol}");
                let needed = run.rtol_needed.unwrap();
                let with = |rtol| reported(&reference, &candidate, &fixed(rtol, atol));
                assert_eq!(
                    with(needed).verdict,
                    Verdict::Succ,
                    "{length} {atol}: {needed}"
                );
                assert_eq!(with(needed).rtol_needed, None);
                let just_below = with(below(needed));
                assert_eq!(
                    just_below.verdict,
                    Verdict::Fail,
                    "{length} {atol}: {needed}"
                );
                assert_eq!(just_below.rtol_needed, Some(needed));
            }
        }
        // What no rtol fixes, and why.
        let nan = reported(&[1.0, 2.0], &[1.0, f32::NAN], &fixed(1e-4, 0.0));
        assert_eq!(
            (nan.verdict, nan.rtol_needed, nan.beyond_rtol),
            (Verdict::Fail, None, Some(BeyondRtol::NonFinite))
        );
        let zero = reported(&[0.0, 2.0], &[1e-3, 2.0], &fixed(1e-4, 1e-4));
        assert_eq!(zero.beyond_rtol, Some(BeyondRtol::ZeroReference));
        // A matched infinity beside an error where the reference is 0.
        let matched = reported(
            &[f32::INFINITY, 0.0],
            &[f32::INFINITY, 1.0],
            &fixed(1e-4, 1e-4),
        );
        assert_eq!(matched.beyond_rtol, Some(BeyondRtol::ZeroReference));
        // Within atol, an error where the reference is 0 needs nothing.
        let small = reported(&[0.0, 2.0], &[1e-5, 2.5], &fixed(1e-4, 1e-4));
        let needed = small.rtol_needed.expect("the 2.5 is fixed by an rtol");
        assert!((needed - (0.5 - 1e-4) / 2.0).abs() < 1e-12, "{needed}");
        // A binding element whose gap to atol is tiny: found at once, not
        // one float at a time (the review's case ran for minutes).
        let hard = reported(&[-(2f32.powi(-53)), 1.0], &[0.5, 1.0], &fixed(0.0, 0.5));
        let needed = hard.rtol_needed.unwrap();
        assert_eq!(
            reported(&[-(2f32.powi(-53)), 1.0], &[0.5, 1.0], &fixed(needed, 0.5)).verdict,
            Verdict::Succ
        );
        assert_eq!(
            reported(
                &[-(2f32.powi(-53)), 1.0],
                &[0.5, 1.0],
                &fixed(below(needed), 0.5)
            )
            .verdict,
            Verdict::Fail
        );
        // A plain comparison (a hypothesis') does not compute it.
        assert_eq!(
            compare(&[1.0], &[2.0], &[1], &fixed(0.0, 0.0)).rtol_needed,
            None
        );
    }

    /// `compare`, element by element in one loop: the rule as the docs
    /// state it, against which the vectorised, parallel version is checked.
    fn compare_slowly(reference: &[f32], candidate: &[f32], tolerance: &Tolerance) -> Comparison {
        let scale = reference
            .iter()
            .filter(|r| r.is_finite())
            .fold(0f64, |m, &r| m.max((r as f64).abs()));
        let atol = tolerance.atol_for(scale);
        let mut result = compare(&[], &[], &[0], tolerance);
        let (mut dot, mut reference_norm, mut candidate_norm) = (0f64, 0f64, 0f64);
        for (index, (&r, &c)) in reference.iter().zip(candidate).enumerate() {
            let (r, c) = (r as f64, c as f64);
            let both_finite = r.is_finite() && c.is_finite();
            let matches = if r.is_nan() || c.is_nan() {
                tolerance.equal_nan && r.is_nan() && c.is_nan()
            } else if both_finite {
                (c - r).abs() <= atol + tolerance.rtol * r.abs()
            } else {
                r == c
            };
            let error = match (both_finite, matches) {
                (true, _) => (c - r).abs(),
                (false, true) => 0.0,
                (false, false) => f64::INFINITY,
            };
            if error > result.max_abs_error {
                result.max_abs_error = error;
                result.worst = Some(WorstElement {
                    index: vec![index],
                    reference: r as f32,
                    candidate: c as f32,
                });
            }
            result.mismatched += !matches as usize;
            result.reference_nan += r.is_nan() as usize;
            result.candidate_nan += c.is_nan() as usize;
            result.reference_inf += r.is_infinite() as usize;
            result.candidate_inf += c.is_infinite() as usize;
            if both_finite {
                dot += r * c;
                reference_norm += r * r;
                candidate_norm += c * c;
            }
        }
        result.verdict = if result.mismatched == 0 {
            Verdict::Succ
        } else {
            Verdict::Fail
        };
        result.scale = scale;
        result.elements = reference.len();
        result.relative_error = result.max_abs_error / scale.max(f32::MIN_POSITIVE as f64);
        let any_finite_pair = reference
            .iter()
            .zip(candidate)
            .any(|(r, c)| r.is_finite() && c.is_finite());
        result.cosine_similarity = match (reference_norm > 0.0, candidate_norm > 0.0) {
            _ if !any_finite_pair && !reference.is_empty() => f64::NAN,
            (true, true) => dot / (reference_norm.sqrt() * candidate_norm.sqrt()),
            (false, false) => 1.0,
            _ => 0.0,
        };
        result
    }

    #[test]
    fn the_fast_comparison_is_the_slow_one() {
        // Seeded xorshift: values, small errors near the tolerance, and
        // (in some runs) NaN and infinities, over one piece or several.
        let mut next = uniform(0x2545_f491_4f6c_dd1d);
        for (run, length) in [1usize, 7, 8, 29, 1000, CHUNK + 3, 2 * CHUNK + 100]
            .into_iter()
            .enumerate()
        {
            for non_finite in [false, true] {
                let reference: Vec<f32> = (0..length)
                    .map(|_| ((next() - 0.5) * 40.0) as f32)
                    .collect();
                let candidate: Vec<f32> = reference
                    .iter()
                    .map(|&r| r + ((next() - 0.5) * 2e-3 * (1.0 + r.abs() as f64)) as f32)
                    .collect();
                let (mut reference, mut candidate) = (reference, candidate);
                if non_finite {
                    for (at, value) in [
                        (0.3, f32::NAN),
                        (0.5, f32::INFINITY),
                        (0.9, f32::NEG_INFINITY),
                    ] {
                        let index = (at * length as f64) as usize;
                        reference[index] = value;
                        if run % 2 == 0 {
                            candidate[index] = value;
                        }
                    }
                }
                for tolerance in [
                    fixed(1e-4, 1e-3),
                    fixed(5e-4, 0.0),
                    Tolerance {
                        equal_nan: true,
                        ..Tolerance::default()
                    },
                    Tolerance {
                        rtol: 0.0,
                        atol: AbsoluteTolerance::ScaleRelative(2e-5),
                        equal_nan: false,
                    },
                ] {
                    let fast = compare(&reference, &candidate, &[length], &tolerance);
                    let slow = compare_slowly(&reference, &candidate, &tolerance);
                    let what = format!("length {length}, non-finite {non_finite}, {tolerance:?}");
                    assert!(
                        (fast.cosine_similarity - slow.cosine_similarity).abs() < 1e-9
                            || (fast.cosine_similarity.is_nan() && slow.cosine_similarity.is_nan()),
                        "{what}: cosine {} against {}",
                        fast.cosine_similarity,
                        slow.cosine_similarity
                    );
                    // Field by field: the worst element may be NaN, which
                    // equals nothing, so its values are compared as bits.
                    let figures = |c: &Comparison| {
                        let worst = c.worst.as_ref().map(|w| {
                            (
                                w.index.clone(),
                                w.reference.to_bits(),
                                w.candidate.to_bits(),
                            )
                        });
                        let counts = (
                            c.reference_nan,
                            c.candidate_nan,
                            c.reference_inf,
                            c.candidate_inf,
                        );
                        (
                            (c.verdict, c.mismatched, c.elements, counts, worst),
                            (c.max_abs_error, c.relative_error, c.scale),
                        )
                    };
                    assert_eq!(figures(&fast), figures(&slow), "{what}");
                    assert!(
                        slow.mismatched > 0 || length < 100,
                        "{what}: a test that can fail"
                    );
                }
            }
        }
    }

    #[test]
    fn equal_arrays_have_no_worst_element() {
        let values = [1.0, -2.0, 3.5];
        let result = compare(&values, &values, &[3], &Tolerance::default());
        assert_eq!((result.max_abs_error, result.worst), (0.0, None));
    }

    #[test]
    fn verdicts_are_written_as_the_report_words() {
        assert_eq!(serde_json::to_value(Verdict::Succ).unwrap(), "succ");
        assert_eq!(serde_json::to_value(Verdict::Fail).unwrap(), "fail");
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
