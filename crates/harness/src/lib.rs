//! The harness: compares the core (or another engine's dump) with a PyTorch
//! reference dump, stage by stage, and says `succ` or `fail` for each conv,
//! block and layer.

pub mod adapter;
pub mod allocator;
pub mod compare_dumps;
pub mod diagnosis;
mod error;
mod lane_sums;
pub mod layout;
pub mod metrics;
pub mod module_check;
mod pipeline;
mod recomputation;
pub mod reference_check;
pub mod reference_stages;
pub mod report;
pub mod repro;
#[cfg(test)]
mod test_util;
pub mod tolerance;
pub mod vectors;
pub mod verify;

pub use compare_dumps::{compare_dumps, CompareOptions};
pub use error::VerifyError;
pub use metrics::{compare, compare_for_report, BeyondRtol, Comparison, Verdict};
pub use pipeline::RunOptions;
pub use report::{Event, Report, RunMode};
pub use repro::{repro, run_case, ReproOptions, ReproSource};
pub use tolerance::{AbsoluteTolerance, AutoTolerance, Tolerance, ToleranceRule};
pub use verify::{verify, verify_dump, VerifyOptions};
