//! The network as a whole: stage names and order, stopping early, and
//! running single stages, on small random models built from torch-named
//! weights.

use std::collections::HashMap;
use std::ops::ControlFlow;

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use resnet_core::ops::ConvGeometry;
use resnet_core::{
    Architecture, BlockKind, CoreError, Head, Network, NormLayer, Tensor, WeightTensor,
};

fn architecture(block: BlockKind, groups: usize, width_per_group: usize) -> Architecture {
    Architecture {
        block,
        layers: vec![2, 1],
        groups,
        width_per_group,
        stem_channels: 8,
        planes: vec![8, 16],
        num_classes: 5,
        in_channels: 3,
        batch_norm_eps: 1e-5,
        replace_stride_with_dilation: Vec::new(),
        norm_layer: NormLayer::BatchNorm2d,
        batch_norm_eps_overrides: Default::default(),
        head: Head::Linear,
    }
}

/// A Bottleneck network whose second layer trades its stride for dilation,
/// with two blocks there, so that both of torchvision's dilations show.
fn dilated() -> Architecture {
    Architecture {
        layers: vec![1, 2],
        replace_stride_with_dilation: vec![true],
        ..architecture(BlockKind::Bottleneck, 1, 64)
    }
}

/// Random weights under torch's state_dict names, shaped as torch shapes them.
struct RandomWeights {
    rng: StdRng,
    weights: HashMap<String, WeightTensor>,
}

impl RandomWeights {
    fn uniform(&mut self, name: String, shape: &[usize], low: f32, high: f32) {
        let rng = &mut self.rng;
        self.weights.insert(
            name,
            ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(low..high)),
        );
    }

    fn conv(&mut self, name: &str, out: usize, input: usize, kernel: usize) {
        self.uniform(
            format!("{name}.weight"),
            &[out, input, kernel, kernel],
            -0.3,
            0.3,
        );
    }

    fn norm(&mut self, name: &str, channels: usize) {
        self.uniform(format!("{name}.weight"), &[channels], 0.5, 1.5);
        self.uniform(format!("{name}.bias"), &[channels], -0.2, 0.2);
        self.uniform(format!("{name}.running_mean"), &[channels], -0.2, 0.2);
        self.uniform(format!("{name}.running_var"), &[channels], 0.5, 2.0);
    }
}

fn random_weights(arch: &Architecture, seed: u64) -> HashMap<String, WeightTensor> {
    let mut w = RandomWeights {
        rng: StdRng::seed_from_u64(seed),
        weights: HashMap::new(),
    };
    w.conv("conv1", arch.stem_channels, arch.in_channels, 7);
    w.norm("bn1", arch.stem_channels);
    let mut in_channels = arch.stem_channels;
    for (layer, (&blocks, &planes)) in arch.layers.iter().zip(&arch.planes).enumerate() {
        for block in 0..blocks {
            let prefix = format!("layer{}.{block}", layer + 1);
            let out = planes * arch.block.expansion();
            let stride = if layer > 0 && block == 0 { 2 } else { 1 };
            match arch.block {
                BlockKind::Bottleneck => {
                    let width = arch.bottleneck_width(planes);
                    w.conv(&format!("{prefix}.conv1"), width, in_channels, 1);
                    w.norm(&format!("{prefix}.bn1"), width);
                    w.conv(&format!("{prefix}.conv2"), width, width / arch.groups, 3);
                    w.norm(&format!("{prefix}.bn2"), width);
                    w.conv(&format!("{prefix}.conv3"), out, width, 1);
                    w.norm(&format!("{prefix}.bn3"), out);
                }
                BlockKind::BasicBlock => {
                    w.conv(&format!("{prefix}.conv1"), planes, in_channels, 3);
                    w.norm(&format!("{prefix}.bn1"), planes);
                    w.conv(&format!("{prefix}.conv2"), planes, planes, 3);
                    w.norm(&format!("{prefix}.bn2"), planes);
                }
            }
            if stride != 1 || in_channels != out {
                w.conv(&format!("{prefix}.downsample.0"), out, in_channels, 1);
                w.norm(&format!("{prefix}.downsample.1"), out);
            }
            in_channels = out;
        }
    }
    let fc = match arch.head {
        Head::DropoutLinear => "fc.1",
        _ => "fc",
    };
    w.uniform(
        format!("{fc}.weight"),
        &[arch.num_classes, in_channels],
        -0.3,
        0.3,
    );
    w.uniform(format!("{fc}.bias"), &[arch.num_classes], -0.3, 0.3);
    w.weights
}

