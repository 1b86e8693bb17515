//! The one place a run reads the reference's stages. The reference check,
//! the comparison loop, the core's sources, the diagnosis and the layout
//! confirmation all ask here, so that a stage file is read once per run; a
//! stage is kept while a later stage still reads it (the core's liveness
//! rule, [`last_readers`]), or until the loop reaches it when it was read
//! ahead, and no longer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use ndarray::ArrayD;
use rayon::prelude::*;
use resnet_core::network::last_readers;
use resnet_core::Network;
use resnet_dump::{Dump, DumpError, LoadedStage, StageEntry};

/// A reference stage as read: NCHW, and a note if it had to be converted to
/// f32.
#[derive(Clone)]
pub struct ReferenceStage {
    pub data: Rc<ArrayD<f32>>,
    pub converted_from: Option<String>,
}

/// The reference dump's stages, read on demand and kept as long as the run
/// needs them.
pub struct ReferenceStages<'a> {
    dump: &'a Dump,
    network: Option<&'a Network>,
    /// For each network stage, the last stage that reads it as an input.
    last_reader: Vec<Option<usize>>,
    read: RefCell<HashMap<String, ReferenceStage>>,
}

impl<'a> ReferenceStages<'a> {
    /// `network` gives the stage graph (which stage reads which); without
    /// it, a stage is kept only until the loop has passed it.
    pub fn new(dump: &'a Dump, network: Option<&'a Network>) -> Self {
        let last_reader = network.map_or_else(Vec::new, |network| {
            let count = network.stages().len();
            let reads = (0..count).map(|index| network.stage_input_indices(index).iter().copied());
            last_readers(count, reads)
        });
        ReferenceStages {
            dump,
            network,
            last_reader,
            read: RefCell::new(HashMap::new()),
        }
    }

    pub fn dump(&self) -> &'a Dump {
        self.dump
    }

    pub fn network(&self) -> Option<&'a Network> {
        self.network
    }

    /// The reference's stage `entry` (one of its manifest's), NCHW.
    pub fn load(&self, entry: &StageEntry) -> Result<ReferenceStage, DumpError> {
        let stage = self.peek(entry)?;
        self.read
            .borrow_mut()
            .entry(entry.name.clone())
            .or_insert_with(|| stage.clone());
        Ok(stage)
    }

    /// [`Self::peek`] of each of `entries`, the files read side by side:
    /// the reference check reads every BatchNorm's input and output far
    /// ahead of the loop (100 MB in ResNet50), and one after the other
    /// they kept the second core idle. (Holding them for the loop instead
    /// of reading them again measured no faster: memory the process has
    /// not touched yet costs the kernel more than a second read.)
    pub fn peek_each<const N: usize>(
        &self,
        entries: [&StageEntry; N],
    ) -> Result<[ReferenceStage; N], DumpError> {
        let held = entries.map(|entry| self.read.borrow().get(&entry.name).cloned());
        let wanted: Vec<&StageEntry> = (entries.iter().zip(&held))
            .filter(|(_, held)| held.is_none())
            .map(|(entry, _)| *entry)
            .collect();
        let mut read = (wanted.par_iter())
            .map(|entry| read_stage(self.dump, entry))
            .collect::<Vec<_>>()
            .into_iter();
        let mut stages = Vec::with_capacity(N);
        for held in held {
            stages.push(match held {
                Some(stage) => stage,
                None => read
                    .next()
                    .expect("one read for each stage not held")?
                    .into(),
            });
        }
        Ok(stages.try_into().ok().expect("one stage for each entry"))
    }

    /// The reference's stage `entry`, held or read, without holding it: a
    /// look far ahead of the loop must not keep the whole network's
    /// activations in memory.
    pub fn peek(&self, entry: &StageEntry) -> Result<ReferenceStage, DumpError> {
        if let Some(stage) = self.read.borrow().get(&entry.name) {
            return Ok(stage.clone());
        }
        read_stage(self.dump, entry).map(ReferenceStage::from)
    }

    /// The stage the reference names `name`, if it has one.
    pub fn named(&self, name: &str) -> Option<Result<ReferenceStage, DumpError>> {
        Some(self.load(self.dump.stage(name)?))
    }

    /// The loop is done with stage `name`: forgets it, and every stage read
    /// so far that no stage after it reads.
    pub fn release_after(&self, name: &str) {
        let position = |name: &str| self.network?.stage_index(name).ok();
        let Some(done) = position(name) else {
            self.read.borrow_mut().remove(name);
            return;
        };
        self.read
            .borrow_mut()
            .retain(|kept, _| match position(kept) {
                Some(kept) => {
                    kept > done || self.last_reader[kept].is_some_and(|reader| reader > done)
                }
                None => kept != name,
            });
    }
}

