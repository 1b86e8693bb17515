//! The report as a person reads it: one line per stage in execution order,
//! a line after each block and each layer, then a summary. Every line
//! starts with a fixed word, so `grep` and `awk` can take it apart too.

use std::fmt::Write as _;
use std::io;

use anstyle::{AnsiColor, Style};

use super::{
    abbreviate, at_least, tolerance_needed_words, Event, GroupSummary, Report, RunMode, Sink,
    StageReport, TopClasses,
};
use crate::diagnosis::{Hint, Origin};
use crate::metrics::{Comparison, Verdict};
use crate::reference_check;
use crate::ToleranceRule;

const NAME_WIDTH: usize = 26;
const BOLD: Style = Style::new().bold();
const DIM: Style = Style::new().dimmed();
const GREEN: Style = AnsiColor::Green.on_default();
const RED: Style = AnsiColor::Red.on_default().bold();
const YELLOW: Style = AnsiColor::Yellow.on_default().bold();
const CYAN: Style = AnsiColor::Cyan.on_default().bold();

/// The text report as a sink: each event's lines written to `out` as it
/// comes, the closing lines when the run finishes. Colour codes are always
/// written; the output stream drops them where colour is not wanted
/// (anstream), and [`Text::plain`] drops them from a report kept in memory.
/// Write errors are ignored: a reader that stopped early (`| head`) does not
/// stop the run.
pub struct Text<W> {
    mode: RunMode,
    out: W,
}

impl<W: io::Write> Text<W> {
    pub fn new(mode: RunMode, out: W) -> Self {
        Text { mode, out }
    }
}

impl Text<Vec<u8>> {
    /// The whole report kept in memory, without colour: for files and for
    /// the Python bindings.
    pub fn plain(self) -> String {
        let text = String::from_utf8(self.out).expect("the text report is UTF-8");
        anstream::adapter::strip_str(&text).to_string()
    }
}

impl<W: io::Write> Sink for Text<W> {
    fn event(&mut self, event: &Event) {
        let _ = self.out.write_all(render(event, self.mode).as_bytes());
        let _ = self.out.flush();
    }

    fn finish(&mut self, report: &Report) {
        let _ = self.out.write_all(summary(report).as_bytes());
    }
}

/// The text for one event.
fn render(event: &Event, mode: RunMode) -> String {
    match event {
        Event::Start { report, stages } => header(report, *stages),
        Event::Stage(stage) => stage_line(stage, mode),
        Event::Block(group) => group_line("block", group),
        Event::Layer(group) => group_line("layer", group),
    }
}

fn paint(style: Style, text: impl std::fmt::Display) -> String {
    format!("{style}{text}{style:#}")
}

fn verdict(verdict: Verdict) -> String {
    match verdict {
        Verdict::Succ => paint(GREEN, "succ"),
        Verdict::Fail => paint(RED, "fail"),
    }
}

fn header(report: &Report, stages: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        paint(
            BOLD,
            format!(
                "verify {} ({}) against {}",
                report.reference, report.model, report.candidate
            )
        )
    );
    let check = &report.reference_check;
    if let Some(message) = check.message() {
        let _ = writeln!(out, "{}", paint(RED, "!".repeat(78)));
        let _ = writeln!(out, "{}", paint(RED, message));
        let _ = writeln!(out, "{}", paint(RED, "!".repeat(78)));
    } else {
        let _ = writeln!(
            out,
            "reference: eval mode (manifest says eval; {})",
            reference_check::eval_mode_evidence(&check.evidence)
        );
    }
    if stages == 0 {
        return out;
    }
    let _ = writeln!(out, "tolerance: {}", report.tolerance.describe());
    let mode = match report.mode {
        RunMode::Cumulative => "cumulative (the core runs end to end on its own outputs)",
        RunMode::Isolated => "isolated (each stage is fed the reference's inputs)",
        RunMode::Both => "both (isolated: error made here; cumulative: error carried in)",
        RunMode::Dumps => "dumps (the candidate's stored outputs)",
    };
    let _ = writeln!(out, "mode: {mode}");
    let _ = writeln!(out);
    let errors = match report.mode {
        RunMode::Both => format!("{:>10} {:>10} {:>10}", "rel err", "isolated", "cosine"),
        _ => format!("{:>10} {:>10} {:>10}", "max|err|", "rel err", "cosine"),
    };
    let _ = write!(
        out,
        "{}",
        paint(
            DIM,
            format!(
                "{:<NAME_WIDTH$} {:<18} {:<20} {:<7} {errors}\n",
                "stage", "module", "shape (NCHW)", "verdict"
            )
        )
    );
    out
}

