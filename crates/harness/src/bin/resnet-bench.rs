//! The core's side of scripts/bench-core: loads a dump's weights and input
//! once, then runs one timed forward pass (no observer) per line `run` on
//! stdin and answers with the milliseconds it took, so that the script can
//! alternate the core with PyTorch within one run.

/// mimalloc keeps freed memory for reuse: the network's weights and every
/// stage's activations are large blocks that the system allocator returns
/// to the kernel and faults back in, page by page, on the next allocation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use ndarray_npy::WriteNpyExt;
use resnet_core::Tensor;
use resnet_dump::Dump;
use resnet_verify::adapter;
use resnet_verify::layout::reference_tensor;
use resnet_verify::reference_stages::ReferenceStages;

/// Serve timed forward passes of the core for scripts/bench-core.
#[derive(Parser)]
struct Cli {
    /// A dump made by `python -m reference.dump`
    dump: PathBuf,
    /// Threads for the core
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Time the observed path (stage by stage, as verify runs it) instead of
    /// the fused inference path
    #[arg(long)]
    observed: bool,
    /// Write the logits of one pass (of the path timed) to FILE as .npy,
    /// then run as usual; scripts/measure-accuracy checks them
    #[arg(long, value_name = "FILE")]
    logits: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    resnet_verify::allocator::keep_freed_memory();
    let cli = Cli::parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads)
        .build_global()
        .context("thread pool")?;
    let dump = Dump::open(&cli.dump)?;
    let network = adapter::network(&dump, &adapter::architecture(dump.architecture()?))?;
    let entry = dump.stage("input").context("the dump has no input stage")?;
    let input = ReferenceStages::new(&dump, None).peek(entry)?.data;
    let Some(input) = reference_tensor(input.view()) else {
        bail!("the input is not NCHW")
    };

    let observed = cli.observed;
    let run = |input: Tensor| {
        if observed {
            network.forward(input)
        } else {
            network.infer(input)
        }
    };
    if let Some(path) = &cli.logits {
        let logits = run(input.clone())?;
        let [batch, _, _, classes] = logits.nhwc_shape();
        let logits = logits
            .into_array()
            .into_shape_with_order((batch, classes))
            .context("logits")?;
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        logits
            .write_npy(std::io::BufWriter::new(file))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        if line?.trim() != "run" {
            break;
        }
        let started = Instant::now();
        let logits = run(input.clone())?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box(logits);
        writeln!(out, "{elapsed:.3}")?;
        out.flush()?;
    }
    Ok(())
}
