//! What a run found, independent of how it is printed. The text, JSON and
//! JUnit writers all read this one structure.

pub mod html;
pub mod json;
pub mod junit;
pub mod plot;
pub mod text;

use std::fmt::Write as _;
use std::ops::ControlFlow;

use resnet_dump::{ModuleKind, NoiseFloor, Precision};
use serde::Serialize;

use crate::diagnosis::{origin, Hint, Origin};
use crate::metrics::{BeyondRtol, Comparison, FailureDetail, Verdict};
use crate::reference_check::ReferenceCheck;
use crate::ToleranceRule;

pub const REPORT_SCHEMA: &str = "resnet-verify-report";
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// Which outputs of the core are compared with the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// The core runs end to end on its own outputs: errors accumulate.
    Cumulative,
    /// Each stage is fed the reference's inputs: the error it adds alone.
    Isolated,
    /// Both, side by side.
    Both,
    /// Two dumps compared (`verify compare`); the core does not run.
    Dumps,
}

impl RunMode {
    pub fn cumulative(self) -> bool {
        matches!(self, RunMode::Cumulative | RunMode::Both)
    }
    pub fn isolated(self) -> bool {
        matches!(self, RunMode::Isolated | RunMode::Both)
    }

    /// What a stage that introduces error did, as this mode tells it.
    pub fn introduces_words(self) -> &'static str {
        match self {
            RunMode::Isolated | RunMode::Both => {
                "introduces error (fails on the reference's own inputs)"
            }
            RunMode::Cumulative => {
                "introduces error (fails where its inputs pass end to end, well within tolerance)"
            }
            // Found either way in a compare; both mean this there.
            RunMode::Dumps => {
                "introduces error (its output is not this stage computed on the candidate's own inputs)"
            }
        }
    }
}

/// The share of its tolerance an input's error may use for a failure fed
/// by it to introduce error of its own: under `--tol auto`'s default
/// multiple, one noise floor; under the default rtol, 2e-5 relative
/// (float32 engines stay near 1e-6).
const CLEAN: f64 = 0.2;

/// The summary's words on the root: later failures are carried from it,
/// or from the stages that introduce error.
pub fn root_words(summary: &Summary) -> &'static str {
    match summary.introduced_at.is_empty() {
        true => "the first stage to fail end to end; later end-to-end failures are carried",
        false => "the first stage to fail end to end; later end-to-end failures are carried from it or from a stage that introduces error",
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// Position in the reference's execution order.
    pub index: usize,
    pub name: String,
    pub module_type: ModuleKind,
    /// The reference's shape (NCHW).
    pub shape: Vec<usize>,
    pub block: Option<String>,
    pub layer: Option<String>,
    pub verdict: Verdict,
    /// The candidate run end to end (or the candidate dump).
    pub cumulative: Option<Comparison>,
    /// The stage fed the reference's inputs.
    pub isolated: Option<Comparison>,
    /// Something worth knowing that is not an error (a converted dtype).
    pub notes: Vec<String>,
    /// For a failure: the root, carried, or introduced here.
    pub origin: Option<Origin>,
    /// For a root or introducing failure: the hypotheses that explain it.
    pub hints: Vec<Hint>,
    /// The reference's noise floor at this stage, when it was dumped with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<NoiseFloor>,
    /// For a batch of several items: the largest |cand - ref| within each
    /// (of the comparison that decides the line), and which is worst.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub max_abs_error_by_item: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_item: Option<usize>,
    /// For a failure that was diagnosed (a root, a stage introducing error):
    /// its worst elements, per-channel error and error histogram.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<FailureDetail>,
}

impl StageReport {
    /// The comparison that decides the line's numbers: cumulative when run.
    pub fn primary(&self) -> Option<&Comparison> {
        self.cumulative.as_ref().or(self.isolated.as_ref())
    }

    pub fn is_conv(&self) -> bool {
        self.module_type == ModuleKind::Conv2d
    }

    /// A layer's own stage (`layer3`, its output). `fc` may be a
    /// Sequential too (a fine-tuning head), and is not a layer.
    pub fn is_layer(&self) -> bool {
        self.module_type == ModuleKind::Sequential
            && self.block.is_none()
            && self.layer.is_none()
            && self.name.starts_with("layer")
    }
}

