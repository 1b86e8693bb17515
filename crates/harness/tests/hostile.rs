//! Broken and hostile dumps: every case ends with a clear error that names
//! the file and the problem (exit 2), or, for odd but valid data, a correct
//! verdict; never a panic.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::Value;

/// Asserts exit code `code`, a message containing `needle` (stderr for 2,
/// stdout otherwise), and no panic.
fn expect(output: &Output, code: i32, needle: &str) {
    let (out, err) = (stdout(output), stderr(output));
    assert!(
        !err.contains("panicked") && !out.contains("panicked"),
        "panic:\n{err}"
    );
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    let text = if code == 2 { &err } else { &out };
    assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
}

/// A .npy file with a hand-written header.
fn raw_npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut dict = header.to_string();
    while !(10 + dict.len() + 1).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    bytes.extend_from_slice(dict.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A copy of resnet18-w8 with `edit` applied to its `layer1.0.conv1` stage file.
fn with_stage_file(dir: &Path, edit: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dump = copy_fixture("resnet18-w8", dir);
    edit(&stage_file(&dump, "layer1.0.conv1"));
    dump
}

fn conv1_values(dump: &Path) -> (Vec<usize>, Vec<f32>) {
    let array = read(&stage_file(dump, "layer1.0.conv1"));
    (array.shape().to_vec(), array.iter().copied().collect())
}

fn shape_text(shape: &[usize]) -> String {
    format!(
        "({})",
        shape.iter().map(|d| format!("{d}, ")).collect::<String>()
    )
}

#[test]
fn truncated_and_garbled_headers() {
    let dir = tempfile::tempdir().unwrap();
    let dump = with_stage_file(dir.path(), |file| {
        let bytes = std::fs::read(file).unwrap();
        std::fs::write(file, &bytes[..20]).unwrap();
    });
    expect(
        &verify(&[path(&dump)]),
        2,
        "layer1.0.conv1.npy: not a valid .npy file: bad header",
    );

    let dir = tempfile::tempdir().unwrap();
    let dump = with_stage_file(dir.path(), |file| {
        std::fs::write(
            file,
            raw_npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8, 8), 'oops",
                &[0; 2048],
            ),
        )
        .unwrap();
    });
    expect(
        &verify(&[path(&dump)]),
        2,
        "layer1.0.conv1.npy: not a valid .npy file: bad header",
    );

    let dir = tempfile::tempdir().unwrap();
    let dump = with_stage_file(dir.path(), |file| {
        std::fs::write(file, b"PK\x03\x04 not numpy at all").unwrap()
    });
    expect(
        &verify(&[path(&dump)]),
        2,
        "layer1.0.conv1.npy: not a valid .npy file",
    );
}

#[test]
fn unsupported_dtypes_are_refused_and_float64_is_converted_with_a_note() {
    for (descr, size) in [("<f2", 2), ("<i4", 4), ("|u1", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let dump = with_stage_file(dir.path(), |file| {
            std::fs::write(
                file,
                raw_npy(
                    &format!(
                        "{{'descr': '{descr}', 'fortran_order': False, 'shape': (1, 8, 8, 8), }}"
                    ),
                    &vec![0; 512 * size],
                ),
            )
            .unwrap();
        });
        expect(
            &verify(&[path(&dump)]),
            2,
            &format!("dtype {descr} is not supported"),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let (shape, values) = conv1_values(&dump);
    let data: Vec<u8> = values
        .iter()
        .flat_map(|&v| (v as f64).to_le_bytes())
        .collect();
    let header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': {}, }}",
        shape_text(&shape)
    );
    std::fs::write(stage_file(&dump, "layer1.0.conv1"), raw_npy(&header, &data)).unwrap();
    let output = verify(&[path(&dump)]);
    expect(
        &output,
        0,
        "note: reference stored as float64, converted to float32",
    );
}

#[test]
fn big_endian_and_fortran_order_are_read_as_what_they_mean() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let (shape, values) = conv1_values(&dump);
    let big: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    let header = format!(
        "{{'descr': '>f4', 'fortran_order': False, 'shape': {}, }}",
        shape_text(&shape)
    );
    std::fs::write(stage_file(&dump, "layer1.0.conv1"), raw_npy(&header, &big)).unwrap();
    expect(&verify(&[path(&dump)]), 0, "summary succ");

    // Fortran order: the same array, its data stored column-major.
    let array = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), values).unwrap();
    let column_major: Vec<u8> = array
        .t()
        .as_standard_layout()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': True, 'shape': {}, }}",
        shape_text(&shape)
    );
    std::fs::write(
        stage_file(&dump, "layer1.0.conv1"),
        raw_npy(&header, &column_major),
    )
    .unwrap();
    expect(&verify(&[path(&dump)]), 0, "summary succ");
}

