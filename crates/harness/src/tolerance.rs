//! When two activations count as equal.
//!
//! The rule is torch's: element-wise `|cand - ref| <= atol + rtol * |ref|`.
//! What differs is the default. torch.testing's float32 defaults (rtol
//! 1.3e-6, atol 1e-5) are made for one operation; a ResNet is hundreds of
//! them, and activation magnitudes grow with depth into the hundreds, so
//! even PyTorch's own float32 result fails them against the exact (float64)
//! computation at most stages. The default here therefore scales `atol`
//! with the stage's magnitude: `atol = atol_scale * max|ref|`. docs/tolerance.md
//! gives the measurements behind the numbers.
//!
//! `--tol auto` asks the reference instead: a dump made with `--floor`
//! records, per stage, how far its own float32 result is from float64, and
//! each stage's atol is a multiple of that ([`AutoTolerance`]).

use resnet_dump::{NoiseFloor, Precision};
use serde::{Serialize, Serializer};

/// The absolute part of the tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum AbsoluteTolerance {
    /// A fixed `atol`, as `--atol` gives it.
    Fixed(f64),
    /// `atol = value * max|ref|` over the stage: the default.
    ScaleRelative(f64),
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{name} must be a finite number >= 0, not {value}")]
pub struct InvalidTolerance {
    pub name: &'static str,
    pub value: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: AbsoluteTolerance,
    /// Whether NaN in both at the same place counts as a match.
    pub equal_nan: bool,
}

impl Tolerance {
    /// The default rtol; see docs/tolerance.md.
    pub const DEFAULT_RTOL: f64 = 1e-4;
    /// The default atol, as a fraction of the stage's largest |ref|.
    pub const DEFAULT_ATOL_SCALE: f64 = 1e-4;

    /// The default, with what a user gave (`--atol` or `--atol-scale`,
    /// `--rtol`, `--equal-nan`, or the bindings' arguments) in its place.
    /// A negative or non-finite figure is refused: it would fail every
    /// element, or none, whatever the data.
    pub fn with_overrides(
        atol: Option<AbsoluteTolerance>,
        rtol: Option<f64>,
        equal_nan: bool,
    ) -> Result<Self, InvalidTolerance> {
        let default = Tolerance::default();
        let check = |name: &'static str, value: f64| match value.is_finite() && value >= 0.0 {
            true => Ok(value),
            false => Err(InvalidTolerance { name, value }),
        };
        Ok(Tolerance {
            rtol: check("rtol", rtol.unwrap_or(default.rtol))?,
            atol: match atol.unwrap_or(default.atol) {
                AbsoluteTolerance::Fixed(atol) => AbsoluteTolerance::Fixed(check("atol", atol)?),
                AbsoluteTolerance::ScaleRelative(fraction) => {
                    AbsoluteTolerance::ScaleRelative(check("atol-scale", fraction)?)
                }
            },
            equal_nan,
        })
    }

    /// The absolute tolerance for a stage whose largest |ref| is `scale`.
    pub fn atol_for(&self, scale: f64) -> f64 {
        match self.atol {
            AbsoluteTolerance::Fixed(atol) => atol,
            AbsoluteTolerance::ScaleRelative(fraction) => fraction * scale,
        }
    }

    pub fn describe(&self) -> String {
        let atol = match self.atol {
            AbsoluteTolerance::Fixed(atol) => format!("atol {atol:e}"),
            AbsoluteTolerance::ScaleRelative(fraction) => format!("atol {fraction:e} x max|ref|"),
        };
        format!(
            "|cand - ref| <= atol + rtol * |ref| with rtol {:e}, {atol}",
            self.rtol
        )
    }
}

/// `--tol auto`: a stage passes when `|cand - ref| <= multiple * unit`
/// everywhere, where the unit is the stage's noise floor (the reference's
/// own float32 error against float64, `max_abs`), at least one float32
/// rounding of the stage's largest value, and scaled by the candidate's
/// unit roundoff over float32's for a candidate computed in float16 or
/// bfloat16. The default multiple, 5: a candidate within 4x the floor
/// against float64 (TorchDynamo allows 2x on the RMS error; a stage's
/// maximum is noisier: 2x + 1 would leave the core, at up to 2.89x
/// against the reference when it summed in one running sum, 1.80x since,
/// no margin) plus the reference's own floor. docs/tolerance.md has the
/// measurements: correct float32 implementations need up to 2.9x, the bug
/// classes hundreds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AutoTolerance {
    pub multiple: f64,
    /// What the candidate computes in.
    pub candidate_dtype: Precision,
    pub equal_nan: bool,
}

