//! Any policy and failure sequence: the retry decisions keep the policy's invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_retry::fuzzing::{check_invariants, decode};

fuzz_target!(|data: &[u8]| {
    let (policy, seed, failures) = decode(data);
    if let Err(e) = check_invariants(&policy, seed, &failures) {
        panic!("{e}");
    }
});
