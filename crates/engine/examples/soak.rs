//! Runs the whole-engine simulation over many seeds: `scripts/soak N` (or
//! `cargo run --release -p lifeboat-engine --features sim --example soak -- N [FIRST]`, or
//! `-- --seed S` to replay one). Prints every failing seed as the command that replays it.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let steps = std::env::var("LIFEBOAT_SIM_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(80);
    let seeds: Vec<u64> = match args.as_slice() {
        [flag, s] if flag == "--seed" => s.parse().map(|s| vec![s]).unwrap_or_default(),
        [n] => (0..n.parse().unwrap_or(100)).collect(),
        [n, first] => {
            let first: u64 = first.parse().unwrap_or(0);
            (first..first + n.parse::<u64>().unwrap_or(100)).collect()
        }
        _ => (0..100).collect(),
    };
    let mut failed = 0;
    let start = std::time::Instant::now();
    for (i, &seed) in seeds.iter().enumerate() {
        if let Err(e) = lifeboat_engine::sim::run(seed, steps) {
            failed += 1;
            eprintln!("{e}\nreplay: scripts/soak --seed {seed}\n");
        }
        if (i + 1) % 500 == 0 {
            eprintln!("{} seeds, {failed} failed, {:.0?}", i + 1, start.elapsed());
        }
    }
    println!(
        "{} seed(s) of {steps} steps, {failed} failed, in {:.1?}",
        seeds.len(),
        start.elapsed()
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
