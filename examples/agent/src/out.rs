//! What a write command prints: lines of text; with `--json`, one JSON document instead
//! (docs/cli.md, "Write commands"): the command, the item and its state after it, the
//! same lines as `messages`, and the disks it wrote.

use std::sync::Mutex;

use lifeboat_engine::{Engine, Location};
use serde::Serialize;

use crate::read::{LocationView, locations};

/// The lines and disks of the command running, when its output is JSON.
static REPORT: Mutex<Option<Report>> = Mutex::new(None);

#[derive(Default)]
struct Report {
    messages: Vec<String>,
    disks: Vec<Location>,
}

/// Collects what the command says into one JSON document from now on.
pub(crate) fn json() {
    *lock() = Some(Report::default());
}

fn lock() -> std::sync::MutexGuard<'static, Option<Report>> {
    REPORT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Prints a line of the command's result (or keeps it for the JSON document).
pub(crate) fn line(line: String) {
    match lock().as_mut() {
        Some(r) => r.messages.push(line),
        None => println!("{line}"),
    }
}

/// `println!` for a command's result: [`line()`].
macro_rules! say {
    ($($t:tt)*) => { $crate::out::line(format!($($t)*)) };
}
pub(crate) use say;

/// The disks a command wrote (a line each, or the document's `disks`).
pub(crate) fn disks(ls: &[Location]) {
    if let Some(r) = lock().as_mut() {
        r.disks = ls.to_vec();
        return;
    }
    for (d, l) in ls.iter().enumerate() {
        match l {
            Location::File { path } => println!("disk {d}: {}", path.display()),
            Location::Blob { name, download } => match download {
                Some(p) => println!("disk {d}: blob {name} (downloaded to {})", p.display()),
                None => println!("disk {d}: blob {name}"),
            },
        }
    }
}

/// A write command's result as `--json` prints it.
#[derive(Serialize)]
struct Done<'a> {
    command: &'a str,
    item: Option<&'a str>,
    /// The item's protection state after the command; null when it has none (a plan, an
    /// item no longer protected).
    state: Option<&'static str>,
    health: Option<&'static str>,
    messages: &'a [String],
    disks: Vec<LocationView<'a>>,
}

/// Prints the JSON document of a command that succeeded, if its output is JSON.
pub(crate) fn finish(command: &str, item: Option<&str>, e: &Engine) -> anyhow::Result<()> {
    let Some(r) = lock().take() else {
        return Ok(());
    };
    let status = item.and_then(|i| e.item(i).ok()).map(|v| v.status);
    let doc = Done {
        command,
        item,
        state: status.as_ref().map(|s| s.state.tag()),
        health: status.as_ref().map(|s| s.health.tag()),
        messages: &r.messages,
        disks: locations(&r.disks),
    };
    let mut text = serde_json::to_vec_pretty(&doc)?;
    text.push(b'\n');
    crate::print_bytes(&text)
}
