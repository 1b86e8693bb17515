//! The `verify` command: arguments in, report out. Everything else lives in
//! the `resnet_verify` library.

/// mimalloc keeps freed memory for reuse: the network's weights and every
/// stage's activations are large blocks that the system allocator returns
/// to the kernel and faults back in, page by page, on the next allocation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use resnet_dump::Precision;
use resnet_verify::report::text::Text;
use resnet_verify::report::{drive, html, json, junit, plot, Rendered, Sink};
use resnet_verify::{
    compare_dumps, verify, AbsoluteTolerance, AutoTolerance, CompareOptions, Event, Report,
    ReproOptions, ReproSource, RunMode, RunOptions, Tolerance, ToleranceRule, VerifyOptions,
};

/// Proves that the Rust ResNet core computes what PyTorch computes, stage by
/// stage, from a reference dump made by `python -m reference.dump`.
///
/// Prints one line per stage (conv, BatchNorm, ReLU, block, layer) with
/// `succ` or `fail`, the largest error, the error relative to the stage's
/// scale and the cosine similarity; a line after each block and layer; and a
/// summary. Exit code: 0 all succ, 1 any fail, 2 bad input or usage.
///
/// Examples:
///   verify out/resnet50                  every stage, cumulative
///   verify out/resnet50 --upto layer3    stop after layer3
///   verify out/resnet50 --both           error made here vs carried in
///   verify out/resnet50 --plot error.svg error growth along the depth
///   verify compare out/resnet50 my-engine-dump --cand-layout nhwc
///   verify out/resnet50-floor --tol auto  each stage judged by its float64 noise floor
///   verify repro compare out/resnet50 my-engine-dump --out case/ --shrink
///                                        the failing stage as a runnable bundle
///   verify case case/                    the core on that bundle alone
///
/// A failing stage is marked as the root (the first to fail end to end),
/// carried (its inputs were already wrong) or as introducing error (it
/// fails on the reference's own inputs: --isolate, --both). For roots and
/// introducers, the harness tests the classic mistakes on the data (weights
/// read in another axis order, BatchNorm with batch statistics or another
/// eps, a ReLU too many or too few, a missing residual add, another input
/// preprocessing, a layout mix-up) and prints each one that reproduces the
/// data as a `hint:` line. docs/diagnosis.md lists them.
#[derive(Parser)]
#[command(
    name = "verify",
    version,
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The reference dump directory (with manifest.json)
    #[arg(required = true)]
    dump: Option<PathBuf>,

    /// Stop after this stage, block or layer (layer3, layer2.1, layer2.1.conv2); nothing after it is computed
    #[arg(long, value_name = "STAGE")]
    upto: Option<String>,

    /// Feed every stage the reference's inputs, so that each error is pinned to the stage that made it
    #[arg(long, conflicts_with = "both")]
    isolate: bool,

    /// Run cumulative and isolated side by side: error carried in against error made here
    #[arg(long)]
    both: bool,

    /// Threads for the core (default: all cores; at most 8 per CPU)
    #[arg(long, value_name = "N")]
    threads: Option<usize>,

    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum Command {
    /// Compare two dumps in the documented format (another engine's output against the reference); the core does not run
    Compare {
        #[command(flatten)]
        compare: Box<CompareArgs>,
        #[command(flatten)]
        output: OutputFlags,
    },
    /// Write the failing stage (the root failure, or --stage) as a bundle someone else can run: its reference inputs, weights (torch layout), torch parameters, both outputs, case.json, a test_repro.py (pytest) and a README; `verify repro compare REF CAND` for another engine's dump
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Repro(Box<ReproArgs>),
    /// Rerun the core on a bundle written by `verify repro`, alone: exit 0 when the core computes the stage within the bundle's tolerance
    Case {
        /// The bundle directory (with case.json)
        dir: PathBuf,
    },
}

#[derive(Args)]
struct CompareArgs {
    /// The reference dump directory
    reference: PathBuf,
    /// The candidate dump directory, written by the engine under test
    candidate: PathBuf,
    /// Memory order of the candidate's stage files (auto: as its manifest says)
    #[arg(long, default_value = "auto", ignore_case = true, value_parser = ["nchw", "nhwc", "auto"])]
    cand_layout: String,
    /// What the candidate computed in, for --tol auto: float16 and bfloat16 scale each stage's tolerance by their roundoff over float32's (default: the candidate manifest's dtype, else float32)
    #[arg(long, value_name = "DTYPE", requires = "tol", value_parser = ["float32", "float16", "bfloat16"])]
    cand_dtype: Option<String>,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Args)]
