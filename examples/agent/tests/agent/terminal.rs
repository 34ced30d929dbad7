//! The agent in a real terminal: `tmux` runs it and `capture-pane` reads the screen, as an
//! operator would see it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::common::*;

/// A tmux server of its own (its socket in the test's directory), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    /// A detached 160x40 session, or `None` (skip) without tmux unless CI requires it.
    fn start(dir: &Path) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but tmux is missing: .ci/run installs it"
            );
            eprintln!("skipping: no tmux");
            return None;
        }
        let t = Tmux {
            socket: dir.join("tmux.sock"),
        };
        t.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "40",
            "-s",
            "t",
        ]);
        Some(t)
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types a command line and Enter.
    fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "t", line, "Enter"]);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Every screen seen until one contains `marker` (polled every 50 ms, at most 2 min).
    fn screens_until(&self, marker: &str) -> Vec<String> {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let s = self.screen();
            let done = s.contains(marker);
            seen.push(s);
            if done {
                return seen;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no {marker}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// A long protect shows a progress bar with a rate and an ETA; `jobs` and `points` print
/// aligned tables.
#[test]
fn progress_and_tables_in_a_real_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tmux) = Tmux::start(dir.path()) else {
        return;
    };
    let disk = dir.path().join("disk.raw");
    make_disk(&disk, 256 * MIB, 9);
    let lb = format!(
        "{} --site {}",
        env!("CARGO_BIN_EXE_lifeboat"),
        dir.path().join("site").display()
    );
    tmux.type_line(&format!(
        "clear; {lb} protect a-rather-long-item-name --disk {}; echo END-$((0+1))",
        disk.display()
    ));
    let screens = tmux.screens_until("END-1");
    let bar = screens
        .iter()
        .flat_map(|s| s.lines())
        .find(|l| l.contains("initial replication") && l.contains("ETA"));
    let bar = bar.unwrap_or_else(|| panic!("no progress bar in {screens:#?}"));
    assert!(bar.contains("iB/s"), "no rate in {bar}");

    tmux.type_line(&format!(
        "clear; {lb} jobs; {lb} points a-rather-long-item-name; echo END-$((1+1))"
    ));
    let screen = tmux.screens_until("END-2").pop().unwrap();
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("id "))
        .expect("a jobs header");
    let col = lines[header].find("started").unwrap();
    let row = lines[header + 1];
    assert!(row.starts_with("a-rather-long-item-name#1"), "{screen}");
    // The started column lines up under its header, past the long id.
    assert!(row[col..].starts_with("20"), "misaligned:\n{screen}");
    let points = lines
        .iter()
        .position(|l| l.starts_with("point"))
        .expect("a points header");
    let col = lines[points].find("age").unwrap();
    assert!(
        lines[points + 1][col..].contains("ago"),
        "misaligned:\n{screen}"
    );
}
