//! The one comparison loop. A run walks the reference's stages in order and
//! asks each [`Candidate`] source for its output of the stage: the core end
//! to end, the core fed the reference's inputs, or another engine's dump.
//! `verify --both` is two sources side by side. Each stage's comparisons,
//! failure origin and hints become one [`StageReport`], told to the
//! listener as it is known.

use std::ops::ControlFlow;

use globset::GlobMatcher;
use ndarray::{ArrayD, Axis, Slice};
use resnet_dump::{ModuleKind, StageEntry};

use crate::diagnosis::{Evidence, Hint, Observed, Origin};
use crate::metrics::{
    compare_for_report, failure_detail, largest_finite_magnitude, max_abs_error_by_item,
    Comparison, Verdict,
};
use crate::reference_stages::ReferenceStages;
use crate::report::{
    abbreviate, ClassScore, Event, Report, ReportBuilder, StageReport, TopClasses,
};
use crate::tolerance::{floor_fits_stage, ToleranceRule};
use crate::AbsoluteTolerance;
use crate::VerifyError;

/// A stage of the run: the reference's entry for it, and where it sits.
pub(crate) struct Row<'a> {
    /// Position in the run's order (the core's stage index, or the
    /// reference manifest's).
    pub index: usize,
    pub entry: &'a StageEntry,
    pub block: &'a Option<String>,
    pub layer: &'a Option<String>,
    /// A block or layer whose output is its last child's.
    pub container: bool,
    /// Reported (not the core's input, and matched by --only).
    pub shown: bool,
}

/// What a source's output of a stage stands for; a run has at most one
/// source of each.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    /// Computed from the candidate's own previous outputs: errors carry.
    EndToEnd = 0,
    /// Computed from the reference's inputs: the error the stage adds alone.
    Reference = 1,
}

/// A source's output of one stage, NCHW.
pub(crate) struct Output {
    pub data: ArrayD<f32>,
    /// Said on the stage's line (a converted dtype, a shape that differs).
    pub notes: Vec<String>,
}

/// A source's output of the row, and how it compares.
struct Produced {
    /// The source's position in the run's list.
    position: usize,
    output: Output,
    /// Under `--item`, the item's slice of the output (what is compared).
    item: Option<ArrayD<f32>>,
    /// `None` when the shapes differ.
    comparison: Option<Comparison>,
}

impl Produced {
    /// The output as compared: the item's slice under `--item`, else all.
    fn compared(&self) -> &ArrayD<f32> {
        self.item.as_ref().unwrap_or(&self.output.data)
    }
}

/// What a source's own look at a failure found, besides the hypotheses.
pub(crate) enum Explained {
    /// A hint for this stage alone.
    Stage(Hint),
    /// A hint that explains the whole run: said once, and the run stops.
    Run { hint: Hint, stopped: String },
}

/// Where a run's candidate outputs come from.
pub(crate) trait Candidate {
    fn feed(&self) -> Feed;

    /// Called for every row, shown or not, before the reference's output is
    /// read. False when the candidate has no such stage: it is not compared.
    fn advance(&mut self, _row: &Row) -> Result<bool, VerifyError> {
        Ok(true)
    }

    /// The candidate's output of `row`, a row shown, in the reference's
    /// NCHW order.
    fn output(&mut self, row: &Row, reference: &ArrayD<f32>) -> Result<Output, VerifyError>;

    /// Called once the rows are compared: `Err` when the run, as a whole,
    /// is bad input.
    fn finish(&self, _report: &Report) -> Result<(), VerifyError> {
        Ok(())
    }

    /// Whether the source's `output` of a stage that fails after the root
    /// is the stage computed (by the core, with the reference's weights) on
    /// the source's own stored inputs: `Some(false)` is a mistake of the
    /// stage's own, not error carried in. `None` where it cannot tell, or
    /// need not (the core computes each stage on its own inputs).
    fn computed_from_own_inputs(
        &self,
        _row: &Row,
        _output: &ArrayD<f32>,
        _evidence: &Evidence,
    ) -> Result<Option<bool>, VerifyError> {
        Ok(None)
    }