struct ReproArgs {
    #[command(subcommand)]
    compare: Option<ReproCompare>,
    /// The reference dump: the core's failure, fed the reference's inputs (as --isolate), is handed over
    #[arg(required = true)]
    dump: Option<PathBuf>,
    /// (None only with the compare subcommand, which has its own.)
    #[command(flatten)]
    flags: Option<ReproFlags>,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Subcommand)]
enum ReproCompare {
    /// Hand over another engine's failing stage: `verify repro compare REF CAND --out DIR`
    Compare {
        #[command(flatten)]
        compare: CompareArgs,
        #[command(flatten)]
        flags: ReproFlags,
    },
}

#[derive(Args)]
struct ReproFlags {
    /// The bundle's directory (created; refused if it exists and is not empty)
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The stage to hand over (default: the root failure)
    #[arg(long, value_name = "NAME")]
    stage: Option<String>,
    /// Cut the case down to the worst element's receptive field (its input window and channels, one output channel's weights)
    #[arg(long)]
    shrink: bool,
    /// Write the bundle even when the stage passes
    #[arg(long)]
    force: bool,
}

/// What every run takes: which stages, which rule.
#[derive(Args)]
struct RunFlags {
    /// Report only stages whose names match this glob (layer1.*, *.conv2)
    #[arg(long, value_name = "GLOB")]
    only: Option<String>,

    /// Stop at the first failing stage
    #[arg(long)]
    fail_fast: bool,

    /// Compare only batch item K (from 0): for a batch of images, the one to look at
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    item: Option<usize>,

    /// Absolute tolerance (torch's rule |cand - ref| <= atol + rtol * |ref|); default: 1e-4 x the stage's max|ref|
    #[arg(long, allow_negative_numbers = true)]
    atol: Option<f64>,

    /// Absolute tolerance as a fraction of each stage's max|ref| (the default's form: 1e-4)
    #[arg(
        long,
        value_name = "FRACTION",
        conflicts_with = "atol",
        allow_negative_numbers = true
    )]
    atol_scale: Option<f64>,

    /// Relative tolerance (torch's rule); default 1e-4
    #[arg(long, allow_negative_numbers = true)]
    rtol: Option<f64>,

    /// auto: each stage's tolerance from the reference's noise floor (its own float32 error against float64, recorded by `python -m reference.dump --floor`): |cand - ref| <= 5 x floor (see --tol-multiple); for a candidate computed in float16 or bfloat16, see --cand-dtype
    #[arg(long, value_name = "RULE", value_parser = ["auto"], conflicts_with_all = ["atol", "atol_scale", "rtol"])]
    tol: Option<String>,

    /// With --tol auto: the multiple of each stage's noise floor allowed (default 5); a failure says the multiple it needs
    #[arg(
        long,
        value_name = "M",
        requires = "tol",
        allow_negative_numbers = true
    )]
    tol_multiple: Option<f64>,

    /// Count NaN in both at the same place as a match
    #[arg(long)]
    equal_nan: bool,

    /// Compare against a reference that was dumped in train mode (refused by default)
    #[arg(long)]
    allow_train_reference: bool,
}

/// How a report is written (not for `repro`, which writes a bundle).
#[derive(Args)]
struct OutputFlags {
    /// Report format [default: from --output's extension (.json, .xml for JUnit, .html), else text]
    #[arg(long, value_enum)]
    format: Option<Format>,

