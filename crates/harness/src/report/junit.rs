//! The report as JUnit XML: one testcase per stage, so that CI systems show
//! each failing stage by name.

use std::fmt::Write as _;

use super::Report;
use crate::metrics::Verdict;

pub fn render(report: &Report) -> String {
    let s = &report.summary;
    let per_image = report.items.len() > 1 || report.item.is_some();
    let images = match per_image {
        true => report
            .items
            .iter()
            .filter(|item| item.top1_agree.is_some())
            .count(),
        false => 0,
    };
    let reference_mode = report.reference_check.message().is_some() as usize;
    // A run that fails with no stage failing (it compared nothing but the
    // input, or nothing): a testcase of its own, or CI would read the XML
    // as a pass.
    let run_failed = (s.verdict == Verdict::Fail && s.fail == 0 && reference_mode == 0) as usize;
    // Every <testcase> counts: the stages, the reference mode, the run, the
    // images.
    let (tests, failures) = (
        s.compared + reference_mode + run_failed + images,
        s.fail + reference_mode + run_failed,
    );
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let suite = escape(&format!("verify {}", report.model));
    let _ = writeln!(
        out,
        "<testsuites name=\"{suite}\" tests=\"{tests}\" failures=\"{failures}\">"
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"{suite}\" tests=\"{tests}\" failures=\"{failures}\">"
    );
    if let Some(check) = report.reference_check.message() {
        let _ = writeln!(
            out,
            "    <testcase classname=\"{suite}\" name=\"reference mode\">"
        );
        let _ = writeln!(out, "      <failure message=\"{}\"/>", escape(&check));
        let _ = writeln!(out, "    </testcase>");
    }
    if run_failed == 1 {
        let why = s.stopped.as_deref().unwrap_or("the run failed");
        let _ = writeln!(out, "    <testcase classname=\"{suite}\" name=\"run\">");
        let _ = writeln!(out, "      <failure message=\"{}\"/>", escape(why));
        let _ = writeln!(out, "    </testcase>");
    }
    for stage in &report.stages {
        let class = escape(stage.layer.as_deref().unwrap_or(&report.model));
        let _ = write!(
            out,
            "    <testcase classname=\"{class}\" name=\"{}\"",
            escape(&stage.name)
        );
        match (stage.verdict, stage.primary()) {
            (Verdict::Fail, Some(comparison)) => {
                let message = format!(
                    "{} of {} elements out of tolerance; max abs error {:.3e}, relative {:.3e}",
                    comparison.mismatched,
                    comparison.elements,
                    comparison.max_abs_error,
                    comparison.relative_error
                );
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"{}\"/>\n    </testcase>",
                    escape(&message)
                );
            }
            _ => {
                let _ = writeln!(out, "/>");
            }
        }
    }
    // A testcase per image for its classes. A class that differs while
    // every stage is within tolerance is a near tie, which another CPU's
    // rounding can flip: said, not failed.
    if per_image {
        for item in report.items.iter().filter(|item| item.top1_agree.is_some()) {
            let image = item
                .image
                .as_deref()
                .map(|image| format!(" ({image})"))
                .unwrap_or_default();
            let name = escape(&format!("item {}{image}: classes", item.index));
            let _ = write!(out, "    <testcase classname=\"images\" name=\"{name}\"");
            let words = |scores: &[super::ClassScore]| {
                scores
                    .iter()
                    .map(|score| score.index.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let said = format!(
                "top-1 {}, top-5 set {}; reference top-5 {}, candidate top-5 {}",
                if item.top1_agree == Some(true) {
                    "agrees"
                } else {
                    "differs"
                },
                if item.top5_agree == Some(true) {
                    "agrees"
                } else {
                    "differs"
                },
                words(&item.reference_top5),
                words(&item.candidate_top5)
            );
            let _ = writeln!(
                out,
                ">\n      <system-out>{}</system-out>\n    </testcase>",
                escape(&said)
            );
        }
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