#[test]
fn header_sizes_that_disagree_with_the_file_are_refused_before_allocating() {
    for (shape, needle) in [
        (
            "(100000, 100000, 100000)",
            "needs 4000000000000000 data bytes, the file holds 2048",
        ),
        ("(100000, 100000, 100000, 100000)", "overflows"),
        ("(4611686018427387904, 4611686018427387904)", "overflows"),
        ("(1, 8, 8, 9)", "needs 2304 data bytes, the file holds 2048"),
        ("(1, 8, 8, 7)", "needs 1792 data bytes, the file holds 2048"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let dump = with_stage_file(dir.path(), |file| {
            std::fs::write(
                file,
                raw_npy(
                    &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"),
                    &[0; 2048],
                ),
            )
            .unwrap();
        });
        expect(&verify(&[path(&dump)]), 2, needle);
    }
}

#[test]
fn zero_sized_dimensions_are_a_clear_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let dump = with_stage_file(dir.path(), |file| {
        std::fs::write(
            file,
            raw_npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 0, 8, 8), }",
                &[],
            ),
        )
        .unwrap();
    });
    expect(
        &verify(&[path(&dump)]),
        2,
        "stage `layer1.0.conv1` has shape [1, 0, 8, 8], but the manifest says [1, 8, 8, 8]",
    );
    edit_manifest(&dump, |m| {
        entry_mut(m, "stages", "layer1.0.conv1")["shape"] = serde_json::json!([1, 0, 8, 8]);
    });
    expect(&verify(&[path(&dump)]), 2, "stage `layer1.0.conv1`: the core's output [1, 8, 8, 8] (NCHW) does not match the reference shape [1, 0, 8, 8]");
}

