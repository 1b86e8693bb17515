use std::fmt;

use crate::ops::{self, BatchNorm, Conv2d, Linear, MaxPool2d, ShapeError};
use crate::{CoreError, Tensor};

/// The torch module class behind a stage, named as `type(module).__name__`
/// names it, so that reports read like the torch model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StageKind {
    Input,
    Conv2d,
    BatchNorm2d,
    ReLU,
    MaxPool2d,
    AdaptiveAvgPool2d,
    Linear,
    /// The identity in eval mode.
    Dropout,
    Identity,
    BasicBlock,
    Bottleneck,
    Sequential,
}

impl StageKind {
    pub fn torch_name(self) -> &'static str {
        match self {
            StageKind::Input => "Input",
            StageKind::Conv2d => "Conv2d",
            StageKind::BatchNorm2d => "BatchNorm2d",
            StageKind::ReLU => "ReLU",
            StageKind::MaxPool2d => "MaxPool2d",
            StageKind::AdaptiveAvgPool2d => "AdaptiveAvgPool2d",
            StageKind::Linear => "Linear",
            StageKind::Dropout => "Dropout",
            StageKind::Identity => "Identity",
            StageKind::BasicBlock => "BasicBlock",
            StageKind::Bottleneck => "Bottleneck",
            StageKind::Sequential => "Sequential",
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// What a stage computes.
#[derive(Clone, Debug)]
pub(crate) enum Operation {
    Input,
    Conv(Conv2d),
    BatchNorm(BatchNorm),
    Relu,
    /// The ReLU that ends a block, applied to `residual + identity`.
    AddRelu,
    MaxPool(MaxPool2d),
    AveragePool,
    /// `fc`, after torch.flatten (which is no work on an `[N, 1, 1, C]` map).
    Linear(Linear),
    /// Dropout in eval mode, nn.Identity: the input, unchanged.
    Identity,
    /// A block, layer or downsample: its output is its last child's.
    Container {
        first_child: usize,
    },
}

impl Operation {
    /// Whether the output can overwrite the first input.
    pub(crate) fn works_in_place(&self) -> bool {
        matches!(
            self,
            Operation::BatchNorm(_) | Operation::Relu | Operation::AddRelu
        )
    }
}

/// One observable point of the network, named as the reference dump names
/// it: the torch module path, with `#k` for the k-th call of a module that
/// is called more than once (`layer1.0.relu#2`).
#[derive(Clone, Debug)]
pub struct Stage {
    pub name: String,
    /// The torch module path, without the call suffix.
    pub module: String,
    pub kind: StageKind,
    /// The block (`layer1.0`) this stage is inside, if any.
    pub block: Option<String>,
    /// The layer (`layer1`) this stage is inside, if any.
    pub layer: Option<String>,
    pub(crate) operation: Operation,
    /// Producers of this stage's inputs (stage indices).
    pub(crate) inputs: Vec<usize>,
}

impl Stage {
    /// The conv this stage runs, if it is a conv.
    pub fn conv(&self) -> Option<&Conv2d> {
        match &self.operation {
            Operation::Conv(conv) => Some(conv),
            _ => None,
        }
    }

    /// The max pool this stage runs, if it is one.
    pub fn max_pool(&self) -> Option<&MaxPool2d> {
        match &self.operation {
            Operation::MaxPool(pool) => Some(pool),
            _ => None,
        }
    }

    pub fn is_container(&self) -> bool {
        matches!(self.operation, Operation::Container { .. })
    }

    /// Whether torch's output of this stage is `[N, C]`: ResNet.forward
    /// flattens the pooled map before `fc`, so `fc` and everything inside
    /// it (a fine-tuning head's Dropout and Linear) are 2-D.
    pub fn is_flattened(&self) -> bool {
        self.module == "fc" || self.module.starts_with("fc.")
    }

    pub(crate) fn apply(&self, inputs: &[&Tensor]) -> Result<Tensor, CoreError> {
        let arity = match self.operation {
            Operation::AddRelu => 2,
            _ => 1,
        };
        if inputs.len() != arity {
            return Err(CoreError::StageArity {
                stage: self.name.clone(),
                expected: arity,
                found: inputs.len(),
            });
        }
        let x = inputs[0];
        let result = match &self.operation {
            Operation::Input | Operation::Identity => Ok(x.clone()),
            Operation::Conv(conv) => conv.forward(x),
            Operation::BatchNorm(norm) => norm.forward(x),
            Operation::Relu => Ok(ops::relu(x)),
            Operation::AddRelu => ops::add_relu(x, inputs[1]),
            Operation::MaxPool(pool) => pool.forward(x),
            Operation::AveragePool => Ok(ops::adaptive_average_pool_1x1(x)),
            Operation::Linear(linear) => linear.forward(x),
            Operation::Container { .. } => unreachable!("containers are run by the network"),
        };
        result.map_err(|reason| self.shape_error(x, reason))
    }

    /// [`Stage::apply`] for an operation that `works_in_place`, writing its
    /// output over `first`, its first input, which nothing else needs.
    pub(crate) fn apply_in_place(
        &self,
        mut first: Tensor,
        rest: &[&Tensor],
    ) -> Result<Tensor, CoreError> {
        let result = match (&self.operation, rest) {
            (Operation::BatchNorm(norm), []) => norm.forward_in_place(&mut first),
            (Operation::Relu, []) => {
                ops::relu_in_place(&mut first);
                Ok(())
            }
            (Operation::AddRelu, [identity]) => ops::add_relu_in_place(&mut first, identity),
            _ => unreachable!("only operations that work in place, with their inputs"),
        };
        match result {
            Ok(()) => Ok(first),
            Err(reason) => Err(self.shape_error(&first, reason)),
        }
    }

    fn shape_error(&self, input: &Tensor, reason: ShapeError) -> CoreError {
        CoreError::StageInputShape {
            stage: self.name.clone(),
            found: input.nhwc_shape().to_vec(),
            reason: Box::new(reason),
        }
    }
}

/// The stage name of the `call`-th call (from 0) of a module that is called
/// more than once per forward pass.
pub fn repeated_call_name(module: &str, call: usize) -> String {
    format!("{module}#{call}")
}
