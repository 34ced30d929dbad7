//! Crash safety: the agent is killed (SIGKILL) at seeded random points during `protect`,
//! `replicate`, `resync` and `failback`; running the command again completes it, and the
//! replica (or the failed-back disks) equal the expected content byte for byte.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use super::common::{MIB, Target, make_disk, s};

const SEEDS: u64 = 4;

/// A crash test's site: a directory holding the site, the VM's disks and its logs.
struct Site {
    dir: PathBuf,
    t: Target,
}

impl Site {
    fn new(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).unwrap();
        // The store outside the site: a take-over test acts from a second site.
        let t = Target {
            site: dir.join("site"),
            store: Some(dir.join("store")),
            azure: None,
        };
        Site { dir, t }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        self.t.cmd(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.t.ok(args)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The replica's latest point equals the item's source disks.
fn assert_replica_is_source(site: &Site, item: &str, disks: &[PathBuf]) {
    let out = site.path("check");
    let _ = fs::remove_dir_all(&out);
    site.ok(&["test-failover", item, "--out", s(&out)]);
    for (d, src) in disks.iter().enumerate() {
        let got = fs::read(out.join(format!("disk{d}.raw"))).unwrap();
        assert!(
            got == fs::read(src).unwrap(),
            "replica disk {d} differs from {}",
            src.display()
        );
    }
    site.ok(&["test-failover-cleanup", item]);
}

/// A fraction in [0.05, 0.95) from a seed.
fn frac(seed: u64) -> f64 {
    0.05 + 0.9 * lifeboat_source::SplitMix64::new(seed).fraction()
}

/// Prepares a site with `setup`, then runs `op` killed at a seeded point and again to
/// completion, then `check`s. The first pass (no kill) measures how long `op` takes.
fn crash_test(name: &str, setup: impl Fn(&Site) -> Vec<String>, check: impl Fn(&Site)) {
    let root = tempfile::tempdir().unwrap();
    let base = Site::new(root.path().join("baseline"));
    let args = setup(&base);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    base.ok(&args);
    let took = t0.elapsed();
    check(&base);
    let mut landed = 0;
    for seed in 1..=SEEDS {
        let mut delay = took.mul_f64(frac(seed * 7919 + name.len() as u64));
        // A kill that comes after the command ended is tried again, sooner, on a fresh site
        // (the machine may be busier now than when the first pass was timed).
        for attempt in 0..4 {
            let site = Site::new(root.path().join(format!("seed{seed}-{attempt}")));
            let args = setup(&site);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let hit = site.t.kill_after(&args, delay);
            site.ok(&args);
            check(&site);
            if hit {
                landed += 1;
                break;
            }
            delay /= 2;
        }
    }
    // Most kills must land while the command runs, or the test tests nothing.
    assert!(
        landed >= SEEDS / 2,
        "{name}: only {landed} of {SEEDS} kills landed mid-run"
    );
}

/// Prepares a site with `setup`, then for N = 1, 2, …: runs `op` with the agent told to
/// abort after its Nth action and before saving the outcome, runs it again to completion,
/// and `check`s; until a run needs fewer than N actions. Every action boundary is hit.
fn crash_at_every_action(name: &str, setup: impl Fn(&Site) -> Vec<String>, check: impl Fn(&Site)) {
    let root = tempfile::tempdir().unwrap();
    for n in 1..100 {
        let site = Site::new(root.path().join(format!("at{n}")));
        let args = setup(&site);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let status = site
            .cmd(&args)
            .env("LIFEBOAT_CRASH_BEFORE_SAVE", n.to_string())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            assert!(n > 1, "{name}: no action was performed");
            return; // fewer than n actions: every boundary was covered
        }
        site.ok(&args);
        check(&site);
    }
    panic!("{name}: more than 100 actions");
}

fn disks(site: &Site) -> Vec<PathBuf> {
    vec![site.path("d0.raw"), site.path("d1.raw")]
}

fn make_vm(site: &Site) -> Vec<PathBuf> {
    let d = disks(site);
    make_disk(&d[0], 24 * MIB, 1);
    make_disk(&d[1], 16 * MIB, 2);
    d
}

/// A VM protected as `vm`; its disks.
fn protected_vm(site: &Site) -> Vec<PathBuf> {
    let d = make_vm(site);
    let args = protect_args(&d);
    site.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    d
}

fn protect_args(d: &[PathBuf]) -> Vec<String> {
    let mut a = vec!["protect".to_string(), "vm".to_string()];
    for p in d {
        a.push("--disk".into());
        a.push(s(p).into());
    }
    a
}

fn check_replica(site: &Site) {
    assert_replica_is_source(site, "vm", &disks(site));
}

#[test]
fn protect_survives_sigkill() {
    crash_test(
        "protect",
        |site| protect_args(&make_vm(site)),
        check_replica,
    );
}

#[test]
fn protect_survives_a_crash_after_every_action() {
    crash_at_every_action(
        "protect",
        |site| protect_args(&make_vm(site)),
        check_replica,
    );
}

/// A thin disk: three copy pieces of the default 256 MiB, the middle one holes (the
/// catalogue is saved after the next piece, not after it: a crash there redoes it).
fn make_thin_vm(site: &Site) -> Vec<PathBuf> {
    let d = site.path("thin.raw");
    let f = fs::File::create(&d).unwrap();
    f.set_len(768 * MIB).unwrap();
    let mut rng = lifeboat_source::SplitMix64::new(3);
    for at in [0, 600 * MIB] {
        f.write_all_at(&rng.bytes(MIB as usize), at).unwrap();
    }
    vec![d]
}

#[test]
fn protect_of_a_thin_disk_survives_a_crash_after_every_action() {
    crash_at_every_action(
        "protect-thin",
        |site| protect_args(&make_thin_vm(site)),
        |site| assert_replica_is_source(site, "vm", &[site.path("thin.raw")]),
    );
}

fn replicate_setup(site: &Site) -> Vec<String> {
    protected_vm(site);
    let (l0, l1) = (site.path("l0.hrl"), site.path("l1.hrl"));
    for (d, l, writes) in [("0", &l0, "180"), ("1", &l1, "100")] {
        site.ok(&[
            "guest-write",
            "vm",
            "--disk",
            d,
            "--log",
            s(l),
            "--writes",
            writes,
            "--size",
            "64K",
        ]);
    }
    vec![
        "replicate".into(),
        "vm".into(),
        "--log".into(),
        format!("0={}", s(&l0)),
        "--log".into(),
        format!("1={}", s(&l1)),
    ]
}

fn replicate_check(site: &Site) {
    check_replica(site);
    // Exactly once: the cycle made one recovery point beyond protection's.
    let out = site.t.json(&["points", "vm"]);
    assert_eq!(out.as_array().unwrap().len(), 2, "{out}");
}

fn resync_setup(site: &Site) -> Vec<String> {
    protected_vm(site);
    let l = site.path("big.hrl");
    site.ok(&[
        "guest-write",
        "vm",
        "--disk",
        "0",
        "--log",
        s(&l),
        "--writes",
        "250",
        "--size",
        "64K",
    ]);
    let out = site.ok(&["replicate", "vm", "--log", &format!("0={}", s(&l))]);
    assert!(out.contains("resync required"), "{out}");
    vec!["resync".into(), "vm".into()]
}

fn failback_setup(site: &Site) -> Vec<String> {
    let d = protected_vm(site);
    let rec = site.path("rec");
    site.ok(&["failover", "vm", "--planned", "--out", s(&rec)]);
    site.ok(&["commit", "vm"]);
    // The recovered machine rewrites a third of each disk.
    for (i, len) in [(0, 24 * MIB), (1, 16 * MIB)] {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(rec.join(format!("disk{i}.raw")))
            .unwrap();
        f.write_all_at(&vec![0xA5; (len / 3) as usize], len / 2)
            .unwrap();
    }
    let mut a = vec!["failback".to_string(), "vm".to_string()];
    for p in &d {
        a.push("--to".into());
        a.push(s(p).into());
    }
    a
}

fn failback_check(site: &Site) {
    let rec = site.path("rec");
    for (i, p) in disks(site).iter().enumerate() {
        let want = fs::read(rec.join(format!("disk{i}.raw"))).unwrap();
        assert!(
            fs::read(p).unwrap() == want,
            "disk {i} differs after failback"
        );
    }
    site.ok(&["reprotect", "vm"]);
    check_replica(site);
}

#[test]
fn replicate_survives_sigkill() {
    crash_test("replicate", replicate_setup, replicate_check);
}

#[test]
fn replicate_survives_a_crash_after_every_action() {
    crash_at_every_action("replicate", replicate_setup, replicate_check);
}

#[test]
fn resync_survives_sigkill() {
    crash_test("resync", resync_setup, check_replica);
}

#[test]
fn resync_survives_a_crash_after_every_action() {
    crash_at_every_action("resync", resync_setup, check_replica);
}

#[test]
fn failback_survives_sigkill() {
    crash_test("failback", failback_setup, failback_check);
}

#[test]
fn failback_survives_a_crash_after_every_action() {
    crash_at_every_action("failback", failback_setup, failback_check);
}

/// The protected site is lost; a fresh site fails the VM over (taking it over first).
fn takeover_setup(site: &Site) -> Vec<String> {
    let old = site.t.at(&site.path("old-site"));
    let d = make_vm(site);
    let args = protect_args(&d);
    old.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let l = site.path("l0.hrl");
    old.ok(&[
        "guest-write",
        "vm",
        "--disk",
        "0",
        "--log",
        s(&l),
        "--writes",
        "40",
        "--size",
        "64K",
    ]);
    old.ok(&["replicate", "vm", "--log", &format!("0={}", s(&l))]);
    fs::remove_dir_all(&old.site).unwrap();
    vec![
        "failover".into(),
        "vm".into(),
        "--unplanned".into(),
        "--out".into(),
        s(&site.path("uf")).into(),
    ]
}

fn takeover_check(site: &Site) {
    assert_eq!(site.t.state("vm"), "unplanned_failover_completed");
    for (i, p) in disks(site).iter().enumerate() {
        let got = fs::read(site.path("uf").join(format!("disk{i}.raw"))).unwrap();
        assert!(got == fs::read(p).unwrap(), "failed-over disk {i} differs");
    }
    let st = site.t.json(&["status", "vm"]);
    assert_eq!(st[0]["owned_here"], true);
}

#[test]
fn take_over_and_failover_survive_sigkill() {
    crash_test("take-over", takeover_setup, takeover_check);
}

#[test]
fn take_over_and_failover_survive_a_crash_after_every_action() {
    crash_at_every_action("take-over", takeover_setup, takeover_check);
}