fn stage_line(stage: &StageReport, mode: RunMode) -> String {
    let shape = format!("{:?}", stage.shape);
    let mut out = format!(
        "{:<NAME_WIDTH$} {:<18} {:<20} {}   ",
        stage.name,
        stage.module_type,
        shape,
        verdict(stage.verdict)
    );
    let numbers = match (mode, &stage.cumulative, &stage.isolated) {
        (RunMode::Both, Some(cumulative), Some(isolated)) => format!(
            "{:>10.2e} {:>10.2e} {:>10.6}",
            cumulative.relative_error, isolated.relative_error, cumulative.cosine_similarity
        ),
        _ => match stage.primary() {
            Some(c) => format!(
                "{:>10.2e} {:>10.2e} {:>10.6}",
                c.max_abs_error, c.relative_error, c.cosine_similarity
            ),
            None => String::new(),
        },
    };
    out.push_str(&numbers);
    out.push('\n');
    for (label, comparison) in [("", &stage.cumulative), ("isolated ", &stage.isolated)] {
        if let Some(comparison) = comparison.as_ref().filter(|c| c.verdict == Verdict::Fail) {
            out.push_str(&paint(YELLOW, failure_detail(label, comparison)));
            out.push('\n');
        }
    }
    // For a batch (not one item of it, --item): where the error is.
    let errors = &stage.max_abs_error_by_item;
    if let (Verdict::Fail, Some(worst), true) = (stage.verdict, stage.worst_item, errors.len() > 1)
    {
        let mut order: Vec<(usize, f64)> = errors.iter().copied().enumerate().collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut line = format!("    by item: worst {worst} (max|err| {:.2e})", order[0].1);
        if let Some((next, error)) = order.get(1) {
            let _ = write!(line, ", next {next} ({error:.2e})");
        }
        let _ = writeln!(out, "{line}");
    }
    match &stage.origin {
        Some(Origin::Root) => {
            let _ = writeln!(out, "    origin: root, the first stage to fail end to end");
        }
        Some(Origin::Introduces) => {
            let _ = writeln!(out, "    origin: {}", mode.introduces_words());
        }
        Some(Origin::Carried { from }) => {
            let _ = writeln!(out, "    origin: carried from {from}");
        }
        None => {}
    }
    for hint in &stage.hints {
        out.push_str(&paint(CYAN, hint_line("    ", hint)));
        out.push('\n');
    }
    for note in &stage.notes {
        let _ = writeln!(out, "    note: {note}");
    }
    out
}

fn hint_line(indent: &str, hint: &Hint) -> String {
    match hint.relative_error {
        Some(error) => format!("{indent}hint: {} (max rel err {error:.1e})", hint.message),
        None => format!(
            "{indent}hint: {} (the output size only; no values reproduced)",
            hint.message
        ),
    }
}

