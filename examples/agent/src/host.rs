//! The agent's host: disks are raw image files, machines are not run (the engine records
//! whether they would be), plan hooks are shell commands.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// (pre or post); a non-zero exit fails the plan.
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
        let status = cmd.status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "hook {hook:?} exited with {status}"
            )));
        }
        Ok(())
    }
}

/// Where `guest-write`'s logs stand per disk (the stand-in guest's own change tracking:
/// the newest log it generated, which the agent may not have taken yet).
pub(crate) fn generated(site: &Path) -> BTreeMap<String, String> {
    std::fs::read(guest_file(site))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records the newest generated log of `key` (`ITEM/DISK`).
pub(crate) fn set_generated(site: &Path, key: &str, id: &str) -> io::Result<()> {
    let mut all = generated(site);
    all.insert(key.to_owned(), id.to_owned());
    let path = guest_file(site);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&all).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

fn guest_file(site: &Path) -> PathBuf {
    site.join("guest.json")
}
