//! The report as JSON: the `Report` structure itself, serialised. Its schema
//! is documented in docs/report-format.md and versioned by
//! `schema_version`.

use super::Report;

pub fn render(report: &Report) -> String {
    serde_json::to_string_pretty(report).expect("a report always serialises") + "\n"
}