fn failure_detail(label: &str, comparison: &Comparison) -> String {
    let mut detail = format!(
        "    {label}{} of {} elements out of tolerance",
        comparison.mismatched, comparison.elements
    );
    if let Some(worst) = &comparison.worst {
        let _ = write!(
            detail,
            "; worst at {:?}: ref {:.6e}, cand {:.6e}",
            worst.index, worst.reference, worst.candidate
        );
    }
    if comparison.reference_nan + comparison.candidate_nan > 0 {
        let _ = write!(
            detail,
            "; NaN: ref {}, cand {}",
            comparison.reference_nan, comparison.candidate_nan
        );
    }
    if comparison.reference_inf + comparison.candidate_inf > 0 {
        let _ = write!(
            detail,
            "; Inf: ref {}, cand {}",
            comparison.reference_inf, comparison.candidate_inf
        );
    }
    let _ = match (
        comparison.rtol_needed,
        comparison.multiple_needed,
        comparison.beyond_rtol,
    ) {
        (Some(rtol), _, _) => write!(detail, "; needs rtol >= {}", at_least(rtol)),
        (_, Some(times), _) => write!(detail, "; needs --tol-multiple >= {}", at_least(times)),
        (_, _, Some(why)) => write!(detail, "; no tolerance passes it ({})", why.describe()),
        _ => Ok(()),
    };
    detail
}

fn group_line(word: &str, group: &GroupSummary) -> String {
    let verdict_word = verdict(group.verdict.unwrap_or(Verdict::Fail));
    let mut counts = vec![format!(
        "{}/{} conv2d",
        group.conv2d.succ, group.conv2d.total
    )];
    if word == "layer" {
        counts.push(format!(
            "{}/{} blocks",
            group.blocks.succ, group.blocks.total
        ));
    }
    counts.push(format!(
        "{}/{} stages",
        group.stages.succ, group.stages.total
    ));
    let line = format!(
        "{word} {} {verdict_word}: {}",
        group.name,
        counts.join(", ")
    );
    if word == "layer" {
        format!("{}\n\n", paint(BOLD, line))
    } else {
        format!("{line}\n")
    }
}

/// The closing lines: counts, first failure, top-5.
fn summary(report: &Report) -> String {
    let mut out = String::new();
    let s = &report.summary;
    let per_item = report.items.len() > 1 || report.item.is_some();
    if per_item {
        out.push_str(&item_lines(report));
    } else if let Some(top5) = &report.top5 {
        out.push_str(&top_lines(top5));
    }
    if let Some(hint) = &s.hint {
        let _ = writeln!(out, "{}", paint(CYAN, hint_line("", hint)));
    }
    if let Some(root) = &s.root {
        let _ = writeln!(out, "root: {root} ({})", super::root_words(s));
    }
    if !s.introduced_at.is_empty() {
        let _ = writeln!(
            out,
            "error introduced at ({}): {}",
            s.introduced_at.len(),
            abbreviate(&s.introduced_at, 12)
        );
    }
    if s.fail > 0 {
        let _ = writeln!(out, "tolerance needed: {}", tolerance_needed_words(report));
    }
    if let Some(stopped) = &s.stopped {
        if !report.reference_check.train_mode || s.compared > 0 {
            let _ = writeln!(out, "stopped: {stopped}");
        }
    }
    if let Some(items) = s.items.as_ref().filter(|_| per_item) {
        let worst = items.worst_item.map_or("none".to_string(), |index| {
            let item = report.items.iter().find(|item| item.index == index);
            match item.and_then(item_label) {
                Some(label) => format!("{index} ({label})"),
                None => index.to_string(),
            }
        });
        let _ = writeln!(
            out,
            "images: {}, top-1 agree {}/{}, top-5 sets agree {}/{}, worst item {worst}",
            items.items, items.top1_agree, items.classified, items.top5_agree, items.classified
        );
    }
    // A fixed rtol is a bar for every engine on every CPU, well above
    // float32's own error: a mistake smaller than it passes unseen.
    if let (Verdict::Succ, ToleranceRule::Fixed(tolerance)) = (s.verdict, &report.tolerance) {
        let has_floor = report.stages.iter().any(|stage| stage.floor.is_some());
        let _ = writeln!(
            out,
            "note: rtol {:e} passes what differs by less (a BatchNorm eps left out moves values by about eps / (2 running_var)); for float32's own error as the bar: {}verify --tol auto",
            tolerance.rtol,
            if has_floor { "" } else { "dump with --floor, then " },
        );
    }
    let _ = writeln!(
        out,
        "summary {}: {} stages compared, {} succ, {} fail; first failure: {}",
        verdict(s.verdict),
        s.compared,
        s.succ,
        s.fail,
        s.first_failure.as_deref().unwrap_or("none")
    );
    out
}

