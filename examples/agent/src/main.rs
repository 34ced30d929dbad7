//! `lifeboat`, the reference agent: protects raw disk images, replicates HRL logs into
//! page blobs (a local embedded site, or Azure Storage), and runs every failover and
//! failback workflow by driving `lifeboat-replication`'s actions.
//!
//! Every command runs in a new process: the state lives in the site directory and is
//! saved after every step, so an interrupted command is completed by running it again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lifeboat_pageblob::{AzureStore, Credential, LocalStore, PageStore};

mod commands;
mod demo;
mod host;
mod human;
mod out;
mod read;
mod service;
mod tools;

/// Lifeboat reference agent: Hyper-V-style replication to a local site or Azure page blobs.
#[derive(Debug, Parser)]
#[command(name = "lifeboat", version, about)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) target: Target,
    /// Machine-readable JSON on stdout (docs/cli.md: the schemas): read commands' views;
    /// write commands' results.
    #[arg(long, global = true, help_heading = "Global options")]
    pub(crate) json: bool,
    /// No progress and no notes on stderr (errors still).
    #[arg(short, long, global = true, help_heading = "Global options")]
    pub(crate) quiet: bool,
    /// More log on stderr: -v what the engine does, -vv debug detail (LIFEBOAT_LOG overrides).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    pub(crate) verbose: u8,
    /// Debug detail on stderr (as -vv).
    #[arg(long, global = true, help_heading = "Global options")]
    pub(crate) debug: bool,
    #[command(subcommand)]
    pub(crate) command: Cmd,
    /// The command's name as typed (`plan failover`), for `--json` results.
    #[arg(skip)]
    pub(crate) name: String,
}

/// Where the agent works and where the replicas (and the catalogue) live.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Global options")]
pub(crate) struct Target {
    /// The site directory: staged logs, protective copies, a cache of the catalogue, and
    /// (by default) the embedded replica store. Losing it loses nothing failover needs.
    #[arg(
        long,
        global = true,
        env = "LIFEBOAT_SITE",
        default_value = "lifeboat-site"
    )]
    pub(crate) site: PathBuf,
    /// The embedded replica store (replicas, recovery points, the catalogue); default
    /// SITE/store. Keep it on other hardware than the site to survive the site's loss.
    #[arg(long, global = true, env = "LIFEBOAT_STORE", conflicts_with = "azure")]
    pub(crate) store: Option<PathBuf>,
    /// Replicate into this Azure container URL (with a SAS query string, or with
    /// --account and --key) instead of the embedded store.
    #[arg(long, global = true, env = "LIFEBOAT_AZURE_URL")]
    pub(crate) azure: Option<String>,
    /// Storage account name (Shared Key).
    #[arg(long, global = true, env = "LIFEBOAT_ACCOUNT")]
    pub(crate) account: Option<String>,
    /// Storage account key, base64 (Shared Key).
    #[arg(long, global = true, env = "LIFEBOAT_KEY", hide_env_values = true)]
    pub(crate) key: Option<String>,
    /// Send replicas at most this fast, for everything this process sends (a service: the
    /// whole site): bytes per second with an IEC unit (`20M` = 20 MiB/s) or bits
    /// (`100Mbit`).
    #[arg(long, global = true, env = "LIFEBOAT_MAX_BANDWIDTH", value_parser = parse_rate)]
    pub(crate) max_bandwidth: Option<u64>,
}

/// How often delta cycles run.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Frequency {
    /// 30 seconds.
    #[value(name = "30s")]
    S30,
    /// 5 minutes.
    #[value(name = "5m")]
    M5,
    /// 15 minutes.
    #[value(name = "15m")]
    M15,
}

/// Disk image tools.
#[derive(Debug, Subcommand)]
pub(crate) enum DiskCmd {
    /// Format (raw, VHDX, fixed VHD), virtual size, block size, allocated bytes, ids.
    #[command(
        after_help = "Examples:\n  lifeboat disk inspect d0.vhdx\n  lifeboat disk inspect d0.raw --json"
    )]
    Inspect {
        /// The image.
        file: PathBuf,
    },
}

