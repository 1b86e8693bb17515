//! `verify DUMP`: run the core on a dump's weights and input, and compare
//! every stage with the reference as it is produced.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use ndarray::ArrayD;
use resnet_core::{CoreError, Network, Steps, Tensor};
use resnet_dump::{similar_stage_names, Dump, StageEntry};

use crate::adapter;
use crate::layout::{candidate_nchw, reference_tensor};
use crate::module_check;
use crate::pipeline::{run, shown, Candidate, Feed, Output, Row, RunOptions};
use crate::reference_check::check_reference;
use crate::reference_stages::ReferenceStages;
use crate::report::{Event, Report, RunMode};
use crate::VerifyError;

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub dump: PathBuf,
    /// Stop after this stage (a stage, block or layer name).
    pub upto: Option<String>,
    pub mode: RunMode,
    pub run: RunOptions,
}

/// Runs the comparison, telling `listener` each result as it is known.
/// `Err` is bad input (exit 2); a report that did not pass is exit 1.
pub fn verify(
    options: &VerifyOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    verify_dump(&Dump::open(&options.dump)?, options, listener)
}

/// [`verify`] on a dump already opened (or held in memory); `options.dump`
/// only names it.
pub fn verify_dump(
    dump: &Dump,
    options: &VerifyOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    let whole = adapter::architecture(dump.architecture()?);
    let core_error = |cause| VerifyError::Core {
        dump: options.dump.clone(),
        cause,
    };
    // A pass that stops early is built only as far as it goes, so that the
    // weights and the reference stages after it are not read; the network
    // as a whole must still be one the core builds.
    whole.validate().map_err(core_error)?;
    let truncated = options.upto.as_deref().and_then(|upto| whole.up_to(upto));
    let network =
        adapter::network(dump, truncated.as_ref().unwrap_or(&whole)).map_err(core_error)?;
    let last = match &options.upto {
        Some(name) => network
            .stage_index(name)
            .map_err(|_| unknown_stage(name, &network))?,
        None => network.stages().len() - 1,
    };
    if last == 0 {
        return Err(VerifyError::Usage(
            "--upto input: the input is given, not computed, so nothing would be compared; \
             name a stage from conv1 on"
                .into(),
        ));
    }
    let checked_through = truncated.is_some().then_some(last);
    let entries = match_stages(dump, &network, &options.dump, checked_through)?;

    let stages = ReferenceStages::new(dump, Some(&network));
    let report = Report::new(
        options.dump.display().to_string(),
        "resnet-core".into(),
        dump.manifest().model_name().to_string(),
        options.mode,
        options.run.tolerance,
        check_reference(&stages, &network, last)?,
    );
    let references = References {
        stages: &stages,
        network: &network,
        path: &options.dump,
        entries,
    };
    let rows: Vec<Row> = network.stages()[..=last]
        .iter()
        .enumerate()
        .filter_map(|(index, stage)| {
            Some(Row {
                index,
                entry: references.entries[index]?,
                block: &stage.block,
                layer: &stage.layer,
                container: stage.is_container(),
                shown: shown(index, &stage.name, options.run.only.as_ref(), true),
            })
        })
        .collect();
    let mut cumulative = EndToEnd {
        references: &references,
        last,
        steps: None,
        output: None,
        position: 0,
    };
    let mut isolated = Isolated {
        references: &references,
    };
    let mut sources: Vec<&mut dyn Candidate> = Vec::new();
    if options.mode.cumulative() {
        sources.push(&mut cumulative);
    }
    if options.mode.isolated() {
        sources.push(&mut isolated);
    }
    run(report, &rows, &mut sources, &stages, &options.run, listener)
}

/// The reference entry for every core stage, checked to cover each other
/// (for a network built only as far as a pass goes, the reference up to
/// the pass's last stage, `checked_through`). A block, layer or downsample
/// the reference did not record (a traced model calls only the modules
/// inside them) has none: its value is its last child's, compared there.
fn match_stages<'a>(
    dump: &'a Dump,
    network: &Network,
    path: &Path,
    checked_through: Option<usize>,
) -> Result<Vec<Option<&'a StageEntry>>, VerifyError> {
    let mismatch = |reason| VerifyError::Mismatch {
        dump: path.to_path_buf(),
        reason,
    };
    let mut entries = Vec::with_capacity(network.stages().len());
    for stage in network.stages() {
        let entry = dump.stage(&stage.name);
        if entry.is_none() && !stage.is_container() {
            return Err(mismatch(format!(
                "the core produces stage `{}` ({}), but the reference has no stage of that name; was the dump made for this architecture?",
                stage.name, stage.kind
            )));
        }
        entries.push(entry);
    }
    if let Some(reason) = module_check::refusal(network, dump) {
        return Err(mismatch(reason));
    }
    let stages = &dump.manifest().stages;
    let covered = match checked_through {
        Some(last) => entries[..=last]
            .iter()
            .rev()
            .flatten()
            .find_map(|entry| stages.iter().position(|s| s.name == entry.name))
            .map_or(0, |position| position + 1),
        None => stages.len(),
    };
    if let Some(extra) = stages[..covered]
        .iter()
        .find(|s| network.stage_index(&s.name).is_err())
    {
        return Err(mismatch(format!(
            "the reference has stage `{}` ({}), which the core does not produce",
            extra.name, extra.module_type
        )));
    }
    Ok(entries)
}