#[test]
fn manifest_problems_name_the_field() {
    type ManifestEdit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, ManifestEdit, &str)> = vec![
        (
            "unknown schema",
            Box::new(|m| m["schema_version"] = 99.into()),
            "schema version 99 is not supported (this build reads version 1)",
        ),
        (
            "a version written as a float",
            Box::new(|m| m["schema_version"] = 1.0.into()),
            "`schema_version` is 1.0, where a whole number (1) is expected",
        ),
        (
            "not ours",
            Box::new(|m| m["format"] = "something-else".into()),
            "format is `something-else`, expected `resnet-verify-dump`",
        ),
        (
            "missing stages",
            Box::new(|m| {
                m.as_object_mut().unwrap().remove("stages");
            }),
            "missing field `stages`",
        ),
        (
            "missing mode",
            Box::new(|m| {
                m.as_object_mut().unwrap().remove("mode");
            }),
            "missing field `mode`",
        ),
        (
            "no architecture",
            Box::new(|m| {
                m.as_object_mut().unwrap().remove("architecture");
            }),
            "field `architecture`: missing",
        ),
        (
            "absolute path",
            Box::new(|m| m["stages"][2]["file"] = "/etc/passwd".into()),
            "stages[2].file`: `/etc/passwd` is an absolute path",
        ),
        (
            "parent path",
            Box::new(|m| m["weights"][0]["file"] = "weights/../../x.npy".into()),
            "weights[0].file`: `weights/../../x.npy` leads out of the dump directory",
        ),
        (
            "duplicate stage",
            Box::new(|m| m["stages"][5]["name"] = m["stages"][4]["name"].clone()),
            "stages[5].name`: duplicate stage name `maxpool`",
        ),
        (
            "stage shape",
            Box::new(|m| m["stages"][1]["shape"] = serde_json::json!([1, 8, 16, 17])),
            "stage `conv1` has shape [1, 8, 16, 16], but the manifest says [1, 8, 16, 17]",
        ),
        (
            "extra stage",
            Box::new(|m| {
                let extra = m["stages"][3].clone();
                let mut extra = extra;
                extra["name"] = "layer9.conv".into();
                m["stages"].as_array_mut().unwrap().push(extra);
            }),
            "the reference has stage `layer9.conv` (ReLU), which the core does not produce",
        ),
        (
            "missing stage",
            Box::new(|m| {
                m["stages"].as_array_mut().unwrap().remove(3);
            }),
            "the core produces stage `relu` (ReLU), but the reference has no stage of that name",
        ),
        (
            "unsupported architecture",
            Box::new(|m| m["architecture"]["groups"] = 2.into()),
            "unsupported architecture: BasicBlock only supports groups=1",
        ),
        (
            "unknown block",
            Box::new(|m| m["architecture"]["block"] = "Transformer".into()),
            "unknown variant `Transformer`",
        ),
        (
            "missing weight",
            Box::new(|m| {
                m["weights"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|w| w["name"] != "layer1.0.conv1.weight");
            }),
            "weight `layer1.0.conv1.weight` is missing",
        ),
        (
            "weight shape in manifest",
            Box::new(|m| {
                entry_mut(m, "weights", "fc.weight")["shape"] = serde_json::json!([10, 32]);
            }),
            "weight `fc.weight` has shape [10, 64] in its file, but the manifest says [10, 32]",
        ),
    ];
    for (what, edit, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        let dump = copy_fixture("resnet18-w8", dir.path());
        edit_manifest(&dump, edit);
        let output = verify(&[path(&dump)]);
        assert_eq!(output.status.code(), Some(2), "{what}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(
            message.contains("manifest.json") || message.contains(dump.to_str().unwrap()),
            "{what}: the file is named: {message}"
        );
        expect(&output, 2, needle);
    }
}

#[test]
fn a_weight_of_the_wrong_shape_names_the_weight_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let file = dump.join("weights/layer2.0.conv1.weight.npy");
    write(
        &file,
        &ndarray::ArrayD::zeros(ndarray::IxDyn(&[16, 8, 1, 1])),
    );
    edit_manifest(&dump, |m| {
        entry_mut(m, "weights", "layer2.0.conv1.weight")["shape"] =
            serde_json::json!([16, 8, 1, 1]);
    });
    expect(&verify(&[path(&dump)]), 2, "weight `layer2.0.conv1.weight` has shape [16, 8, 1, 1], but the architecture needs [16, 8, 3, 3]");
}

#[test]
fn missing_files_and_symlinks_out_of_the_dump() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&dump, "layer1.1.bn2");
    std::fs::remove_file(&file).unwrap();
    expect(
        &verify(&[path(&dump)]),
        2,
        &format!(
            "{}: No such file or directory",
            file.file_name().unwrap().to_str().unwrap()
        ),
    );

    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let outside = dir.path().join("outside.npy");
    std::fs::copy(stage_file(&dump, "layer1.0.conv1"), &outside).unwrap();
    let inside = stage_file(&dump, "layer1.0.conv1");
    std::fs::remove_file(&inside).unwrap();
    std::os::unix::fs::symlink(&outside, &inside).unwrap();
    expect(
        &verify(&[path(&dump)]),
        2,
        "leads out of the dump directory",
    );
}

