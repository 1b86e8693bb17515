//! An engine of its own: a torchvision ResNet's stem and first block in plain
//! Rust with ndarray, from a reference dump's weights and input, written as
//! a candidate with `resnet_dump::CandidateWriter` (the format crate alone).
//!
//! ```sh
//! cargo run --release -p resnet-dump --example rust_engine -- REF_DIR OUT_DIR
//! target/release/verify compare REF_DIR OUT_DIR
//! ```
//!
//! `verify compare` says succ for the stages written and lists the rest as
//! not compared.

use std::error::Error;

use ndarray::{s, Array4, ArrayD, Ix4};
use resnet_dump::{CandidateWriter, Dump, Layout};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// torch's conv2d without bias: x NCHW, weight OIHW, summed in f64.
fn conv2d(
    x: &Array4<f32>,
    weight: &Array4<f32>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Array4<f32> {
    let (n, _, h, w) = x.dim();
    let (out_c, group_c, kh, kw) = weight.dim();
    let (oh, ow) = (
        (h + 2 * padding - kh) / stride + 1,
        (w + 2 * padding - kw) / stride + 1,
    );
    let per_group = out_c / groups;
    Array4::from_shape_fn((n, out_c, oh, ow), |(i, o, oy, ox)| {
        let mut sum = 0f64;
        for k in 0..group_c {
            let channel = o / per_group * group_c + k;
            for ky in 0..kh {
                for kx in 0..kw {
                    let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                    if iy < padding || ix < padding || iy - padding >= h || ix - padding >= w {
                        continue;
                    }
                    sum += x[[i, channel, iy - padding, ix - padding]] as f64
                        * weight[[o, k, ky, kx]] as f64;
                }
            }
        }
        sum as f32
    })
}

/// Eval mode: the running statistics, and the module's own eps where the
/// architecture gives it one.
fn batch_norm(dump: &Dump, x: &Array4<f32>, module: &str, eps: f64) -> Result<Array4<f32>> {
    let overrides = &dump.architecture()?.batch_norm_eps_overrides;
    let eps = overrides.get(module).copied().unwrap_or(eps);
    let part = |name: &str| -> Result<ArrayD<f32>> {
        Ok(dump
            .load_weight(&format!("{module}.{name}"))?
            .ok_or(format!("no {module}.{name}"))?)
    };
    let (mean, var, gamma, beta) = (
        part("running_mean")?,
        part("running_var")?,
        part("weight")?,
        part("bias")?,
    );
    let mut y = x.clone();
    for ((_, c, _, _), value) in y.indexed_iter_mut() {
        let scale = gamma[c] as f64 / (var[c] as f64 + eps).sqrt();
        *value = ((*value as f64 - mean[c] as f64) * scale + beta[c] as f64) as f32;
    }
    Ok(y)
}

/// torch's ReLU keeps NaN (`v.max(0.0)` would make it 0).
fn relu(x: &Array4<f32>) -> Array4<f32> {
    x.mapv(|v| if v < 0.0 { 0.0 } else { v })
}

/// 3x3, stride 2, padding 1.
fn max_pool(x: &Array4<f32>) -> Array4<f32> {
    let (n, c, h, w) = x.dim();
    Array4::from_shape_fn(
        (n, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1),
        |(i, j, oy, ox)| {
            let rows = (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h);
            let columns = (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w);
            x.slice(s![i, j, rows, columns])
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
        },
    )
}

fn run(reference: &str, out: &str) -> Result<()> {
    let dump = Dump::open(reference.as_ref())?;
    let eps = dump.architecture()?.batch_norm_eps;
    let weight = |name: &str| -> Result<Array4<f32>> {
        let w = dump
            .load_weight(&format!("{name}.weight"))?
            .ok_or(format!("no {name}.weight"))?;
        Ok(w.into_dimensionality::<Ix4>()?)
    };
    let input = dump
        .stage("input")
        .ok_or("the reference has no input stage")?;
    let mut x = dump.load_stage(input)?.data.into_dimensionality::<Ix4>()?;

    let mut writer = CandidateWriter::create(out, Layout::NCHW)?.checked_against(dump.manifest());
    let mut stage = |name: &str, module_type: &str, value: Array4<f32>| -> Result<Array4<f32>> {
        writer.stage(name, module_type, value.view().into_dyn())?;
        Ok(value)
    };
    // The stem.
    x = stage("conv1", "Conv2d", conv2d(&x, &weight("conv1")?, 2, 3, 1))?;
    x = stage("bn1", "BatchNorm2d", batch_norm(&dump, &x, "bn1", eps)?)?;
    x = stage("relu", "ReLU", relu(&x))?;
    x = stage("maxpool", "MaxPool2d", max_pool(&x))?;

    // layer1.0: convs, each BatchNorm, the block's relu after each but the
    // last, and relu(out + identity) to end it.
    let block = "layer1.0";
    let bottleneck = dump.stage("layer1.0.conv3").is_some();
    let groups = dump.architecture()?.groups;
    let convs: &[(&str, usize, usize)] = if bottleneck {
        &[("conv1", 0, 1), ("conv2", 1, groups), ("conv3", 0, 1)]
    } else {
        &[("conv1", 1, 1), ("conv2", 1, 1)]
    };
    let (mut out_x, mut identity) = (x.clone(), x);
    for (number, &(conv, padding, groups)) in convs.iter().enumerate() {
        let (conv, norm) = (
            format!("{block}.{conv}"),
            format!("{block}.bn{}", number + 1),
        );
        out_x = stage(
            &conv,
            "Conv2d",
            conv2d(&out_x, &weight(&conv)?, 1, padding, groups),
        )?;
        out_x = stage(&norm, "BatchNorm2d", batch_norm(&dump, &out_x, &norm, eps)?)?;
        if number + 1 < convs.len() {
            out_x = stage(&format!("{block}.relu#{number}"), "ReLU", relu(&out_x))?;
        }
    }
    if dump.stage("layer1.0.downsample").is_some() {
        let conv = weight("layer1.0.downsample.0")?;
        identity = stage(
            "layer1.0.downsample.0",
            "Conv2d",
            conv2d(&identity, &conv, 1, 0, 1),
        )?;
        identity = stage(
            "layer1.0.downsample.1",
            "BatchNorm2d",
            batch_norm(&dump, &identity, "layer1.0.downsample.1", eps)?,
        )?;
        identity = stage("layer1.0.downsample", "Sequential", identity)?;
    }
    let sum = (&out_x + &identity).mapv(|v| v.max(0.0));
    let out_x = stage(&format!("{block}.relu#{}", convs.len() - 1), "ReLU", sum)?;
    stage(
        block,
        if bottleneck {
            "Bottleneck"
        } else {
            "BasicBlock"
        },
        out_x,
    )?;
    println!("wrote {}", writer.close()?.display());
    Ok(())
}

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [reference, out] = arguments.as_slice() else {
        eprintln!("usage: rust_engine REF_DIR OUT_DIR");
        std::process::exit(2);
    };
    if let Err(error) = run(reference, out) {
        eprintln!("rust_engine: {error}");
        std::process::exit(1);
    }
}