    /// Write the report in --format to FILE; the text report still goes to stdout
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// Draw each stage's error relative to its scale along the network's depth (log scale, with the tolerance and the first failure) as an SVG
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct Common {
    #[command(flatten)]
    run: RunFlags,
    #[command(flatten)]
    output: OutputFlags,
}

impl OutputFlags {
    /// --format, or what --output's extension says (a CI step writing
    /// `--output report.json` expects JSON in it, not the text report).
    fn format(&self) -> Format {
        let by_extension = || {
            let extension = self
                .output
                .as_ref()?
                .extension()?
                .to_str()?
                .to_ascii_lowercase();
            match extension.as_str() {
                "json" => Some(Format::Json),
                "xml" => Some(Format::Junit),
                "html" | "htm" => Some(Format::Html),
                _ => None,
            }
        };
        self.format.or_else(by_extension).unwrap_or(Format::Text)
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Text,
    Json,
    Junit,
    /// One self-contained page (inline CSS, script and SVG) for people
    Html,
}

fn main() -> ExitCode {
    resnet_verify::allocator::keep_freed_memory();
    resnet_verify::allocator::without_huge_pages();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("verify: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; `Ok(passed)`.
fn run(cli: Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Some(Command::Compare { output, .. }) => prepare_outputs(output)?,
        None => prepare_outputs(&cli.common.output)?,
        Some(_) => {}
    }
    if let Some(threads) = cli.threads {
        // The core's threads spin between its parallel regions: more of
        // them than CPUs only slow it, and tens of thousands exhaust memory
        // (20000 aborted on a failed stack guard, not an error).
        let cpus = std::thread::available_parallelism().map_or(1, |cpus| cpus.get());
        let most = 8 * cpus;
        if threads > most {
            anyhow::bail!(
                "--threads {threads}: at most {most} (8 per CPU; this machine has {cpus})"
            );
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    match cli.command {
        Some(Command::Compare { compare, output }) => {
            let options = compare_options(&compare)?;
            let report = report(&output, RunMode::Dumps, |listener| {
                Ok(compare_dumps(&options, listener)?)
            })?;
            Ok(report.passed())
        }
        Some(Command::Repro(repro_args)) => {
            let (source, flags) = match &repro_args.compare {
                Some(ReproCompare::Compare { compare, flags }) => {
                    (ReproSource::Dumps(compare_options(compare)?), flags)
                }
                None => (
                    ReproSource::Core(VerifyOptions {
                        dump: repro_args.dump.clone().expect("clap requires DUMP"),
                        upto: None,
                        mode: RunMode::Isolated,
                        run: run_options(&repro_args.run)?,
                    }),
                    (repro_args.flags.as_ref()).context("--out DIR is required")?,
                ),
            };
            let outcome = resnet_verify::repro(
                &source,
                &ReproOptions {
                    out: flags.out.clone(),
                    stage: flags.stage.clone(),
                    shrink: flags.shrink,
                    force: flags.force,
                },
            )?;
            say(&format!("{}\n", outcome.message))?;
            Ok(true)
        }
        Some(Command::Case { dir }) => {
            let outcome = resnet_verify::run_case(&dir)?;
            say(&outcome.message())?;
            Ok(outcome.core.verdict == resnet_verify::Verdict::Succ)
        }
        None => {
            let mode = match (cli.isolate, cli.both) {
                (true, _) => RunMode::Isolated,
                (_, true) => RunMode::Both,
                _ => RunMode::Cumulative,
            };
            let options = VerifyOptions {
                dump: cli.dump.expect("clap requires DUMP without a subcommand"),
                upto: cli.upto,
                mode,
                run: run_options(&cli.common.run)?,
            };
            let report = report(&cli.common.output, mode, |listener| {
                Ok(verify(&options, listener)?)
            })?;
            Ok(report.passed())
        }
    }
}

/// Writes `text` to stdout; a reader that stopped early (`| head`) is not
/// an error.
fn say(text: &str) -> anyhow::Result<()> {
    match anstream::stdout().write_all(text.as_bytes()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(error).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn compare_options(compare: &CompareArgs) -> anyhow::Result<CompareOptions> {
    Ok(CompareOptions {
        reference: compare.reference.clone(),
        candidate: compare.candidate.clone(),
        // auto: as the candidate's manifest says.
        layout: (!compare.cand_layout.eq_ignore_ascii_case("auto"))
            .then(|| compare.cand_layout.parse())
            .transpose()
            .map_err(anyhow::Error::msg)?,
        candidate_dtype: compare.cand_dtype.as_deref().map(|dtype| match dtype {
            "float16" => Precision::Float16,
            "bfloat16" => Precision::Bfloat16,
            _ => Precision::Float32,
        }),
        run: run_options(&compare.run)?,
    })
}

fn run_options(common: &RunFlags) -> anyhow::Result<RunOptions> {
    let atol = match (common.atol, common.atol_scale) {
        (Some(atol), _) => Some(AbsoluteTolerance::Fixed(atol)),
        (None, Some(fraction)) => Some(AbsoluteTolerance::ScaleRelative(fraction)),
        (None, None) => None,
    };
    let only = common.only.as_ref().map(|pattern| {
        globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .build()
            .map(|glob| glob.compile_matcher())
            .with_context(|| format!("--only {pattern}: not a valid glob"))
    });
    Ok(RunOptions {
        only: only.transpose()?,
        fail_fast: common.fail_fast,
        tolerance: match &common.tol {
            Some(_) => AutoTolerance::with_multiple(common.tol_multiple, common.equal_nan)?,
            None => ToleranceRule::Fixed(Tolerance::with_overrides(
                atol,
                common.rtol,
                common.equal_nan,
            )?),
        },
        allow_train_reference: common.allow_train_reference,
        item: common.item,
    })
}

/// Streams the text report to stdout (unless stdout is to carry JSON or
/// JUnit), shows progress on a terminal, and writes --output at the end.
fn report(
    common: &OutputFlags,
    mode: RunMode,
    run: impl FnOnce(&mut dyn FnMut(Event)) -> anyhow::Result<Report>,
) -> anyhow::Result<Report> {
    let format = common.format();
    let text_to_stdout = format == Format::Text || common.output.is_some();
    let mut progress = Progress(ProgressBar::hidden());
    let mut live = text_to_stdout.then(|| {
        Text::new(
            mode,
            Suspended {
                progress: progress.0.clone(),
                out: anstream::stdout(),
            },
        )
    });
    let mut text_file =
        (format == Format::Text && common.output.is_some()).then(|| Text::new(mode, Vec::new()));
    let mut rendered = match format {
        Format::Text => None,
        Format::Json => Some(Rendered::new(json::render)),
        Format::Junit => Some(Rendered::new(junit::render)),
        Format::Html => Some(Rendered::new(html::render)),
    };
    let mut plot = common.plot.as_ref().map(|_| Rendered::new(plot::svg));
    let mut sinks: Vec<&mut dyn Sink> = vec![&mut progress];
    if let Some(live) = &mut live {
        sinks.push(live);
    }
    if let Some(text_file) = &mut text_file {
        sinks.push(text_file);
    }
    if let Some(rendered) = &mut rendered {
        sinks.push(rendered);
    }
    if let Some(plot) = &mut plot {
        sinks.push(plot);
    }
    let report = drive(&mut sinks, run)?;
    drop(sinks);
    let rendered = match text_file {
        Some(text_file) => Some(text_file.plain()),
        None => rendered.and_then(Rendered::into_output),
    };
    if let Some(rendered) = rendered {
        match &common.output {
            Some(path) => std::fs::write(path, rendered)
                .with_context(|| format!("cannot write {}", path.display()))?,
            None => say(&rendered)?,
        }
    }
    if let (Some(path), Some(drawn)) = (&common.plot, plot.and_then(Rendered::into_output)) {
        let drawn = drawn.map_err(|reason| anyhow::anyhow!("cannot draw the plot: {reason}"))?;
        std::fs::write(path, drawn).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

/// Refuses one file for both the report and the plot, then empties the
/// report and plot an earlier run left at this run's paths:
/// they must not stand for this run if it is refused or fails before
/// writing its own (a CI step that reads the file would see the old
/// verdict). Only a plain file is emptied (through a link, its target): a
/// device, a pipe or `/dev/null` is left as it is.
fn prepare_outputs(common: &OutputFlags) -> anyhow::Result<()> {
    if let (Some(output), Some(plot)) = (&common.output, &common.plot) {
        // The file as it will be: its directory resolved (links, `..`), its
        // name as given; `./r.svg` and `r.svg` are one file.
        let resolved = |path: &std::path::Path| {
            let directory = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            directory
                .canonicalize()
                .ok()
                .zip(path.file_name().map(|name| name.to_owned()))
        };
        let same = output == plot || {
            let (a, b) = (resolved(output), resolved(plot));
            a.is_some() && a == b
        };
        if same {
            anyhow::bail!(
                "--output and --plot both name {}: the plot would overwrite the report",
                output.display()
            );
        }
    }
    for path in [&common.output, &common.plot].into_iter().flatten() {
        if std::fs::metadata(path).is_ok_and(|target| target.is_file()) {
            std::fs::File::create(path)
                .with_context(|| format!("cannot replace {}", path.display()))?;
        }
    }
    Ok(())
}

/// The progress bar on stderr, for a terminal: a sink of the run's events.
struct Progress(ProgressBar);

impl Sink for Progress {
    fn event(&mut self, event: &Event) {
        let progress = &self.0;
        if let Event::Start { stages, .. } = event {
            if *stages > 0 && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                progress.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                progress.set_length(*stages as u64);
                progress.set_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} stages {msg}")
                        .expect("valid template"),
                );
            }
        }
        if let Event::Stage(stage) = event {
            progress.set_position(stage.index as u64 + 1);
        }
    }

    fn finish(&mut self, _report: &Report) {
        self.0.finish_and_clear();
    }
}

/// Stdout, written with the progress bar out of the way: each write is
/// flushed while the bar is hidden, so the bar is redrawn once per write.
struct Suspended {
    progress: ProgressBar,
    out: anstream::Stdout,
}

impl Write for Suspended {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.progress.suspend(|| {
            self.out.write_all(buf)?;
            self.out.flush()
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
