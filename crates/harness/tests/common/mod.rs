//! Helpers shared by the CLI tests: fixtures, writable copies, manifest
//! edits and .npy files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

pub fn verify(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_verify"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("verify runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A writable copy of a fixture.
pub fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let target = into.join(name);
    copy(&fixture(name), &target);
    target
}

/// A dump's manifest.json, as JSON.
pub fn manifest(dump: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dump.join("manifest.json")).unwrap()).unwrap()
}

pub fn edit_manifest(dump: &Path, edit: impl FnOnce(&mut Value)) {
    let mut edited = manifest(dump);
    edit(&mut edited);
    std::fs::write(
        dump.join("manifest.json"),
        serde_json::to_string(&edited).unwrap(),
    )
    .unwrap();
}

pub fn read(file: &Path) -> ArrayD<f32> {
    ArrayD::<f32>::read_npy(std::fs::File::open(file).unwrap()).unwrap()
}

pub fn write(file: &Path, array: &ArrayD<f32>) {
    array
        .write_npy(std::fs::File::create(file).unwrap())
        .unwrap();
}

pub fn stage_file(dump: &Path, stage: &str) -> PathBuf {
    dump.join(
        entry(&manifest(dump), "stages", stage)["file"]
            .as_str()
            .unwrap(),
    )
}

/// The entry named `name` in the list `list` of a manifest or a report
/// (`stages`, `weights`).
pub fn entry<'a>(document: &'a Value, list: &str, name: &str) -> &'a Value {
    document[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

/// [`entry`], to edit.
pub fn entry_mut<'a>(document: &'a mut Value, list: &str, name: &str) -> &'a mut Value {
    document[list]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

pub fn json_report(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// `verify compare REFERENCE CANDIDATE ARGUMENTS --format json`: its exit
/// code and JSON report.
pub fn compare_report(reference: &Path, candidate: &Path, arguments: &[&str]) -> (i32, Value) {
    let mut all = vec!["compare", path(reference), path(candidate)];
    all.extend(arguments);
    all.extend(["--format", "json"]);
    let output = verify(&all);
    let code = output.status.code().expect("an exit code");
    assert!(code == 0 || code == 1, "exit {code}: {}", stderr(&output));
    (code, json_report(&output))
}

/// What a reader sees that flattens an OIHW conv weight in torch's order
/// and reads the numbers back as OHWI: the seed's first bug.
pub fn read_as_ohwi(weight: &ArrayD<f32>) -> ArrayD<f32> {
    let shape = weight.shape();
    let flat: Vec<f32> = weight.iter().copied().collect();
    ArrayD::from_shape_vec(IxDyn(&[shape[0], shape[2], shape[3], shape[1]]), flat)
        .unwrap()
        .permuted_axes(IxDyn(&[0, 3, 1, 2]))
        .as_standard_layout()
        .into_owned()
}