fn random_input(seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    Tensor::from_nhwc(ndarray::Array4::from_shape_simple_fn(
        (2, 29, 31, 3),
        || rng.random_range(-2.0f32..2.0),
    ))
}

#[test]
fn stage_names_follow_torch_execution_order() {
    let arch = architecture(BlockKind::BasicBlock, 1, 64);
    let network = Network::from_weights(&arch, &random_weights(&arch, 1)).unwrap();
    let names: Vec<&str> = network
        .stages()
        .iter()
        .map(|stage| stage.name.as_str())
        .collect();
    let expected = [
        "input",
        "conv1",
        "bn1",
        "relu",
        "maxpool",
        "layer1.0.conv1",
        "layer1.0.bn1",
        "layer1.0.relu#0",
        "layer1.0.conv2",
        "layer1.0.bn2",
        "layer1.0.relu#1",
        "layer1.0",
        "layer1.1.conv1",
        "layer1.1.bn1",
        "layer1.1.relu#0",
        "layer1.1.conv2",
        "layer1.1.bn2",
        "layer1.1.relu#1",
        "layer1.1",
        "layer1",
        "layer2.0.conv1",
        "layer2.0.bn1",
        "layer2.0.relu#0",
        "layer2.0.conv2",
        "layer2.0.bn2",
        "layer2.0.downsample.0",
        "layer2.0.downsample.1",
        "layer2.0.downsample",
        "layer2.0.relu#1",
        "layer2.0",
        "layer2",
        "avgpool",
        "fc",
    ];
    assert_eq!(names, expected);
    let downsample = &network.stages()[network.stage_index("layer2.0.downsample.0").unwrap()];
    assert_eq!(
        (downsample.block.as_deref(), downsample.layer.as_deref()),
        (Some("layer2.0"), Some("layer2"))
    );
    let block = &network.stages()[network.stage_index("layer2.0").unwrap()];
    assert_eq!(
        (block.block.as_deref(), block.layer.as_deref()),
        (None, Some("layer2"))
    );
    // The block's last ReLU adds the identity: the downsample's output.
    let inputs: Vec<&str> = network
        .stage_inputs(network.stage_index("layer2.0.relu#1").unwrap())
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(inputs, ["layer2.0.bn2", "layer2.0.downsample"]);
}

#[test]
fn observed_isolated_and_plain_passes_agree() {
    for arch in [
        architecture(BlockKind::Bottleneck, 2, 32),
        architecture(BlockKind::BasicBlock, 1, 64),
        dilated(),
    ] {
        let network = Network::from_weights(&arch, &random_weights(&arch, 2)).unwrap();
        let mut outputs: Vec<Tensor> = Vec::new();
        let logits = network
            .forward_observed(random_input(3), None, &mut |_, output| {
                outputs.push(output.clone());
                ControlFlow::Continue(())
            })
            .unwrap()
            .unwrap();
        assert_eq!(outputs.len(), network.stages().len());
        assert_eq!(logits.nhwc_shape(), [2, 1, 1, 5]);
        assert_eq!(
            network.forward(random_input(3)).unwrap(),
            logits,
            "no observer, same logits"
        );
        // Each stage run alone on the pass's own inputs gives the pass's output, bit for bit.
        for index in 1..network.stages().len() {
            let inputs: Vec<&Tensor> = network
                .stage_input_indices(index)
                .iter()
                .map(|&p| &outputs[p])
                .collect();
            let alone = network.run_stage(index, &inputs).unwrap();
            assert_eq!(
                alone,
                outputs[index],
                "stage {}",
                network.stages()[index].name
            );
        }
    }
}