/// Output disk format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// Raw image, exactly the disk's size.
    #[default]
    Raw,
    /// Fixed VHD (rounded up to 1 MiB, 512-byte footer).
    Vhd,
    /// Dynamic VHDX, as Hyper-V attaches (files at this site only).
    Vhdx,
}

/// How the service writes its log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// The agent's commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// The service: replicate every item of the site continuously (cycles at each item's
    /// copy frequency from the logs in SITE/inbox/ITEM/DISK_INDEX/, retries, scheduled
    /// copies and resyncs) until SIGTERM or SIGINT.
    #[command(
        after_help = "Examples:\n  lifeboat run --metrics 127.0.0.1:9477 --log-format json\n  lifeboat run --once          # from cron: what is due, then exit"
    )]
    Run {
        /// Do the work that is due now, then exit (for cron).
        #[arg(long)]
        once: bool,
        /// Serve metrics in the Prometheus text format at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// The log's format (on stderr; LIFEBOAT_LOG filters it, default info).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// How many items copy a piece of a disk (initial replication), resynchronise a disk
        /// or apply a cycle's logs at once; each copy in flight holds a few 4 MiB segments of
        /// its piece in memory.
        #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
        transfers: u16,
    },
    /// The main job: a small VM through every workflow, verified by BLAKE3 at each step.
    #[command(after_help = "Examples:\n  lifeboat demo\n  lifeboat demo --dir /tmp/lifeboat-demo")]
    Demo {
        /// Working directory for the demo's VM and site (recreated).
        #[arg(long, default_value = "lifeboat-demo")]
        dir: PathBuf,
    },
    /// Enable protection: initial replication of every disk, then finalize.
    #[command(
        after_help = "Examples:\n  lifeboat protect vm1 --disk d0.raw --disk d1.raw --copy-frequency 30s --retention 24\n  lifeboat protect vm1 --disk d0.raw --auto-resync --rpo-warning 15m --rpo-critical 1h"
    )]
    Protect {
        /// The item (machine) name.
        item: String,
        /// Its disks (raw images), in order.
        #[arg(long = "disk", required = true)]
        disks: Vec<PathBuf>,
        /// Delta cycle interval.
        #[arg(long, value_enum, default_value = "5m")]
        copy_frequency: Frequency,
        /// Recovery-point retention in hours (1..=24).
        #[arg(long, default_value_t = 24)]
        retention: u64,
        /// Resync block size (e.g. 64K, 1M).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u64,
        /// Start a resync by itself when one is required (the service performs it);
        /// without it, `lifeboat resync ITEM` starts it.
        #[arg(long)]
        auto_resync: bool,
        /// Health turns Warning when the newest point is older than this (e.g. 90s, 15m, 1h).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        rpo_warning: Duration,
        /// Health turns Critical when the newest point is older than this.
        #[arg(long, value_parser = parse_duration)]
        rpo_critical: Option<Duration>,
    },
    /// Change an item's replication policy (only the settings given); it takes effect at
    /// once.
    #[command(
        after_help = "Examples:\n  lifeboat policy vm1 --copy-frequency 30s\n  lifeboat policy vm1 --retention 4 --rpo-critical 2h --auto-resync true"
    )]
    Policy {
        /// The item.
        item: String,
        /// Delta cycle interval.
        #[arg(long, value_enum)]
        copy_frequency: Option<Frequency>,
        /// Recovery-point retention in hours (1..=24).
        #[arg(long)]
        retention: Option<u64>,
        /// Health turns Warning when the newest point is older than this.
        #[arg(long, value_parser = parse_duration)]
        rpo_warning: Option<Duration>,
        /// Health turns Critical when the newest point is older than this.
        #[arg(long, value_parser = parse_duration)]
        rpo_critical: Option<Duration>,
        /// Start resyncs by itself (true) or on request only (false).
        #[arg(long)]
        auto_resync: Option<bool>,
    },
    /// Run a delta cycle now: apply closed HRL logs (these, and those waiting in
    /// SITE/inbox/ITEM/DISK_INDEX/) in chain order, exactly once, as a new recovery point.
    #[command(
        after_help = "Examples:\n  lifeboat replicate vm1 --log 0=l1.hrl --log 1=l1b.hrl\n  lifeboat replicate vm1       # the logs in the inbox"
    )]
    Replicate {
        /// The item.
        item: String,
        /// DISK_INDEX=FILE.hrl (any order: each disk's chain decides).
        #[arg(long = "log", value_parser = parse_log)]
        logs: Vec<(usize, PathBuf)>,
        /// The logs were closed at a quiesced (VSS) snapshot of the machine: the point is
        /// application-consistent.
        #[arg(long)]
        app_consistent: bool,
    },
    /// Fixed-block compare of the source disks against the replica's digests; send only
    /// differing blocks.
    #[command(
        after_help = "Examples:\n  lifeboat resync vm1\n  lifeboat resync vm1 --pause\n  lifeboat resync vm1 --resume"
    )]
    Resync {
        /// The item.
        item: String,
        /// Pause the running resync.
        #[arg(long, group = "control")]
        pause: bool,
        /// Resume a paused resync where it stopped.
        #[arg(long, group = "control")]
        resume: bool,
        /// Cancel the resync (the item stays resync-required).
        #[arg(long, group = "control")]
        cancel: bool,
    },
    /// Protected items: state, health, points.
    #[command(after_help = "Examples:\n  lifeboat status\n  lifeboat status vm1 --json")]
    Status {
        /// One item.
        item: Option<String>,
    },
    /// The jobs view.
    #[command(after_help = "Examples:\n  lifeboat jobs\n  lifeboat jobs vm1 --json")]
    Jobs {
        /// One item's jobs.
        item: Option<String>,
    },
    /// An item's recovery points.
    #[command(after_help = "Examples:\n  lifeboat points vm1\n  lifeboat points vm1 --json")]
    Points {
        /// The item.
        item: String,
    },
    /// Write a recovery point's disks into DIR without disturbing replication.
    #[command(
        after_help = "Examples:\n  lifeboat test-failover vm1 --out test\n  lifeboat test-failover vm1 --point latest-app-consistent --out test --format vhdx"
    )]
    TestFailover {
        /// The item.
        item: String,
        /// latest, latest-processed, latest-app-consistent or a point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Overwrite disk files already in the output directory.
        #[arg(long)]
        force: bool,
    },
    /// Delete the test-failover disks.
    #[command(after_help = "Examples:\n  lifeboat test-failover-cleanup vm1")]
    TestFailoverCleanup {
        /// The item.
        item: String,
    },
    /// Fail over: planned (source shut down, final delta, zero loss) or unplanned.
    #[command(
        after_help = "Examples:\n  lifeboat failover vm1 --planned --out recovered\n  lifeboat failover vm1 --unplanned --point latest-processed --out recovered",
        group(clap::ArgGroup::new("kind").required(true).args(["planned", "unplanned"]))
    )]
    Failover {
        /// The item.
        item: String,
        /// Planned failover.
        #[arg(long)]
        planned: bool,
        /// Unplanned failover.
        #[arg(long)]
        unplanned: bool,
        /// Unplanned: latest, latest-processed, latest-app-consistent or a point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// Planned: the final logs (DISK_INDEX=FILE.hrl).
        #[arg(long = "log", value_parser = parse_log)]
        logs: Vec<(usize, PathBuf)>,
        /// Where the recovered disks are written as files (on Azure, downloads of the new
        /// blobs; without it, blobs in the store).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Overwrite disk files already in the output directory.
        #[arg(long)]
        force: bool,
    },
    /// Before commit: move the failed-over machine to another recovery point.
    #[command(
        after_help = "Examples:\n  lifeboat change-point vm1 --point 12\n  lifeboat change-point vm1 --point latest-app-consistent"
    )]
    ChangePoint {
        /// The item.
        item: String,
        /// latest-processed, latest-app-consistent or a point id.
        #[arg(long)]
        point: String,
    },
    /// Keep the failover: delete every other recovery point.
    #[command(after_help = "Examples:\n  lifeboat commit vm1")]
    Commit {
        /// The item.
        item: String,
    },
    /// Cancel an uncommitted failover, or a failback.
    #[command(after_help = "Examples:\n  lifeboat cancel vm1")]
    Cancel {
        /// The item.
        item: String,
    },
    /// Bring on-premises disks up to the recovered disks' current content.
    #[command(
        after_help = "Examples:\n  lifeboat failback vm1 --to d0.raw --to d1.raw\n  lifeboat failback vm1 --to /dev/sdb --full"
    )]
    Failback {
        /// The item.
        item: String,
        /// The on-premises disks, in disk order (the original ones or alternates).
        #[arg(long = "to", required = true)]
        to: Vec<PathBuf>,
        /// Copy everything instead of only differing blocks.
        #[arg(long)]
        full: bool,
    },
    /// Disable protection: change tracking stops, logs not applied are dropped and the
    /// item leaves the catalogue; the replica stays in the store unless --delete-replica.
    #[command(
        after_help = "Examples:\n  lifeboat unprotect vm1\n  lifeboat unprotect vm1 --delete-replica   # recovery points and replica too"
    )]
    Unprotect {
        /// The item.
        item: String,
        /// Delete the replica's disks and every recovery point as well.
        #[arg(long)]
        delete_replica: bool,
    },
    /// After failback: replicate towards the recovery site again.
    #[command(after_help = "Examples:\n  lifeboat reprotect vm1")]
    Reprotect {
        /// The item.
        item: String,
    },
    /// Check a replica (or a recovery point) block by block against the digests recorded
    /// as it was written, and the replica against the source disks; changes nothing unless
    /// --repair.
    #[command(
        after_help = "Examples:\n  lifeboat verify vm1\n  lifeboat verify vm1 --point 3\n  lifeboat verify vm1 --source --repair"
    )]
    Verify {
        /// The item.
        item: String,
        /// Check this recovery point instead of the live replica.
        #[arg(long, conflicts_with_all = ["source", "repair"])]
        point: Option<u64>,
        /// Compare the live replica with the source disks too (quiet or snapshotted
        /// sources: writes not replicated yet also differ).
        #[arg(long)]
        source: bool,
        /// Re-send exactly the blocks that differ from the source (a resync that knows the
        /// damage).
        #[arg(long)]
        repair: bool,
    },
    /// Act for an item another site owns (that site is lost): its replication there is
    /// fenced by the store from now on.
    #[command(after_help = "Examples:\n  lifeboat --site dr --store /mnt/replicas take-over vm1")]
    TakeOver {
        /// The item.
        item: String,
    },
    /// After fixing a non-recoverable error: try again.
    #[command(after_help = "Examples:\n  lifeboat repair vm1")]
    Repair {
        /// The item.
        item: String,
    },
    /// Carry on with interrupted or retrying work.
    #[command(after_help = "Examples:\n  lifeboat resume\n  lifeboat resume --now")]
    Resume {
        /// Do not wait for scheduled retries or cycles: run them now.
        #[arg(long)]
        now: bool,
    },
    /// Simulated guest writes on a source disk, recorded in an HRL log (as Hyper-V's
    /// change tracking would).
    #[command(
        after_help = "Examples:\n  lifeboat guest-write vm1 --disk 0 --log l1.hrl --writes 64 --size 64K"
    )]
    GuestWrite {
        /// The item.
        item: String,
        /// The disk index.
        #[arg(long)]
        disk: usize,
        /// The log to write.
        #[arg(long)]
        log: PathBuf,
        /// Number of writes.
        #[arg(long, default_value_t = 64)]
        writes: u32,
        /// Bytes per write (a multiple of 512).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        size: u64,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Cancel, restart or resume a job.
    #[command(after_help = "Examples:\n  lifeboat job cancel vm1#4\n  lifeboat job restart vm1#4")]
    Job {
        #[command(subcommand)]
        command: JobCmd,
    },
    /// Recovery plans.
    #[command(
        after_help = "Examples:\n  lifeboat plan create dr --group db --group app,web\n  lifeboat plan failover dr --test --out test"
    )]
    Plan {
        #[command(subcommand)]
        command: PlanCmd,
    },
    /// HRL log tools.
    #[command(
        after_help = "Examples:\n  lifeboat hrl inspect l1.hrl\n  lifeboat hrl apply l1.hrl l2.hrl --disk d0.raw"
    )]
    Hrl {
        #[command(subcommand)]
        command: HrlCmd,
    },
    /// Disk image tools.
    #[command(after_help = "Examples:\n  lifeboat disk inspect d0.vhdx")]
    Disk {
        #[command(subcommand)]
        command: DiskCmd,
    },
    /// Shell completions on stdout (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  lifeboat completions bash > /etc/bash_completion.d/lifeboat"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The manual page (roff) on stdout.
    #[command(after_help = "Examples:\n  lifeboat man > /usr/local/share/man/man1/lifeboat.1")]
    Man,
    /// `resync::diff` on two local files.
    #[command(
        after_help = "Examples:\n  lifeboat diff d0.raw replica.raw\n  lifeboat diff d0.raw replica.raw --apply --json"
    )]
    Diff {
        /// The source.
        source: PathBuf,
        /// The target.
        target: PathBuf,
        /// Block size.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        block_size: u64,
        /// Make TARGET equal to SOURCE by writing only the differing blocks.
        #[arg(long)]
        apply: bool,
    },
}