    /// A failing stage's explanation by the source itself, tried before the
    /// hypotheses; when it finds one, the hypotheses are not tested.
    fn explain(
        &self,
        _: &Row,
        _: &Observed,
        _: &Evidence,
    ) -> Result<Option<Explained>, VerifyError> {
        Ok(None)
    }
}

/// What every run takes, whatever its candidate.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Report only the stages whose names match.
    pub only: Option<GlobMatcher>,
    pub fail_fast: bool,
    pub tolerance: ToleranceRule,
    pub allow_train_reference: bool,
    /// Compare only this batch item (`--item K`).
    pub item: Option<usize>,
}

/// Starts the run on `report` (its header), compares every row with the
/// sources and returns the final report.
pub(crate) fn run(
    report: Report,
    rows: &[Row],
    sources: &mut [&mut dyn Candidate],
    reference: &ReferenceStages,
    options: &RunOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    // A stage without a floor under --tol auto is bad input: said before
    // anything is compared.
    let without_floor = rows.iter().filter(|row| row.shown).find_map(|row| {
        (options.tolerance)
            .for_stage(&row.entry.name, row.entry.floor.as_ref())
            .err()
    });
    if let Some(mut missing) = without_floor {
        if rows.iter().all(|row| row.entry.floor.is_none()) {
            missing.stage = None;
        }
        return Err(VerifyError::Mismatch {
            dump: reference.dump().manifest_path().to_path_buf(),
            reason: missing.to_string(),
        });
    }
    // A glob that selects nothing is a mistake in the command, not a run
    // that failed (or, in compare, a candidate that matched nothing).
    if let Some(only) = &options.only {
        if !rows.iter().any(|row| row.shown) {
            return Err(VerifyError::Usage(format!(
                "--only {}: matches no stage this run compares (stage names as the report \
                 writes them: conv1, layer1.*, *.conv2)",
                only.glob()
            )));
        }
    }
    if let Some(item) = options.item {
        let batch = rows
            .first()
            .and_then(|row| row.entry.shape.first().copied());
        if batch.is_none_or(|batch| item >= batch) {
            return Err(VerifyError::Usage(format!(
                "--item {item}: the reference's batch has {} item(s), numbered from 0",
                batch.unwrap_or(0)
            )));
        }
    }
    let mut report = report;
    report.item = options.item;
    let mut builder =
        match ReportBuilder::start(report, rows.len(), options.allow_train_reference, listener) {
            ControlFlow::Continue(builder) => builder,
            ControlFlow::Break(refused) => return Ok(refused),
        };
    let stopped = compare_stages(rows, sources, reference, options, &mut builder, listener)?;
    let input = reference.dump().manifest().input.as_ref();
    if let Some(images) = input.and_then(|input| input.images.as_ref()) {
        for item in &mut builder.report.items {
            item.image = images.get(item.index).cloned();
        }
    }
    for source in sources.iter() {
        source.finish(&builder.report)?;
    }
    Ok(builder.finish(stopped))
}

