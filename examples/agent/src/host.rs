//! The agent's host: disks are raw image files, machines are not run (the engine records
//! whether they would be), plan hooks are shell commands.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_engine::{Disk, FileHost, Host};

/// Environment variables a hook never sees: the store's secrets.
const SECRETS: [&str; 3] = ["LIFEBOAT_KEY", "LIFEBOAT_AZURE_URL", "LIFEBOAT_ACCOUNT"];

/// Raw image files, shell hooks.
#[derive(Debug, Default)]
pub(crate) struct AgentHost;

impl Host for AgentHost {
    fn open_disk(&self, path: &Path) -> io::Result<Arc<dyn Disk>> {
        FileHost.open_disk(path)
    }

    fn create_disk(&self, path: &Path, len: u64) -> io::Result<()> {
        FileHost.create_disk(path, len)
    }

    /// `sh -c HOOK` with `LIFEBOAT_PLAN`, `LIFEBOAT_GROUP` (from 1) and `LIFEBOAT_PHASE`
    /// (pre or post), without the store's secrets; a non-zero exit, or running longer than
    /// `LIFEBOAT_HOOK_TIMEOUT` seconds (default 3600; the hook is killed), fails the plan.
    fn run_hook(&self, plan: &str, group: usize, pre: bool, hook: &str) -> io::Result<()> {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(hook)
            .env("LIFEBOAT_PLAN", plan)
            .env("LIFEBOAT_GROUP", (group + 1).to_string())
            .env("LIFEBOAT_PHASE", if pre { "pre" } else { "post" });
        for s in SECRETS {
            cmd.env_remove(s);
        }
        let timeout = std::env::var("LIFEBOAT_HOOK_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(3600), Duration::from_secs);
        // Its own process group, so a timeout kills what the hook started too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn()?;
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() >= timeout {
                if let Some(pid) = i32::try_from(child.id())
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "hook {hook:?} ran longer than {} s: killed",
                        timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            return Err(io::Error::other(format!(
                "hook {hook:?} exited with {status}"
            )));
        }
        Ok(())
    }
}

/// Where `guest-write`'s logs stand per disk (the stand-in guest's own change tracking:
/// the tracking session and the newest log it generated, which the agent may not have
/// taken yet).
pub(crate) fn generated(site: &Path) -> BTreeMap<String, (u64, String)> {
    std::fs::read(guest_file(site))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records the newest generated log of `key` (`ITEM/DISK`) in tracking session `session`.
pub(crate) fn set_generated(site: &Path, key: &str, session: u64, id: &str) -> io::Result<()> {
    let mut all = generated(site);
    all.insert(key.to_owned(), (session, id.to_owned()));
    let path = guest_file(site);
    let tmp = path.with_extension("tmp");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(&serde_json::to_vec(&all).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

fn guest_file(site: &Path) -> PathBuf {
    site.join("guest.json")
}