/// Counts over a block or a layer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupSummary {
    pub name: String,
    pub module_type: ModuleKind,
    pub verdict: Option<Verdict>,
    pub stages: Tally,
    pub conv2d: Tally,
    pub blocks: Tally,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Tally {
    pub succ: usize,
    pub total: usize,
}

impl Tally {
    pub fn add(&mut self, verdict: Verdict) {
        self.total += 1;
        self.succ += (verdict == Verdict::Succ) as usize;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassScore {
    pub index: usize,
    pub name: Option<String>,
    pub logit: f32,
}

/// One batch item (an image) over the whole run.
#[derive(Clone, Debug, Serialize)]
pub struct ItemReport {
    pub index: usize,
    /// The image it was made from, when the reference names it.
    pub image: Option<String>,
    /// Its top-5 classes on both sides (empty when no logits were compared).
    pub reference_top5: Vec<ClassScore>,
    pub candidate_top5: Vec<ClassScore>,
    /// Same best class; the same five classes, in any order.
    pub top1_agree: Option<bool>,
    pub top5_agree: Option<bool>,
    /// The item's largest error relative to the stage's max|ref|, and where.
    pub max_relative_error: f64,
    pub worst_stage: Option<String>,
}

/// The batch in one line: how many items agree on their classes, and
/// which item is furthest from the reference.
#[derive(Clone, Debug, Serialize)]
pub struct ItemsSummary {
    pub items: usize,
    /// Items whose logits were compared.
    pub classified: usize,
    pub top1_agree: usize,
    pub top5_agree: usize,
    pub worst_item: Option<usize>,
}

/// Top-5 classes of the first batch item, on both sides.
#[derive(Clone, Debug, Serialize)]
pub struct TopClasses {
    pub reference: Vec<ClassScore>,
    pub candidate: Vec<ClassScore>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub compared: usize,
    pub succ: usize,
    pub fail: usize,
    pub first_failure: Option<String>,
    /// The first stage that fails end to end; every later end-to-end
    /// failure is carried from it or from a stage that introduces error.
    pub root: Option<String>,
    /// The stages that fail when fed the reference's inputs (isolated),
    /// or, after the root, end to end where their inputs pass.
    pub introduced_at: Vec<String>,
    /// A hypothesis that explains the whole run (a candidate stored in
    /// another layout), given once instead of a wall of failures.
    pub hint: Option<Hint>,
    /// Why the run ended before the last stage, if it did.
    pub stopped: Option<String>,
    pub verdict: Verdict,
    /// The smallest rtol under which every stage compared would pass, the
    /// run's atol kept: the largest any failure needs. `None` when every
    /// stage passes, or when no rtol passes some failure.
    pub rtol_needed: Option<f64>,
    /// Why no rtol passes some failure, each reason once.
    pub beyond_rtol: Vec<BeyondRtol>,
    /// For a batch of several items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<ItemsSummary>,
    /// Under `--tol auto`: the smallest multiple of the noise floor under
    /// which every stage compared would pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiple_needed: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub schema_version: u32,
    pub reference: String,
    /// The candidate dump, for `verify compare`; the core otherwise.
    pub candidate: String,
    pub model: String,
    pub mode: RunMode,
    pub tolerance: ToleranceRule,
    pub reference_check: ReferenceCheck,
    pub stages: Vec<StageReport>,
    pub blocks: Vec<GroupSummary>,
    pub layers: Vec<GroupSummary>,
    pub top5: Option<TopClasses>,
    /// Each batch item, for a batch of several (or a run restricted to one
    /// with `--item`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<ItemReport>,
    /// The one batch item compared (`--item K`), if the run was restricted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    pub summary: Summary,
}

impl Report {
    /// An empty report, before any stage is compared.
    pub fn new(
        reference: String,
        candidate: String,
        model: String,
        mode: RunMode,
        tolerance: ToleranceRule,
        reference_check: ReferenceCheck,
    ) -> Report {
        Report {
            schema: REPORT_SCHEMA,
            schema_version: REPORT_SCHEMA_VERSION,
            reference,
            candidate,
            model,
            mode,
            tolerance,
            reference_check,
            stages: Vec::new(),
            blocks: Vec::new(),
            layers: Vec::new(),
            top5: None,
            items: Vec::new(),
            item: None,
            summary: Summary::default(),
        }
    }

    pub fn passed(&self) -> bool {
        self.summary.verdict == Verdict::Succ
    }

    /// Batch item `index`'s report, made when first asked for.
    pub(crate) fn item_mut(&mut self, index: usize) -> &mut ItemReport {
        let position = match self.items.iter().position(|item| item.index == index) {
            Some(position) => position,
            None => {
                self.items.push(ItemReport {
                    index,
                    image: None,
                    reference_top5: Vec::new(),
                    candidate_top5: Vec::new(),
                    top1_agree: None,
                    top5_agree: None,
                    max_relative_error: 0.0,
                    worst_stage: None,
                });
                self.items.len() - 1
            }
        };
        &mut self.items[position]
    }
}

/// What a run tells its listener as it goes, so that a person sees each
/// line as soon as it is known.
pub enum Event<'a> {
    /// The run is about to compare up to `stages` stages.
    Start {
        report: &'a Report,
        stages: usize,
    },
    Stage(&'a StageReport),
    Block(&'a GroupSummary),
    Layer(&'a GroupSummary),
}

/// A consumer of a run, as ripgrep's printers are sinks of its searcher:
/// told each [`Event`] as the run goes, then the final report, built once.
/// The text report, the binary's progress bar, JSON, JUnit and the plot
/// are all sinks.
pub trait Sink {
    fn event(&mut self, _event: &Event) {}
    fn finish(&mut self, _report: &Report) {}
}

/// Runs `run`, telling every sink each event, then, if it ends with a
/// report, that report.
pub fn drive<E>(
    sinks: &mut [&mut dyn Sink],
    run: impl FnOnce(&mut dyn FnMut(Event)) -> Result<Report, E>,
) -> Result<Report, E> {
    let report = run(&mut |event| {
        for sink in sinks.iter_mut() {
            sink.event(&event);
        }
    })?;
    for sink in sinks.iter_mut() {
        sink.finish(&report);
    }
    Ok(report)
}

/// A sink that renders only the final report (JSON, JUnit, the plot).
pub struct Rendered<T> {
    render: fn(&Report) -> T,
    output: Option<T>,
}

impl<T> Rendered<T> {
    pub fn new(render: fn(&Report) -> T) -> Self {
        Rendered {
            render,
            output: None,
        }
    }

    /// What was rendered; `None` if the run did not finish.
    pub fn into_output(self) -> Option<T> {
        self.output
    }
}

impl<T> Sink for Rendered<T> {
    fn finish(&mut self, report: &Report) {
        self.output = Some((self.render)(report));
    }
}

/// Failures diagnosed per run at most: the hypotheses recompute stages, and
/// past the first few roots the hints say nothing new.
const DIAGNOSED_AT_MOST: usize = 16;

/// Accumulates stage results into block and layer counts and the summary.
pub(crate) struct ReportBuilder {
    pub report: Report,
    /// The block and the layer the stages are in: blocks follow each other,
    /// and so do layers, so one of each is open at a time.
    open_block: Option<GroupSummary>,
    open_layer: Option<GroupSummary>,
    diagnosed: usize,
}

impl ReportBuilder {
    /// Starts the run (tells `listener`) to compare up to `stages` stages;
    /// unless the reference is in train mode and that was not allowed:
    /// then the run breaks with the final report, failed, with the train-mode message
    /// as the reason, and nothing is to be compared.
    pub fn start(
        mut report: Report,
        stages: usize,
        allow_train_reference: bool,
        listener: &mut dyn FnMut(Event),
    ) -> ControlFlow<Report, Self> {
        if report.reference_check.train_mode && !allow_train_reference {
            report.summary.verdict = Verdict::Fail;
            report.summary.stopped = report.reference_check.message();
            listener(Event::Start {
                report: &report,
                stages: 0,
            });
            return ControlFlow::Break(report);
        }
        listener(Event::Start {
            report: &report,
            stages,
        });
        ControlFlow::Continue(ReportBuilder {
            report,
            open_block: None,
            open_layer: None,
            diagnosed: 0,
        })
    }

    /// The origin of the next stage's failure, from which of its
    /// comparisons failed; `inputs`: the stages it reads, in a run end to
    /// end only (none: not known).
    pub fn origin(
        &self,
        cumulative_failed: bool,
        isolated_failed: bool,
        container: bool,
        inputs: &[&str],
    ) -> Option<Origin> {
        let summary = &self.report.summary;
        let upstream = summary.introduced_at.last().or(summary.root.as_ref());
        // Clean, not only passing: an error carried from the root can hover
        // under tolerance for stages on end (an eps left out, under --tol
        // auto: 2.5-5 floors a stage against a tolerance of 5) and then pass
        // it again without a mistake of its own.
        let clean = |name: &&str| {
            let stage = self.report.stages.iter().rev().find(|s| s.name == *name);
            stage.is_some_and(|stage| {
                stage.cumulative.as_ref().is_some_and(|comparison| {
                    comparison.verdict == Verdict::Succ
                        && tolerance_used(&self.report, stage, comparison) <= CLEAN
                })
            })
        };
        let inputs_pass = !inputs.is_empty() && inputs.iter().all(clean);
        origin(
            cumulative_failed,
            isolated_failed,
            inputs_pass,
            container,
            upstream.map(String::as_str),
        )
    }

    /// Whether a failure of this origin gets its hypotheses tested: roots
    /// and stages that introduce error, up to a budget. Carried failures
    /// say nothing new.
    pub fn should_diagnose(&mut self, origin: &Option<Origin>) -> bool {
        let wanted = matches!(origin, Some(Origin::Root | Origin::Introduces))
            && self.diagnosed < DIAGNOSED_AT_MOST;
        self.diagnosed += wanted as usize;
        wanted
    }

    /// Records a stage and tells `listener`, closing a block or layer when
    /// the stage is that container's own output.
    pub fn push(&mut self, stage: StageReport, listener: &mut dyn FnMut(Event)) {
        self.note_items(&stage);
        let verdict = stage.verdict;
        let summary = &mut self.report.summary;
        summary.compared += 1;
        if verdict == Verdict::Succ {
            summary.succ += 1;
        } else {
            summary.fail += 1;
            summary
                .first_failure
                .get_or_insert_with(|| stage.name.clone());
            summary.verdict = Verdict::Fail;
        }
        let failed_end_to_end = stage
            .cumulative
            .as_ref()
            .is_some_and(|c| c.verdict == Verdict::Fail);
        match &stage.origin {
            Some(Origin::Root) => summary.root = Some(stage.name.clone()),
            Some(Origin::Introduces) => {
                if failed_end_to_end && summary.root.is_none() {
                    summary.root = Some(stage.name.clone());
                }
                summary.introduced_at.push(stage.name.clone());
            }
            _ => {}
        }
        let is_block = stage.module_type.is_block();
        let is_layer = stage.is_layer();
        for (open, name) in [
            (&mut self.open_block, &stage.block),
            (&mut self.open_layer, &stage.layer),
        ] {
            if let Some(name) = name {
                let group = open_group(open, name);
                group.stages.add(verdict);
                if stage.is_conv() {
                    group.conv2d.add(verdict);
                }
            }
        }
        let closes = if is_block {
            Some((&mut self.open_block, &mut self.report.blocks))
        } else if is_layer {
            Some((&mut self.open_layer, &mut self.report.layers))
        } else {
            None
        };
        self.report.stages.push(stage);
        let stage = self.report.stages.last().expect("just pushed");
        listener(Event::Stage(stage));
        if let Some((open, closed)) = closes {
            let mut group = open
                .take()
                .filter(|group| group.name == stage.name)
                .unwrap_or_else(|| GroupSummary {
                    name: stage.name.clone(),
                    ..GroupSummary::default()
                });
            group.module_type = stage.module_type.clone();
            group.stages.add(verdict);
            group.verdict = Some(if group.stages.succ == group.stages.total {
                Verdict::Succ
            } else {
                Verdict::Fail
            });
            closed.push(group);
            let group = closed.last().expect("just pushed");
            // A layer counts its blocks by their verdicts (any stage of the
            // block failed), not by the block's output stage alone.
            if let (true, Some(layer), Some(block_verdict)) =
                (is_block, self.open_layer.as_mut(), group.verdict)
            {
                layer.blocks.add(block_verdict);
            }
            listener(if is_block {
                Event::Block(group)
            } else {
                Event::Layer(group)
            });
        }
    }

    /// Keeps each item's worst error relative to the stage's scale.
    fn note_items(&mut self, stage: &StageReport) {
        let Some(scale) = stage.primary().map(|comparison| comparison.scale) else {
            return;
        };
        let offset = self.report.item.unwrap_or(0);
        for (position, &error) in stage.max_abs_error_by_item.iter().enumerate() {
            let relative = error / scale.max(f32::MIN_POSITIVE as f64);
            let item = self.report.item_mut(position + offset);
            if relative > item.max_relative_error
                || (relative.is_nan() && item.worst_stage.is_none())
            {
                item.max_relative_error = relative;
                item.worst_stage = Some(stage.name.clone());
            }
        }
    }

    pub fn finish(mut self, stopped: Option<String>) -> Report {
        let summary = &mut self.report.summary;
        summary.stopped = stopped;
        let items = &self.report.items;
        if !items.is_empty() {
            let classified = items
                .iter()
                .filter(|item| item.top1_agree.is_some())
                .count();
            let agree = |pick: fn(&ItemReport) -> Option<bool>| {
                items.iter().filter(|item| pick(item) == Some(true)).count()
            };
            summary.items = Some(ItemsSummary {
                items: items.len(),
                classified,
                top1_agree: agree(|item| item.top1_agree),
                top5_agree: agree(|item| item.top5_agree),
                worst_item: items
                    .iter()
                    .filter(|item| item.worst_stage.is_some())
                    .max_by(|a, b| {
                        (a.max_relative_error.total_cmp(&b.max_relative_error))
                            .then(b.index.cmp(&a.index))
                    })
                    .map(|item| item.index),
            });
        }
        let needed = tolerance_needed(&self.report.stages);
        (
            summary.rtol_needed,
            summary.multiple_needed,
            summary.beyond_rtol,
        ) = needed;
        // The input is given, not computed: a run that compared nothing
        // else (a candidate holding only a copy of it, `--upto input`)
        // proves nothing, and must not pass.
        let computed = self
            .report
            .stages
            .iter()
            .any(|stage| stage.module_type != ModuleKind::Input);
        if !computed {
            summary.verdict = Verdict::Fail;
            let why = match summary.compared {
                0 => "no stage was compared",
                _ => "no stage but the input was compared: nothing computed was checked",
            };
            summary.stopped = Some(match summary.stopped.take() {
                Some(stopped) => format!("{stopped}; {why}"),
                None => why.to_string(),
            });
        }
        self.report
    }
}

/// `value` to two significant digits, rounded up, so that the figure as
/// shown, read back, is no smaller (the JSON report has it exactly).
pub(crate) fn at_least(value: f64) -> String {
    if value <= 0.0 {
        return "0".into();
    }
    if !value.is_normal() || value < 1e-300 || !value.is_finite() {
        return format!("{value:e}");
    }
    let mut exponent = value.log10().floor() as i32;
    let mut tenths = (value / 10f64.powi(exponent) * 10.0).ceil() as u64;
    loop {
        if tenths >= 100 {
            tenths = tenths.div_ceil(10);
            exponent += 1;
        }
        let shown = format!("{}.{}e{exponent}", tenths / 10, tenths % 10);
        if shown.parse::<f64>().is_ok_and(|read| read >= value) {
            return shown;
        }
        tenths += 1;
    }
}

/// What a failed run needs, in words: the smallest rtol (or, under
/// `--tol auto`, multiple of the floor) under which every stage compared
/// passes, rounded up so that the figure passes as shown, or why none does.
pub(crate) fn tolerance_needed_words(report: &Report) -> String {
    let s = &report.summary;
    // Stages not compared (a stop, a stage missing) may need more.
    let more = if s.stopped.is_some() {
        "; the stages not compared may need more"
    } else {
        ""
    };
    let words = match (s.rtol_needed, s.multiple_needed) {
        (Some(rtol), _) => format!(
            "every stage compared passes with rtol >= {} (atol as run)",
            at_least(rtol)
        ),
        (_, Some(times)) => format!(
            "every stage compared passes with --tol auto --tol-multiple {}{}",
            at_least(times),
            match report.tolerance {
                ToleranceRule::Auto(auto) if auto.candidate_dtype != Precision::Float32 => {
                    format!(" --cand-dtype {}", auto.candidate_dtype.name())
                }
                _ => String::new(),
            }
        ),
        _ => format!(
            "no {} passes every stage ({})",
            if matches!(report.tolerance, ToleranceRule::Auto(_)) {
                "multiple of the floor"
            } else {
                "rtol"
            },
            s.beyond_rtol
                .iter()
                .map(|why| why.describe())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    words + more
}

/// The rtol (under `--tol auto`, the multiple) under which every stage that
/// failed would pass (the largest any failure needs), or, each once, why
/// none would.
fn tolerance_needed(stages: &[StageReport]) -> (Option<f64>, Option<f64>, Vec<BeyondRtol>) {
    let largest = |so_far: Option<f64>, value: f64| Some(so_far.map_or(value, |n| n.max(value)));
    let (mut needed, mut multiple): (Option<f64>, Option<f64>) = (None, None);
    let mut beyond = Vec::new();
    for stage in stages.iter().filter(|stage| stage.verdict == Verdict::Fail) {
        let failures: Vec<&Comparison> = [&stage.cumulative, &stage.isolated]
            .into_iter()
            .flatten()
            .filter(|comparison| comparison.verdict == Verdict::Fail)
            .collect();
        // A failure without a failing comparison is a shape that differs.
        if failures.is_empty() {
            beyond.push(BeyondRtol::Shape);
        }
        for comparison in failures {
            match (comparison.rtol_needed, comparison.multiple_needed) {
                (Some(rtol), _) => needed = largest(needed, rtol),
                (_, Some(times)) => multiple = largest(multiple, times),
                _ => beyond.push(comparison.beyond_rtol.unwrap_or(BeyondRtol::ZeroReference)),
            }
        }
    }
    beyond.sort();
    beyond.dedup();
    if beyond.is_empty() {
        (needed, multiple, beyond)
    } else {
        (None, None, beyond)
    }
}

/// The open group named `name`, started afresh if the open one has
/// another name (a group whose own stage the reference lacks never closes).
fn open_group<'a>(open: &'a mut Option<GroupSummary>, name: &str) -> &'a mut GroupSummary {
    if open.as_ref().is_some_and(|group| group.name != name) {
        *open = None;
    }
    open.get_or_insert_with(|| GroupSummary {
        name: name.to_string(),
        ..GroupSummary::default()
    })
}

/// The first `shown` names, and how many more there are.
pub(crate) fn abbreviate(names: &[String], shown: usize) -> String {
    let mut text = names
        .iter()
        .take(shown)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > shown {
        let _ = write!(text, ", ... ({} more)", names.len() - shown);
    }
    text
}

/// How much of its tolerance a stage's error uses: `max|err| / (atol +
/// rtol * max|ref|)` (NaN where the rule has no tolerance for it).
pub fn tolerance_used(report: &Report, stage: &StageReport, comparison: &Comparison) -> f64 {
    let Ok(resolved) = report
        .tolerance
        .for_stage(&stage.name, stage.floor.as_ref())
    else {
        return f64::NAN;
    };
    let tolerance = resolved.tolerance;
    let bound = tolerance.atol_for(comparison.scale) + tolerance.rtol * comparison.scale;
    comparison.max_abs_error / bound.max(f64::MIN_POSITIVE)
}
