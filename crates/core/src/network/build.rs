//! Builds the stage list from an architecture and a set of torch weights.
//! Read top to bottom, it is torchvision's `ResNet`, `Bottleneck` and
//! `BasicBlock`.

use std::cell::RefCell;
use std::collections::HashSet;

use ndarray::Ix4;

use super::stage::repeated_call_name;
use super::{last_readers, released_after, sources, Network, Operation, Stage, StageKind};
use crate::ops::{BatchNorm, Conv2d, ConvGeometry, Linear, MaxPool2d};
use crate::weights::{linear_weight_from_torch, load_with_shape};
use crate::{Architecture, BlockKind, CoreError, Head, WeightSource};

impl Network {
    /// Builds the network described by `architecture`, taking every weight
    /// from `weights` under its torch state_dict name, in torch's layout.
    pub fn from_weights(
        architecture: &Architecture,
        weights: &dyn WeightSource,
    ) -> Result<Network, CoreError> {
        architecture.validate()?;
        let recording = Recording {
            source: weights,
            read: RefCell::new(HashSet::new()),
        };
        let mut net = Builder {
            architecture,
            weights: &recording,
            stages: Vec::new(),
            block: None,
            layer: None,
        };

        let input = net.push("input", "", StageKind::Input, Operation::Input, vec![]);
        // The stem.
        let x = net.conv(
            "conv1",
            input,
            architecture.in_channels,
            architecture.stem_channels,
            ConvGeometry::square(7, 2, 3, 1),
        )?;
        let x = net.batch_norm("bn1", x, architecture.stem_channels)?;
        let x = net.push("relu", "relu", StageKind::ReLU, Operation::Relu, vec![x]);
        let pool = MaxPool2d {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let mut x = net.push(
            "maxpool",
            "maxpool",
            StageKind::MaxPool2d,
            Operation::MaxPool(pool),
            vec![x],
        );

        // The four (or however many) stages; every one but the first halves
        // the image, or, dilated, keeps its size and widens the 3x3 convs
        // after its first block.
        let mut in_channels = architecture.stem_channels;
        let mut dilation = 1;
        for (index, (&blocks, &planes)) in architecture
            .layers
            .iter()
            .zip(&architecture.planes)
            .enumerate()
        {
            let mut stride = if index == 0 { 1 } else { 2 };
            let previous_dilation = dilation;
            if architecture.is_dilated(index) {
                dilation *= stride;
                stride = 1;
            }
            x = net.layer(
                &format!("layer{}", index + 1),
                x,
                &mut in_channels,
                LayerShape {
                    planes,
                    blocks,
                    stride,
                    first_dilation: previous_dilation,
                    dilation,
                },
            )?;
        }

        // The head.
        if architecture.head != Head::None {
            let pooled = net.push(
                "avgpool",
                "avgpool",
                StageKind::AdaptiveAvgPool2d,
                Operation::AveragePool,
                vec![x],
            );
            let (features, classes) = (architecture.feature_channels(), architecture.num_classes);
            match architecture.head {
                Head::Linear => {
                    net.linear("fc", pooled, features, classes)?;
                }
                Head::DropoutLinear => {
                    let first_child = net.stages.len();
                    let dropped = net.push(
                        "fc.0",
                        "fc.0",
                        StageKind::Dropout,
                        Operation::Identity,
                        vec![pooled],
                    );
                    net.linear("fc.1", dropped, features, classes)?;
                    net.container("fc", StageKind::Sequential, pooled, first_child);
                }
                Head::Identity => {
                    net.push(
                        "fc",
                        "fc",
                        StageKind::Identity,
                        Operation::Identity,
                        vec![pooled],
                    );
                }
                Head::None => unreachable!("no head"),
            }
        }

        // An eps given to a BatchNorm this network does not have would be
        // silently unused: a misspelt path, or a model other than described.
        if let Some(module) = architecture.batch_norm_eps_overrides.keys().find(|module| {
            !net.stages
                .iter()
                .any(|stage| stage.kind == StageKind::BatchNorm2d && stage.module == **module)
        }) {
            return Err(CoreError::UnsupportedArchitecture(format!(
                "`batch_norm_eps_overrides` names `{module}`, which is not a BatchNorm of this architecture"
            )));
        }

        let reads = (0..net.stages.len()).map(|index| sources(&net.stages, index));
        let last_reader = last_readers(net.stages.len(), reads);
        let released_after = released_after(&last_reader, net.stages.len());
        Ok(Network {
            architecture: architecture.clone(),
            stages: net.stages,
            last_reader,
            released_after,
            weights_read: recording.read.into_inner(),
            fused: std::sync::OnceLock::new(),
        })
    }
}

/// One layer's blocks, as torchvision's `_make_layer` makes them.
struct LayerShape {
    planes: usize,
    blocks: usize,
    /// The first block's stride (1 in a dilated layer).
    stride: usize,
    /// The first block's dilation: the previous layer's.
    first_dilation: usize,
    /// Every other block's dilation.
    dilation: usize,
}

/// A weight source that notes every name read from it.
struct Recording<'a> {
    source: &'a dyn WeightSource,
    read: RefCell<HashSet<String>>,
}

