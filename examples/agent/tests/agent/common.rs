//! What every agent test uses: a target (a site directory and a store), disks, and
//! byte-for-byte comparisons.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const MIB: u64 = 1 << 20;

/// Azurite's well-known development key.
pub(crate) const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Where the agent works: a site directory, and the store it replicates into (the site's
/// own embedded store, an embedded store elsewhere, or an Azurite container).
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) site: PathBuf,
    pub(crate) store: Option<PathBuf>,
    pub(crate) azure: Option<String>,
}

impl Target {
    /// A site in `dir/site` with its own embedded store.
    pub(crate) fn local(dir: &Path) -> Self {
        Target {
            site: dir.join("site"),
            store: None,
            azure: None,
        }
    }

    /// An Azurite container, when the test script started Azurite (`AZURITE_BLOB_PORT`).
    /// With `CI=true` Azurite must be there. The container is new for every call.
    pub(crate) fn azurite(dir: &Path, container: &str) -> Option<Self> {
        let url = azurite_url(container)?;
        Some(Target {
            site: dir.join("site"),
            store: None,
            azure: Some(url),
        })
    }

    /// The same store, another site directory.
    pub(crate) fn at(&self, site: &Path) -> Self {
        Target {
            site: site.to_path_buf(),
            ..self.clone()
        }
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lifeboat"));
        c.arg("--site").arg(&self.site);
        if let Some(dir) = &self.store {
            c.arg("--store").arg(dir);
        }
        if let Some(url) = &self.azure {
            c.args(["--azure", url, "--account", "devstoreaccount1"]);
            c.env("LIFEBOAT_KEY", AZURITE_KEY);
        }
        c.args(args);
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("the agent runs")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lifeboat {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs a command that must end with exit status `code` (and no panic); its output.
    pub(crate) fn exits(&self, args: &[&str], code: i32) -> Output {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "lifeboat {args:?}: {err}");
        assert!(!err.contains("panicked"), "panic: {err}");
        out
    }

    /// Runs a command that must fail cleanly (exit 1, a one-line reason, no panic);
    /// returns the reason.
    pub(crate) fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "lifeboat {args:?} should fail with 1: {err}"
        );
        assert!(!err.contains("panicked"), "panic: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("lifeboat: "))
            .unwrap_or_else(|| panic!("no reason line in {err}"));
        line.to_owned()
    }

    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.ok(&a)).expect("JSON output")
    }

    pub(crate) fn state(&self, item: &str) -> String {
        self.json(&["status", item])[0]["state"]
            .as_str()
            .expect("state")
            .to_owned()
    }

    /// Starts the command, kills it with SIGKILL after `delay`; whether it was still
    /// running then.
    pub(crate) fn kill_after(&self, args: &[&str], delay: Duration) -> bool {
        let mut child = self.cmd(args).spawn().unwrap();
        let start = Instant::now();
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let running = child.try_wait().unwrap().is_none();
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();
        running
    }
}

/// The URL of a new Azurite container, or `None` (skip) when Azurite is not running and
/// CI does not require it.
pub(crate) fn azurite_url(container: &str) -> Option<String> {
    let port = match std::env::var("AZURITE_BLOB_PORT") {
        Ok(p) => p,
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but AZURITE_BLOB_PORT is not set: scripts/test starts Azurite"
            );
            eprintln!("skipping: AZURITE_BLOB_PORT not set");
            return None;
        }
    };
    Some(format!(
        "http://127.0.0.1:{port}/devstoreaccount1/{}",
        unique(container)
    ))
}

/// A container name no earlier run on the same Azurite used.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// A deterministic disk image: data regions and zero regions.
pub(crate) fn make_disk(path: &Path, len: u64, seed: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    let mut rng = lifeboat_source::SplitMix64::new(seed);
    let mut buf = vec![0u8; 128 << 10];
    let mut at = 0;
    while at < len {
        // Two regions in three hold data.
        if rng.below(3) != 0 {
            rng.fill(&mut buf);
            f.write_all_at(&buf, at).unwrap();
        }
        at += buf.len() as u64;
    }
}

pub(crate) fn bytes(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub(crate) fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (bytes(a), bytes(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: lengths",
        a.display(),
        b.display()
    );
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