impl AutoTolerance {
    pub const DEFAULT_MULTIPLE: f64 = 5.0;
    /// The most auto allows, as a fraction of the stage's max|ref|: scaled
    /// to bfloat16's roundoff, a deep stage's floor times the multiple can
    /// exceed the stage itself, and an all-zero output (an error of
    /// max|ref|) would pass. Correct PyTorch bfloat16 runs measured up to
    /// 0.095 of max|ref| on ResNet50 at 224 and 0.35 on the width-8 test
    /// models at 64x64; float16 0.015 (docs/tolerance.md).
    pub const CEILING: f64 = 0.5;

    /// `--tol auto` for a float32 candidate, with the multiple a user gave
    /// (refused when negative or not finite).
    pub fn with_multiple(
        multiple: Option<f64>,
        equal_nan: bool,
    ) -> Result<ToleranceRule, InvalidTolerance> {
        let multiple = multiple.unwrap_or(Self::DEFAULT_MULTIPLE);
        if !(multiple.is_finite() && multiple >= 0.0) {
            return Err(InvalidTolerance {
                name: "tol-multiple",
                value: multiple,
            });
        }
        Ok(ToleranceRule::Auto(AutoTolerance {
            multiple,
            candidate_dtype: Precision::Float32,
            equal_nan,
        }))
    }

    /// The stage's unit of atol (see the type).
    pub fn unit(&self, floor: &NoiseFloor) -> f64 {
        let single = Precision::Float32.unit_roundoff();
        let roundoff_ratio = (self.candidate_dtype.unit_roundoff() / single).max(1.0);
        floor.max_abs.max(single * floor.scale) * roundoff_ratio
    }
}

/// A run's rule: the same tolerance for every stage, or each stage's own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ToleranceRule {
    Fixed(Tolerance),
    Auto(AutoTolerance),
}

/// Whether `floor` can be the noise floor of a stage whose largest finite
/// |value| is `largest`. The stored float32 output and the float64 one the
/// floor was measured against differ by at most `max_abs` everywhere, so
/// their largest magnitudes do too (with one float32 rounding of slack, for
/// a reference stored wider); and no two outputs of magnitudes `largest`
/// and `scale` differ by more than their sum. A floor that fails was
/// measured on other data (copied from another stage or dump, or edited),
/// and under `--tol auto` it would set this stage's tolerance: a `max_abs`
/// of 1e30 would pass anything up to the ceiling.
pub fn floor_fits_stage(floor: &NoiseFloor, largest: f64) -> Result<(), String> {
    let slack = f64::from(f32::EPSILON) * floor.scale.max(largest);
    let advice = "--tol auto needs the floor measured on this reference \
                  (python -m reference.dump ... --floor)";
    if (largest - floor.scale).abs() > floor.max_abs + slack {
        return Err(format!(
            "its noise floor is not its own: floor.scale (max|float64|) is {:e}, but the stored \
             stage's largest |value| is {largest:e}, and the two cannot differ by more than \
             floor.max_abs ({:e}). {advice}",
            floor.scale, floor.max_abs
        ));
    }
    if floor.max_abs > largest + floor.scale + slack {
        return Err(format!(
            "its noise floor is not its own: floor.max_abs ({:e}) is more than the stored \
             stage's largest |value| ({largest:e}) and floor.scale ({:e}) together, which no \
             two outputs of those sizes differ by. {advice}",
            floor.max_abs, floor.scale
        ));
    }
    Ok(())
}

/// `--tol auto` on a stage whose reference has no noise floor (`None`:
/// no stage of the reference has one).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "{} no noise floor: --tol auto needs a reference dumped with --floor \
     (python -m reference.dump ... --floor)",
    match .stage { Some(stage) => format!("stage {stage} has"), None => "the reference has".into() }
)]
pub struct MissingFloor {
    pub stage: Option<String>,
}

/// One stage's tolerance, and for `--tol auto` its unit, in which a
/// failure's need is said, and its ceiling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageTolerance {
    pub tolerance: Tolerance,
    pub auto_unit: Option<f64>,
    /// Under auto, the largest atol any multiple gives.
    pub auto_ceiling: Option<f64>,
}

impl ToleranceRule {
    /// `--tol auto` with the default multiple and a float32 candidate.
    pub fn auto() -> Self {
        AutoTolerance::with_multiple(None, false).expect("the default is valid")
    }