#[test]
fn a_pass_stops_after_the_named_stage() {
    let arch = architecture(BlockKind::Bottleneck, 1, 64);
    let network = Network::from_weights(&arch, &random_weights(&arch, 4)).unwrap();
    let upto = network.stage_index("layer1.1").unwrap();
    let mut seen = Vec::new();
    let last = network
        .forward_observed(random_input(5), Some(upto), &mut |stage, _| {
            seen.push(stage.name.clone());
            ControlFlow::Continue(())
        })
        .unwrap()
        .unwrap();
    assert_eq!(seen.last().map(String::as_str), Some("layer1.1"));
    assert_eq!(seen.len(), upto + 1);
    assert_eq!(last.nchw_shape()[1], 32);
    // An observer can stop the pass too.
    let mut count = 0;
    let stopped = network
        .forward_observed(random_input(5), None, &mut |_, _| {
            count += 1;
            if count == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert!(stopped.is_none());
    assert_eq!(count, 3);
}

#[test]
fn bad_weights_and_inputs_are_named() {
    let arch = architecture(BlockKind::Bottleneck, 1, 64);
    let mut weights = random_weights(&arch, 6);
    weights.insert(
        "layer1.0.conv2.weight".into(),
        ArrayD::zeros(IxDyn(&[8, 8, 1, 3])),
    );
    match Network::from_weights(&arch, &weights) {
        Err(CoreError::WeightShape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "layer1.0.conv2.weight");
            assert_eq!((expected, found), (vec![8, 8, 3, 3], vec![8, 8, 1, 3]));
        }
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
    weights.remove("layer1.0.conv2.weight");
    assert!(
        matches!(Network::from_weights(&arch, &weights), Err(CoreError::MissingWeight { name }) if name == "layer1.0.conv2.weight")
    );

    let network = Network::from_weights(&arch, &random_weights(&arch, 6)).unwrap();
    assert!(matches!(
        network.forward(Tensor::zeros(1, 16, 16, 4)),
        Err(CoreError::InputShape { .. })
    ));
    let conv = network.stage_index("layer1.0.conv2").unwrap();
    let error = network
        .run_stage(conv, &[&Tensor::zeros(1, 8, 8, 5)])
        .unwrap_err();
    assert!(error.to_string().contains("layer1.0.conv2"), "{error}");
}

#[test]
fn the_fused_inference_path_computes_the_same_logits() {
    for arch in [
        architecture(BlockKind::Bottleneck, 2, 32),
        architecture(BlockKind::BasicBlock, 1, 64),
        dilated(),
    ] {
        let network = Network::from_weights(&arch, &random_weights(&arch, 8)).unwrap();
        let observed = network.forward(random_input(9)).unwrap();
        let fused = network.infer(random_input(9)).unwrap();
        assert_eq!(observed.nhwc_shape(), fused.nhwc_shape());
        // f32::max drops a NaN operand: without this, NaN logits on either
        // side would leave `error` at 0 and pass.
        for (path, logits) in [("observed", &observed), ("fused", &fused)] {
            assert!(
                logits.as_slice().iter().all(|v| v.is_finite()),
                "{path} logits are not all finite: {:?}",
                logits.as_slice()
            );
        }
        let scale = observed.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
        let error = observed
            .as_slice()
            .iter()
            .zip(fused.as_slice())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            error <= 1e-5 * scale,
            "fused logits differ by {error} (scale {scale})"
        );
    }
}

/// Every stage's output of one observed pass, by name.
fn outputs_by_name(network: &Network, input: Tensor) -> HashMap<String, Tensor> {
    let mut outputs = HashMap::new();
    network
        .forward_observed(input, None, &mut |stage, output| {
            outputs.insert(stage.name.clone(), output.clone());
            ControlFlow::Continue(())
        })
        .unwrap();
    outputs
}

#[test]
fn a_dilated_layer_keeps_the_map_size_and_dilates_as_torchvision_does() {
    let arch = dilated();
    let network = Network::from_weights(&arch, &random_weights(&arch, 4)).unwrap();
    let geometry = |name: &str| {
        *network.stages()[network.stage_index(name).unwrap()]
            .conv()
            .unwrap()
            .geometry()
    };
    // torchvision's _make_layer: the first block keeps the previous
    // dilation (1) without the stride; the blocks after it dilate by the
    // stride it gave up, padding as much.
    let expected = |dilation: usize| ConvGeometry {
        dilation: [dilation; 2],
        ..ConvGeometry::square(3, 1, dilation, 1)
    };
    assert_eq!(geometry("layer2.0.conv2"), expected(1));
    assert_eq!(geometry("layer2.1.conv2"), expected(2));
    assert_eq!(
        geometry("layer2.0.downsample.0"),
        ConvGeometry::square(1, 1, 0, 1)
    );
    let outputs = outputs_by_name(&network, random_input(5));
    let spatial = |name: &str| outputs[name].nhwc_shape()[1..3].to_vec();
    assert_eq!(spatial("layer2"), spatial("layer1"));
    assert_eq!(outputs["layer2"].channels(), 64);

    let strided = Architecture {
        replace_stride_with_dilation: vec![false],
        ..dilated()
    };
    let strided = Network::from_weights(&strided, &random_weights(&arch, 4)).unwrap();
    let outputs = outputs_by_name(&strided, random_input(5));
    assert_eq!(outputs["layer2"].nhwc_shape()[1..3], [4, 4]);
}

#[test]
fn dilation_is_refused_where_torchvision_refuses_it() {
    let refusal = |arch: Architecture| match arch.validate() {
        Err(CoreError::UnsupportedArchitecture(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let basic = Architecture {
        replace_stride_with_dilation: vec![true],
        ..architecture(BlockKind::BasicBlock, 1, 64)
    };
    assert!(refusal(basic).starts_with("BasicBlock does not support dilation"));
    let too_many = Architecture {
        replace_stride_with_dilation: vec![false, true],
        ..dilated()
    };
    assert!(
        refusal(too_many).contains("needs one flag per layer after the first (1)"),
        "the flags' count is checked"
    );
}

#[test]
fn fine_tuning_heads_and_backbones_end_as_torch_names_them() {
    let names = |arch: &Architecture| -> Vec<String> {
        let network = Network::from_weights(arch, &random_weights(arch, 6)).unwrap();
        let names: Vec<String> = network.stages().iter().map(|s| s.name.clone()).collect();
        names[names.len() - 4..].to_vec()
    };
    let with_head = |head| Architecture {
        head,
        ..architecture(BlockKind::BasicBlock, 1, 64)
    };
    assert_eq!(
        names(&with_head(Head::DropoutLinear)),
        ["avgpool", "fc.0", "fc.1", "fc"]
    );
    assert_eq!(
        names(&with_head(Head::Identity)),
        ["layer2.0", "layer2", "avgpool", "fc"]
    );
    assert_eq!(
        names(&with_head(Head::None)),
        [
            "layer2.0.downsample",
            "layer2.0.relu#1",
            "layer2.0",
            "layer2"
        ]
    );
}

#[test]
fn each_head_outputs_what_the_classifier_network_has_at_that_point() {
    let base = architecture(BlockKind::Bottleneck, 2, 32);
    let linear = Network::from_weights(&base, &random_weights(&base, 7)).unwrap();
    let outputs = outputs_by_name(&linear, random_input(8));
    for head in [Head::DropoutLinear, Head::Identity, Head::None] {
        let arch = Architecture {
            head,
            ..base.clone()
        };
        // The same random weights: the head's Linear is fc's, renamed.
        let mut weights = random_weights(&base, 7);
        if head == Head::DropoutLinear {
            for part in ["weight", "bias"] {
                let value = weights.remove(&format!("fc.{part}")).unwrap();
                weights.insert(format!("fc.1.{part}"), value);
            }
        }
        let network = Network::from_weights(&arch, &weights).unwrap();
        let expected = match head {
            Head::DropoutLinear => &outputs["fc"],
            Head::Identity => &outputs["avgpool"],
            _ => &outputs["layer2"],
        };
        let stepped = network.forward(random_input(8)).unwrap();
        assert_eq!(&stepped, expected, "{head:?}: the stepped pass");
        let fused = network.infer(random_input(8)).unwrap();
        assert_eq!(
            fused.nhwc_shape(),
            expected.nhwc_shape(),
            "{head:?}: the fused pass"
        );
        let error = fused
            .as_slice()
            .iter()
            .zip(expected.as_slice())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let scale = expected.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(error <= 1e-5 * scale, "{head:?}: fused differs by {error}");
    }
}

#[test]
fn a_batch_norm_with_an_eps_of_its_own_uses_it() {
    let base = architecture(BlockKind::BasicBlock, 1, 64);
    let own = Architecture {
        batch_norm_eps_overrides: [("layer1.0.bn2".to_string(), 0.5)].into(),
        ..base.clone()
    };
    let everywhere = Architecture {
        batch_norm_eps: 0.5,
        ..base.clone()
    };
    let weights = random_weights(&base, 9);
    let build = |arch: &Architecture| Network::from_weights(arch, &weights).unwrap();
    let own_network = build(&own);
    let [base, own, everywhere] = [build(&base), build(&own), build(&everywhere)]
        .map(|n| outputs_by_name(&n, random_input(10)));
    assert_eq!(own["bn1"], base["bn1"], "the others keep batch_norm_eps");
    assert_ne!(own["layer1.0.bn2"], base["layer1.0.bn2"]);
    // Fed the same input, it normalises as with eps 0.5 everywhere.
    let index = own_network.stage_index("layer1.0.bn2").unwrap();
    let alone = own_network
        .run_stage(index, &[&everywhere["layer1.0.conv2"]])
        .unwrap();
    assert_eq!(alone, everywhere["layer1.0.bn2"]);
}

#[test]
fn an_eps_for_a_batch_norm_the_network_does_not_have_is_refused() {
    let base = architecture(BlockKind::BasicBlock, 1, 64);
    let weights = random_weights(&base, 9);
    // A misspelt path (a trailing dot), a BatchNorm a BasicBlock lacks, a conv.
    for module in ["layer1.0.bn2.", "layer1.0.bn3", "layer1.0.conv1"] {
        let misspelt = Architecture {
            batch_norm_eps_overrides: [(module.to_string(), 0.5)].into(),
            ..base.clone()
        };
        let Err(error) = Network::from_weights(&misspelt, &weights) else {
            panic!("an eps for {module} was taken");
        };
        assert_eq!(
            error.to_string(),
            format!("unsupported architecture: `batch_norm_eps_overrides` names `{module}`, which is not a BatchNorm of this architecture")
        );
    }
}

#[test]
fn a_network_cut_before_a_batch_norm_with_its_own_eps_still_builds() {
    // verify --upto builds the architecture cut at the stage: the eps of a
    // BatchNorm cut off goes with it; one that is kept stays.
    let base = architecture(BlockKind::BasicBlock, 1, 64);
    let own = Architecture {
        batch_norm_eps_overrides: [
            ("layer1.0.bn2".to_string(), 0.5),
            ("layer1.1.bn1".to_string(), 0.25),
            ("layer2.0.bn2".to_string(), 0.125),
        ]
        .into(),
        ..base.clone()
    };
    let weights = random_weights(&own, 9);
    for (stage, kept) in [
        ("layer1.0", vec!["layer1.0.bn2"]),
        ("layer1", vec!["layer1.0.bn2", "layer1.1.bn1"]),
        (
            "layer2.0.relu#0",
            vec!["layer1.0.bn2", "layer1.1.bn1", "layer2.0.bn2"],
        ),
        // The smallest network with the stem still has layer1.0.
        ("maxpool", vec!["layer1.0.bn2"]),
    ] {
        let cut = own.up_to(stage).expect("a stage before the head");
        assert_eq!(
            cut.batch_norm_eps_overrides.keys().collect::<Vec<_>>(),
            kept,
            "{stage}"
        );
        assert!(Network::from_weights(&cut, &weights).is_ok(), "{stage}");
    }
    assert!(Network::from_weights(&own, &weights).is_ok());
}

#[test]
fn weights_the_network_does_not_read_are_named_on_request() {
    let arch = architecture(BlockKind::BasicBlock, 1, 64);
    let mut weights = random_weights(&arch, 10);
    weights.insert("bn1.num_batches_tracked".into(), ArrayD::zeros(IxDyn(&[])));
    let network = Network::from_weights(&arch, &weights).unwrap();
    // Every weight read; the count of training batches is no weight.
    assert_eq!(
        network.check_all_weights_read(weights.keys().map(String::as_str)),
        Ok(())
    );
    // A conv's bias, which torchvision's ResNets do not have, and a module
    // of the model's own: the network is built without them, and says so
    // when asked.
    let mut names: Vec<&str> = weights.keys().map(String::as_str).collect();
    names.extend(["layer1.0.conv1.bias", "extra.weight"]);
    let refused = network.check_all_weights_read(names).unwrap_err();
    assert!(
        refused.to_string().starts_with(
            "2 weight(s) that the architecture does not use: extra.weight, layer1.0.conv1.bias."
        ),
        "{refused}"
    );
}

#[test]
fn the_outputs_are_the_same_bits_whatever_the_thread_count() {
    // Large enough that every operation splits its work (the packed GEMM
    // across output tiles, the grouped convs through the gemm crate, the
    // element-wise ops in chunks): no thread count may change a bit.
    let arch = Architecture {
        layers: vec![2, 1],
        stem_channels: 32,
        planes: vec![16, 32],
        ..architecture(BlockKind::Bottleneck, 2, 64)
    };
    let network = Network::from_weights(&arch, &random_weights(&arch, 11)).unwrap();
    let mut rng = StdRng::seed_from_u64(12);
    let input = Tensor::from_nhwc(ndarray::Array4::from_shape_simple_fn(
        (2, 96, 80, 3),
        || rng.random_range(-2.0f32..2.0),
    ));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let stages: Vec<Tensor> = network
                .steps(input.clone(), None)
                .map(|step| step.unwrap().1.as_ref().clone())
                .collect();
            (stages, network.infer(input.clone()).unwrap())
        })
    };
    let bits =
        |tensor: &Tensor| -> Vec<u32> { tensor.as_slice().iter().map(|v| v.to_bits()).collect() };
    let (one_stages, one_fused) = run(1);
    for threads in [2, 3, 8] {
        let (stages, fused) = run(threads);
        for (index, (a, b)) in one_stages.iter().zip(&stages).enumerate() {
            assert!(
                bits(a) == bits(b),
                "{threads} threads: stage {} differs from one thread's",
                network.stages()[index].name
            );
        }
        assert!(
            bits(&one_fused) == bits(&fused),
            "{threads} threads: the fused logits differ"
        );
    }
}
