//! The network as a flat list of stages in torch's execution order.
//!
//! A stage is either an operator (conv, BatchNorm, ReLU, ...) or a container
//! (a block, a layer, a downsample Sequential) whose output is that of its
//! last child, exactly as torch's forward hooks see them. Keeping the list
//! flat lets one interpreter serve three needs: a full forward pass, a pass
//! that stops after any stage, and a single stage run from inputs supplied
//! by the caller.

mod build;
mod fused;
mod stage;

use std::ops::ControlFlow;
use std::rc::Rc;

pub(crate) use stage::Operation;
pub use stage::{Stage, StageKind};

use crate::{Architecture, CoreError, Tensor};

/// A ResNet ready to run.
pub struct Network {
    architecture: Architecture,
    stages: Vec<Stage>,
    /// For each stage, the last stage that reads its value.
    last_reader: Vec<Option<usize>>,
    /// For each stage, the stages whose values are not needed once it ran.
    released_after: Vec<Vec<usize>>,
    /// The inference path, built on first use.
    fused: std::sync::OnceLock<fused::FusedPlan>,
}

impl Network {
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// Every stage, in execution order. Stage 0 is the input.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    pub fn stage_index(&self, name: &str) -> Result<usize, CoreError> {
        self.stages
            .iter()
            .position(|stage| stage.name == name)
            .ok_or_else(|| CoreError::UnknownStage(name.to_string()))
    }

    /// The stages whose outputs feed stage `index`, in the order
    /// [`Network::run_stage`] takes them. A container is fed what its first
    /// child is fed.
    pub fn stage_inputs(&self, index: usize) -> impl Iterator<Item = &Stage> {
        self.stages[index]
            .inputs
            .iter()
            .map(|&producer| &self.stages[producer])
    }

    /// The indices of the stages that feed stage `index`.
    pub fn stage_input_indices(&self, index: usize) -> &[usize] {
        &self.stages[index].inputs
    }

    /// The logits (`[N, 1, 1, classes]`) by the inference path: BatchNorm
    /// folded into the convs, ReLU and the residual add fused into their
    /// output pass. Nothing is observable; [`Network::forward`] computes the
    /// same function stage by stage.
    pub fn infer(&self, input: Tensor) -> Result<Tensor, CoreError> {
        let channels = self.architecture.in_channels;
        if input.channels() != channels || input.as_slice().is_empty() {
            return Err(CoreError::InputShape {
                found: input.nhwc_shape().to_vec(),
                expected_channels: channels,
            });
        }
        self.fused
            .get_or_init(|| fused::FusedPlan::build(self))
            .run(input)
    }

    /// The logits (`[N, 1, 1, classes]`), with nothing observed or copied.
    pub fn forward(&self, input: Tensor) -> Result<Tensor, CoreError> {
        let output = self.forward_observed(input, None, &mut |_, _| ControlFlow::Continue(()))?;
        Ok(output.expect("an unobserved pass runs to the end"))
    }

    /// Runs from the input up to and including stage `upto` (the whole
    /// network when `None`), handing every stage's output to `observer` as
    /// it is produced. Nothing after `upto` is computed. Returns the last
    /// computed output, or `None` when the observer asked to stop.
    pub fn forward_observed(
        &self,
        input: Tensor,
        upto: Option<usize>,
        observer: &mut dyn FnMut(&Stage, &Tensor) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>, CoreError> {
        let channels = self.architecture.in_channels;
        if input.channels() != channels || input.as_slice().is_empty() {
            return Err(CoreError::InputShape {
                found: input.nhwc_shape().to_vec(),
                expected_channels: channels,
            });
        }
        let input = Rc::new(input);
        if observer(&self.stages[0], &input).is_break() {
            return Ok(None);
        }
        let last = upto.unwrap_or(self.stages.len() - 1);
        if last == 0 {
            return Ok(Some(Rc::unwrap_or_clone(input)));
        }
        let output = self.execute(0, input, 1, last, observer)?;
        Ok(output.map(Rc::unwrap_or_clone))
    }

    /// Runs stage `index` alone on the given inputs (one per
    /// [`Network::stage_inputs`]). A container runs all its children.
    pub fn run_stage(&self, index: usize, inputs: &[&Tensor]) -> Result<Tensor, CoreError> {
        let stage = &self.stages[index];
        if inputs.len() != stage.inputs.len().max(1) {
            return Err(CoreError::StageArity {
                stage: stage.name.clone(),
                expected: stage.inputs.len().max(1),
                found: inputs.len(),
            });
        }
        match stage.operation {
            Operation::Container { first_child } => {
                let seed = Rc::new(inputs[0].clone());
                let output =
                    self.execute(stage.inputs[0], seed, first_child, index, &mut |_, _| {
                        ControlFlow::Continue(())
                    })?;
                Ok(Rc::unwrap_or_clone(
                    output.expect("an unobserved run goes to the end"),
                ))
            }
            _ => stage.apply(inputs),
        }
    }

    /// Runs stages `first..=last`, with the value of stage `seed_index`
    /// given. Values are released as soon as no later stage needs them, so
    /// a pass holds a handful of activations, not all of them.
    fn execute(
        &self,
        seed_index: usize,
        seed: Rc<Tensor>,
        first: usize,
        last: usize,
        observer: &mut dyn FnMut(&Stage, &Tensor) -> ControlFlow<()>,
    ) -> Result<Option<Rc<Tensor>>, CoreError> {
        let mut values: Vec<Option<Rc<Tensor>>> = vec![None; self.stages.len()];
        values[seed_index] = Some(seed);
        for index in first..=last {
            let stage = &self.stages[index];
            let output = match stage.operation {
                Operation::Container { .. } => values[index - 1]
                    .clone()
                    .expect("a container follows its last child"),
                _ => {
                    let first_input = stage.inputs[0];
                    let reusable = stage.operation.works_in_place()
                        && self.last_reader[first_input] == Some(index);
                    // Nothing later reads the input (and no one else holds
                    // it): overwrite it rather than copy it.
                    let owned = reusable
                        .then(|| values[first_input].take())
                        .flatten()
                        .and_then(|value| match Rc::try_unwrap(value) {
                            Ok(tensor) => Some(tensor),
                            Err(shared) => {
                                values[first_input] = Some(shared);
                                None
                            }
                        });
                    let output = match owned {
                        Some(tensor) => {
                            stage.apply_in_place(tensor, &gather(&values, &stage.inputs[1..]))?
                        }
                        None => stage.apply(&gather(&values, &stage.inputs))?,
                    };
                    Rc::new(output)
                }
            };
            if observer(stage, &output).is_break() {
                return Ok(None);
            }
            values[index] = Some(output);
            if index != last {
                for &released in &self.released_after[index] {
                    values[released] = None;
                }
            }
        }
        Ok(values[last].take())
    }
}

/// The values of `producers`, which have all run.
fn gather<'a>(values: &'a [Option<Rc<Tensor>>], producers: &[usize]) -> Vec<&'a Tensor> {
    producers
        .iter()
        .map(|&producer| {
            values[producer]
                .as_deref()
                .expect("producers run before consumers")
        })
        .collect()
}