impl Cmd {
    /// The item a command is for, if it is for one.
    pub(crate) fn item(&self) -> Option<&str> {
        match self {
            Cmd::Protect { item, .. }
            | Cmd::Policy { item, .. }
            | Cmd::Replicate { item, .. }
            | Cmd::Resync { item, .. }
            | Cmd::Points { item }
            | Cmd::TestFailover { item, .. }
            | Cmd::TestFailoverCleanup { item }
            | Cmd::Failover { item, .. }
            | Cmd::ChangePoint { item, .. }
            | Cmd::Commit { item }
            | Cmd::Cancel { item }
            | Cmd::Failback { item, .. }
            | Cmd::Unprotect { item, .. }
            | Cmd::Reprotect { item }
            | Cmd::Verify { item, .. }
            | Cmd::TakeOver { item }
            | Cmd::Repair { item }
            | Cmd::GuestWrite { item, .. } => Some(item),
            Cmd::Status { item } | Cmd::Jobs { item } => item.as_deref(),
            Cmd::Job { command } => match command {
                JobCmd::Cancel { id } | JobCmd::Restart { id } | JobCmd::Resume { id } => {
                    Some(&id.item)
                }
            },
            _ => None,
        }
    }
}

/// Job commands.
#[derive(Debug, Subcommand)]
pub(crate) enum JobCmd {
    /// Cancel a running resync or recovery plan.
    #[command(after_help = "Examples:\n  lifeboat job cancel vm1#4")]
    Cancel {
        /// The job id (ITEM#N).
        id: lifeboat_replication::JobId,
    },
    /// Run a failed or cancelled job's operation again.
    #[command(after_help = "Examples:\n  lifeboat job restart vm1#4")]
    Restart {
        /// The job id (ITEM#N).
        id: lifeboat_replication::JobId,
    },
    /// Let a suspended job continue.
    #[command(after_help = "Examples:\n  lifeboat job resume dr#2")]
    Resume {
        /// The job id (ITEM#N).
        id: lifeboat_replication::JobId,
    },
}

