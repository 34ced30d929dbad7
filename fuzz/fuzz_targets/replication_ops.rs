//! Any sequence of commands, action outcomes, time steps and crashes: the replication
//! coordinator's invariants hold after every step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lifeboat_replication::Coordinator;
use lifeboat_replication::fuzzing::run_ops;

fuzz_target!(|data: &[u8]| {
    let ops: Vec<(u8, u8, u8)> = data.chunks_exact(3).map(|c| (c[0], c[1], c[2])).collect();
    // A crash restores a copy of the state (the property tests go through serde JSON).
    let persist = |c: &Coordinator| Ok(c.clone());
    if let Err(e) = run_ops(&ops, &persist) {
        panic!("{e}");
    }
});
