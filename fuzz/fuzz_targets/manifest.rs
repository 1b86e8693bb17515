//! Any text given as manifest.json: an error or a checked manifest, never a
//! panic; and no accepted file name leads out of the dump.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(manifest) = resnet_dump::Manifest::parse(text) {
        for file in manifest.stages.iter().map(|s| &s.file).chain(manifest.weights.iter().map(|w| &w.file)) {
            assert!(!file.starts_with('/') && !file.split('/').any(|part| part == ".."), "{file}");
        }
    }
});
