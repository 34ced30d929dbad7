//! `lifeboat run`: the service replicates from the inbox in real time, beside read and
//! operator commands, serves metrics, rides out a store that goes away, and stops cleanly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::*;

/// A running `lifeboat run`, stopped (SIGTERM) when dropped.
struct Service {
    child: Child,
}

impl Service {
    fn start(t: &Target, args: &[&str]) -> Service {
        let mut a = vec!["run"];
        a.extend_from_slice(args);
        let child = t
            .cmd(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the service starts");
        Service { child }
    }

    /// SIGTERM; the exit status and the service's log.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        terminate(&self.child);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the service did not stop within 10 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut log = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut log);
        }
        (status, log)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            terminate(&self.child);
            let _ = self.child.wait();
        }
    }
}

fn terminate(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Guest writes on disk 0 recorded in a log (outside the inbox).
fn make_log(t: &Target, dir: &Path, item: &str, seed: u64) -> PathBuf {
    let tmp = dir.join(format!("log-{seed}.hrl"));
    t.ok(&[
        "guest-write",
        item,
        "--disk",
        "0",
        "--log",
        s(&tmp),
        "--writes",
        "8",
        "--size",
        "4K",
        "--seed",
        &seed.to_string(),
    ]);
    tmp
}

/// Moves a log into the inbox whole (as a shipper does); returns its name there.
fn into_inbox(t: &Target, item: &str, log: &Path) -> PathBuf {
    let inbox = t.site.join("inbox").join(item).join("0");
    std::fs::create_dir_all(&inbox).unwrap();
    let dest = inbox.join(log.file_name().unwrap());
    std::fs::rename(log, &dest).unwrap();
    dest
}

/// Guest writes recorded in a log, shipped into the inbox.
fn ship_log(t: &Target, dir: &Path, item: &str, seed: u64) -> PathBuf {
    let log = make_log(t, dir, item, seed);
    into_inbox(t, item, &log)
}

/// Waits until `cond` holds (polling), at most `limit`.
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn http_get(port: u16, path: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// Protect with a 30 s copy frequency, run the service, ship a log into the inbox: a new
/// point holding its writes appears within two intervals; reads answer at once; a test
/// failover beside the service is byte-exact; /metrics serves the item; SIGTERM exits 0
/// with nothing half-applied.
#[test]
fn the_service_replicates_the_inbox_beside_commands() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::local(dir.path());
    let disk = dir.path().join("disk0.raw");
    make_disk(&disk, 8 * MIB, 3);
    t.ok(&[
        "protect",
        "vm",
        "--disk",
        s(&disk),
        "--copy-frequency",
        "30s",
    ]);
    let port = free_port();
    let svc = Service::start(&t, &["--metrics", &format!("127.0.0.1:{port}")]);
    wait_for(Duration::from_secs(10), "the metrics page", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let before = t.json(&["points", "vm"]).as_array().unwrap().len();
    let log = ship_log(&t, dir.path(), "vm", 11);
    // Reads answer at once while the service works.
    for args in [&["status", "vm"][..], &["points", "vm"], &["jobs"]] {
        let start = Instant::now();
        t.ok(args);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "{args:?} took {took:?}");
    }
    wait_for(Duration::from_secs(65), "a point from the inbox", || {
        t.json(&["points", "vm"]).as_array().unwrap().len() > before && !log.exists()
    });
    // The newest point holds the source as written: a test failover beside the service.
    let tf = dir.path().join("tf");
    t.ok(&["test-failover", "vm", "--out", s(&tf)]);
    assert_same(&tf.join("disk0.raw"), &disk);
    t.ok(&["test-failover-cleanup", "vm"]);
    let page = http_get(port, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for family in [
        "lifeboat_rpo_seconds{item=\"vm\"}",
        "lifeboat_health{item=\"vm\"} 0",
        "lifeboat_protected{item=\"vm\"} 1",
        "lifeboat_inbox_bytes{item=\"vm\"} 0",
    ] {
        assert!(page.contains(family), "{family} missing from\n{page}");
    }
    assert!(http_get(port, "/other").starts_with("HTTP/1.1 404"));
    let (status, log) = svc.stop();
    assert!(status.success(), "the service exited with {status}: {log}");
    assert!(log.contains("service stopped"), "{log}");
    // Nothing half-applied: every job ended, and the replica matches its digests.
    let jobs = t.json(&["jobs", "vm"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] != "in_progress"),
        "{jobs}"
    );
    t.ok(&["verify", "vm"]);
}

/// A log that cannot be applied is moved aside with its reason; the item follows the
/// resync rules; `run --once` does what is due and exits.
#[test]
fn a_log_out_of_chain_is_moved_aside_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::local(dir.path());
    let disk = dir.path().join("disk0.raw");
    make_disk(&disk, 4 * MIB, 5);
    t.ok(&[
        "protect",
        "vm",
        "--disk",
        s(&disk),
        "--copy-frequency",
        "30s",
    ]);
    // Two logs; only the second reaches the inbox: a gap.
    let lost = ship_log(&t, dir.path(), "vm", 1);
    std::fs::remove_file(&lost).unwrap();
    let second = ship_log(&t, dir.path(), "vm", 2);
    // Not a log at all.
    let junk = second.with_file_name("junk.hrl");
    std::fs::write(&junk, b"not a log").unwrap();
    t.ok(&["replicate", "vm"]);
    let aside = second.parent().unwrap().join("refused");
    let reason = std::fs::read_to_string(aside.join("log-2.hrl.reason")).unwrap();
    assert!(reason.contains("chain"), "{reason}");
    assert!(aside.join("junk.hrl").exists());
    assert!(std::fs::read_to_string(aside.join("junk.hrl.reason")).is_ok());
    assert_eq!(t.state("vm"), "resync_required");
    let out = t.run(&["run", "--once"]);
    assert!(out.status.success(), "{out:?}");
}

