//! Any bytes: signature decoding never panics, and whatever decodes re-encodes identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_resync::fuzzing::check_decode;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = check_decode(data) {
        panic!("{e}");
    }
});
