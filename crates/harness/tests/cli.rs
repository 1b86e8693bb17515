//! `verify` as users and CI run it: on the committed fixtures, on copies of
//! them with the seed's bugs injected, and on broken input.

mod common;

use common::*;
use ndarray::{ArrayD, Axis, IxDyn};

#[test]
fn every_eval_fixture_is_succ_at_every_stage() {
    for (name, stages) in [
        ("resnet50-w8", 182),
        ("resnet18-w8", 75),
        ("resnext50-w8", 182),
    ] {
        let output = verify(&[path(&fixture(name))]);
        let text = stdout(&output);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{name}:\n{text}{}",
            stderr(&output)
        );
        let stage_lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("Conv2d") || l.contains("BatchNorm2d") || l.contains(" ReLU "))
            .collect();
        assert!(
            !stage_lines.is_empty() && stage_lines.iter().all(|l| l.contains(" succ ")),
            "{name}"
        );
        assert!(text.contains(&format!("summary succ: {stages} stages compared, {stages} succ, 0 fail; first failure: none")), "{name}:\n{text}");
        assert!(text.contains("reference: eval mode"), "{name}");
        // A pass under the default rtol says what it cannot see, and how to.
        assert!(
            text.contains("note: rtol 1e-4 passes what differs by less (a BatchNorm eps left out")
                && text.contains("dump with --floor, then verify --tol auto\nsummary succ"),
            "{name}:\n{text}"
        );
    }
    let text = stdout(&verify(&[path(&fixture("resnet50-w8"))]));
    assert!(
        text.contains("layer layer1 succ: 10/10 conv2d, 3/3 blocks"),
        "{text}"
    );
    assert!(
        text.contains("layer layer3 succ: 19/19 conv2d, 6/6 blocks"),
        "{text}"
    );
    assert!(text.contains("block layer2.0 succ: 4/4 conv2d"), "{text}");
    // 1000 classes: both sides' top-5 with names, and they agree.
    let top: Vec<&str> = text.lines().filter(|l| l.starts_with("top5 ")).collect();
    assert_eq!(top.len(), 2);
    assert_eq!(
        top[0]
            .trim_start_matches("top5 reference:")
            .split(", ")
            .map(|c| c.split(" (").next().unwrap())
            .collect::<Vec<_>>(),
        top[1]
            .trim_start_matches("top5 candidate:")
            .split(", ")
            .map(|c| c.split(" (").next().unwrap())
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_train_mode_reference_is_refused_loudly() {
    let output = verify(&[path(&fixture("resnet18-w8-train"))]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains("THE REFERENCE WAS DUMPED IN TRAIN MODE"),
        "{text}"
    );
    assert!(
        text.contains("its manifest records mode \"train\""),
        "{text}"
    );
    assert!(
        text.contains("batch statistics: bn1"),
        "the data itself shows it: {text}"
    );
}

#[test]
fn train_mode_is_caught_from_the_data_even_when_the_manifest_says_eval() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8-train", dir.path());
    edit_manifest(&dump, |m| m["mode"] = "eval".into());
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("THE REFERENCE WAS DUMPED IN TRAIN MODE: its BatchNorm outputs were computed with batch statistics"), "{text}");
}

#[test]
fn batch_norm_with_batch_statistics_fails_against_running_statistics() {
    // The train-mode reference is BatchNorm with batch statistics; the core
    // uses running statistics. Forced to compare, the difference must fail
    // at the very first BatchNorm: the seed's second bug, seen from the
    // other side.
    let output = verify(&[
        path(&fixture("resnet18-w8-train")),
        "--allow-train-reference",
        "--isolate",
        "--fail-fast",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("first failure: bn1"), "{text}");
}

#[test]
fn batch_norm_eps_1e_3_instead_of_1e_5_fails() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet50-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["batch_norm_eps"] = 1e-3.into());
    let output = verify(&[path(&dump), "--isolate", "--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    let report = json_report(&output);
    assert_eq!(report["summary"]["first_failure"], "bn1");
    let failing_norms = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["module_type"] == "BatchNorm2d" && s["verdict"] == "fail")
        .count();
    assert!(
        failing_norms > 10,
        "only {failing_norms} BatchNorms fail in isolation"
    );
}