fn unknown_stage(name: &str, network: &Network) -> VerifyError {
    let names = network.stages().iter().map(|stage| stage.name.as_str());
    let near = similar_stage_names(name, names, 8);
    let hint = if near.is_empty() {
        "layers (layer1, layer2, ...), blocks (layer2.1) and stages (layer2.1.conv2) are accepted"
            .to_string()
    } else {
        format!("stages with a similar name: {}", near.join(", "))
    };
    VerifyError::Usage(format!("--upto {name}: no such stage; {hint}"))
}

/// The reference's stages as the core names them.
struct References<'a> {
    stages: &'a ReferenceStages<'a>,
    network: &'a Network,
    path: &'a PathBuf,
    /// The reference's entry for each core stage; none for a container it
    /// did not record.
    entries: Vec<Option<&'a StageEntry>>,
}

impl References<'_> {
    /// The reference's output of core stage `index`, in NCHW order.
    fn load(&self, index: usize) -> Result<Rc<ArrayD<f32>>, VerifyError> {
        match self.entries[index] {
            Some(entry) => Ok(self.stages.load(entry)?.data),
            // A container not recorded: its last child's value.
            None => self.load(index - 1),
        }
    }

    /// The reference's input, as the core takes it.
    fn input(&self) -> Result<Tensor, VerifyError> {
        reference_tensor(self.load(0)?.view())
            .ok_or_else(|| self.mismatch(0, "the input is not a 4-D NCHW tensor".into()))
    }

    fn core_error(&self, cause: CoreError) -> VerifyError {
        VerifyError::Core {
            dump: self.path.clone(),
            cause,
        }
    }

    fn mismatch(&self, index: usize, reason: String) -> VerifyError {
        let name = &self.network.stages()[index].name;
        VerifyError::Mismatch {
            dump: self.path.clone(),
            reason: format!("stage `{name}`: {reason}"),
        }
    }

    /// The core's output of stage `index` in the reference's NCHW shape.
    fn output(
        &self,
        index: usize,
        output: &Tensor,
        reference: &ArrayD<f32>,
    ) -> Result<Output, VerifyError> {
        let data = candidate_nchw(output, reference.shape()).ok_or_else(|| {
            self.mismatch(
                index,
                format!(
                    "the core's output {:?} (NCHW) does not match the reference shape {:?}",
                    output.nchw_shape(),
                    reference.shape()
                ),
            )
        })?;
        Ok(Output {
            data,
            notes: Vec::new(),
        })
    }
}

/// The core run end to end on its own outputs.
struct EndToEnd<'a> {
    references: &'a References<'a>,
    last: usize,
    /// The pass, started on the first row.
    steps: Option<Steps<'a>>,
    /// The output of the row last advanced to.
    output: Option<Rc<Tensor>>,
    /// The stage the pass yields next.
    position: usize,
}

impl Candidate for EndToEnd<'_> {
    fn feed(&self) -> Feed {
        Feed::EndToEnd
    }

    fn advance(&mut self, row: &Row) -> Result<bool, VerifyError> {
        self.output = None;
        if self.steps.is_none() {
            let input = self.references.input()?;
            let network = self.references.network;
            self.steps = Some(network.steps(input, Some(self.last)));
        }
        let steps = self.steps.as_mut().expect("just started");
        // Past the stages without a row (containers the reference lacks).
        for _ in self.position..=row.index {
            let (_, output) = steps
                .next()
                .expect("a pass yields every stage up to the last")
                .map_err(|source| self.references.core_error(source))?;
            self.output = Some(output);
        }
        self.position = row.index + 1;
        Ok(true)
    }

    fn output(&mut self, row: &Row, reference: &ArrayD<f32>) -> Result<Output, VerifyError> {
        let output = self.output.take().expect("advanced to this row");
        self.references.output(row.index, &output, reference)
    }
}

/// Each core stage run alone on the reference's inputs.
struct Isolated<'a> {
    references: &'a References<'a>,
}

impl Candidate for Isolated<'_> {
    fn feed(&self) -> Feed {
        Feed::Reference
    }

    fn advance(&mut self, row: &Row) -> Result<bool, VerifyError> {
        if row.index == 0 {
            // Refused as the end-to-end pass would refuse it.
            self.references.input()?;
        }
        Ok(true)
    }

    fn output(&mut self, row: &Row, reference: &ArrayD<f32>) -> Result<Output, VerifyError> {
        let index = row.index;
        let network = self.references.network;
        let mut tensors = Vec::new();
        for &producer in network.stage_input_indices(index) {
            tensors.push(self.reference_input(producer)?);
        }
        let borrowed: Vec<&Tensor> = tensors.iter().collect();
        let output = network
            .run_stage(index, &borrowed)
            .map_err(|source| self.references.core_error(source))?;
        self.references.output(index, &output, reference)
    }
}

impl Isolated<'_> {
    /// The reference's output of `producer`, as the core takes it.
    fn reference_input(&self, producer: usize) -> Result<Tensor, VerifyError> {
        let reference = self.references.load(producer)?;
        reference_tensor(reference.view()).ok_or_else(|| {
            self.references
                .mismatch(producer, "cannot be fed to the core".into())
        })
    }
}
