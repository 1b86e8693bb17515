//! The inference path: the same network at full speed, with nothing to
//! observe. Each BatchNorm is folded into the conv before it, and the ReLU
//! and the residual add that follow are applied in the conv's own pass over
//! its output, so `conv-bn-relu` and `conv-bn-add-relu` are one step each.
//! Built from the stage list, so it computes the same function; the tests
//! hold the two paths to the same logits.

use std::collections::HashMap;

use super::{last_readers, released_after, Network, Operation};
use crate::ops::{self, Conv2d, Linear, MaxPool2d};
use crate::{CoreError, Tensor};

/// One step of the inference path. Values are named by the stage whose
/// output they are (the last stage a step absorbed).
#[derive(Debug)]
pub(crate) enum Step {
    Conv {
        conv: Conv2d,
        input: usize,
        /// Added before the ReLU: the block's identity.
        residual: Option<usize>,
        relu: bool,
        output: usize,
    },
    Relu {
        input: usize,
        output: usize,
    },
    AddRelu {
        input: usize,
        residual: usize,
        output: usize,
    },
    MaxPool {
        pool: MaxPool2d,
        input: usize,
        output: usize,
    },
    AveragePool {
        input: usize,
        output: usize,
    },
    Linear {
        linear: Linear,
        input: usize,
        output: usize,
    },
}

impl Step {
    fn inputs(&self) -> Vec<usize> {
        match self {
            Step::Conv {
                input, residual, ..
            } => std::iter::once(*input).chain(*residual).collect(),
            Step::AddRelu {
                input, residual, ..
            } => vec![*input, *residual],
            Step::Relu { input, .. }
            | Step::MaxPool { input, .. }
            | Step::AveragePool { input, .. }
            | Step::Linear { input, .. } => vec![*input],
        }
    }

    fn output(&self) -> usize {
        match self {
            Step::Conv { output, .. }
            | Step::Relu { output, .. }
            | Step::AddRelu { output, .. }
            | Step::MaxPool { output, .. }
            | Step::AveragePool { output, .. }
            | Step::Linear { output, .. } => *output,
        }
    }
}

/// The steps, and after each the values no later step reads.
#[derive(Debug)]
pub(crate) struct FusedPlan {
    steps: Vec<Step>,
    released_after: Vec<Vec<usize>>,
}

impl FusedPlan {
    pub(crate) fn build(network: &Network) -> FusedPlan {
        let stages = &network.stages;
        // A container's value is its last child's, whatever that became.
        let mut alias: Vec<usize> = (0..stages.len()).collect();
        for (index, stage) in stages.iter().enumerate() {
            match stage.operation {
                Operation::Container { .. } => alias[index] = alias[index - 1],
                Operation::Identity => alias[index] = alias[stage.inputs[0]],
                _ => {}
            }
        }
        let readers = |producer: usize| {
            stages
                .iter()
                .filter(|stage| {
                    !stage.is_container() && stage.inputs.iter().any(|&i| alias[i] == producer)
                })
                .count()
        };
        let mut steps: Vec<Step> = Vec::new();
        // A folded conv whose output only an AddRelu reads, waiting for it.
        let mut pending: HashMap<usize, Step> = HashMap::new();
        let mut index = 1;
        while index < stages.len() {
            let stage = &stages[index];
            let input = stage.inputs.first().map(|&i| alias[i]);
            match &stage.operation {
                Operation::Conv(conv) => {
                    let mut conv = conv.clone();
                    let mut output = index;
                    let mut relu = false;
                    if let Some(Operation::BatchNorm(norm)) =
                        stages.get(index + 1).map(|s| &s.operation)
                    {
                        if stages[index + 1].inputs == [index] && readers(index) == 1 {
                            conv = conv.fold_batch_norm(norm);
                            output = index + 1;
                            index += 1;
                        }
                    }
                    if let Some(next) = stages.get(index + 1) {
                        if matches!(next.operation, Operation::Relu)
                            && next.inputs == [output]
                            && readers(output) == 1
                        {
                            relu = true;
                            output = index + 1;
                            index += 1;
                        }
                    }
                    let step = Step::Conv {
                        conv: conv.for_inference(),
                        input: input.expect("a conv has an input"),
                        residual: None,
                        relu,
                        output,
                    };
                    let add_relu_reads = stages.iter().any(|s| {
                        matches!(s.operation, Operation::AddRelu) && alias[s.inputs[0]] == output
                    });
                    if !relu && readers(output) == 1 && add_relu_reads {
                        pending.insert(output, step);
                    } else {
                        steps.push(step);
                    }
                }
                Operation::AddRelu => {
                    let (residual_input, identity) =
                        (alias[stage.inputs[0]], alias[stage.inputs[1]]);
                    match pending.remove(&residual_input) {
                        Some(Step::Conv {
                            conv,
                            input,
                            relu: false,
                            ..
                        }) => steps.push(Step::Conv {
                            conv,
                            input,
                            residual: Some(identity),
                            relu: true,
                            output: index,
                        }),
                        _ => steps.push(Step::AddRelu {
                            input: residual_input,
                            residual: identity,
                            output: index,
                        }),
                    }
                }
                Operation::Relu => steps.push(Step::Relu {
                    input: input.expect("input"),
                    output: index,
                }),
                Operation::BatchNorm(_) => {
                    unreachable!("every BatchNorm in a ResNet follows a conv and is folded into it")
                }
                Operation::MaxPool(pool) => steps.push(Step::MaxPool {
                    pool: *pool,
                    input: input.expect("input"),
                    output: index,
                }),
                Operation::AveragePool => steps.push(Step::AveragePool {
                    input: input.expect("input"),
                    output: index,
                }),
                Operation::Linear(linear) => steps.push(Step::Linear {
                    linear: linear.clone(),
                    input: input.expect("input"),
                    output: index,
                }),
                Operation::Input | Operation::Identity | Operation::Container { .. } => {}
            }
            index += 1;
        }
        assert!(
            pending.is_empty(),
            "every deferred conv met its residual add"
        );

        let last_reader = last_readers(stages.len(), steps.iter().map(Step::inputs));
        let released_after = released_after(&last_reader, steps.len());
        FusedPlan {
            steps,
            released_after,
        }
    }

    /// Runs the plan on `input`; returns the last step's output (the logits).
    pub(crate) fn run(&self, input: Tensor) -> Result<Tensor, CoreError> {
        let mut values: HashMap<usize, Tensor> = HashMap::new();
        values.insert(0, input);
        let mut last = 0;
        for (position, step) in self.steps.iter().enumerate() {
            let get = |id: &usize| values.get(id).expect("steps run in dependency order");
            let output = match step {
                Step::Conv {
                    conv,
                    input,
                    residual,
                    relu,
                    ..
                } => conv.forward_fused(get(input), residual.as_ref().map(get), *relu),
                Step::Relu { input, .. } => Ok(ops::relu(get(input))),
                Step::AddRelu {
                    input, residual, ..
                } => ops::add_relu(get(input), get(residual)),
                Step::MaxPool { pool, input, .. } => pool.forward(get(input)),
                Step::AveragePool { input, .. } => Ok(ops::adaptive_average_pool_1x1(get(input))),
                Step::Linear { linear, input, .. } => linear.forward(get(input)),
            }
            .map_err(|reason| CoreError::StageInputShape {
                stage: format!("fused step {position}"),
                found: vec![],
                reason: Box::new(reason),
            })?;
            last = step.output();
            values.insert(last, output);
            for released in &self.released_after[position] {
                values.remove(released);
            }
        }
        Ok(values.remove(&last).expect("the last value is kept"))
    }
}