/// Compares every row with the sources, pushing each stage's report into
/// `builder` (which tells `listener`). Returns why the run stopped early,
/// if it did.
fn compare_stages(
    rows: &[Row],
    sources: &mut [&mut dyn Candidate],
    stages: &ReferenceStages,
    options: &RunOptions,
    builder: &mut ReportBuilder,
    listener: &mut dyn FnMut(Event),
) -> Result<Option<String>, VerifyError> {
    let mut missing = Vec::new();
    let mut stopped = None;
    let mut previous: Option<&Row> = None;
    'rows: for row in rows {
        if let Some(previous) = previous.replace(row) {
            stages.release_after(&previous.entry.name);
        }
        for source in sources.iter_mut() {
            if !source.advance(row)? {
                missing.push(row.entry.name.clone());
                continue 'rows;
            }
        }
        if !row.shown {
            continue;
        }
        let mut tolerance = (options.tolerance)
            .for_stage(&row.entry.name, row.entry.floor.as_ref())
            .expect("checked before the run");
        let loaded = stages.load(row.entry)?;
        let reference = &*loaded.data;
        // --item only narrows the view: the tolerance and the relative
        // error keep the whole stage's scale, so that an item's verdict is
        // the one the whole batch gives it.
        // Under --tol auto the floor sets the tolerance, so it must be
        // this stage's own (the same scale).
        let auto_floor = row
            .entry
            .floor
            .as_ref()
            .filter(|_| tolerance.auto_unit.is_some());
        let largest = (options.item.is_some() || auto_floor.is_some()).then(|| {
            let reference = reference.as_standard_layout();
            let values = reference
                .as_slice()
                .expect("a standard layout is contiguous");
            largest_finite_magnitude(values) as f64
        });
        if let (Some(floor), Some(largest)) = (auto_floor, largest) {
            floor_fits_stage(floor, largest).map_err(|reason| VerifyError::Mismatch {
                dump: stages.dump().manifest_path().to_path_buf(),
                reason: format!("stage `{}`: {reason}", row.entry.name),
            })?;
        }
        let full_scale = options.item.and(largest);
        if let Some(scale) = full_scale {
            tolerance.tolerance.atol =
                AbsoluteTolerance::Fixed(tolerance.tolerance.atol_for(scale));
        }
        // What is compared: the whole batch, or the one item asked for.
        let item_of = |array: &ArrayD<f32>| -> Option<ArrayD<f32>> {
            let item = options.item?;
            (array.ndim() > 0 && item < array.shape()[0]).then(|| {
                array
                    .slice_axis(Axis(0), Slice::from(item..item + 1))
                    .to_owned()
            })
        };
        let reference_item = item_of(reference);
        let compared = reference_item.as_ref().unwrap_or(reference);
        let mut notes = Vec::new();
        if let Some(dtype) = &loaded.converted_from {
            notes.push(format!("reference stored as {dtype}, converted to float32"));
        }

        // Each source's output and how it compares, by what it stands for.
        let mut produced: [Option<Produced>; 2] = [None, None];
        for (position, source) in sources.iter_mut().enumerate() {
            let output = source.output(row, reference)?;
            let item = item_of(&output.data);
            let comparison = (output.data.shape() == reference.shape()).then(|| {
                let mut comparison = compare_for_report(
                    compared.as_slice().expect("standard layout"),
                    (item.as_ref().unwrap_or(&output.data))
                        .as_slice()
                        .expect("standard layout"),
                    compared.shape(),
                    &tolerance,
                );
                // Coordinates and scale in the reference's batch.
                if let (Some(item), Some(worst)) = (options.item, comparison.worst.as_mut()) {
                    worst.index[0] += item;
                }
                if let Some(scale) = full_scale {
                    comparison.scale = scale;
                    comparison.relative_error =
                        comparison.max_abs_error / scale.max(f32::MIN_POSITIVE as f64);
                }
                comparison
            });
            produced[source.feed() as usize] = Some(Produced {
                position,
                output,
                item,
                comparison,
            });
        }
        let produced_by = |feed: Feed| produced[feed as usize].as_ref();
        // Per image: for a batch of several, or the one asked for.
        let per_item =
            options.item.is_some() || reference.shape().first().is_some_and(|&batch| batch > 1);
        // The logits (not the features that an Identity `fc` passes on).
        // Classes are read off the candidate's logits whatever their shape
        // (another number of classes still has a best one).
        if row.entry.name == "fc" && row.entry.module_type != ModuleKind::Identity {
            let classes = stages.dump().manifest().classes.as_deref();
            let candidate = produced_by(Feed::EndToEnd).map(Produced::compared);
            builder.report.top5 = top_classes(compared, candidate, classes);
            if per_item {
                classify_items(&mut builder.report, compared, candidate, classes);
            }
        }
        // Each item's largest error.
        let (by_item, worst_item) = match produced_by(Feed::EndToEnd)
            .or(produced_by(Feed::Reference))
            .filter(|produced| produced.comparison.is_some() && per_item)
        {
            Some(produced) => {
                let by_item = max_abs_error_by_item(
                    compared.as_slice().expect("standard layout"),
                    produced.compared().as_slice().expect("standard layout"),
                    compared.shape()[0],
                    tolerance.tolerance.equal_nan,
                );
                let worst = (0..by_item.len())
                    // The first on a tie, like the worst element.
                    .max_by(|&a, &b| by_item[a].total_cmp(&by_item[b]).then(b.cmp(&a)))
                    .map(|index| index + options.item.unwrap_or(0));
                (by_item, worst)
            }
            None => (Vec::new(), None),
        };
        let failed = |feed: Feed| {
            produced_by(feed).is_some_and(|produced| {
                (produced.comparison.as_ref()).is_none_or(|c| c.verdict == Verdict::Fail)
            })
        };
        let (end_to_end_failed, isolated_failed) =
            (failed(Feed::EndToEnd), failed(Feed::Reference));
        // Run end to end only, a failure after the root whose inputs pass
        // is a mistake of its own, not error carried from the root.
        let network = stages
            .network()
            .filter(|_| end_to_end_failed && produced_by(Feed::Reference).is_none());
        let inputs: Vec<&str> = network
            .and_then(|network| {
                let index = network.stage_index(&row.entry.name).ok()?;
                let sources = network.stage_sources(index).into_iter();
                Some(
                    sources
                        .map(|source| network.stages()[source].name.as_str())
                        .collect(),
                )
            })
            .unwrap_or_default();
        let mut origin = builder.origin(end_to_end_failed, isolated_failed, row.container, &inputs);
        // Another engine's stage held to its own stored inputs: one carried
        // by its inputs that is not itself of them made error of its own (a
        // second mistake after the root, or one next to a stage stored
        // wrong); a root that is, was handed an error grown under tolerance.
        let evidence = Evidence::new(stages, &options.tolerance, row.entry);
        let own_inputs = match (&origin, produced_by(Feed::EndToEnd)) {
            (Some(Origin::Root | Origin::Carried { .. }), Some(produced))
                if !row.container && produced.output.data.shape() == reference.shape() =>
            {
                sources[produced.position].computed_from_own_inputs(
                    row,
                    &produced.output.data,
                    &evidence,
                )?
            }
            _ => None,
        };
        match (&origin, own_inputs) {
            (Some(Origin::Carried { .. }), Some(false)) => origin = Some(Origin::Introduces),
            (Some(Origin::Root), Some(true)) => notes.push(
                "computed right from the candidate's own inputs (which pass): its error grew upstream, under tolerance there; a tighter rule (--tol auto on a dump made with --floor, or a smaller --rtol) shows where it was born"
                    .into(),
            ),
            _ => {}
        }
        let mut hints = Vec::new();
        let mut detail = None;
        if builder.should_diagnose(&origin) {
            // The stage's own error shows best with the reference's inputs.
            let wanted = if isolated_failed {
                Feed::Reference
            } else {
                Feed::EndToEnd
            };
            if let Some(produced) = produced_by(wanted) {
                let (position, output) = (produced.position, &produced.output);
                if output.data.shape() == reference.shape() {
                    // What was compared: the one item under --item.
                    let mut found = failure_detail(
                        compared,
                        produced.compared(),
                        tolerance.tolerance.equal_nan,
                    );
                    for worst in &mut found.worst {
                        worst.index[0] += options.item.unwrap_or(0);
                    }
                    detail = Some(found);
                }
                let observed = Observed::new(reference, &output.data);
                match sources[position].explain(row, &observed, &evidence)? {
                    Some(Explained::Stage(hint)) => hints.push(hint),
                    Some(Explained::Run { hint, stopped: why }) => {
                        // Said once for the run, not again on the stage.
                        builder.report.summary.hint = Some(hint);
                        stopped = Some(why);
                    }
                    None if output.data.shape() == reference.shape() => {
                        hints = evidence.diagnose(&row.entry.name, &observed, &missing);
                    }
                    None => {
                        hints = evidence.diagnose_size(
                            &row.entry.name,
                            reference.shape(),
                            &output.data,
                        );
                    }
                }
            }
        }

        let [cumulative, isolated] = produced.map(|produced| {
            let produced = produced?;
            notes.extend(produced.output.notes);
            produced.comparison
        });
        // A NaN matched under --equal-nan passes silently otherwise.
        let matched_nan = (cumulative.as_ref().or(isolated.as_ref()))
            .filter(|_| tolerance.tolerance.equal_nan)
            .map_or(0, |c| c.reference_nan.min(c.candidate_nan));
        if matched_nan > 0 {
            notes.push(format!(
                "NaN on both sides ({matched_nan}), matched under --equal-nan"
            ));
        }
        let failed = end_to_end_failed || isolated_failed;
        builder.push(
            StageReport {
                index: row.index,
                name: row.entry.name.clone(),
                module_type: row.entry.module_type.clone(),
                shape: reference.shape().to_vec(),
                block: row.block.clone(),
                layer: row.layer.clone(),
                verdict: if failed { Verdict::Fail } else { Verdict::Succ },
                cumulative,
                isolated,
                notes,
                origin,
                hints,
                floor: row.entry.floor,
                max_abs_error_by_item: by_item,
                worst_item,
                detail,
            },
            listener,
        );
        if stopped.is_some() {
            break;
        }
        if failed && options.fail_fast {
            stopped = Some(format!("--fail-fast: stopped after {}", row.entry.name));
            break;
        }
    }
    if !missing.is_empty() && stopped.is_none() {
        stopped = Some(format!(
            "{} reference stage(s) not in the candidate, not compared: {}",
            missing.len(),
            abbreviate(&missing, 5)
        ));
    }
    Ok(stopped)
}

