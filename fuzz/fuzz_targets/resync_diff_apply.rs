//! Any pair of disks: every diff pairing agrees with the naive reference and
//! apply(diff(a, b), b) == a.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_resync::fuzzing::{check_diff_apply, split};

fuzz_target!(|data: &[u8]| {
    let (a, b, bs) = split(data);
    if let Err(e) = check_diff_apply(&a, &b, bs) {
        panic!("{e}");
    }
});
