//! Any bytes given as a .npy file: an error or an array, never a panic or
//! an allocation the file's size does not justify.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(array) = resnet_dump::npy::decode_f32(bytes) {
        assert!(array.data.len() * 4 <= bytes.len());
    }
});
