//! Any chain of writes: written logs read back identically, replay like a naive disk model,
//! and fold into a change map that holds exactly the model's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_hrl::fuzzing::{check_chain, ops_from_bytes};

fuzz_target!(|data: &[u8]| {
    let (metadata_size, logs) = ops_from_bytes(data);
    if let Err(e) = check_chain(&logs, metadata_size, data.first().is_some_and(|b| b & 1 == 1)) {
        panic!("{e}");
    }
});