    /// The tolerance of stage `stage`, whose reference's noise floor is `floor`.
    pub fn for_stage(
        &self,
        stage: &str,
        floor: Option<&NoiseFloor>,
    ) -> Result<StageTolerance, MissingFloor> {
        match self {
            ToleranceRule::Fixed(tolerance) => Ok(StageTolerance {
                tolerance: *tolerance,
                auto_unit: None,
                auto_ceiling: None,
            }),
            ToleranceRule::Auto(auto) => {
                // A floor that is negative or not finite is no floor.
                let valid = |value: f64| value.is_finite() && value >= 0.0;
                let floor = floor
                    .filter(|floor| valid(floor.max_abs) && valid(floor.scale))
                    .ok_or_else(|| MissingFloor {
                        stage: Some(stage.to_string()),
                    })?;
                let unit = auto.unit(floor);
                let ceiling = AutoTolerance::CEILING * floor.scale;
                Ok(StageTolerance {
                    tolerance: Tolerance {
                        rtol: 0.0,
                        atol: AbsoluteTolerance::Fixed((auto.multiple * unit).min(ceiling)),
                        equal_nan: auto.equal_nan,
                    },
                    auto_unit: Some(unit),
                    auto_ceiling: Some(ceiling),
                })
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ToleranceRule::Fixed(tolerance) => tolerance.describe(),
            ToleranceRule::Auto(auto) => {
                let dtype = match auto.candidate_dtype {
                    Precision::Float32 | Precision::Float64 => String::new(),
                    other => format!(
                        ", scaled to a {} candidate's roundoff (x{})",
                        other.name(),
                        other.unit_roundoff() / Precision::Float32.unit_roundoff()
                    ),
                };
                format!(
                    "auto: |cand - ref| <= {} x the stage's noise floor (the reference's float32 \
                     error against float64, at least 2^-24 x max|ref|){dtype}, at most {} x max|ref|",
                    auto.multiple,
                    AutoTolerance::CEILING
                )
            }
        }
    }

    pub fn equal_nan(&self) -> bool {
        match self {
            ToleranceRule::Fixed(tolerance) => tolerance.equal_nan,
            ToleranceRule::Auto(auto) => auto.equal_nan,
        }
    }
}

impl Default for ToleranceRule {
    fn default() -> Self {
        ToleranceRule::Fixed(Tolerance::default())
    }
}

/// A fixed rule as the report has always shown it; auto with `"rule": "auto"`.
impl Serialize for ToleranceRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Auto<'a> {
            rule: &'static str,
            #[serde(flatten)]
            auto: &'a AutoTolerance,
        }
        match self {
            ToleranceRule::Fixed(tolerance) => tolerance.serialize(serializer),
            ToleranceRule::Auto(auto) => Auto { rule: "auto", auto }.serialize(serializer),
        }
    }
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            rtol: Self::DEFAULT_RTOL,
            atol: AbsoluteTolerance::ScaleRelative(Self::DEFAULT_ATOL_SCALE),
            equal_nan: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_scales_atol_with_the_stage() {
        let default = Tolerance::default();
        assert_eq!(default.rtol, 1e-4);
        assert!(!default.equal_nan);
        assert_eq!(default.atol_for(250.0), 250.0 * 1e-4);
        assert_eq!(
            default.describe(),
            "|cand - ref| <= atol + rtol * |ref| with rtol 1e-4, atol 1e-4 x max|ref|"
        );
    }

    #[test]
    fn what_the_user_gives_replaces_the_default_part_by_part() {
        assert_eq!(
            Tolerance::with_overrides(None, None, false),
            Ok(Tolerance::default())
        );
        let fixed =
            Tolerance::with_overrides(Some(AbsoluteTolerance::Fixed(0.5)), None, true).unwrap();
        assert_eq!(
            (fixed.rtol, fixed.atol, fixed.equal_nan),
            (1e-4, AbsoluteTolerance::Fixed(0.5), true)
        );
        // A fixed atol does not follow the stage's scale.
        assert_eq!(fixed.atol_for(1000.0), 0.5);
        assert_eq!(
            fixed.describe(),
            "|cand - ref| <= atol + rtol * |ref| with rtol 1e-4, atol 5e-1"
        );
        let scaled = Tolerance::with_overrides(
            Some(AbsoluteTolerance::ScaleRelative(3e-5)),
            Some(2e-6),
            false,
        )
        .unwrap();
        assert_eq!(scaled.atol_for(10.0), 10.0 * 3e-5);
        assert_eq!(
            scaled.describe(),
            "|cand - ref| <= atol + rtol * |ref| with rtol 2e-6, atol 3e-5 x max|ref|"
        );
    }

    #[test]
    fn negative_or_non_finite_figures_are_refused_by_name() {
        let refused = |atol, rtol| Tolerance::with_overrides(atol, rtol, false).unwrap_err();
        assert_eq!(
            refused(None, Some(-1e-4)).to_string(),
            "rtol must be a finite number >= 0, not -0.0001"
        );
        assert_eq!(refused(None, Some(f64::NAN)).name, "rtol");
        assert_eq!(
            refused(Some(AbsoluteTolerance::Fixed(-1.0)), None).name,
            "atol"
        );
        assert_eq!(
            refused(Some(AbsoluteTolerance::ScaleRelative(f64::INFINITY)), None).name,
            "atol-scale"
        );
        // Zero is a tolerance: exact equality.
        assert!(
            Tolerance::with_overrides(Some(AbsoluteTolerance::Fixed(0.0)), Some(0.0), false)
                .is_ok()
        );
    }

    #[test]
    fn a_floor_fits_only_a_stage_of_its_own_scale() {
        use resnet_dump::NoiseFloor;
        let floor = NoiseFloor {
            max_abs: 1e-6,
            scale: 2.0,
            relative: 5e-7,
            rms: 1e-7,
        };
        // The float32 maximum may be off by max_abs, in either direction.
        assert_eq!(floor_fits_stage(&floor, 2.0 - 1e-6), Ok(()));
        assert_eq!(floor_fits_stage(&floor, 2.0 + 1e-6), Ok(()));
        let other = floor_fits_stage(&floor, 2.1).unwrap_err();
        assert!(
            other.starts_with("its noise floor is not its own: floor.scale (max|float64|) is 2e0, but the stored stage's largest |value| is 2.1e0"),
            "{other}"
        );
        let huge = NoiseFloor {
            max_abs: 1e30,
            relative: 5e29,
            ..floor
        };
        let huge = floor_fits_stage(&huge, 2.0).unwrap_err();
        assert!(huge.contains("floor.max_abs (1e30) is more than the stored stage's largest |value| (2e0) and floor.scale (2e0) together"), "{huge}");
        let zero = NoiseFloor {
            max_abs: 0.0,
            scale: 0.0,
            relative: 0.0,
            rms: 0.0,
        };
        assert_eq!(floor_fits_stage(&zero, 0.0), Ok(()));
        assert!(floor_fits_stage(&zero, 1e-3).is_err());
    }

    #[test]
    fn auto_gives_each_stage_a_multiple_of_its_floor_scaled_to_the_candidate() {
        use resnet_dump::{NoiseFloor, Precision};
        let floor = NoiseFloor {
            max_abs: 2e-6,
            scale: 4.0,
            relative: 5e-7,
            rms: 1e-7,
        };
        let stage = ToleranceRule::auto()
            .for_stage("conv1", Some(&floor))
            .unwrap();
        assert_eq!(stage.auto_unit, Some(2e-6));
        assert_eq!(stage.tolerance.rtol, 0.0);
        assert_eq!(stage.tolerance.atol_for(123.0), 5.0 * 2e-6);
        // A floor below one float32 rounding of the largest value is raised to it.
        let exact = NoiseFloor {
            max_abs: 0.0,
            ..floor
        };
        let unit = |rule: ToleranceRule, floor: &NoiseFloor| {
            rule.for_stage("input", Some(floor))
                .unwrap()
                .auto_unit
                .unwrap()
        };
        assert_eq!(unit(ToleranceRule::auto(), &exact), 4.0 * 2f64.powi(-24));
        // bfloat16: 2^16 times float32's roundoff; float64 is no tighter than float32.
        let with = |dtype| {
            ToleranceRule::Auto(AutoTolerance {
                candidate_dtype: dtype,
                ..match ToleranceRule::auto() {
                    ToleranceRule::Auto(auto) => auto,
                    ToleranceRule::Fixed(_) => unreachable!(),
                }
            })
        };
        assert_eq!(unit(with(Precision::Bfloat16), &floor), 2e-6 * 65536.0);
        assert_eq!(unit(with(Precision::Float16), &floor), 2e-6 * 8192.0);
        assert_eq!(unit(with(Precision::Float64), &floor), 2e-6);
        assert_eq!(
            ToleranceRule::auto().for_stage("layer1", None),
            Err(MissingFloor {
                stage: Some("layer1".into())
            })
        );
        assert_eq!(
            MissingFloor { stage: None }.to_string(),
            "the reference has no noise floor: --tol auto needs a reference dumped with --floor \
             (python -m reference.dump ... --floor)"
        );
        assert_eq!(
            AutoTolerance::with_multiple(Some(-1.0), false)
                .unwrap_err()
                .name,
            "tol-multiple"
        );
        // The report says which rule ran; a fixed one as it always has.
        assert_eq!(
            serde_json::to_value(ToleranceRule::auto()).unwrap(),
            serde_json::json!({"rule": "auto", "multiple": 5.0, "candidate_dtype": "float32", "equal_nan": false})
        );
        assert_eq!(
            serde_json::to_value(ToleranceRule::default()).unwrap(),
            serde_json::to_value(Tolerance::default()).unwrap()
        );
    }
}
