//! Any bytes: the HRL reader never panics in any mode, and a log the strict reader accepts
//! re-encodes byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_hrl::fuzzing::check_parse;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = check_parse(data) {
        panic!("{e}");
    }
});