/// Recovery plan commands.
#[derive(Debug, Subcommand)]
pub(crate) enum PlanCmd {
    /// Create (or replace) a plan: ordered groups of items, with pre and post actions.
    #[command(
        after_help = "Examples:\n  lifeboat plan create dr --group db --group app,web\n  lifeboat plan create dr --group db --pre '1/planned:script:/etc/lifeboat/stop-app.sh' --post '1:manual:check the database'"
    )]
    Create {
        /// The plan.
        plan: String,
        /// A group: ITEM[,ITEM...]; groups fail over in the order given.
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        /// A pre action: GROUP[/SCOPE,...]:manual:NAME or GROUP[/SCOPE,...]:script:COMMAND
        /// (GROUP from 1; SCOPE test, planned or unplanned; none for all).
        #[arg(long = "pre")]
        pre: Vec<String>,
        /// A post action, as --pre.
        #[arg(long = "post")]
        post: Vec<String>,
    },
    /// List the recovery plans.
    #[command(after_help = "Examples:\n  lifeboat plan list\n  lifeboat plan list --json")]
    List,
    /// A plan's groups, actions and latest job.
    #[command(after_help = "Examples:\n  lifeboat plan show dr\n  lifeboat plan show dr --json")]
    Show {
        /// The plan.
        plan: String,
    },
    /// Delete a plan (its items stay protected).
    #[command(after_help = "Examples:\n  lifeboat plan delete dr")]
    Delete {
        /// The plan.
        plan: String,
    },
    /// Delete the test-failover disks of every item of a plan (after `plan failover --test`).
    #[command(after_help = "Examples:\n  lifeboat plan cleanup dr")]
    Cleanup {
        /// The plan.
        plan: String,
    },
    /// Continue a plan waiting for a manual action.
    #[command(after_help = "Examples:\n  lifeboat plan resume dr")]
    Resume {
        /// The plan.
        plan: String,
    },
    /// Fail over every item of a plan, group by group.
    #[command(
        after_help = "Examples:\n  lifeboat plan failover dr --test --out test\n  lifeboat plan failover dr --planned --out recovered",
        group(clap::ArgGroup::new("kind").required(true).args(["test", "planned", "unplanned"]))
    )]
    Failover {
        /// The plan.
        plan: String,
        /// Test failover.
        #[arg(long)]
        test: bool,
        /// Planned failover.
        #[arg(long)]
        planned: bool,
        /// Unplanned failover.
        #[arg(long)]
        unplanned: bool,
        /// Output directory (one subdirectory per item).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite disk files already in the output directories.
        #[arg(long)]
        force: bool,
    },
}

