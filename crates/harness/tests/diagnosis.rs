//! Each classic mistake, injected into a fixture, must be named by a hint
//! at the stage where it was made; correct runs must get no hint at all.
//! Most mistakes are made the way another engine would make them: the
//! candidate dump is the reference with one stage recomputed wrongly, and
//! `verify compare` must explain it. Mistakes on the reference's side
//! (train mode, another eps, weights stored in another order) are run
//! through the core.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use ndarray::{ArrayD, Axis, Ix4, IxDyn};
use resnet_core::ops::{Conv2d, ConvGeometry};
use resnet_core::weights::conv_weight_from_oihw;
use resnet_core::Tensor;
use serde_json::Value;

/// `verify compare` of `name` against a copy of it that `edit` changed.
fn compare_edited(name: &str, edit: impl FnOnce(&Path)) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture(name, dir.path());
    edit(&candidate);
    let (code, report) = compare_report(&fixture(name), &candidate, &[]);
    assert_eq!(code, 1);
    report
}

fn stage<'a>(report: &'a Value, name: &str) -> &'a Value {
    entry(report, "stages", name)
}

/// The (hypothesis, message) of every hint at stage `name`.
fn hints(report: &Value, name: &str) -> Vec<(String, String)> {
    stage(report, name)["hints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["hypothesis"].as_str().unwrap().to_string(),
                h["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_hint(report: &Value, name: &str, hypothesis: &str, says: &str) {
    let found = hints(report, name);
    assert!(
        found
            .iter()
            .any(|(h, m)| h == hypothesis && m.contains(says)),
        "{name}: expected a {hypothesis} hint saying {says:?}, got {found:?}"
    );
    assert_eq!(report["summary"]["root"], name);
    assert_eq!(stage(report, name)["origin"]["kind"], "root");
}

fn weight(dump: &Path, name: &str) -> Vec<f64> {
    read(&dump.join("weights").join(format!("{name}.npy")))
        .iter()
        .map(|&v| v as f64)
        .collect()
}

fn replace_stage(dump: &Path, name: &str, value: &ArrayD<f32>) {
    write(&stage_file(dump, name), value);
}

fn stage_output(dump: &Path, name: &str) -> ArrayD<f32> {
    read(&stage_file(dump, name))
}

/// BatchNorm of an NCHW tensor with the given per-channel parameters.
fn batch_norm(
    x: &ArrayD<f32>,
    mean: &[f64],
    var: &[f64],
    w: &[f64],
    b: &[f64],
    eps: f64,
) -> ArrayD<f32> {
    let mut y = x.clone();
    for (c, mut values) in y.axis_iter_mut(Axis(1)).enumerate() {
        values
            .mapv_inplace(|v| ((v as f64 - mean[c]) / (var[c] + eps).sqrt() * w[c] + b[c]) as f32);
    }
    y
}

/// (weight, bias, running_mean, running_var) made wrong.
type BatchNormMistake = fn([Vec<f64>; 4]) -> [Vec<f64>; 4];
/// The 0-1 RGB image to a network input.
type Preprocessing = fn(&ArrayD<f32>) -> ArrayD<f32>;

/// The candidate's bn1, computed from the reference's conv1 with
/// `parameters` turning the true (weight, bias, mean, var) into the wrong ones.
fn wrong_bn1(
    dump: &Path,
    eps: f64,
    parameters: impl Fn([Vec<f64>; 4]) -> [Vec<f64>; 4],
) -> ArrayD<f32> {
    let x = stage_output(dump, "conv1");
    let [w, b, mean, var] = parameters([
        weight(dump, "bn1.weight"),
        weight(dump, "bn1.bias"),
        weight(dump, "bn1.running_mean"),
        weight(dump, "bn1.running_var"),
    ]);
    batch_norm(&x, &mean, &var, &w, &b, eps)
}

#[test]
fn correct_runs_get_no_hint_at_all() {
    for name in ["resnet50-w8", "resnet18-w8", "resnext50-w8"] {
        let output = verify(&[path(&fixture(name)), "--both", "--format", "json"]);
        assert_eq!(output.status.code(), Some(0), "{name}");
        let report = json_report(&output);
        for stage in report["stages"].as_array().unwrap() {
            assert_eq!(
                stage["hints"],
                serde_json::json!([]),
                "{name} {}",
                stage["name"]
            );
            // A missing key also reads as Null: the key must be there.
            assert!(
                stage.get("origin").is_some_and(|origin| origin.is_null()),
                "{name} {}",
                stage["name"]
            );
        }
        let summary = &report["summary"];
        for key in ["root", "hint"] {
            assert!(
                summary.get(key).is_some_and(|value| value.is_null()),
                "{name}: summary {key}: {summary}"
            );
        }
        assert_eq!(summary["introduced_at"], serde_json::json!([]), "{name}");
        let text = stdout(&verify(&[path(&fixture(name)), "--both"]));
        assert!(
            !text.contains("hint:") && !text.contains("origin:"),
            "{text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_fixture("resnet18-w8", dir.path());
    let same = verify(&["compare", path(&fixture("resnet18-w8")), path(&copy)]);
    assert_eq!(same.status.code(), Some(0));
    assert!(!stdout(&same).contains("hint:"));
}

#[test]
fn batch_statistics_in_the_candidate() {
    let report = compare_edited("resnet18-w8", |dump| {
        let x = stage_output(dump, "conv1");
        let (mut mean, mut var) = (Vec::new(), Vec::new());
        for values in x.axis_iter(Axis(1)) {
            let m = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
            mean.push(m);
            var.push(
                values.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / values.len() as f64,
            );
        }
        let bn1 = wrong_bn1(dump, 1e-5, |[w, b, _, _]| [w, b, mean.clone(), var.clone()]);
        replace_stage(dump, "bn1", &bn1);
    });
    assert_hint(
        &report,
        "bn1",
        "batch_statistics",
        "the candidate matches BatchNorm with batch statistics",
    );
}

#[test]
fn batch_statistics_in_a_train_mode_reference() {
    let output = verify(&[
        path(&fixture("resnet18-w8-train")),
        "--allow-train-reference",
        "--isolate",
        "--format",
        "json",
    ]);
    let report = json_report(&output);
    let found = hints(&report, "bn1");
    assert!(
        found.iter().any(|(h, m)| h == "batch_statistics" && m.contains("the reference matches BatchNorm with batch statistics: it was dumped in train mode")),
        "{found:?}"
    );
    assert_eq!(stage(&report, "bn1")["origin"]["kind"], "introduces");
}

#[test]
fn another_eps_is_solved_for() {
    let report = compare_edited("resnet18-w8", |dump| {
        replace_stage(dump, "bn1", &wrong_bn1(dump, 1e-3, |p| p));
    });
    assert_hint(
        &report,
        "bn1",
        "batch_norm_eps",
        "the candidate matches BatchNorm with eps = 1.0e-3",
    );

    // The core run with eps 1e-3 from an edited manifest: the reference is
    // the one that matches the model's true 1e-5.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet50-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["batch_norm_eps"] = 1e-3.into());
    let report = json_report(&verify(&[path(&dump), "--format", "json"]));
    assert_hint(
        &report,
        "bn1",
        "batch_norm_eps",
        "the reference matches BatchNorm with eps = 1.0e-5",
    );
}

#[test]
fn weight_and_bias_swapped_or_missing() {
    let cases: [(&str, BatchNormMistake); 4] = [
        ("weight and bias swapped", |[w, b, m, v]| [b, w, m, v]),
        ("weight missing", |[w, b, m, v]| {
            [vec![1.0; w.len()], b, m, v]
        }),
        ("bias missing", |[w, b, m, v]| [w, vec![0.0; b.len()], m, v]),
        ("weight and bias both missing", |[w, b, m, v]| {
            [vec![1.0; w.len()], vec![0.0; b.len()], m, v]
        }),
    ];
    for (says, mistake) in cases {
        let report = compare_edited("resnet18-w8", |dump| {
            replace_stage(dump, "bn1", &wrong_bn1(dump, 1e-5, mistake));
        });
        assert_hint(&report, "bn1", "batch_norm_affine", says);
    }
}

#[test]
fn running_mean_and_var_swapped() {
    let report = compare_edited("resnet18-w8", |dump| {
        replace_stage(
            dump,
            "bn1",
            &wrong_bn1(dump, 1e-5, |[w, b, m, v]| [w, b, v, m]),
        );
    });
    assert_hint(
        &report,
        "bn1",
        "batch_norm_statistics_swapped",
        "running_mean and running_var swapped",
    );
}

#[test]
fn the_variance_used_as_the_standard_deviation() {
    let report = compare_edited("resnet18-w8", |dump| {
        replace_stage(
            dump,
            "bn1",
            &wrong_bn1(dump, 0.0, |[w, b, m, v]| {
                let squared = v.iter().map(|v| v * v).collect();
                [w, b, m, squared]
            }),
        );
    });
    assert_hint(
        &report,
        "bn1",
        "batch_norm_affine",
        "divided by running_var, not by sqrt(running_var + eps)",
    );
}

/// What a BatchNorm puts under its square root, from (running_var, eps).
type VarUnderRoot = fn(f64, f64) -> f64;

/// A reference and a candidate dump of resnet18-w8 whose bn1 running_var
/// is scaled by `var_scale` (compare reads the reference's weights), the
/// reference's bn1 torch's, the candidate's with `candidate_var(var, eps)`
/// in place of `var + eps` under the root.
fn small_variance_pair(dir: &Path, var_scale: f32, candidate_var: VarUnderRoot) -> [PathBuf; 2] {
    ["reference", "candidate"].map(|side| {
        let dump = copy_fixture("resnet18-w8", &dir.join(side));
        let var_file = dump.join("weights").join("bn1.running_var.npy");
        write(&var_file, &read(&var_file).mapv(|v| v * var_scale));
        let eps = 1e-5;
        let bn = wrong_bn1(&dump, 0.0, |[w, b, m, v]| {
            let v = v
                .iter()
                .map(|&v| match side {
                    "reference" => v + eps,
                    _ => candidate_var(v, eps),
                })
                .collect();
            [w, b, m, v]
        });
        replace_stage(&dump, "bn1", &bn);
        dump
    })
}

#[test]
fn eps_left_out_or_added_outside_the_square_root() {
    // Each differs from sqrt(var + eps) only where var is small: bn1's
    // running_var scaled to about 1e-4 on both sides.
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, VarUnderRoot, &str); 2] = [
        (
            "outside",
            |v, eps| (v.sqrt() + eps).powi(2),
            "divided by sqrt(running_var) + eps, not by sqrt(running_var + eps)",
        ),
        (
            "left-out",
            |v, _| v,
            "eps left out (0): divided by sqrt(running_var), not by sqrt(running_var + 1e-5)",
        ),
    ];
    for (name, candidate_var, says) in cases {
        let [reference, candidate] =
            small_variance_pair(&dir.path().join(name), 1e-4, candidate_var);
        let (_, report) = compare_report(&reference, &candidate, &[]);
        assert_hint(&report, "bn1", "batch_norm_eps", says);
        // Not also an eps solved from the data: it fits, and misleads.
        assert_eq!(
            hints(&report, "bn1").len(),
            1,
            "{name}: {:?}",
            hints(&report, "bn1")
        );
    }
    // Where var is small but not tiny (about 6e-3), eps left out and eps
    // outside the root are within tolerance of each other: eps left out
    // was named 'outside the root'. Only what the data tells is said.
    let [reference, candidate] = small_variance_pair(&dir.path().join("near"), 1e-2, |v, _| v);
    let (_, report) = compare_report(&reference, &candidate, &[]);
    let found = hints(&report, "bn1");
    assert!(
        found
            .iter()
            .all(|(_, message)| !message.contains("outside the square root")),
        "{found:?}"
    );
}

#[test]
fn a_missing_relu() {
    let report = compare_edited("resnet18-w8", |dump| {
        std::fs::copy(
            stage_file(dump, "layer2.0.bn1"),
            stage_file(dump, "layer2.0.relu#0"),
        )
        .unwrap();
    });
    assert_hint(
        &report,
        "layer2.0.relu#0",
        "missing_relu",
        "a ReLU is missing: the candidate equals the ReLU's input",
    );
}

#[test]
fn a_leaky_relu_is_not_a_missing_one() {
    // relu(candidate) is the reference for a LeakyReLU too: it was once
    // 'a ReLU is missing'. The ReLU's input tells them apart.
    let report = compare_edited("resnet18-w8", |dump| {
        let input = stage_output(dump, "layer2.0.bn1");
        replace_stage(
            dump,
            "layer2.0.relu#0",
            &input.mapv(|v| if v < 0.0 { 0.01 * v } else { v }),
        );
    });
    assert_hint(
        &report,
        "layer2.0.relu#0",
        "other_activation",
        "a LeakyReLU (negative slope 1.000e-2) where torch has a ReLU",
    );
    // At a block's last ReLU, relu(bn2 + identity): its input is the sum,
    // and the LeakyReLU there was 'a ReLU is missing'.
    let report = compare_edited("resnet18-w8", |dump| {
        let sum = &stage_output(dump, "layer1.0.bn2") + &stage_output(dump, "maxpool");
        replace_stage(
            dump,
            "layer1.0.relu#1",
            &sum.mapv(|v| if v < 0.0 { 0.1 * v } else { v }),
        );
    });
    assert_hint(
        &report,
        "layer1.0.relu#1",
        "other_activation",
        "a LeakyReLU (negative slope 1.000e-1) where torch has a ReLU",
    );
    let found = hints(&report, "layer1.0.relu#1");
    assert!(found.iter().all(|(h, _)| h != "missing_relu"), "{found:?}");
}

#[test]
fn a_relu6_and_a_skipped_batch_norm_are_named() {
    // ReLU6 where torch has a ReLU: values above 6 clipped. The fixture's
    // activations stay below 6, so both sides' ReLU input is scaled up
    // (compare reads the reference's stages, not its weights).
    let dir = tempfile::tempdir().unwrap();
    let [reference, candidate] = ["reference", "candidate"].map(|side| {
        let dump = copy_fixture("resnet18-w8", &dir.path().join(side));
        let scaled = stage_output(&dump, "layer2.0.bn1").mapv(|v| v * 10.0);
        replace_stage(&dump, "layer2.0.bn1", &scaled);
        let clip = if side == "reference" {
            f32::INFINITY
        } else {
            6.0
        };
        replace_stage(
            &dump,
            "layer2.0.relu#0",
            &scaled.mapv(|v| v.clamp(0.0, clip)),
        );
        dump
    });
    let (_, report) = compare_report(&reference, &candidate, &["--only", "layer2.0.relu#0"]);
    assert_hint(
        &report,
        "layer2.0.relu#0",
        "other_activation",
        "a ReLU6 (clipped at 6) where torch has a ReLU",
    );
    // A BatchNorm left out: the stage holds its input, the conv's output.
    let report = compare_edited("resnet18-w8", |dump| {
        let conv = stage_output(dump, "layer3.0.conv2");
        replace_stage(dump, "layer3.0.bn2", &conv);
    });
    assert_hint(
        &report,
        "layer3.0.bn2",
        "skipped_stage",
        "the candidate equals this stage's input (layer3.0.conv2): the stage was skipped",
    );
}

#[test]
fn an_extra_relu() {
    let report = compare_edited("resnet18-w8", |dump| {
        let bn = stage_output(dump, "layer1.0.bn2");
        replace_stage(dump, "layer1.0.bn2", &bn.mapv(|v| v.max(0.0)));
    });
    assert_hint(
        &report,
        "layer1.0.bn2",
        "extra_relu",
        "the candidate equals relu(reference)",
    );
}

#[test]
fn a_missing_residual_add() {
    let report = compare_edited("resnet50-w8", |dump| {
        let branch = stage_output(dump, "layer1.1.bn3");
        replace_stage(dump, "layer1.1.relu#2", &branch.mapv(|v| v.max(0.0)));
    });
    assert_hint(
        &report,
        "layer1.1.relu#2",
        "missing_residual",
        "relu(layer1.1.bn3) without `+ layer1.0`: the residual add is missing",
    );
}

#[test]
fn a_relu_before_the_residual_add() {
    let report = compare_edited("resnet50-w8", |dump| {
        let branch = stage_output(dump, "layer1.1.bn3");
        let identity = stage_output(dump, "layer1.0");
        replace_stage(
            dump,
            "layer1.1.relu#2",
            &(&branch.mapv(|v| v.max(0.0)) + &identity),
        );
    });
    assert_hint(
        &report,
        "layer1.1.relu#2",
        "relu_before_add",
        "relu(layer1.1.bn3) + layer1.0: the ReLU comes before the residual add",
    );
}

#[test]
fn a_skipped_downsample_batch_norm() {
    let report = compare_edited("resnet50-w8", |dump| {
        let branch = stage_output(dump, "layer2.0.bn3");
        let projected = stage_output(dump, "layer2.0.downsample.0");
        replace_stage(
            dump,
            "layer2.0.relu#2",
            &(&branch + &projected).mapv(|v| v.max(0.0)),
        );
    });
    assert_hint(
        &report,
        "layer2.0.relu#2",
        "skipped_downsample",
        "the downsample's BatchNorm (layer2.0.downsample.1) was skipped",
    );
}

/// The reference's input undone to the 0-1 RGB image.
fn image(dump: &Path) -> ArrayD<f32> {
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let mut x = stage_output(dump, "input");
    for (c, mut values) in x.axis_iter_mut(Axis(1)).enumerate() {
        values.mapv_inplace(|v| v * std[c] + mean[c]);
    }
    x
}

fn normalised(image: &ArrayD<f32>, scale: f32, mean: [f32; 3], std: [f32; 3]) -> ArrayD<f32> {
    let mut x = image.clone();
    for (c, mut values) in x.axis_iter_mut(Axis(1)).enumerate() {
        values.mapv_inplace(|v| (v * scale - mean[c]) / std[c]);
    }
    x
}

#[test]
fn input_preprocessing_differs() {
    let cases: [(&str, Preprocessing); 3] = [
        ("is the image in BGR order, not RGB", |image| {
            let mut bgr = image.clone();
            bgr.invert_axis(Axis(1));
            normalised(&bgr, 1.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        }),
        ("is the image scaled 0-255, not 0-1", |image| {
            normalised(image, 255.0, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        }),
        (
            "is normalised with mean [0.500, 0.500, 0.500] and std [0.500, 0.500, 0.500]",
            |image| normalised(image, 1.0, [0.5; 3], [0.5; 3]),
        ),
    ];
    for (says, preprocess) in cases {
        let report = compare_edited("resnet18-w8", |dump| {
            let input = preprocess(&image(dump));
            replace_stage(dump, "input", &input);
        });
        assert_hint(&report, "input", "preprocessing", says);
    }
}

/// Stage `stage` of `dump` as a conv of `weight` (OIHW) computes it from
/// the stored output of stage `input`: a candidate's conv with a mistake
/// in its weights.
fn replace_with_conv(
    dump: &Path,
    stage: &str,
    input: &str,
    weight: &ndarray::Array4<f32>,
    geometry: ConvGeometry,
) {
    let (out_channels, in_channels) = (weight.shape()[0], weight.shape()[1]);
    let conv = Conv2d::new(
        in_channels,
        out_channels,
        geometry,
        conv_weight_from_oihw(weight.view(), 1),
        None,
    );
    let input = stage_output(dump, input)
        .into_dimensionality::<Ix4>()
        .unwrap();
    let output = conv.forward(&Tensor::from_nchw(input.view())).unwrap();
    replace_stage(dump, stage, &output.to_nchw().into_dyn());
}

#[test]
fn a_flipped_kernel_is_named() {
    // The candidate's layer1.0.conv1 (3x3) convolved: each kernel rotated
    // 180 degrees, where torch cross-correlates.
    let report = compare_edited("resnet18-w8", |dump| {
        let w = read(&dump.join("weights/layer1.0.conv1.weight.npy"))
            .into_dimensionality::<Ix4>()
            .unwrap();
        let flipped = w.slice(ndarray::s![.., .., ..;-1, ..;-1]).to_owned();
        let geometry = ConvGeometry::square(3, 1, 1, 1);
        replace_with_conv(dump, "layer1.0.conv1", "maxpool", &flipped, geometry);
    });
    assert_hint(
        &report,
        "layer1.0.conv1",
        "flipped_kernel",
        "each kernel rotated 180 degrees: a convolution, where torch computes a cross-correlation",
    );
}

#[test]
fn probabilities_for_logits_and_channels_reversed_after_normalising_are_named() {
    let report = compare_edited("resnet18-w8", |dump| {
        let logits = stage_output(dump, "fc");
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = logits.iter().map(|v| (v - top).exp()).sum();
        replace_stage(dump, "fc", &logits.mapv(|v| (v - top).exp() / total));
    });
    assert_hint(
        &report,
        "fc",
        "linear_layout",
        "the candidate is softmax(logits): torch's ResNet returns the logits",
    );
    let report = compare_edited("resnet18-w8", |dump| {
        let mut input = stage_output(dump, "input");
        input.invert_axis(Axis(1));
        replace_stage(dump, "input", &input);
    });
    assert_hint(
        &report,
        "input",
        "preprocessing",
        "is the normalised input with its channels reversed (BGR order after the RGB mean and std)",
    );
}

#[test]
fn a_border_padded_by_reflection_is_named() {
    // layer1.0.conv1 (3x3, padding 1) with padding_mode='reflect': the
    // input's border mirrored (row -1 is row 1), not zeros.
    let report = compare_edited("resnet18-w8", |dump| {
        let input = stage_output(dump, "maxpool")
            .into_dimensionality::<Ix4>()
            .unwrap();
        let (n, c, h, w) = input.dim();
        let mirror = |i: usize, size: usize| match i {
            0 => 1,
            i if i == size + 1 => size - 2,
            i => i - 1,
        };
        let padded = ndarray::Array4::from_shape_fn((n, c, h + 2, w + 2), |(n, c, y, x)| {
            input[[n, c, mirror(y, h), mirror(x, w)]]
        });
        let weight = read(&dump.join("weights/layer1.0.conv1.weight.npy"))
            .into_dimensionality::<Ix4>()
            .unwrap();
        let conv = Conv2d::new(
            c,
            weight.shape()[0],
            ConvGeometry::square(3, 1, 0, 1),
            conv_weight_from_oihw(weight.view(), 1),
            None,
        );
        let output = conv.forward(&Tensor::from_nchw(padded.view())).unwrap();
        replace_stage(dump, "layer1.0.conv1", &output.to_nchw().into_dyn());
    });
    assert_hint(
        &report,
        "layer1.0.conv1",
        "padding_mode",
        "padding_mode='reflect' (its border mirrored), where torch pads zeros",
    );
}

#[test]
fn a_classifier_without_its_bias_is_named() {
    let report = compare_edited("resnet18-w8", |dump| {
        let pooled = stage_output(dump, "avgpool");
        let weight = read(&dump.join("weights/fc.weight.npy"));
        let (classes, features) = (weight.shape()[0], weight.shape()[1]);
        let x = pooled.as_slice().unwrap();
        let w = weight.as_slice().unwrap();
        let logits: Vec<f32> = (0..classes)
            .map(|o| {
                (0..features)
                    .map(|i| x[i] as f64 * w[o * features + i] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        replace_stage(
            dump,
            "fc",
            &ArrayD::from_shape_vec(IxDyn(&[1, classes]), logits).unwrap(),
        );
    });
    assert_hint(
        &report,
        "fc",
        "linear_layout",
        "matches this Linear with its bias left out",
    );
}

#[test]
fn conv_weights_read_in_another_order() {
    // The candidate's conv1 ran with the OIHW weights read back as OHWI.
    let report = compare_edited("resnet18-w8", |dump| {
        let w = read(&dump.join("weights/conv1.weight.npy"));
        let misread = read_as_ohwi(&w).into_dimensionality::<Ix4>().unwrap();
        let geometry = ConvGeometry::square(7, 2, 3, 1);
        replace_with_conv(dump, "conv1", "input", &misread, geometry);
    });
    assert_hint(
        &report,
        "conv1",
        "weight_order",
        "its OIHW weights read as OHWI",
    );
}

/// Turns `dump` into what an engine that folds each BatchNorm into the conv
/// before it writes (ONNX exporters, TensorRT): no conv stages, and `bn1`
/// computed by one conv whose weights and bias are conv1's and bn1's
/// folded, `w * weight / sqrt(var + eps)` and `bias - mean * weight /
/// sqrt(var + eps)`. `misread` reads conv1's OIHW weights as OHWI first;
/// `parameters` makes bn1's (weight, bias, mean, var) wrong.
fn fold_batch_norms(dump: &Path, misread: bool, eps: f64, parameters: BatchNormMistake) {
    edit_manifest(dump, |m| {
        m["stages"]
            .as_array_mut()
            .unwrap()
            .retain(|stage| stage["module_type"] != "Conv2d");
    });
    let conv_weight = read(&dump.join("weights/conv1.weight.npy"));
    let conv_weight = if misread {
        read_as_ohwi(&conv_weight)
    } else {
        conv_weight
    };
    let [gamma, beta, mean, var] = parameters([
        weight(dump, "bn1.weight"),
        weight(dump, "bn1.bias"),
        weight(dump, "bn1.running_mean"),
        weight(dump, "bn1.running_var"),
    ]);
    let scale: Vec<f64> = (0..gamma.len())
        .map(|c| gamma[c] / (var[c] + eps).sqrt())
        .collect();
    let mut folded = conv_weight.into_dimensionality::<Ix4>().unwrap();
    for (c, mut filter) in folded.outer_iter_mut().enumerate() {
        filter.mapv_inplace(|w| (w as f64 * scale[c]) as f32);
    }
    let bias = (0..scale.len())
        .map(|c| (beta[c] - mean[c] * scale[c]) as f32)
        .collect();
    let [out_channels, in_channels, ..] = *folded.shape() else {
        unreachable!()
    };
    let conv = Conv2d::new(
        in_channels,
        out_channels,
        ConvGeometry::square(7, 2, 3, 1),
        conv_weight_from_oihw(folded.view(), 1),
        Some(bias),
    );
    let input = stage_output(dump, "input")
        .into_dimensionality::<Ix4>()
        .unwrap();
    let output = conv.forward(&Tensor::from_nchw(input.view())).unwrap();
    replace_stage(dump, "bn1", &output.to_nchw().into_dyn());
}

#[test]
fn mistakes_inside_a_folded_batch_norm_are_named_there() {
    // Folded right, the candidate compares succ where it has stages.
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    fold_batch_norms(&candidate, false, 1e-5, |p| p);
    let output = verify(&["compare", path(&fixture("resnet18-w8")), path(&candidate)]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output)
        .contains("reference stage(s) not in the candidate, not compared: conv1, layer1.0.conv1"));

    let cases: [(&str, &str, bool, f64, BatchNormMistake); 4] = [
        (
            "weight_order",
            "the candidate matches conv `conv1` (folded into this BatchNorm) with its OIHW weights read as OHWI",
            true,
            1e-5,
            |p| p,
        ),
        (
            "batch_norm_eps",
            "the candidate matches BatchNorm with eps = 1.0e-3",
            false,
            1e-3,
            |p| p,
        ),
        (
            "batch_norm_statistics_swapped",
            "running_mean and running_var swapped",
            false,
            1e-5,
            |[w, b, m, v]| [w, b, v, m],
        ),
        ("batch_norm_affine", "weight missing", false, 1e-5, |[w, b, m, v]| {
            [vec![1.0; w.len()], b, m, v]
        }),
    ];
    for (hypothesis, says, misread, eps, mistake) in cases {
        let report = compare_edited("resnet18-w8", |dump| {
            fold_batch_norms(dump, misread, eps, mistake)
        });
        assert_hint(&report, "bn1", hypothesis, says);
    }
}

#[test]
fn a_pooled_output_stored_flat_compares_with_a_note() {
    // Engines that fuse the flatten store avgpool as [N, C].
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    let pooled = stage_output(&candidate, "avgpool");
    let [n, c, ..] = *pooled.shape() else {
        unreachable!()
    };
    let flat = pooled.into_shape_with_order(IxDyn(&[n, c])).unwrap();
    replace_stage(&candidate, "avgpool", &flat);
    edit_manifest(&candidate, |m| {
        entry_mut(m, "stages", "avgpool")["shape"] = serde_json::json!([n, c]);
    });
    let (code, report) = compare_report(&fixture("resnet18-w8"), &candidate, &[]);
    assert_eq!(code, 0);
    assert_eq!(
        stage(&report, "avgpool")["notes"],
        serde_json::json!([format!(
            "shape [{n}, {c}] compared as the reference's [{n}, {c}, 1, 1] (they differ only by axes of size 1)"
        )])
    );
    // Another shape of the same size is still a failure.
    let wrong = stage_output(&candidate, "avgpool")
        .into_shape_with_order(IxDyn(&[n, c / 2, 2]))
        .unwrap();
    replace_stage(&candidate, "avgpool", &wrong);
    edit_manifest(&candidate, |m| {
        entry_mut(m, "stages", "avgpool")["shape"] = serde_json::json!([n, c / 2, 2]);
    });
    let output = verify(&["compare", path(&fixture("resnet18-w8")), path(&candidate)]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn weights_stored_in_another_order_are_found_by_the_core() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let file = dump.join("weights/conv1.weight.npy");
    let w = read(&file);
    write(&file, &read_as_ohwi(&w));
    let report = json_report(&verify(&[path(&dump), "--format", "json"]));
    let found = hints(&report, "conv1");
    assert!(
        found.iter().any(|(h, m)| h == "weight_order"
            && m.contains("the dump holds the reference's OIHW weights read as OHWI")),
        "{found:?}"
    );
}

fn stored_in(dump: &Path, name: &str, axes: [usize; 4]) {
    let file = stage_file(dump, name);
    let array = read(&file);
    let permuted = array
        .permuted_axes(IxDyn(&axes))
        .as_standard_layout()
        .into_owned();
    write(&file, &permuted);
}

#[test]
fn a_candidate_stored_nhwc_gets_one_layout_hint_not_a_wall_of_failures() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    let manifest = manifest(&candidate);
    for entry in manifest["stages"].as_array().unwrap() {
        if entry["shape"].as_array().unwrap().len() == 4 {
            stored_in(&candidate, entry["name"].as_str().unwrap(), [0, 2, 3, 1]);
        }
    }
    // The engine's manifest gives its files' shapes, but says NCHW.
    edit_manifest(&candidate, |m| {
        for stage in m["stages"].as_array_mut().unwrap() {
            let shape = stage["shape"].as_array().unwrap().clone();
            if shape.len() == 4 {
                stage["shape"] = serde_json::json!([shape[0], shape[2], shape[3], shape[1]]);
            }
        }
    });
    let output = verify(&["compare", path(&fixture("resnet18-w8")), path(&candidate)]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert_eq!(text.matches("hint:").count(), 1, "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l
                .split_once("] ")
                .is_some_and(|(_, verdict)| verdict.trim_start().starts_with("fail")))
            .count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("hint: the candidate's file is the reference stored NHWC (shape [1, 32, 32, 3]), read as NCHW; pass --cand-layout nhwc"),
        "{text}"
    );
    assert!(text.contains("rerun with --cand-layout nhwc"), "{text}");
}

#[test]
fn height_and_width_swapped_under_the_same_shape() {
    // A reshape without a transpose: the values of an H x W map written as
    // W x H under the original shape (the maps are square here).
    let report = compare_edited("resnet18-w8", |dump| {
        stored_in(dump, "layer1.0.conv1", [0, 1, 3, 2]);
    });
    assert_hint(
        &report,
        "layer1.0.conv1",
        "layout",
        "in NCWH order under its NCHW shape [1, 8, 8, 8]: height and width swapped (the image transposed, or reshaped without a transpose)",
    );
}

#[test]
fn nhwc_data_reshaped_to_nchw_is_told_to_transpose_not_to_pass_a_flag() {
    // Every 4-D stage's NHWC memory saved under its NCHW shape: no reading
    // flag undoes that, so the advice is to transpose before saving.
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    let manifest = manifest(&candidate);
    for entry in manifest["stages"].as_array().unwrap() {
        let file = stage_file(&candidate, entry["name"].as_str().unwrap());
        let array = read(&file);
        if array.ndim() == 4 {
            let memory: Vec<f32> = array
                .view()
                .permuted_axes(IxDyn(&[0, 2, 3, 1]))
                .iter()
                .copied()
                .collect();
            write(
                &file,
                &ArrayD::from_shape_vec(array.shape(), memory).unwrap(),
            );
        }
    }
    let output = verify(&["compare", path(&fixture("resnet18-w8")), path(&candidate)]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("a reshape without a transpose"), "{text}");
    assert!(
        text.contains("so the rest would fail the same way; transpose each stage from NHWC to NCHW before saving it (a reshape leaves the values in NHWC order)"),
        "{text}"
    );
    assert!(!text.contains("--cand-layout"), "{text}");
}

#[test]
fn the_root_is_named_and_later_failures_are_carried() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["batch_norm_eps"] = 1e-2.into());
    let report = json_report(&verify(&[path(&dump), "--format", "json"]));
    assert_eq!(report["summary"]["root"], "bn1");
    let failing: Vec<&Value> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["verdict"] == "fail")
        .collect();
    assert!(failing.len() > 10);
    assert_eq!(failing[0]["origin"]["kind"], "root");
    assert!(failing[1..]
        .iter()
        .all(|s| s["origin"] == serde_json::json!({"kind": "carried", "from": "bn1"})));
    let text = stdout(&verify(&[path(&dump)]));
    assert!(
        text.contains("root: bn1 (the first stage to fail end to end"),
        "{text}"
    );
    assert!(text.contains("    origin: carried from bn1"), "{text}");
}

#[test]
fn a_second_mistake_after_exact_stages_is_named_where_it_is_made() {
    // An engine wrong at maxpool, whose later stages are exact again up to
    // a second mistake at layer2.0.bn1: that was 'carried from maxpool',
    // though its input passes.
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    for (stage, change) in [("maxpool", 1.1f32), ("layer2.0.bn1", 0.5)] {
        let file = stage_file(&candidate, stage);
        let values = read(&file);
        write(
            &file,
            &match stage {
                "maxpool" => values.mapv(|v| v * change),
                _ => values.mapv(|v| v + change),
            },
        );
    }
    let (_, report) = compare_report(&fixture("resnet18-w8"), &candidate, &[]);
    assert_eq!(report["summary"]["root"], "maxpool");
    assert_eq!(
        report["summary"]["introduced_at"],
        serde_json::json!(["layer2.0.bn1"])
    );
    assert_eq!(
        stage(&report, "layer2.0.bn1")["origin"]["kind"],
        "introduces"
    );
    let text = stdout(&verify(&[
        "compare",
        path(&fixture("resnet18-w8")),
        path(&candidate),
    ]));
    assert!(
        text.contains("    origin: introduces error (its output is not this stage computed on the candidate's own inputs)"),
        "{text}"
    );
    assert!(
        text.contains("root: maxpool (the first stage to fail end to end; later end-to-end failures are carried from it or from a stage that introduces error)"),
        "{text}"
    );
}

#[test]
fn isolated_runs_name_the_stages_that_introduce_error() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["batch_norm_eps"] = 1e-2.into());
    let report = json_report(&verify(&[path(&dump), "--isolate", "--format", "json"]));
    let introducers = report["summary"]["introduced_at"].as_array().unwrap();
    assert!(!introducers.is_empty());
    for name in introducers {
        let stage = stage(&report, name.as_str().unwrap());
        assert_eq!(
            stage["module_type"], "BatchNorm2d",
            "{name}: only BatchNorms make error here"
        );
        assert_eq!(stage["origin"]["kind"], "introduces");
    }
    let text = stdout(&verify(&[path(&dump), "--isolate"]));
    assert!(text.contains("error introduced at ("), "{text}");
}

#[test]
fn the_plot_draws_both_modes_the_tolerance_and_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["batch_norm_eps"] = 1e-2.into());
    let svg: PathBuf = dir.path().join("error.svg");
    let output = verify(&[path(&dump), "--both", "--plot", path(&svg)]);
    assert_eq!(output.status.code(), Some(1));
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.starts_with("<svg") && drawn.trim_end().ends_with("</svg>"));
    for label in [
        "cumulative (end to end)",
        "isolated (reference inputs)",
        "tolerance",
        "first failure: bn1",
        "layer4",
    ] {
        assert!(drawn.contains(label), "no {label:?} in the plot");
    }
    // One point per compared stage and series, at least.
    assert!(drawn.matches("<circle").count() >= 2 * 75);
    assert!(!drawn.contains("NaN/Inf"), "no stage is infinitely off");

    // An infinite error (a NaN) is drawn at the top, and labelled there.
    let candidate = copy_fixture("resnet18-w8", &dir.path().join("nan"));
    let file = stage_file(&candidate, "layer2.0.conv1");
    write(&file, &read(&file).mapv(|_| f32::NAN));
    let reference = fixture("resnet18-w8");
    let output = verify(&[
        "compare",
        path(&reference),
        path(&candidate),
        "--plot",
        path(&svg),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(drawn.matches("NaN/Inf").count(), 1, "one stage is NaN");

    let bad = verify(&[
        path(&fixture("resnet18-w8")),
        "--plot",
        "/nonexistent-dir/x.svg",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("cannot write /nonexistent-dir/x.svg"));
}

#[test]
fn a_candidate_holding_only_the_input_fails() {
    // The input is the reference's own, copied: matching it checks nothing
    // the candidate computed, so it must not pass (exit 0) in CI.
    let only_the_input = |candidate: &Path| {
        edit_manifest(candidate, |manifest| {
            manifest["stages"]
                .as_array_mut()
                .unwrap()
                .retain(|stage| stage["name"] == "input")
        })
    };
    let report = compare_edited("resnet18-w8", only_the_input);
    let summary = &report["summary"];
    assert_eq!(summary["verdict"], "fail");
    assert_eq!(summary["compared"], 1);
    assert_eq!(summary["fail"], 0);
    assert!(summary["stopped"]
        .as_str()
        .unwrap()
        .ends_with("no stage but the input was compared: nothing computed was checked"));

    // JUnit, which CI reads, fails it too.
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    only_the_input(&candidate);
    let reference = fixture("resnet18-w8");
    let output = verify(&[
        "compare",
        path(&reference),
        path(&candidate),
        "--format",
        "junit",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let xml = stdout(&output);
    assert!(
        xml.contains("tests=\"2\" failures=\"1\"")
            && xml.contains("name=\"run\">\n      <failure message=\"75 reference stage(s) not in the candidate"),
        "{xml}"
    );
}
