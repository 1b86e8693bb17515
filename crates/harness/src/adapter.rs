//! The one place where the dump format meets the core under test: a dump's
//! weights as the core's [`WeightSource`], and the manifest's architecture
//! as the core's. The format crate knows nothing of the core.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver};

use resnet_core::{
    Architecture, BlockKind, CoreError, Head, Network, NormLayer, WeightSource, WeightTensor,
};
use resnet_dump::{Dump, DumpError};

/// A dump's weights, read on demand as the core asks for them.
pub struct DumpWeights<'a>(pub &'a Dump);

impl WeightSource for DumpWeights<'_> {
    fn weight(&self, name: &str) -> Result<WeightTensor, CoreError> {
        weight_or_error(name, self.0.load_weight(name))
    }
}

/// The core's view of a weight read from a dump.
fn weight_or_error(
    name: &str,
    read: Result<Option<WeightTensor>, DumpError>,
) -> Result<WeightTensor, CoreError> {
    match read {
        Ok(Some(weight)) => Ok(weight),
        Ok(None) => Err(CoreError::MissingWeight {
            name: name.to_string(),
        }),
        Err(error) => Err(CoreError::WeightSource {
            name: name.to_string(),
            reason: error.to_string(),
        }),
    }
}

/// How many weights the reading thread may be ahead of the core.
const WEIGHTS_AHEAD: usize = 8;

/// The core built on a dump's weights. A second thread reads the weight
/// files in the manifest's order (the order the core asks for them) while
/// the core reorders and packs the ones before: on a ResNet50 dump the
/// reading (100 MB) and the packing each took some 30 ms one after the
/// other. The network is the one `Network::from_weights` builds from
/// [`DumpWeights`], with the same errors; built for the manifest's whole
/// architecture, it is refused if it leaves a weight the dump lists unread.
pub fn network(dump: &Dump, architecture: &Architecture) -> Result<Network, CoreError> {
    let network = read_ahead_network(dump, architecture)?;
    // The manifest's whole network (not one cut short for --upto) reads
    // every weight the dump lists, or the dump is of another model.
    let whole = dump.architecture().ok().map(self::architecture);
    if whole.as_ref() == Some(architecture) {
        let listed = dump.manifest().weights.iter();
        network.check_all_weights_read(listed.map(|weight| weight.name.as_str()))?;
    }
    Ok(network)
}

fn read_ahead_network(dump: &Dump, architecture: &Architecture) -> Result<Network, CoreError> {
    std::thread::scope(|scope| {
        let (sender, receiver) = sync_channel(WEIGHTS_AHEAD);
        scope.spawn(move || {
            for entry in &dump.manifest().weights {
                let read = dump.load_weight(&entry.name);
                // The core has stopped asking (built, or failed).
                if sender.send((entry.name.as_str(), read)).is_err() {
                    break;
                }
            }
        });
        let weights = ReadAhead {
            dump,
            arriving: receiver,
            arrived: RefCell::new(HashMap::new()),
        };
        Network::from_weights(architecture, &weights)
    })
}

/// Weights as the reading thread hands them over; one the core asks for
/// out of order is waited for, and those before it kept until asked.
struct ReadAhead<'a> {
    dump: &'a Dump,
    arriving: Receiver<(&'a str, Result<Option<WeightTensor>, DumpError>)>,
    arrived: RefCell<HashMap<&'a str, Result<Option<WeightTensor>, DumpError>>>,
}

impl WeightSource for ReadAhead<'_> {
    fn weight(&self, name: &str) -> Result<WeightTensor, CoreError> {
        if let Some(read) = self.arrived.borrow_mut().remove(name) {
            return weight_or_error(name, read);
        }
        // A weight the manifest does not list never arrives: waiting for
        // it would read all the others into memory first.
        let listed = (self.dump.manifest().weights.iter()).any(|weight| weight.name == name);
        if listed {
            while let Ok((arrived, read)) = self.arriving.recv() {
                if arrived == name {
                    return weight_or_error(name, read);
                }
                self.arrived.borrow_mut().insert(arrived, read);
            }
        }
        // Not listed, or every weight has arrived (asked twice).
        weight_or_error(name, self.dump.load_weight(name))
    }
}

/// The manifest's architecture, for the core. (A field the manifest gains
/// must be added here: the core's struct literal lists all of its own.)
pub fn architecture(architecture: &resnet_dump::Architecture) -> resnet_core::Architecture {
    let a = architecture;
    resnet_core::Architecture {
        block: match a.block {
            resnet_dump::BlockKind::BasicBlock => BlockKind::BasicBlock,
            resnet_dump::BlockKind::Bottleneck => BlockKind::Bottleneck,
        },
        layers: a.layers.clone(),
        groups: a.groups,
        width_per_group: a.width_per_group,
        stem_channels: a.stem_channels,
        planes: a.planes.clone(),
        num_classes: a.num_classes,
        in_channels: a.in_channels,
        batch_norm_eps: a.batch_norm_eps,
        replace_stride_with_dilation: a.replace_stride_with_dilation.clone(),
        norm_layer: match a.norm_layer {
            resnet_dump::NormLayer::BatchNorm2d => NormLayer::BatchNorm2d,
            resnet_dump::NormLayer::FrozenBatchNorm2d => NormLayer::FrozenBatchNorm2d,
        },
        batch_norm_eps_overrides: a.batch_norm_eps_overrides.clone(),
        head: match a.head {
            resnet_dump::Head::Linear => Head::Linear,
            resnet_dump::Head::DropoutLinear => Head::DropoutLinear,
            resnet_dump::Head::Identity => Head::Identity,
            resnet_dump::Head::None => Head::None,
        },
    }
}