/// HRL commands.
#[derive(Debug, Subcommand)]
pub(crate) enum HrlCmd {
    /// Header and every write: offset, length, BLAKE3 of the payload.
    #[command(
        after_help = "Examples:\n  lifeboat hrl inspect l1.hrl\n  lifeboat hrl inspect l1.hrl --json"
    )]
    Inspect {
        /// The log.
        file: PathBuf,
    },
    /// Replay logs onto a raw disk, chain order checked.
    #[command(after_help = "Examples:\n  lifeboat hrl apply l1.hrl l2.hrl --disk d0.raw")]
    Apply {
        /// The logs, in chain order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The disk image.
        #[arg(long)]
        disk: PathBuf,
    },
}

/// Parses sizes like `4096`, `64K`, `1M`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("not a size: {s}"))
}

/// Parses a rate: bytes per second as a size (`20M`), or bits per second with a decimal
/// unit (`100Mbit`, `1Gbit`, `500kbit`).
fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    if let Some(n) = t.strip_suffix("bit") {
        let (num, mul) = match n.char_indices().last() {
            Some((i, 'k' | 'K')) => (&n[..i], 1_000),
            Some((i, 'M')) => (&n[..i], 1_000_000),
            Some((i, 'G')) => (&n[..i], 1_000_000_000),
            _ => (n, 1),
        };
        return num
            .parse::<u64>()
            .ok()
            .and_then(|v| v.checked_mul(mul))
            .map(|bits| bits / 8)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("not a rate (e.g. 20M, 100Mbit): {s}"));
    }
    parse_size(t).map_err(|_| format!("not a rate (e.g. 20M, 100Mbit): {s}"))
}