/// Each item's top-5 classes on both sides, and whether they agree, into
/// the report's items (the candidate's empty when no source runs end to
/// end); the items are those compared (one with `--item`).
fn classify_items(
    report: &mut Report,
    reference: &ArrayD<f32>,
    candidate: Option<&ArrayD<f32>>,
    classes: Option<&[String]>,
) {
    let rows = |array: &ArrayD<f32>| -> Vec<Vec<f32>> {
        match array.ndim() {
            0 => Vec::new(),
            _ => array
                .outer_iter()
                .map(|item| item.iter().copied().collect())
                .collect(),
        }
    };
    let reference_rows = rows(reference);
    let candidate_rows = candidate.map(rows).unwrap_or_default();
    let offset = report.item.unwrap_or(0);
    for (position, logits) in reference_rows.iter().enumerate() {
        let index = position + offset;
        let item = report.item_mut(index);
        item.reference_top5 = top5(logits, classes);
        if let Some(candidate) = candidate_rows.get(position) {
            item.candidate_top5 = top5(candidate, classes);
            let indices = |scores: &[ClassScore]| -> Vec<usize> {
                let mut indices: Vec<usize> = scores.iter().map(|score| score.index).collect();
                indices.sort_unstable();
                indices
            };
            item.top1_agree = Some(
                item.reference_top5.first().map(|score| score.index)
                    == item.candidate_top5.first().map(|score| score.index),
            );
            item.top5_agree = Some(indices(&item.reference_top5) == indices(&item.candidate_top5));
        }
    }
}

/// The first batch item's top-5 classes on both sides (the candidate's
/// empty when no source runs end to end).
fn top_classes(
    reference: &ArrayD<f32>,
    candidate: Option<&ArrayD<f32>>,
    classes: Option<&[String]>,
) -> Option<TopClasses> {
    let first_row = |array: &ArrayD<f32>| array.rows().into_iter().next().map(|row| row.to_vec());
    let reference = top5(&first_row(reference)?, classes);
    let candidate = match candidate {
        Some(candidate) => top5(&first_row(candidate)?, classes),
        None => Vec::new(),
    };
    Some(TopClasses {
        reference,
        candidate,
    })
}

pub(crate) fn top5(logits: &[f32], classes: Option<&[String]>) -> Vec<ClassScore> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(5)
        .map(|index| ClassScore {
            index,
            name: classes.and_then(|names| names.get(index).cloned()),
            logit: logits[index],
        })
        .collect()
}

/// Which stages a run reports: all but the core's input (`skip_input`),
/// those matching `only`.
pub(crate) fn shown(
    index: usize,
    name: &str,
    only: Option<&GlobMatcher>,
    skip_input: bool,
) -> bool {
    !(skip_input && index == 0) && only.is_none_or(|glob| glob.is_match(name))
}
