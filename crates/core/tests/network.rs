//! The network as a whole: stage names and order, stopping early, and
//! running single stages, on small random models built from torch-named
//! weights.

use std::collections::HashMap;
use std::ops::ControlFlow;

use ndarray::{ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use resnet_core::{Architecture, BlockKind, CoreError, Network, Tensor, WeightTensor};

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
    w.uniform(
        "fc.weight".into(),
        &[arch.num_classes, in_channels],
        -0.3,
        0.3,
    );
    w.uniform("fc.bias".into(), &[arch.num_classes], -0.3, 0.3);
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
