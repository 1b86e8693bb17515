//! Does the core build the module the reference ran? The core builds a
//! network from the manifest's `architecture`, as torchvision would; a
//! dumped model that differs in one module (a ReLU6 for a ReLU, a conv with
//! a bias or another stride, a pool with `ceil_mode`, a BatchNorm with its
//! own eps) would otherwise be compared against another network, and its
//! failures (or worse, its successes) would mean nothing. So each stage's
//! recorded module type and parameters are checked against the core's
//! before anything runs, and every difference is named.
//!
//! BatchNorm's eps is the one parameter the core takes from the manifest's
//! `architecture` rather than from each module: `batch_norm_eps` for all
//! but those listed in `batch_norm_eps_overrides`. So the BatchNorms not
//! listed must agree with each other, and those listed with their entry;
//! a core told another eps for all is a core bug to find, not a different
//! model (docs/diagnosis.md).

use resnet_core::{Architecture, Network, Stage, StageKind};
use resnet_dump::{Dump, StageEntry};
use serde_json::{json, Value};

/// Why the core cannot verify the model of `dump` exactly, naming every
/// module that differs from what `network` built (the first few); None when
/// every module agrees. Stages the core does not produce are not looked at
/// here: matching the stages by name says so.
pub fn refusal(network: &Network, dump: &Dump) -> Option<String> {
    let pairs: Vec<(&Stage, &StageEntry)> = network
        .stages()
        .iter()
        .filter_map(|stage| Some((stage, dump.stage(&stage.name)?)))
        .collect();
    let architecture = network.architecture();
    let mut found: Vec<String> = pairs
        .iter()
        .flat_map(|(stage, entry)| differences(stage, entry, architecture))
        .collect();
    let entries: Vec<&StageEntry> = pairs.iter().map(|(_, entry)| *entry).collect();
    found.extend(batch_norm_eps_differences(&entries, architecture));
    if found.is_empty() {
        return None;
    }
    const SHOWN: usize = 8;
    let more = found.len().saturating_sub(SHOWN);
    found.truncate(SHOWN);
    if more > 0 {
        found.push(format!("and {more} more"));
    }
    Some(format!(
        "the reference's model is not the one the core builds, so it cannot be verified exactly: {}",
        found.join("; ")
    ))
}

/// What differs between the module the reference recorded for `entry` and
/// the one the core built for `stage`, one line each; empty when they
/// agree. Parameters the manifest does not record are not checked.
pub fn differences(stage: &Stage, entry: &StageEntry, architecture: &Architecture) -> Vec<String> {
    let recorded = entry.module_type.as_str();
    let built = match stage.kind {
        StageKind::BatchNorm2d => architecture.norm_layer.torch_name(),
        kind => kind.torch_name(),
    };
    if recorded != built {
        return vec![format!(
            "`{}` is a {recorded} in the reference; the core builds {built}",
            stage.name,
        )];
    }
    let built = match stage.kind {
        StageKind::Conv2d => stage.conv().map(|conv| {
            let geometry = conv.geometry();
            json!({
                "kernel_size": geometry.kernel,
                "stride": geometry.stride,
                "padding": geometry.padding,
                "dilation": geometry.dilation,
                "groups": geometry.groups,
                "bias": conv.has_bias(),
            })
        }),
        // FrozenBatchNorm2d has neither: it is both.
        StageKind::BatchNorm2d => Some(json!({
            "affine": true,
            "track_running_stats": true,
        })),
        StageKind::MaxPool2d => stage.max_pool().map(|pool| {
            json!({
                "kernel_size": pool.kernel,
                "stride": pool.stride,
                "padding": pool.padding,
                "dilation": 1,
                "ceil_mode": false,
            })
        }),
        StageKind::AdaptiveAvgPool2d => Some(json!({ "output_size": [1, 1] })),
        StageKind::Linear => Some(json!({ "bias": true })),
        _ => None,
    };
    let Some(Value::Object(built)) = built else {
        return Vec::new();
    };
    built
        .iter()
        .filter_map(|(key, core)| {
            let reference = entry.params.get(key)?;
            (!same(reference, core)).then(|| {
                format!(
                    "`{}` ({recorded}) has {key} = {reference} in the reference; the core builds {key} = {core}",
                    stage.name
                )
            })
        })
        .collect()
}

/// The BatchNorms whose recorded eps is not the one the core gives them,
/// one line each: for those in `batch_norm_eps_overrides`, their entry;
/// for the others, the one most of them have.
pub fn batch_norm_eps_differences(
    entries: &[&StageEntry],
    architecture: &Architecture,
) -> Vec<String> {
    let norm = architecture.norm_layer.torch_name();
    let recorded: Vec<(&str, f64)> = entries
        .iter()
        .filter(|entry| entry.module_type.as_str() == norm)
        .filter_map(|entry| Some((entry.name.as_str(), entry.params.get("eps")?.as_f64()?)))
        .collect();
    let overridden = |name: &str| architecture.batch_norm_eps_overrides.get(name).copied();
    let shared: Vec<f64> = recorded
        .iter()
        .filter(|(name, _)| overridden(name).is_none())
        .map(|&(_, eps)| eps)
        .collect();
    let common = shared
        .iter()
        .copied()
        .max_by_key(|&eps| shared.iter().filter(|&&e| e == eps).count());
    recorded
        .iter()
        .filter_map(|&(name, eps)| match overridden(name) {
            Some(own) => (eps != own).then(|| {
                format!("`{name}` ({norm}) has eps = {eps} in the reference; the architecture gives it {own}")
            }),
            None => (Some(eps) != common).then(|| {
                format!(
                    "`{name}` ({norm}) has eps = {eps} in the reference, where the other BatchNorms have {}, and the architecture does not list it in batch_norm_eps_overrides",
                    common.unwrap_or(eps)
                )
            }),
        })
        .collect()
}

/// Equal as JSON, numbers compared by value (`1e-5` and `0.00001`, `1`
/// and `1.0`), and a pair that is the same number twice equal to that
/// number (torch writes a pool's kernel as `3` or `[3, 3]`).
fn same(reference: &Value, core: &Value) -> bool {
    match (reference, core) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b))
        }
        (Value::Array(pair), Value::Number(_)) | (Value::Number(_), Value::Array(pair)) => {
            let number = if reference.is_number() {
                reference
            } else {
                core
            };
            !pair.is_empty() && pair.iter().all(|value| same(value, number))
        }
        _ => reference == core,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_pairs_compare_by_value() {
        assert!(same(&json!(1e-5), &json!(0.00001)));
        assert!(same(&json!(1), &json!(1.0)));
        assert!(same(&json!([3, 3]), &json!(3)));
        assert!(same(&json!(3), &json!([3, 3])));
        assert!(!same(&json!([3, 2]), &json!(3)));
        assert!(!same(&json!([]), &json!(3)));
        assert!(!same(&json!(true), &json!(false)));
        assert!(!same(&json!([1, 1]), &json!([1, 1, 1])));
        assert!(!same(&json!(1e-3), &json!(1e-5)));
    }
}