/// Parses `90s`, `15m`, `2h` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("not a duration (e.g. 90s, 15m, 1h): {s}"))
}

/// Parses `DISK_INDEX=FILE`.
fn parse_log(s: &str) -> Result<(usize, PathBuf), String> {
    let (d, f) = s
        .split_once('=')
        .ok_or_else(|| format!("expected DISK_INDEX=FILE, got {s}"))?;
    let d = d
        .parse::<usize>()
        .map_err(|_| format!("not a disk index: {d}"))?;
    Ok((d, PathBuf::from(f)))
}

/// Exit statuses (docs/cli.md): 0 done, 1 an error, 2 a usage error (or, for `diff`, an
/// error), 3 a recovery plan waiting at a manual action; `diff` exits 1 when the files
/// differ, like `cmp`; 141 when standard output was closed early (`| head`).
pub(crate) mod exit {
    /// A plan stopped at a manual action.
    pub(crate) const PLAN_WAITING: u8 = 3;
    /// `diff`: the files differ.
    pub(crate) const DIFFERENT: u8 = 1;
    /// `diff`: an error (as `cmp`).
    pub(crate) const DIFF_TROUBLE: u8 = 2;
    /// Standard output closed early (as a process SIGPIPE ended).
    pub(crate) const CLOSED_PIPE: i32 = 141;
}