#[test]
fn conv_weights_read_in_the_wrong_layout_fail() {
    // The seed's first bug: OIHW weights flattened in torch's order and read
    // back as OHWI. Each conv weight W is replaced by what such a reader sees.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet50-w8", dir.path());
    for entry in std::fs::read_dir(dump.join("weights")).unwrap() {
        let file = entry.unwrap().path();
        let weight = read(&file);
        if weight.ndim() != 4 || weight.shape()[2] == 1 {
            continue; // 1x1 kernels read the same either way
        }
        write(&file, &read_as_ohwi(&weight));
    }
    let output = verify(&[path(&dump), "--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(json_report(&output)["summary"]["first_failure"], "conv1");
}

#[test]
fn a_missing_relu_fails() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    // An engine that forgot the ReLU after layer2.0.bn1 outputs bn1 unchanged.
    std::fs::copy(
        stage_file(&candidate, "layer2.0.bn1"),
        stage_file(&candidate, "layer2.0.relu#0"),
    )
    .unwrap();
    let output = verify(&[
        "compare",
        path(&fixture("resnet18-w8")),
        path(&candidate),
        "--format",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let report = json_report(&output);
    assert_eq!(report["summary"]["first_failure"], "layer2.0.relu#0");
    assert_eq!(report["summary"]["fail"], 1);
}

#[test]
fn upto_stops_after_the_named_stage() {
    let output = verify(&[path(&fixture("resnet50-w8")), "--upto", "layer3"]);
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    let last_stage = text
        .lines()
        .rfind(|l| l.contains(" succ ") && !l.starts_with("layer ") && !l.starts_with("block "))
        .unwrap();
    assert!(last_stage.starts_with("layer3 "), "{last_stage}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("layer4") || l.starts_with("avgpool") || l.starts_with("fc ")),
        "{text}"
    );
    let output = verify(&[
        path(&fixture("resnet50-w8")),
        "--upto",
        "layer2.1.conv2",
        "--format",
        "json",
    ]);
    let stages = json_report(&output)["stages"].as_array().unwrap().clone();
    assert_eq!(stages.last().unwrap()["name"], "layer2.1.conv2");

    let output = verify(&[path(&fixture("resnet50-w8")), "--upto", "layer9"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--upto layer9: no such stage"));
}

#[test]
fn a_run_told_to_compare_nothing_is_a_usage_error() {
    // Not a fail (exit 1): nothing failed; and in compare, not 'no stage of
    // the candidate has a name that the reference has'.
    let dump = fixture("resnet18-w8");
    let fixture = path(&dump);
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_fixture("resnet18-w8", dir.path());
    for (arguments, says) in [
        (
            vec![fixture, "--upto", "input"],
            "--upto input: the input is given, not computed",
        ),
        (
            vec![fixture, "--only", "nomatch*"],
            "--only nomatch*: matches no stage this run compares",
        ),
        (
            vec!["compare", fixture, path(&copy), "--only", "nomatch"],
            "--only nomatch: matches no stage this run compares",
        ),
    ] {
        let output = verify(&arguments);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}");
        assert!(
            stderr(&output).contains(says),
            "{arguments:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn upto_reads_no_weight_or_stage_past_the_block_it_stops_in() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    for file in [
        dump.join("weights/fc.weight.npy"),
        dump.join("weights/layer4.0.conv1.weight.npy"),
        stage_file(&dump, "layer4.0.bn1"),
    ] {
        std::fs::write(file, b"broken").unwrap();
    }
    let output = verify(&[path(&dump), "--upto", "layer3"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = verify(&[path(&dump), "--upto", "layer3.1.bn1", "--isolate"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("not a valid .npy file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn upto_inside_a_block_reads_no_stage_past_it() {
    // The pass is built to the block's end, but the reference check read
    // every BatchNorm of it: layer3.1.bn2's file, after layer3.1.bn1.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    for stage in ["layer3.1.conv2", "layer3.1.bn2", "layer3.1.relu#1"] {
        std::fs::write(stage_file(&dump, stage), b"broken").unwrap();
    }
    for mode in [&[][..], &["--isolate"], &["--both"]] {
        let mut arguments = vec![path(&dump), "--upto", "layer3.1.bn1"];
        arguments.extend(mode);
        let output = verify(&arguments);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{mode:?}: {}",
            stderr(&output)
        );
    }
    let output = verify(&[path(&dump), "--upto", "layer3.1.relu#1"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn upto_still_refuses_an_architecture_the_core_does_not_build() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| {
        m["architecture"]["layers"] = serde_json::json!([2, 0, 2, 2])
    });
    let output = verify(&[path(&dump), "--upto", "layer1.0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("every stage needs at least one block"),
        "{}",
        stderr(&output)
    );
    // A cause is said once, not again as the error's source.
    let dump = copy_fixture("resnet18-w8", dir.path());
    std::fs::remove_file(dump.join("weights/layer2.0.bn1.running_var.npy")).unwrap();
    let stderr = stderr(&verify(&[path(&dump)]));
    assert_eq!(stderr.matches("cannot be read").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[test]
fn upto_checks_the_reference_up_to_where_it_stops() {
    // A stage the core does not produce, just before the stage a pass
    // stops at, is found; one past it is not looked at.
    for (extra_before, refused) in [("layer1.0.conv2", true), ("layer2.0.conv1", false)] {
        let dir = tempfile::tempdir().unwrap();
        let dump = copy_fixture("resnet18-w8", dir.path());
        edit_manifest(&dump, |m| {
            let stages = m["stages"].as_array_mut().unwrap();
            let at = stages
                .iter()
                .position(|s| s["name"] == extra_before)
                .unwrap();
            let mut extra = stages[at - 1].clone();
            extra["name"] = "layer1.0.extra".into();
            stages.insert(at, extra);
        });
        let output = verify(&[path(&dump), "--upto", "layer1.0.conv2"]);
        if refused {
            assert_eq!(output.status.code(), Some(2));
            assert!(stderr(&output).contains("the reference has stage `layer1.0.extra`"));
        } else {
            assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        }
    }
}

#[test]
fn an_input_that_is_not_nchw_is_refused_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&dump, "input");
    let input = read(&file);
    let flat = input.into_shape_with_order(IxDyn(&[1, 3, 1024])).unwrap();
    write(&file, &flat);
    edit_manifest(&dump, |m| {
        entry_mut(m, "stages", "input")["shape"] = serde_json::json!([1, 3, 1024]);
    });
    for mode in [&[][..], &["--isolate"], &["--both"]] {
        let mut arguments = vec![path(&dump)];
        arguments.extend_from_slice(mode);
        let output = verify(&arguments);
        assert_eq!(output.status.code(), Some(2), "{mode:?}");
        assert!(
            stderr(&output).contains("stage `input`: the input is not a 4-D NCHW tensor"),
            "{mode:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn a_failure_says_the_tolerance_it_needs_and_that_one_passes() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&candidate, "layer2.0.conv2");
    write(&file, &read(&file).mapv(|v| v * 1.003 + 1e-4));
    let run = |rtol: Option<f64>| {
        let mut arguments = vec![
            "compare".to_string(),
            path(&fixture("resnet18-w8")).to_string(),
            path(&candidate).to_string(),
            "--format".into(),
            "json".into(),
        ];
        if let Some(rtol) = rtol {
            arguments.extend(["--rtol".into(), rtol.to_string()]);
        }
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        json_report(&verify(&arguments))
    };
    let report = run(None);
    let conv2 = &entry(&report, "stages", "layer2.0.conv2")["cumulative"];
    assert_eq!(conv2["verdict"], "fail");
    let needed = conv2["rtol_needed"].as_f64().unwrap();
    assert!((2e-3..4e-3).contains(&needed), "{needed}");
    assert_eq!(report["summary"]["rtol_needed"].as_f64(), Some(needed));
    // Rerun with it: that stage passes; a hair below: it fails.
    let at = run(Some(needed));
    assert_eq!(entry(&at, "stages", "layer2.0.conv2")["verdict"], "succ");
    assert_eq!(at["summary"]["verdict"], "succ");
    let below = run(Some(f64::from_bits(needed.to_bits() - 1)));
    assert_eq!(entry(&below, "stages", "layer2.0.conv2")["verdict"], "fail");
    // The text shows it rounded up, and the run's largest.
    let text = stdout(&verify(&[
        "compare",
        path(&fixture("resnet18-w8")),
        path(&candidate),
    ]));
    assert!(text.contains("; needs rtol >= "), "{text}");
    assert!(
        text.contains("tolerance needed: every stage compared passes with rtol >= "),
        "{text}"
    );
}

#[test]
fn isolated_and_side_by_side_modes() {
    for mode in ["--isolate", "--both"] {
        let output = verify(&[path(&fixture("resnext50-w8")), mode, "--format", "json"]);
        assert_eq!(output.status.code(), Some(0), "{mode}");
        let report = json_report(&output);
        let stages = report["stages"].as_array().unwrap();
        assert_eq!(stages.len(), 182);
        assert!(stages.iter().all(|s| s["isolated"]["verdict"] == "succ"));
        assert_eq!(
            stages.iter().all(|s| !s["cumulative"].is_null()),
            mode == "--both"
        );
    }
}

#[test]
fn only_shows_a_subset() {
    let output = verify(&[
        path(&fixture("resnet18-w8")),
        "--only",
        "*.conv2",
        "--format",
        "json",
    ]);
    let report = json_report(&output);
    let names: Vec<&str> = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 8);
    assert!(names.iter().all(|n| n.ends_with(".conv2")));
}

#[test]
fn json_and_junit_reports() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("report.xml");
    let output = verify(&[
        path(&fixture("resnet18-w8")),
        "--format",
        "junit",
        "--output",
        path(&junit),
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert!(
        stdout(&output).contains("summary succ"),
        "the text report still goes to stdout"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<testcase ").count(), 75);
    assert!(xml.contains("tests=\"75\" failures=\"0\""));

    let report = json_report(&verify(&[
        path(&fixture("resnet18-w8")),
        "--format",
        "json",
    ]));
    assert_eq!(
        (report["schema"].as_str(), report["schema_version"].as_u64()),
        (Some("resnet-verify-report"), Some(1))
    );
    let conv1 = &report["stages"][0];
    assert_eq!(conv1["name"], "conv1");
    assert_eq!(conv1["shape"], serde_json::json!([1, 8, 16, 16]));
    // The core against its own fixture: conv1 agrees, and the figures say so.
    let metrics = &conv1["cumulative"];
    assert_eq!(metrics["verdict"], "succ");
    assert_eq!(metrics["mismatched"], 0);
    assert_eq!(metrics["elements"], 8 * 16 * 16);
    let scale = metrics["scale"].as_f64().unwrap();
    let max_abs_error = metrics["max_abs_error"].as_f64().unwrap();
    assert!(scale > 0.1, "{metrics}");
    assert!(max_abs_error <= 1e-4 * scale, "{metrics}");
    assert_eq!(
        metrics["relative_error"].as_f64(),
        Some(max_abs_error / scale)
    );
    assert!(
        metrics["cosine_similarity"].as_f64().unwrap() > 1.0 - 1e-9,
        "{metrics}"
    );
}

#[test]
fn compare_reads_nhwc_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    // Store every 4-D stage NHWC, as an NHWC engine would.
    let manifest = manifest(&candidate);
    for stage in manifest["stages"].as_array().unwrap() {
        let file = candidate.join(stage["file"].as_str().unwrap());
        let array = read(&file);
        if array.ndim() == 4 {
            write(
                &file,
                &array
                    .permuted_axes(IxDyn(&[0, 2, 3, 1]))
                    .as_standard_layout()
                    .into_owned(),
            );
        }
    }
    edit_manifest(&candidate, |m| {
        m["layout"] = "NHWC".into();
        for stage in m["stages"].as_array_mut().unwrap() {
            let shape = stage["shape"].as_array().unwrap().clone();
            if shape.len() == 4 {
                stage["shape"] = serde_json::json!([shape[0], shape[2], shape[3], shape[1]]);
            }
        }
    });
    let reference = fixture("resnet18-w8");
    let auto = verify(&["compare", path(&reference), path(&candidate)]);
    assert_eq!(auto.status.code(), Some(0), "{}", stdout(&auto));
    // Spelled as the manifest spells it, or in lower case.
    for spelling in ["NHWC", "nhwc", "AUTO"] {
        let named = verify(&[
            "compare",
            path(&reference),
            path(&candidate),
            "--cand-layout",
            spelling,
        ]);
        assert_eq!(
            named.status.code(),
            Some(0),
            "{spelling}: {}",
            stderr(&named)
        );
    }
    let forced = verify(&[
        "compare",
        path(&reference),
        path(&candidate),
        "--cand-layout",
        "nchw",
    ]);
    assert_eq!(forced.status.code(), Some(1));
    // Read as NCHW, the first 4-D stage already fails on its shape.
    assert!(
        stdout(&forced).contains("first failure: input"),
        "{}",
        stdout(&forced)
    );
}

#[test]
fn fail_fast_stops_at_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["batch_norm_eps"] = 1e-1.into());
    let report = json_report(&verify(&[path(&dump), "--fail-fast", "--format", "json"]));
    assert_eq!(report["summary"]["compared"], 2);
    assert_eq!(
        report["summary"]["stopped"],
        "--fail-fast: stopped after bn1"
    );
}

#[test]
fn only_reads_the_reference_stages_it_compares() {
    // A stage that is not shown is not read end to end: a broken avgpool
    // file does not stop a run that reports layer1 alone, and stops one
    // that reports avgpool, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let avgpool = dump.join("stages/074_avgpool.npy");
    assert!(avgpool.exists());
    std::fs::write(&avgpool, b"not an npy file").unwrap();
    let output = verify(&[path(&dump), "--only", "layer1.*"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let output = verify(&[path(&dump), "--only", "avgpool"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("avgpool.npy"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_reference_without_blocks_and_layers_is_compared_where_it_has_stages() {
    // A traced model (create_feature_extractor) calls the modules inside
    // its blocks and layers, not the blocks and layers: torch records no
    // stage for them. Their values are their last child's, compared there.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let (mut removed, mut kept) = (0, 0);
    edit_manifest(&dump, |manifest| {
        let stages = manifest["stages"].as_array_mut().unwrap();
        let before = stages.len();
        stages.retain(|stage| {
            !["BasicBlock", "Sequential"].contains(&stage["module_type"].as_str().unwrap())
        });
        (removed, kept) = (before - stages.len(), stages.len());
    });
    assert_eq!(removed, 8 + 4 + 3, "blocks, layers, downsamples");
    for mode in [&[][..], &["--isolate"], &["--both"]] {
        let mut arguments = vec![path(&dump), "--format", "json"];
        arguments.extend_from_slice(mode);
        let output = verify(&arguments);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{mode:?}: {}",
            stderr(&output)
        );
        let report = json_report(&output);
        assert_eq!(
            report["summary"]["compared"],
            kept - 1,
            "{mode:?}: all but the input"
        );
        assert_eq!(report["blocks"].as_array().unwrap().len(), 0);
    }
    // A pass that stops at a block or layer the reference lacks stops there.
    for upto in ["layer2", "layer3.0", "layer3.0.downsample"] {
        let output = verify(&[path(&dump), "--upto", upto, "--both"]);
        assert_eq!(output.status.code(), Some(0), "{upto}: {}", stderr(&output));
    }
    // A stage that computes something is never left out.
    edit_manifest(&dump, |manifest| {
        manifest["stages"]
            .as_array_mut()
            .unwrap()
            .retain(|stage| stage["name"] != "layer2.0.conv2");
    });
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("the core produces stage `layer2.0.conv2` (Conv2d), but the reference has no stage of that name"));
}

#[test]
fn bad_input_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let output = verify(&[path(&missing)]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        format!("verify: error: {}: no such directory\n", missing.display())
    );
    // A directory without a manifest: the file, and its cause said once.
    std::fs::create_dir(&missing).unwrap();
    let stderr_text = stderr(&verify(&[path(&missing)]));
    assert!(
        stderr_text.contains("nowhere/manifest.json: No such file or directory")
            && stderr_text.matches("No such file").count() == 1,
        "{stderr_text}"
    );
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    assert!(stderr(&verify(&[path(&file)])).contains("a-file: not a directory"));

    let dump = copy_fixture("resnet18-w8", dir.path());
    std::fs::write(dump.join("manifest.json"), "{ not json").unwrap();
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("manifest.json: invalid manifest: malformed JSON"),
        "{}",
        stderr(&output)
    );

    let dump = copy_fixture("resnext50-w8", dir.path());
    edit_manifest(&dump, |m| {
        m["stages"][3]["file"] = "../../../etc/passwd".into()
    });
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output)
            .contains("stages[3].file`: `../../../etc/passwd` leads out of the dump directory"),
        "{}",
        stderr(&output)
    );

    let dump = copy_fixture("resnet50-w8", dir.path());
    let file = stage_file(&dump, "layer1.0.conv2");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("layer1.0.conv2.npy: not a valid .npy file")
            && message.contains("truncated"),
        "{message}"
    );
    assert!(!message.contains("panicked"));
}

#[test]
fn the_reference_input_is_what_the_core_runs_on() {
    // Changing the stored input changes every stage: the core really reads it.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&dump, "input");
    let input = read(&file);
    let flipped = input
        .clone()
        .permuted_axes(IxDyn(&[0, 1, 3, 2]))
        .as_standard_layout()
        .into_owned();
    let mut swapped = flipped.clone();
    swapped
        .index_axis_mut(Axis(1), 0)
        .assign(&flipped.index_axis(Axis(1), 2));
    write(&file, &swapped);
    let output = verify(&[path(&dump), "--format", "json"]);
    assert_eq!(output.status.code(), Some(1));
    let report = json_report(&output);
    assert_eq!(report["summary"]["first_failure"], "conv1", "{report}");
    assert_eq!(report["reference_check"]["train_mode"], false);
}

#[test]
fn atol_can_follow_each_stage_scale_with_another_fraction() {
    let output = verify(&[
        path(&fixture("resnet18-w8")),
        "--atol-scale",
        "3e-5",
        "--rtol",
        "3e-5",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("with rtol 3e-5, atol 3e-5 x max|ref|"),
        "{}",
        stdout(&output)
    );
    // Too tight for float32 summation orders: the figure really is used.
    let tight = verify(&[
        path(&fixture("resnet18-w8")),
        "--atol-scale",
        "1e-9",
        "--rtol",
        "0",
    ]);
    assert_eq!(tight.status.code(), Some(1), "{}", stdout(&tight));
    let both = verify(&[
        path(&fixture("resnet18-w8")),
        "--atol",
        "1",
        "--atol-scale",
        "1e-4",
    ]);
    assert_eq!(both.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
}

#[test]
fn the_reference_check_recomputes_every_batch_norm_both_ways() {
    for (name, train) in [("resnet18-w8", false), ("resnet18-w8-train", true)] {
        let output = verify(&[
            path(&fixture(name)),
            "--allow-train-reference",
            "--format",
            "json",
        ]);
        let report = json_report(&output);
        let check = &report["reference_check"];
        assert_eq!(check["train_mode"], train, "{name}: {check}");
        let evidence = check["evidence"].as_array().unwrap();
        let stages: Vec<_> = evidence.iter().map(|e| e["stage"].clone()).collect();
        let manifest = manifest(&fixture(name));
        let batch_norms: Vec<_> = manifest["stages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["module_type"] == "BatchNorm2d")
            .map(|s| s["name"].clone())
            .collect();
        assert_eq!(batch_norms.len(), 20);
        assert_eq!(stages, batch_norms, "{name}");
        for e in evidence {
            let (matching, other) = if train {
                ("batch_statistics_error", "running_statistics_error")
            } else {
                ("running_statistics_error", "batch_statistics_error")
            };
            // One way reproduces the stored output to float32 rounding,
            // the other misses it by far.
            assert!(e[matching].as_f64().unwrap() < 1e-5, "{name}: {e}");
            assert!(e[other].as_f64().unwrap() > 1e-2, "{name}: {e}");
        }
    }
    let text = stdout(&verify(&[path(&fixture("resnet18-w8"))]));
    assert!(
        text.contains("reference: eval mode (manifest says eval; 20 of 20 BatchNorms reproduced with running statistics)"),
        "{text}"
    );
    // A run that stops early reads no stage past the one it stops at: the
    // BatchNorms up to there are examined, and before the first, none.
    let text = stdout(&verify(&[
        path(&fixture("resnet18-w8")),
        "--upto",
        "layer1.0.bn2",
    ]));
    assert!(
        text.contains("reference: eval mode (manifest says eval; 3 of 3 BatchNorms reproduced with running statistics)"),
        "{text}"
    );
    let text = stdout(&verify(&[path(&fixture("resnet18-w8")), "--upto", "conv1"]));
    assert!(
        text.contains("reference: eval mode (manifest says eval; no BatchNorm in the stages compared to check it by)"),
        "{text}"
    );
}

#[test]
fn one_batch_norm_left_in_train_mode_is_caught_from_the_data() {
    // model.eval(); model.layer4[1].bn2.train(): at layer4's 1x1 map a
    // train-mode BatchNorm normalises each channel's one value to 0, so
    // its output is its bias. The manifest says eval.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let bias = read(&dump.join("weights/layer4.1.bn2.bias.npy"));
    let file = stage_file(&dump, "layer4.1.bn2");
    let mut output = read(&file);
    assert_eq!(output.shape(), [1, 64, 1, 1]);
    for (channel, value) in output.iter_mut().enumerate() {
        *value = bias[channel];
    }
    write(&file, &output);
    let result = verify(&[path(&dump)]);
    assert_eq!(result.status.code(), Some(1));
    let text = stdout(&result);
    assert!(
        text.contains("THE REFERENCE WAS DUMPED IN TRAIN MODE: its BatchNorm outputs were computed with batch statistics: layer4.1.bn2 (batch stats reproduce it to"),
        "{text}"
    );
}

#[test]
fn a_negative_or_non_finite_tolerance_is_bad_input() {
    for flags in [
        ["--rtol=-1e-4", "--atol=0"],
        ["--atol=-1", "--rtol=0"],
        ["--atol-scale=nan", "--rtol=0"],
    ] {
        let output = verify(&[path(&fixture("resnet18-w8")), flags[0], flags[1]]);
        assert_eq!(output.status.code(), Some(2), "{flags:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("must be a finite number >= 0"),
            "{flags:?}: {stderr}"
        );
    }
}

#[test]
fn a_batch_norm_with_an_eps_of_its_own_is_built_with_it() {
    // The architecture gives layer4.1.bn2 the eps it records: not refused,
    // and the core normalises it with that eps (the data has 1e-5's, so
    // that stage fails as introducing error, named by the eps hint).
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| {
        m["architecture"]["batch_norm_eps_overrides"] = serde_json::json!({"layer4.1.bn2": 1e-3});
        entry_mut(m, "stages", "layer4.1.bn2")["params"]["eps"] = 1e-3.into();
    });
    let output = verify(&[path(&dump), "--isolate", "--format", "json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report = json_report(&output);
    assert_eq!(
        report["summary"]["introduced_at"],
        serde_json::json!(["layer4.1.bn2"])
    );
}

#[test]
fn a_reference_model_the_core_does_not_build_is_refused_by_name() {
    // Each is one module of resnet18 changed the way users change them; the
    // core would build the stock module and compare against another network.
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &str); 8] = [
        (
            |m| entry_mut(m, "stages", "relu")["module_type"] = "ReLU6".into(),
            "`relu` is a ReLU6 in the reference; the core builds ReLU",
        ),
        (
            |m| entry_mut(m, "stages", "layer1.0.conv1")["params"]["bias"] = true.into(),
            "`layer1.0.conv1` (Conv2d) has bias = true in the reference; the core builds bias = false",
        ),
        (
            |m| {
                let params = &mut entry_mut(m, "stages", "layer2.1.conv2")["params"];
                params["dilation"] = serde_json::json!([2, 2]);
                params["padding"] = serde_json::json!([2, 2]);
            },
            "`layer2.1.conv2` (Conv2d) has dilation = [2,2] in the reference; the core builds dilation = [1,1]; `layer2.1.conv2` (Conv2d) has padding = [2,2]",
        ),
        (
            |m| entry_mut(m, "stages", "maxpool")["params"]["ceil_mode"] = true.into(),
            "`maxpool` (MaxPool2d) has ceil_mode = true in the reference; the core builds ceil_mode = false",
        ),
        (
            |m| entry_mut(m, "stages", "layer4.1.bn2")["params"]["eps"] = 1e-3.into(),
            "`layer4.1.bn2` (BatchNorm2d) has eps = 0.001 in the reference, where the other BatchNorms have 0.00001, and the architecture does not list it in batch_norm_eps_overrides",
        ),
        (
            |m| {
                m["architecture"]["batch_norm_eps_overrides"] = serde_json::json!({"layer4.1.bn2": 1e-3})
            },
            "`layer4.1.bn2` (BatchNorm2d) has eps = 0.00001 in the reference; the architecture gives it 0.001",
        ),
        (
            |m| m["architecture"]["norm_layer"] = "FrozenBatchNorm2d".into(),
            "`bn1` is a BatchNorm2d in the reference; the core builds FrozenBatchNorm2d",
        ),
        (
            |m| entry_mut(m, "stages", "avgpool")["params"]["output_size"] = serde_json::json!([2, 2]),
            "`avgpool` (AdaptiveAvgPool2d) has output_size = [2,2] in the reference; the core builds output_size = [1,1]",
        ),
    ];
    for (edit, message) in cases {
        let dir = tempfile::tempdir().unwrap();
        let dump = copy_fixture("resnet18-w8", dir.path());
        edit_manifest(&dump, edit);
        let output = verify(&[path(&dump)]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{message}: {}",
            stdout(&output)
        );
        let stderr = stderr(&output);
        assert!(
            stderr.contains("the reference's model is not the one the core builds, so it cannot be verified exactly: ")
                && stderr.contains(message),
            "expected {message:?} in {stderr}"
        );
    }
}

#[test]
fn a_refused_run_leaves_no_report_of_an_earlier_run() {
    // CI reads the report file: after a refusal it must not find the last
    // run's passing one there (an empty file parses as nothing).
    let dir = tempfile::tempdir().unwrap();
    for format in ["junit", "json"] {
        let report = dir.path().join(format!("report.{format}"));
        let plot = dir.path().join("errors.svg");
        let flags = [
            "--format",
            format,
            "--output",
            path(&report),
            "--plot",
            path(&plot),
        ];
        let fixture = fixture("resnet18-w8");
        let mut args = vec![path(&fixture)];
        args.extend(flags);
        assert_eq!(verify(&args).status.code(), Some(0));
        assert!(report.exists() && plot.exists());

        let dump = copy_fixture("resnet18-w8", &dir.path().join(format));
        edit_manifest(&dump, |m| {
            entry_mut(m, "stages", "relu")["module_type"] = "ReLU6".into()
        });
        let mut args = vec![path(&dump)];
        args.extend(flags);
        let output = verify(&args);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        let empty = |file: &std::path::Path| std::fs::read(file).unwrap().is_empty();
        assert!(empty(&report) && empty(&plot), "{format}");
    }
    // Not a plain file: left as it is, and written to.
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let fixture = fixture("resnet18-w8");
        let args = [path(&fixture), "--format", "json", "--output", "/dev/null"];
        let output = verify(&args);
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        let null = std::fs::metadata("/dev/null").unwrap();
        assert!(null.file_type().is_char_device());
    }
}

#[test]
fn more_threads_than_the_machine_can_hold_is_an_error_not_a_crash() {
    let output = verify(&[path(&fixture("resnet18-w8")), "--threads", "1000000"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).starts_with("verify: error: --threads 1000000: at most "),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_architecture_field_the_format_does_not_know_is_refused() {
    // `"stem": "deep"` would describe another network than the one built.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| m["architecture"]["stem"] = "deep".into());
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("manifest.json: invalid manifest: unknown field `stem`"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_weight_the_architecture_does_not_read_is_refused_unless_cut_before_it() {
    // A dump of a model whose layer1.0.conv1 has a bias: torchvision's has
    // none, and a network built without it computes another model.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    let bias = ArrayD::from_elem(IxDyn(&[8]), 0.5f32);
    write(&dump.join("weights").join("layer1.0.conv1.bias.npy"), &bias);
    edit_manifest(&dump, |m| {
        let listed = m["weights"].as_array_mut().unwrap();
        listed.push(serde_json::json!({
            "name": "layer1.0.conv1.bias", "shape": [8], "dtype": "float32",
            "file": "weights/layer1.0.conv1.bias.npy"
        }));
    });
    let output = verify(&[path(&dump)]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert!(
        stderr(&output).contains(
            "1 weight(s) that the architecture does not use: layer1.0.conv1.bias. The model they come from has parts the core does not build"
        ),
        "{}",
        stderr(&output)
    );
    // A pass cut before it reads only the weights up to the cut.
    let cut = verify(&[path(&dump), "--upto", "maxpool"]);
    assert_eq!(cut.status.code(), Some(0), "{}", stderr(&cut));
}

#[test]
fn the_reference_compared_with_itself_is_refused() {
    // Once 76/76 succ, exit 0: by its own path, or through a link.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("candidate");
    std::os::unix::fs::symlink(fixture("resnet18-w8"), &link).unwrap();
    for candidate in [fixture("resnet18-w8"), link] {
        let output = verify(&["compare", path(&fixture("resnet18-w8")), path(&candidate)]);
        assert_eq!(output.status.code(), Some(2));
        assert!(
            stderr(&output).contains("are the same dump: the reference compared with itself passes whatever an engine computes"),
            "{}",
            stderr(&output)
        );
    }
}

#[test]
fn a_candidate_stage_of_another_module_type_is_noted() {
    // The values are judged as ever; the type says the engine may have
    // written another stage's output under this name.
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&candidate, |m| {
        entry_mut(m, "stages", "bn1")["module_type"] = "Conv2d".into()
    });
    let (code, report) = compare_report(&fixture("resnet18-w8"), &candidate, &[]);
    assert_eq!(code, 0);
    assert_eq!(
        entry(&report, "stages", "bn1")["notes"],
        serde_json::json!(["the candidate's manifest calls it Conv2d, where the reference's module is BatchNorm2d: written under another stage's name?"])
    );
}

#[test]
fn a_negative_tolerance_is_explained_however_it_is_written() {
    let fixture = fixture("resnet18-w8");
    for args in [
        ["--atol", "-1"],
        ["--atol=-1", "--rtol=0"],
        ["--rtol", "-1"],
    ] {
        let mut all = vec![path(&fixture)];
        all.extend(args);
        let output = verify(&all);
        assert_eq!(output.status.code(), Some(2));
        assert!(
            stderr(&output).contains("must be a finite number >= 0, not -1"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn a_failure_no_rtol_passes_says_which_element_stops_it() {
    // One element where the reference ReLU output is 0 set to 1: no rtol
    // scales a 0, and the line says the element is one whose reference is 0.
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&candidate, "relu");
    let mut values = read(&file);
    let zero = values
        .iter()
        .position(|&v| v == 0.0)
        .expect("a ReLU output has zeros");
    values.as_slice_mut().unwrap()[zero] = 1.0;
    write(&file, &values);
    let output = verify(&["compare", path(&fixture("resnet18-w8")), path(&candidate)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains(
            "no tolerance passes it (an element whose reference is 0 is off by more than atol)"
        ),
        "{}",
        stdout(&output)
    );
}

#[test]
fn a_noise_floor_that_is_negative_or_not_finite_is_refused_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(
        &dump,
        |m| {
            entry_mut(m, "stages", "conv1")["floor"] =
                serde_json::json!({"max_abs": -1.0, "scale": 2.0, "relative": 0.5, "rms": 0.1})
        },
    );
    let output = verify(&[path(&dump), "--tol", "auto"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("stages[1].floor.max_abs`: must be a finite number >= 0, not -1"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn upto_before_a_batch_norm_with_its_own_eps_runs() {
    // The network built for --upto layer1 has no layer4.1.bn2: its eps must
    // not make the build refuse the run.
    let dir = tempfile::tempdir().unwrap();
    let dump = copy_fixture("resnet18-w8", dir.path());
    edit_manifest(&dump, |m| {
        m["architecture"]["batch_norm_eps_overrides"] = serde_json::json!({"layer4.1.bn2": 1e-3});
        entry_mut(m, "stages", "layer4.1.bn2")["params"]["eps"] = 1e-3.into();
    });
    let output = verify(&[path(&dump), "--upto", "layer1"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn a_layer_counts_a_block_with_a_failing_stage_as_failed() {
    // layer2.0.conv1 off by 1%, the block's output untouched: the block
    // fails, and its layer said '2/2 blocks' (it counted the block's
    // output stage, which passes).
    let dir = tempfile::tempdir().unwrap();
    let candidate = copy_fixture("resnet18-w8", dir.path());
    let file = stage_file(&candidate, "layer2.0.conv1");
    write(&file, &read(&file).mapv(|v| v * 1.01));
    let reference = fixture("resnet18-w8");
    let (_, report) = compare_report(&reference, &candidate, &[]);
    assert_eq!(entry(&report, "blocks", "layer2.0")["verdict"], "fail");
    let layer = entry(&report, "layers", "layer2");
    assert_eq!(layer["blocks"], serde_json::json!({"succ": 1, "total": 2}));
    let text = stdout(&verify(&["compare", path(&reference), path(&candidate)]));
    assert!(text.contains("1/2 blocks"), "{text}");
}

#[test]
fn the_html_report_says_the_tolerance_needed_as_the_text_does() {
    // It once rounded the figure to nearest (a copied rtol could still
    // fail), left out --cand-dtype, and said nothing when no rtol passes.
    let dir = tempfile::tempdir().unwrap();
    let reference = fixture("resnet18-w8");
    for (name, change) in [
        ("scaled", (|v: f32| v * 1.01) as fn(f32) -> f32),
        ("nan", |_| f32::NAN),
    ] {
        let candidate = copy_fixture("resnet18-w8", &dir.path().join(name));
        let file = stage_file(&candidate, "layer2.0.conv1");
        write(&file, &read(&file).mapv(change));
        let page = dir.path().join(format!("{name}.html"));
        let output = verify(&[
            "compare",
            path(&reference),
            path(&candidate),
            "--format",
            "html",
            "--output",
            path(&page),
        ]);
        assert_eq!(output.status.code(), Some(1));
        let text = stdout(&output);
        let line = text
            .lines()
            .find_map(|line| line.strip_prefix("tolerance needed: "))
            .unwrap_or_else(|| panic!("{name}: {text}"));
        let html = std::fs::read_to_string(&page).unwrap();
        let escaped = line.replace('>', "&gt;").replace('<', "&lt;");
        assert!(
            html.contains(&format!("<li>tolerance needed: {escaped}</li>")),
            "{name}: {line}"
        );
    }
}

#[test]
fn the_output_file_takes_its_format_from_its_extension_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let dump = fixture("resnet18-w8");
    let at = |name: &str| dir.path().join(name);
    for (name, starts) in [
        ("r.json", "{"),
        ("r.xml", "<?xml"),
        ("r.html", "<!doctype html>"),
        ("r.txt", "verify "),
    ] {
        let file = at(name);
        let output = verify(&[path(&dump), "--output", path(&file)]);
        assert_eq!(output.status.code(), Some(0), "{name}: {}", stderr(&output));
        let written = std::fs::read_to_string(&file).unwrap();
        assert!(written.starts_with(starts), "{name}: {}", &written[..40]);
    }
    // Told, it writes what it is told.
    let file = at("told.json");
    verify(&[path(&dump), "--format", "text", "--output", path(&file)]);
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .starts_with("verify "));
    // One file for two outputs is refused before anything is written.
    let same = at("same");
    let output = verify(&[path(&dump), "--output", path(&same), "--plot", path(&same)]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("--output and --plot both name"),
        "{}",
        stderr(&output)
    );
    assert!(!same.exists());
}