/// The image an item was made from, else its reference class.
fn item_label(item: &super::ItemReport) -> Option<String> {
    item.image.clone().or_else(|| {
        let best = item.reference_top5.first()?;
        Some(
            best.name
                .clone()
                .unwrap_or_else(|| format!("class {}", best.index)),
        )
    })
}

/// One line per batch item: its classes on both sides and its worst error.
fn item_lines(report: &Report) -> String {
    let class = |score: Option<&super::ClassScore>| match score {
        Some(score) => match &score.name {
            Some(name) => format!("{} {name} ({:.3})", score.index, score.logit),
            None => format!("{} ({:.3})", score.index, score.logit),
        },
        None => "-".to_string(),
    };
    let mut out = String::from(
        "images (batch items): top-1 reference / candidate, top-5 set, largest error relative to the stage's max|ref|\n",
    );
    for item in &report.items {
        let name = item
            .image
            .as_deref()
            .map(|image| format!(" {image}"))
            .unwrap_or_default();
        let top1 = match item.top1_agree {
            Some(true) => format!("top-1 agree {}", class(item.reference_top5.first())),
            Some(false) => paint(
                YELLOW,
                format!(
                    "top-1 DIFFERS: reference {}, candidate {}",
                    class(item.reference_top5.first()),
                    class(item.candidate_top5.first())
                ),
            ),
            None => format!("top-1 reference {}", class(item.reference_top5.first())),
        };
        let top5 = match item.top5_agree {
            Some(true) => "; top-5 set agrees",
            Some(false) => "; top-5 set differs",
            None => "",
        };
        let worst = match &item.worst_stage {
            Some(stage) => format!("; worst {:.2e} at {stage}", item.max_relative_error),
            None => String::new(),
        };
        let _ = writeln!(out, "  item {}{name}: {top1}{top5}{worst}", item.index);
    }
    out
}

fn top_lines(top5: &TopClasses) -> String {
    let describe = |scores: &[super::ClassScore]| {
        scores
            .iter()
            .map(|c| match &c.name {
                Some(name) => format!("{} {name} ({:.3})", c.index, c.logit),
                None => format!("{} ({:.3})", c.index, c.logit),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!("top5 reference: {}\n", describe(&top5.reference));
    if !top5.candidate.is_empty() {
        let _ = writeln!(out, "top5 candidate: {}", describe(&top5.candidate));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::at_least;

    #[test]
    fn the_tolerance_shown_is_never_below_the_figure() {
        let mut values = vec![3.07e-3, 2.1e-8, 9.99e-5, 0.101, 1.0, 123.0, 1e-310, 5e-324];
        // A float or two above a two-digit decimal: read as that decimal,
        // it would be below the figure.
        for decimal in [2.1e-8, 3.1e-3, 1.5e-1, 9.9e2] {
            let bits = f64::to_bits(decimal);
            values.extend([f64::from_bits(bits + 1), f64::from_bits(bits + 2)]);
        }
        for value in values {
            let shown = at_least(value);
            let read: f64 = shown.parse().unwrap();
            assert!(read >= value, "{value:e} shown as {shown}");
            assert!(
                read <= value * 1.11 || value < 1e-300,
                "{value:e} shown as {shown}"
            );
        }
        assert_eq!(at_least(3.07e-3), "3.1e-3");
        assert_eq!(at_least(9.99e-5), "1.0e-4");
        assert_eq!(at_least(f64::from_bits(2.1e-8f64.to_bits() + 1)), "2.2e-8");
        assert_eq!(at_least(0.0), "0");
    }
}