/// A command's outcome that is not plain success, as an exit status (its message, if any,
/// already printed).
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// A write to a closed standard output (`lifeboat status | head -2`) ends the process
/// quietly instead of with a panic's message.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if text.contains("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(exit::CLOSED_PIPE);
        }
        default(info);
    }));
}

/// Checks the container a URL names against Azure's naming rule before anything is sent.
fn check_container(url: &str) -> Result<()> {
    let rest = url.split_once("://").map(|(_, r)| r).with_context(|| {
        format!("{url} is not a URL (https://ACCOUNT.blob.core.windows.net/CONTAINER)")
    })?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Azurite and other emulators put the account in the path: http://HOST:PORT/ACCOUNT/CONTAINER.
    let emulator =
        host.starts_with("127.") || host.starts_with("localhost") || host.starts_with('[');
    let container = match (emulator, segments.as_slice()) {
        (false, [c]) | (true, [_, c]) => *c,
        _ => bail!(
            "{url} names no container: use https://ACCOUNT.blob.core.windows.net/CONTAINER (Azurite: http://127.0.0.1:10000/ACCOUNT/CONTAINER)"
        ),
    };
    let ok = (3..=63).contains(&container.len())
        && container
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !container.starts_with('-')
        && !container.ends_with('-')
        && !container.contains("--");
    if !ok {
        bail!(
            "container name {container:?} is not valid: 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit"
        );
    }
    Ok(())
}

/// Writes `bytes` to stdout; a closed pipe ends the process quietly, as for `println!`.
fn print_bytes(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(exit::CLOSED_PIPE)
        }
        r => Ok(r?),
    }
}

/// The subcommand's name as typed, nested ones included (`plan failover`).
fn command_name(m: &clap::ArgMatches) -> String {
    match m.subcommand() {
        Some((name, sub)) => match command_name(sub) {
            rest if rest.is_empty() => name.to_owned(),
            rest => format!("{name} {rest}"),
        },
        None => String::new(),
    }
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_pipe();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli.name = command_name(&matches);
    // The service logs what it does; a command only its errors (its output says the rest).
    let (level, json) = match &cli.command {
        Cmd::Run { log_format, .. } => ("info", *log_format == LogFormat::Json),
        _ => ("error", false),
    };
    let level = match cli.verbose {
        _ if cli.debug => "debug",
        0 => level,
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        log.json().init();
    } else {
        log.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lifeboat: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let diff = matches!(cli.command, Cmd::Diff { .. });
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Exit>() {
            Some(Exit(code)) => std::process::ExitCode::from(*code),
            None => {
                eprintln!("lifeboat: {}", reason(&e));
                match diff {
                    true => std::process::ExitCode::from(exit::DIFF_TROUBLE),
                    false => std::process::ExitCode::FAILURE,
                }
            }
        },
    }
}

/// An error and its causes on one line, each cause said once: the engine's errors name
/// their cause in their own text and also give it as their `source` (as a library's
/// caller printing only the error needs it), which `{:#}` would print twice.
fn reason(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.ends_with(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

async fn run(cli: Cli) -> Result<()> {
    if cli.json
        && matches!(
            cli.command,
            Cmd::Run { .. } | Cmd::Demo { .. } | Cmd::Completions { .. } | Cmd::Man
        )
    {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "--json has no meaning for `{}` (the service's log: --log-format json)",
                cli.name
            ),
        )
        .exit();
    }
    match &cli.command {
        Cmd::Hrl { command } => return tools::hrl(command, cli.json),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "lifeboat", &mut out);
            return print_bytes(&out);
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            return print_bytes(&out);
        }
        Cmd::Disk {
            command: DiskCmd::Inspect { file },
        } => return tools::inspect_disk(file, cli.json),
        Cmd::Diff {
            source,
            target,
            block_size,
            apply,
        } => return tools::diff(source, target, *block_size, *apply, cli.json),
        Cmd::Demo { dir } => return demo::run(dir, &cli.target).await,
        Cmd::Status { .. }
        | Cmd::Jobs { .. }
        | Cmd::Points { .. }
        | Cmd::Plan {
            command: PlanCmd::List | PlanCmd::Show { .. },
        } => return read::run(&cli).await,
        _ => {}
    }
    commands::check_first_protect(&cli)?;
    let store = open_store(&cli.target, true).await?;
    if let Cmd::Run {
        once,
        metrics,
        transfers,
        ..
    } = &cli.command
    {
        let opts = service::Options {
            once: *once,
            metrics: *metrics,
            transfers: usize::from(*transfers),
        };
        return service::run(&store, &cli.target.site, opts).await;
    }
    commands::run(store, &cli).await
}