/// Reads `entry` from `dump`, NCHW, on any thread (the `Rc` of a
/// [`ReferenceStage`] is made on the run's).
fn read_stage(dump: &Dump, entry: &StageEntry) -> Result<LoadedStage, DumpError> {
    let loaded = dump.load_stage(entry)?;
    Ok(LoadedStage {
        data: dump.manifest().layout.to_nchw(loaded.data),
        converted_from: loaded.converted_from,
    })
}

impl From<LoadedStage> for ReferenceStage {
    fn from(loaded: LoadedStage) -> Self {
        ReferenceStage {
            data: Rc::new(loaded.data),
            converted_from: loaded.converted_from,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::adapter;

    fn fixture() -> Dump {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resnet18-w8");
        Dump::open(&dir).unwrap()
    }

    /// The core built on `dump`, as a run builds it.
    fn network(dump: &Dump) -> Network {
        adapter::network(dump, &adapter::architecture(dump.architecture().unwrap())).unwrap()
    }

    /// Whether `name` is still held: loading it again gives the same array.
    fn held(stages: &ReferenceStages, name: &str, data: &Rc<ArrayD<f32>>) -> bool {
        let again = stages.named(name).unwrap().unwrap();
        let same = Rc::ptr_eq(&again.data, data);
        if !same {
            // Read again: forget it, so that the next question is asked afresh.
            stages.read.borrow_mut().remove(name);
        }
        same
    }

    #[test]
    fn a_stage_is_read_once_and_kept_while_a_later_stage_reads_it() {
        let dump = fixture();
        let network = network(&dump);
        let stages = ReferenceStages::new(&dump, Some(&network));
        let maxpool = network.stage_index("maxpool").unwrap();
        let readers: Vec<usize> = (0..network.stages().len())
            .filter(|&index| network.stage_input_indices(index).contains(&maxpool))
            .collect();
        let (first_reader, last_reader) = (readers[0], *readers.last().unwrap());
        assert!(first_reader < last_reader, "{readers:?}");
        let name = |index: usize| network.stages()[index].name.as_str();

        let data = stages.named("maxpool").unwrap().unwrap().data;
        assert!(held(&stages, "maxpool", &data));
        stages.release_after("maxpool");
        stages.release_after(name(first_reader));
        assert!(held(&stages, "maxpool", &data));
        stages.release_after(name(last_reader));
        assert!(!held(&stages, "maxpool", &data));

        // Read ahead of the loop: kept until the loop has passed it.
        let ahead = stages.named("layer2.0.conv1").unwrap().unwrap().data;
        stages.release_after("conv1");
        assert!(held(&stages, "layer2.0.conv1", &ahead));
        // Then, like any stage, until its reader (layer2.0.bn1) is done.
        stages.release_after("layer2.0.conv1");
        assert!(held(&stages, "layer2.0.conv1", &ahead));
        stages.release_after("layer2.0.bn1");
        assert!(!held(&stages, "layer2.0.conv1", &ahead));
    }

    #[test]
    fn stages_peeked_side_by_side_are_read_right_and_not_held() {
        let dump = fixture();
        let network = network(&dump);
        let stages = ReferenceStages::new(&dump, Some(&network));
        let entry = |name| dump.stage(name).unwrap();
        let (conv, bn) = (entry("layer1.0.conv1"), entry("layer1.0.bn1"));
        let held = stages.named("layer1.0.conv1").unwrap().unwrap().data;
        let [conv_data, bn_data] = stages
            .peek_each([conv, bn])
            .unwrap()
            .map(|stage| stage.data);
        assert!(
            Rc::ptr_eq(&conv_data, &held),
            "a held stage is not read again"
        );
        assert_eq!(*bn_data, dump.load_stage(bn).unwrap().data);
        assert!(!stages.read.borrow().contains_key("layer1.0.bn1"));
    }

    #[test]
    fn without_a_network_a_stage_is_kept_until_the_loop_passes_it() {
        let dump = fixture();
        let stages = ReferenceStages::new(&dump, None);
        let bn1 = stages.named("bn1").unwrap().unwrap().data;
        stages.release_after("conv1");
        assert!(held(&stages, "bn1", &bn1));
        stages.release_after("bn1");
        assert!(!held(&stages, "bn1", &bn1));
    }
}