impl WeightSource for Recording<'_> {
    fn weight(&self, name: &str) -> Result<crate::WeightTensor, CoreError> {
        self.read.borrow_mut().insert(name.to_string());
        self.source.weight(name)
    }
}

struct Builder<'a> {
    architecture: &'a Architecture,
    weights: &'a dyn WeightSource,
    stages: Vec<Stage>,
    block: Option<String>,
    layer: Option<String>,
}

impl Builder<'_> {
    fn layer(
        &mut self,
        name: &str,
        input: usize,
        in_channels: &mut usize,
        shape: LayerShape,
    ) -> Result<usize, CoreError> {
        let first_child = self.stages.len();
        self.layer = Some(name.to_string());
        let mut x = input;
        let planes = shape.planes;
        for index in 0..shape.blocks {
            let block = format!("{name}.{index}");
            let (stride, dilation) = match index {
                0 => (shape.stride, shape.first_dilation),
                _ => (1, shape.dilation),
            };
            x = match self.architecture.block {
                BlockKind::Bottleneck => {
                    self.bottleneck(&block, x, *in_channels, planes, stride, dilation)?
                }
                // Validated: a BasicBlock is never dilated.
                BlockKind::BasicBlock => {
                    self.basic_block(&block, x, *in_channels, planes, stride)?
                }
            };
            *in_channels = planes * self.architecture.block.expansion();
        }
        self.layer = None;
        Ok(self.container(name, StageKind::Sequential, input, first_child))
    }

    /// 1x1 reduce, 3x3 (strided or dilated, grouped), 1x1 expand, then
    /// `relu(out + identity)`.
    fn bottleneck(
        &mut self,
        name: &str,
        input: usize,
        in_channels: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<usize, CoreError> {
        let first_child = self.stages.len();
        self.block = Some(name.to_string());
        let width = self.architecture.bottleneck_width(planes);
        let out_channels = planes * BlockKind::Bottleneck.expansion();
        let groups = self.architecture.groups;

        let x = self.conv(
            &format!("{name}.conv1"),
            input,
            in_channels,
            width,
            ConvGeometry::square(1, 1, 0, 1),
        )?;
        let x = self.batch_norm(&format!("{name}.bn1"), x, width)?;
        let x = self.block_relu(name, 0, x);
        let x = self.conv(
            &format!("{name}.conv2"),
            x,
            width,
            width,
            ConvGeometry {
                dilation: [dilation; 2],
                ..ConvGeometry::square(3, stride, dilation, groups)
            },
        )?;
        let x = self.batch_norm(&format!("{name}.bn2"), x, width)?;
        let x = self.block_relu(name, 1, x);
        let x = self.conv(
            &format!("{name}.conv3"),
            x,
            width,
            out_channels,
            ConvGeometry::square(1, 1, 0, 1),
        )?;
        let residual = self.batch_norm(&format!("{name}.bn3"), x, out_channels)?;
        let identity = self.identity(name, input, in_channels, out_channels, stride)?;
        self.block_add_relu(name, 2, residual, identity);

        self.block = None;
        Ok(self.container(name, StageKind::Bottleneck, input, first_child))
    }

    /// Two 3x3 convs, then `relu(out + identity)`.
    fn basic_block(
        &mut self,
        name: &str,
        input: usize,
        in_channels: usize,
        planes: usize,
        stride: usize,
    ) -> Result<usize, CoreError> {
        let first_child = self.stages.len();
        self.block = Some(name.to_string());

        let x = self.conv(
            &format!("{name}.conv1"),
            input,
            in_channels,
            planes,
            ConvGeometry::square(3, stride, 1, 1),
        )?;
        let x = self.batch_norm(&format!("{name}.bn1"), x, planes)?;
        let x = self.block_relu(name, 0, x);
        let x = self.conv(
            &format!("{name}.conv2"),
            x,
            planes,
            planes,
            ConvGeometry::square(3, 1, 1, 1),
        )?;
        let residual = self.batch_norm(&format!("{name}.bn2"), x, planes)?;
        let identity = self.identity(name, input, in_channels, planes, stride)?;
        self.block_add_relu(name, 1, residual, identity);

        self.block = None;
        Ok(self.container(name, StageKind::BasicBlock, input, first_child))
    }

    /// The block's input, or torchvision's downsample (1x1 strided conv and
    /// BatchNorm) where the shape changes.
    fn identity(
        &mut self,
        block: &str,
        input: usize,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
    ) -> Result<usize, CoreError> {
        if stride == 1 && in_channels == out_channels {
            return Ok(input);
        }
        let name = format!("{block}.downsample");
        let first_child = self.stages.len();
        let x = self.conv(
            &format!("{name}.0"),
            input,
            in_channels,
            out_channels,
            ConvGeometry::square(1, stride, 0, 1),
        )?;
        self.batch_norm(&format!("{name}.1"), x, out_channels)?;
        Ok(self.container(&name, StageKind::Sequential, input, first_child))
    }

    fn block_relu(&mut self, block: &str, call: usize, input: usize) -> usize {
        let module = format!("{block}.relu");
        self.push(
            &repeated_call_name(&module, call),
            &module,
            StageKind::ReLU,
            Operation::Relu,
            vec![input],
        )
    }

    fn block_add_relu(
        &mut self,
        block: &str,
        call: usize,
        residual: usize,
        identity: usize,
    ) -> usize {
        let module = format!("{block}.relu");
        self.push(
            &repeated_call_name(&module, call),
            &module,
            StageKind::ReLU,
            Operation::AddRelu,
            vec![residual, identity],
        )
    }

    fn conv(
        &mut self,
        name: &str,
        input: usize,
        in_channels: usize,
        out_channels: usize,
        geometry: ConvGeometry,
    ) -> Result<usize, CoreError> {
        let [kh, kw] = geometry.kernel;
        let shape = [out_channels, in_channels / geometry.groups, kh, kw];
        let weight = load_with_shape(self.weights, &format!("{name}.weight"), &shape)?;
        let weight = weight
            .into_dimensionality::<Ix4>()
            .expect("shape checked above");
        let conv = Conv2d::from_oihw(weight.view(), geometry, None);
        Ok(self.push(
            name,
            name,
            StageKind::Conv2d,
            Operation::Conv(conv),
            vec![input],
        ))
    }

    fn batch_norm(
        &mut self,
        name: &str,
        input: usize,
        channels: usize,
    ) -> Result<usize, CoreError> {
        let load = |part: &str| -> Result<Vec<f32>, CoreError> {
            Ok(
                load_with_shape(self.weights, &format!("{name}.{part}"), &[channels])?
                    .into_raw_vec_and_offset()
                    .0,
            )
        };
        let norm = BatchNorm::from_running_statistics(
            &load("weight")?,
            &load("bias")?,
            &load("running_mean")?,
            &load("running_var")?,
            self.architecture.batch_norm_eps_of(name),
        );
        Ok(self.push(
            name,
            name,
            StageKind::BatchNorm2d,
            Operation::BatchNorm(norm),
            vec![input],
        ))
    }

    fn linear(
        &mut self,
        name: &str,
        input: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<usize, CoreError> {
        let weight = load_with_shape(
            self.weights,
            &format!("{name}.weight"),
            &[out_features, in_features],
        )?;
        let weight = weight
            .into_dimensionality::<ndarray::Ix2>()
            .expect("shape checked above");
        let bias = load_with_shape(self.weights, &format!("{name}.bias"), &[out_features])?;
        let linear = Linear::new(
            in_features,
            out_features,
            linear_weight_from_torch(weight.view()),
            bias.into_raw_vec_and_offset().0,
        );
        Ok(self.push(
            name,
            name,
            StageKind::Linear,
            Operation::Linear(linear),
            vec![input],
        ))
    }

    fn container(
        &mut self,
        name: &str,
        kind: StageKind,
        input: usize,
        first_child: usize,
    ) -> usize {
        self.push(
            name,
            name,
            kind,
            Operation::Container { first_child },
            vec![input],
        )
    }

    fn push(
        &mut self,
        name: &str,
        module: &str,
        kind: StageKind,
        operation: Operation,
        inputs: Vec<usize>,
    ) -> usize {
        // A container is not inside itself.
        let block = self.block.clone().filter(|block| block != name);
        let layer = self.layer.clone().filter(|layer| layer != name);
        self.stages.push(Stage {
            name: name.to_string(),
            module: module.to_string(),
            kind,
            block,
            layer,
            operation,
            inputs,
        });
        self.stages.len() - 1
    }
}