/// A store, how messages name it, and whether it is Azure.
pub(crate) struct Store {
    /// The store.
    pub(crate) store: Arc<dyn PageStore>,
    /// A path, or the container URL without its query (a SAS signature is a secret).
    pub(crate) desc: String,
    /// Azure (machines there run on blobs) or the embedded store.
    pub(crate) azure: bool,
    /// How replicas are written: the bandwidth limit, shared by every writer.
    pub(crate) writer: lifeboat_pageblob::WriterConfig,
}

/// The embedded store's directory a target names (`None`: an Azure container).
pub(crate) fn local_store_dir(target: &Target) -> Option<PathBuf> {
    target.azure.is_none().then(|| {
        target
            .store
            .clone()
            .unwrap_or_else(|| target.site.join("store"))
    })
}

/// Opens the store a target names (creating the container on Azure when `create`; without
/// it, nothing is sent until the first request).
pub(crate) async fn open_store(target: &Target, create: bool) -> Result<Store> {
    let writer = lifeboat_pageblob::WriterConfig {
        throttle: target.max_bandwidth.map(lifeboat_pageblob::Throttle::new),
        ..Default::default()
    };
    match &target.azure {
        None => {
            let dir = local_store_dir(target).unwrap_or_default();
            let store = LocalStore::open(&dir)
                .with_context(|| format!("opening the store {}", dir.display()))?;
            let desc = dir.canonicalize().unwrap_or(dir).display().to_string();
            Ok(Store {
                store: Arc::new(store),
                desc,
                azure: false,
                writer,
            })
        }
        Some(url) => {
            if url.contains('?') && (target.account.is_some() || target.key.is_some()) {
                bail!(
                    "the container URL carries a SAS and --account/--key are given too: use one or the other"
                );
            }
            let credential = match (&target.account, &target.key) {
                (Some(account), Some(key)) => Credential::SharedKey {
                    account: account.clone(),
                    key: key.clone(),
                },
                _ if url.contains('?') => Credential::Sas,
                _ => bail!("--azure needs --account and --key, or a SAS URL"),
            };
            let desc = url.split('?').next().unwrap_or_default().to_owned();
            check_container(&desc)?;
            let store = AzureStore::new(url, credential)?;
            if create {
                store
                    .ensure_container()
                    .await
                    .with_context(|| format!("reaching {desc}"))?;
            }
            Ok(Store {
                store: Arc::new(store),
                desc,
                azure: true,
                writer,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_in_bytes_or_bits() {
        assert_eq!(super::parse_rate("20M"), Ok(20 << 20));
        assert_eq!(super::parse_rate("20M/s"), Ok(20 << 20));
        assert_eq!(super::parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(super::parse_rate("1Gbit"), Ok(125_000_000));
        assert_eq!(super::parse_rate("500kbit"), Ok(62_500));
        assert!(super::parse_rate("fast").is_err());
        assert!(super::parse_rate("0").is_err());
    }

    /// Every command's help ends with examples (docs/cli.md promises them).
    #[test]
    fn every_command_has_an_example() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in c.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                let help = sub
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if !help.contains("Examples:\n  lifeboat ") && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(
            &<super::Cli as clap::CommandFactory>::command(),
            "lifeboat",
            &mut missing,
        );
        assert!(missing.is_empty(), "no example: {missing:?}");
    }
}