/// With `--auto-resync` the service resynchronises by itself after a gap in the chain, and
/// the replica is the source again; the RPO thresholds turn health as points age.
#[test]
fn the_service_resyncs_by_itself_and_watches_the_rpo() {
    let dir = tempfile::tempdir().unwrap();
    let t = Target::local(dir.path());
    let disk = dir.path().join("disk0.raw");
    make_disk(&disk, 4 * MIB, 6);
    t.ok(&[
        "protect",
        "vm",
        "--disk",
        s(&disk),
        "--copy-frequency",
        "30s",
        "--auto-resync",
        "--rpo-warning",
        "2s",
        "--rpo-critical",
        "4s",
    ]);
    let lost = ship_log(&t, dir.path(), "vm", 1);
    std::fs::remove_file(&lost).unwrap();
    let second = ship_log(&t, dir.path(), "vm", 2);
    let svc = Service::start(&t, &[]);
    // At the next cycle the gap is found, the log moved aside, and a resync run by itself;
    // the cycle after the resync's makes a point holding every write.
    let refused = second.parent().unwrap().join("refused/log-2.hrl.reason");
    wait_for(
        Duration::from_secs(100),
        "a resync and a point after it",
        || {
            refused.exists()
                && t.state("vm") == "protected"
                && t.json(&["points", "vm"]).as_array().unwrap().len() >= 2
        },
    );
    let (status, log) = svc.stop();
    assert!(status.success(), "{log}");
    let jobs = t.json(&["jobs", "vm"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "resynchronize" && j["state"] == "succeeded"),
        "{jobs}"
    );
    t.ok(&["verify", "vm"]);
    let tf = dir.path().join("tf");
    t.ok(&["test-failover", "vm", "--out", s(&tf)]);
    assert_same(&tf.join("disk0.raw"), &disk);
    t.ok(&["test-failover-cleanup", "vm"]);
    // No cycle for longer than the critical threshold: the health rules run as time passes.
    std::thread::sleep(Duration::from_secs(5));
    let out = t.run(&["run", "--once"]);
    assert!(out.status.success(), "{out:?}");
    let status = t.json(&["status", "vm"]);
    assert_eq!(status[0]["health"], "critical", "{status}");
}

/// The store goes away under a running service (Azurite stopped): reads keep answering
/// from the site's cache, the service retries on the schedule, and replication catches
/// up when the store is back.
#[test]
fn the_service_rides_out_a_store_that_goes_away() {
    let Some(azurite) = azurite_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("azurite");
    let port = free_port();
    let mut az = start_azurite(&azurite, &data, port);
    let t = Target {
        site: dir.path().join("site"),
        store: None,
        azure: Some(format!("http://127.0.0.1:{port}/devstoreaccount1/svc")),
    };
    let disk = dir.path().join("disk0.raw");
    make_disk(&disk, 4 * MIB, 9);
    t.ok(&[
        "protect",
        "vm",
        "--disk",
        s(&disk),
        "--copy-frequency",
        "30s",
    ]);
    let before = t.json(&["points", "vm"]).as_array().unwrap().len();
    let svc = Service::start(&t, &[]);
    std::thread::sleep(Duration::from_secs(1));
    // The store goes away; a log arrives.
    let log = make_log(&t, dir.path(), "vm", 21);
    // Stopped, not killed: Azurite saves its data on the way out.
    az.stop();
    let log = into_inbox(&t, "vm", &log);
    let start = Instant::now();
    let out = t.run(&["status", "vm"]);
    assert!(out.status.success(), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site's cache"), "{err}");
    // Past the cycle: it failed and a retry is scheduled.
    std::thread::sleep(Duration::from_secs(35));
    assert!(log.exists(), "the log was taken while the store was away");
    // The store is back: the retry (1 min after the failure) catches up.
    let _az = start_azurite(&azurite, &data, port);
    wait_for(
        Duration::from_secs(120),
        "a point after the store came back",
        || {
            let out = t.run(&["--json", "points", "vm"]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .ok()
                    .and_then(|v| v.as_array().map(Vec::len))
                    .is_some_and(|n| n > before)
                && !log.exists()
        },
    );
    let (status, log) = svc.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("retried on the schedule"), "{log}");
    let tf = dir.path().join("tf");
    t.ok(&["test-failover", "vm", "--out", s(&tf)]);
    assert_same(&tf.join("disk0.raw"), &disk);
}

/// The Azurite the test script installed (`tools/azurite`), or `None` (skip) outside CI.
fn azurite_binary() -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools/azurite/node_modules/.bin/azurite-blob");
    if bin.exists() {
        return Some(bin);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but Azurite is not installed in tools/azurite"
    );
    eprintln!("skipping: Azurite is not installed in tools/azurite");
    None
}

/// An Azurite of the test's own, stopped when dropped.
struct Azurite(Child);

impl Azurite {
    /// SIGTERM, and wait for it to save its data and exit.
    fn stop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            terminate(&self.0);
            let _ = self.0.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An Azurite of this test's own, keeping its data in `data` (so it survives a restart).
fn start_azurite(bin: &Path, data: &Path, port: u16) -> Azurite {
    let child = Command::new(bin)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .arg("--location")
        .arg(data)
        .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Azurite starts");
    wait_for(Duration::from_secs(30), "Azurite", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Azurite(child)
}