#[test]
fn nan_and_inf_are_counted_and_never_match_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let reference = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&reference, "layer1.0.bn1");
    let mut array = read(&file);
    array.as_slice_mut().unwrap()[..3].fill(f32::NAN);
    array.as_slice_mut().unwrap()[3] = f32::INFINITY;
    write(&file, &array);
    let output = verify(&[path(&reference), "--isolate", "--only", "layer1.0.bn1"]);
    expect(&output, 1, "NaN: ref 3, cand 0; Inf: ref 1, cand 0");

    // The same NaN on both sides: a mismatch, unless --equal-nan.
    let candidate = dir.path().join("candidate");
    std::fs::rename(&reference, &candidate).unwrap();
    let clean = copy_fixture("resnet18-w8", dir.path());
    std::fs::copy(
        stage_file(&candidate, "layer1.0.bn1"),
        stage_file(&clean, "layer1.0.bn1"),
    )
    .unwrap();
    let mut no_inf = read(&stage_file(&candidate, "layer1.0.bn1"));
    no_inf.as_slice_mut().unwrap()[3] = 0.0;
    write(&stage_file(&candidate, "layer1.0.bn1"), &no_inf);
    write(&stage_file(&clean, "layer1.0.bn1"), &no_inf);
    let strict = verify(&[
        "compare",
        path(&clean),
        path(&candidate),
        "--only",
        "layer1.0.bn1",
    ]);
    expect(&strict, 1, "3 of 512 elements out of tolerance");
    let lenient = verify(&[
        "compare",
        path(&clean),
        path(&candidate),
        "--only",
        "layer1.0.bn1",
        "--equal-nan",
    ]);
    expect(&lenient, 0, "summary succ: 1 stages compared");
    // Said, not passed over in silence.
    expect(
        &lenient,
        0,
        "note: NaN on both sides (3), matched under --equal-nan",
    );
}

#[test]
fn an_all_zero_reference_has_well_defined_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let reference = copy_fixture("resnet18-w8", dir.path());
    let candidate = dir.path().join("candidate");
    std::fs::create_dir(&candidate).unwrap();
    let zeros = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 8, 8, 8]));
    write(&stage_file(&reference, "layer1.0.conv1"), &zeros);
    let candidate = {
        let copy = copy_fixture("resnet18-w8", &candidate);
        write(&stage_file(&copy, "layer1.0.conv1"), &zeros);
        copy
    };
    let output = verify(&[
        "compare",
        path(&reference),
        path(&candidate),
        "--only",
        "layer1.0.conv1",
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(0));
    let report = json_report(&output);
    // Every other stage is identical on both sides too (relative error 0,
    // cosine 1): the zeroed stage must be the one looked at.
    let stages = report["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 1, "{stages:?}");
    assert_eq!(stages[0]["name"], "layer1.0.conv1");
    let comparison = &stages[0]["cumulative"];
    assert_eq!(
        (
            comparison["scale"].as_f64(),
            comparison["max_abs_error"].as_f64(),
            comparison["elements"].as_u64()
        ),
        (Some(0.0), Some(0.0), Some(512)),
        "{comparison}"
    );
    assert_eq!(
        (
            comparison["relative_error"].as_f64(),
            comparison["cosine_similarity"].as_f64()
        ),
        (Some(0.0), Some(1.0))
    );
}

#[test]
fn batch_norm_stages_stored_flat_are_not_recomputed_but_reported() {
    // conv1 and bn1 stored as [C, H*W]: the reference check cannot recompute
    // a BatchNorm from them (it needs NCHW maps), so it examines the next
    // three; the comparison then names the shape.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    for stage in ["conv1", "bn1"] {
        let file = stage_file(&dump, stage);
        let flat = read(&file)
            .into_shape_with_order(ndarray::IxDyn(&[8, 256]))
            .unwrap();
        write(&file, &flat);
        edit_manifest(&dump, |m| {
            entry_mut(m, "stages", stage)["shape"] = serde_json::json!([8, 256]);
        });
    }
    let output = verify(&[path(&dump), "--format", "json"]);
    expect(
        &output,
        2,
        "stage `conv1`: the core's output [1, 8, 16, 16] (NCHW) does not match the reference shape [8, 256]",
    );
}
