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

use std::collections::HashSet;
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
    /// The state_dict names the network was built from.
    weights_read: HashSet<String>,
    /// The inference path, built on first use.
    fused: std::sync::OnceLock<fused::FusedPlan>,
}

impl Network {
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// Refuses `names` (a model's state_dict) if the network did not read
    /// them all: a conv's bias, or a module the architecture lacks, would
    /// be dropped in silence, and the network would compute another model
    /// than the one the weights came from. (Not checked by
    /// [`Network::from_weights`]: a network cut short, for `--upto`, reads
    /// only the weights before the cut.) BatchNorm's `num_batches_tracked`
    /// counts training batches, no part of eval mode, and is never read.
    pub fn check_all_weights_read<'n>(
        &self,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<(), CoreError> {
        let mut unread: Vec<String> = names
            .into_iter()
            .filter(|name| !name.ends_with(".num_batches_tracked"))
            .filter(|name| !self.weights_read.contains(*name))
            .map(str::to_string)
            .collect();
        if unread.is_empty() {
            return Ok(());
        }
        unread.sort();
        Err(CoreError::UnusedWeights { names: unread })
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

    /// The stages whose values stage `index`'s value is made of: its inputs,
    /// or for a container (whose value is its last child's) the stage just
    /// before it.
    pub fn stage_sources(&self, index: usize) -> Vec<usize> {
        sources(&self.stages, index)
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
        let mut logits = None;
        for step in self.steps(input, None) {
            logits = Some(step?.1);
        }
        Ok(Rc::unwrap_or_clone(
            logits.expect("a pass yields the input at least"),
        ))
    }

    /// A pass from the input up to and including stage `upto` (the whole
    /// network when `None`), one stage at a time: each item is a stage and
    /// its output, computed when it is asked for, so nothing after the last
    /// item taken is computed. The first item is the input itself, or the
    /// error that it cannot be fed to the network; after an error, nothing.
    ///
    /// An output held past the next step costs that step a copy: a stage
    /// overwrites its input in place only when no one else holds it.
    pub fn steps(&self, input: Tensor, upto: Option<usize>) -> Steps<'_> {
        let last = upto.unwrap_or(self.stages.len() - 1);
        let channels = self.architecture.in_channels;
        if input.channels() != channels || input.as_slice().is_empty() {
            return Steps {
                error: Some(CoreError::InputShape {
                    found: input.nhwc_shape().to_vec(),
                    expected_channels: channels,
                }),
                ..Steps::new(self, 0, None, 0, last)
            };
        }
        Steps::new(self, 0, Some(Rc::new(input)), 0, last)
    }

    /// [`Network::steps`] with a callback: `observer` is handed every
    /// stage's output and may stop the pass. Returns the last computed
    /// output, or `None` when the observer asked to stop.
    pub fn forward_observed(
        &self,
        input: Tensor,
        upto: Option<usize>,
        observer: &mut dyn FnMut(&Stage, &Tensor) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>, CoreError> {
        let mut last = None;
        for step in self.steps(input, upto) {
            let (stage, output) = step?;
            if observer(stage, &output).is_break() {
                return Ok(None);
            }
            last = Some(output);
        }
        Ok(last.map(Rc::unwrap_or_clone))
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
                let steps = Steps::new(self, stage.inputs[0], Some(seed), first_child, index);
                let mut output = None;
                for step in steps {
                    output = Some(step?.1);
                }
                Ok(Rc::unwrap_or_clone(
                    output.expect("a container has children"),
                ))
            }
            _ => stage.apply(inputs),
        }
    }
}

/// The stages of a pass, run one per item: see [`Network::steps`].
/// Values are released as soon as no later stage needs them, so a pass
/// holds a handful of activations, not all of them.
pub struct Steps<'a> {
    network: &'a Network,
    values: Vec<Option<Rc<Tensor>>>,
    /// The stage to run next.
    next: usize,
    last: usize,
    /// Yielded as the next item, and the pass ends.
    error: Option<CoreError>,
}

impl<'a> Steps<'a> {
    /// Runs stages `first..=last`, with the value of stage `seed_index`
    /// given; when `first` is the seed's own stage, it is yielded first.
    fn new(
        network: &'a Network,
        seed_index: usize,
        seed: Option<Rc<Tensor>>,
        first: usize,
        last: usize,
    ) -> Self {
        let mut values: Vec<Option<Rc<Tensor>>> = vec![None; network.stages.len()];
        values[seed_index] = seed;
        Steps {
            network,
            values,
            next: first,
            last,
            error: None,
        }
    }

    fn run(&mut self, index: usize) -> Result<Rc<Tensor>, CoreError> {
        let network = self.network;
        let stage = &network.stages[index];
        let values = &mut self.values;
        if let Some(seed) = &values[index] {
            return Ok(seed.clone());
        }
        Ok(match stage.operation {
            Operation::Container { .. } => values[index - 1]
                .clone()
                .expect("a container follows its last child"),
            Operation::Identity => values[stage.inputs[0]]
                .clone()
                .expect("producers run before consumers"),
            _ => {
                let first_input = stage.inputs[0];
                let reusable = stage.operation.works_in_place()
                    && network.last_reader[first_input] == Some(index);
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
                        stage.apply_in_place(tensor, &gather(values, &stage.inputs[1..]))?
                    }
                    None => stage.apply(&gather(values, &stage.inputs))?,
                };
                Rc::new(output)
            }
        })
    }
}

impl<'a> Iterator for Steps<'a> {
    type Item = Result<(&'a Stage, Rc<Tensor>), CoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(error) = self.error.take() {
            self.next = self.last + 1;
            return Some(Err(error));
        }
        if self.next > self.last {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let output = match self.run(index) {
            Ok(output) => output,
            Err(error) => {
                self.next = self.last + 1;
                return Some(Err(error));
            }
        };
        if index == self.last {
            // The pass is over: the output is the caller's alone.
            self.values.clear();
        } else {
            self.values[index] = Some(output.clone());
            for &released in &self.network.released_after[index] {
                self.values[released] = None;
            }
        }
        Some(Ok((&self.network.stages[index], output)))
    }
}

/// Liveness: for each of `values` values, the position of the last reader
/// that reads it, if any; `readers` yields, in order, the values each
/// reader reads.
pub fn last_readers<R: IntoIterator<Item = usize>>(
    values: usize,
    readers: impl IntoIterator<Item = R>,
) -> Vec<Option<usize>> {
    let mut last_reader = vec![None; values];
    for (position, reads) in readers.into_iter().enumerate() {
        for value in reads {
            last_reader[value] = Some(position);
        }
    }
    last_reader
}

/// The inverse of [`last_readers`]: for each of `readers` positions, the
/// values that no later reader needs once it ran.
pub(crate) fn released_after(last_reader: &[Option<usize>], readers: usize) -> Vec<Vec<usize>> {
    let mut released = vec![Vec::new(); readers];
    for (value, reader) in last_reader.iter().enumerate() {
        if let Some(reader) = *reader {
            released[reader].push(value);
        }
    }
    released
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

/// See [`Network::stage_sources`]; for the stages of a network being built.
fn sources(stages: &[Stage], index: usize) -> Vec<usize> {
    match stages[index].operation {
        Operation::Container { .. } => vec![index - 1],
        _ => stages[index].inputs.clone(),
    }
}
