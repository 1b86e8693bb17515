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
use resnet_core::network::last_readers;
use resnet_core::Network;
use resnet_dump::{Dump, DumpError, StageEntry};

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
        if let Some(stage) = self.read.borrow().get(&entry.name) {
            return Ok(stage.clone());
        }
        let loaded = self.dump.load_stage(entry)?;
        let stage = ReferenceStage {
            data: Rc::new(self.dump.manifest().layout.to_nchw(loaded.data)),
            converted_from: loaded.converted_from,
        };
        self.read
            .borrow_mut()
            .insert(entry.name.clone(), stage.clone());
        Ok(stage)
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
