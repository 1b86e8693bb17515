//! The report as JUnit XML: one testcase per stage, so that CI systems show
//! each failing stage by name.

use std::fmt::Write as _;

use super::Report;
use crate::metrics::Verdict;

pub fn render(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let suite = escape(&format!("verify {}", report.model));
    let _ = writeln!(
        out,
        "<testsuites name=\"{suite}\" tests=\"{}\" failures=\"{}\">",
        s.compared, s.fail
    );
    let _ = writeln!(
        out,
        "  <testsuite name=\"{suite}\" tests=\"{}\" failures=\"{}\">",
        s.compared, s.fail
    );
    if let Some(check) = report.reference_check.message() {
        let _ = writeln!(
            out,
            "    <testcase classname=\"{suite}\" name=\"reference mode\">"
        );
        let _ = writeln!(out, "      <failure message=\"{}\"/>", escape(&check));
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
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
