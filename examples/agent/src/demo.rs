//! `demo`, the main job, and `guest-write`, the stand-in for a running guest whose writes
//! Hyper-V's change tracking records in HRL logs.

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use lifeboat_engine::{Engine, Failover, Location};
use lifeboat_hrl::{LogWriter, WriterConfig};
use lifeboat_pageblob::{Condition, MAX_PUT, PageStore};
use lifeboat_replication::{Command, PointChoice, ProtectionState};
use lifeboat_source::SplitMix64;

use crate::commands;
use crate::host;
use crate::{Store, Target, open_store};

/// The demo's data: the workspace's seeded generator, shaped like a file system's bytes.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// Bytes that look like a file system's: text, structured records, random data.
    fn fill(&mut self, buf: &mut [u8]) {
        match self.below(3) {
            0 => {
                let words: [&[u8]; 8] = [
                    b"replica ",
                    b"lifeboat ",
                    b"disk ",
                    b"block ",
                    b"journal ",
                    b"write ",
                    b"sector ",
                    b"\n",
                ];
                let mut i = 0;
                while i < buf.len() {
                    let w = words[self.below(8) as usize];
                    let n = w.len().min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            1 => {
                let tag = self.next();
                for (k, rec) in buf.chunks_mut(64).enumerate() {
                    let v = (tag ^ k as u64).to_le_bytes();
                    for (j, b) in rec.iter_mut().enumerate() {
                        *b = if j < 8 { v[j] } else { 0 };
                    }
                }
            }
            _ => self.0.fill(buf),
        }
    }
}

fn guid(seed: &str) -> [u8; 16] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let h = blake3::hash(format!("{seed}/{nanos}/{}", std::process::id()).as_bytes());
    let mut g = [0u8; 16];
    g.copy_from_slice(&h.as_bytes()[..16]);
    g
}

/// Writes `writes` random writes of `size` bytes to the item's source disk `d` and
/// records them in a new HRL log at `log`, chained after the disk's last log (the
/// stand-in for a running guest whose writes Hyper-V's change tracking records).
#[allow(clippy::too_many_arguments)]
pub(crate) fn guest_write(
    e: &Engine,
    item: &str,
    d: usize,
    log: &Path,
    writes: u32,
    size: u64,
    seed: u64,
    quiet: bool,
) -> Result<()> {
    let v = e.item(item)?;
    let it = v.item;
    if !it.source_running {
        bail!("{item}'s source machine is shut down: it makes no writes");
    }
    let Some(disk) = it.disks.get(d) else {
        bail!(
            "{item} has {} disk(s); there is no disk {d}",
            it.disks.len()
        );
    };
    let len = disk.size;
    if size == 0 || !size.is_multiple_of(512) || size > len {
        bail!("--size must be a multiple of 512 and at most the disk's size");
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk.source)
        .with_context(|| format!("opening disk {}", disk.source.display()))?;
    if host::is_vhdx_file(&file)? {
        bail!(
            "{} is a VHDX: the stand-in guest writes raw images only (Hyper-V writes a VHDX)",
            disk.source.display()
        );
    }
    let t = &disk.tracking;
    // The stand-in's own chain: the newest log it generated in this tracking session
    // (taken or not), else where the session's chain stands.
    let key = format!("{item}/{d}");
    let site = e.site().dir().to_path_buf();
    let previous = host::generated(&site)
        .get(&key)
        .and_then(|(session, h)| (*session == t.session).then(|| unhex(h)).flatten())
        .unwrap_or(t.last_log);
    let unique_id = guid(&format!("{item}/{d}/{seed}"));
    let config = WriterConfig {
        unique_id,
        previous_unique_id: previous,
        vhd2_data_write_guid: t.write_guid,
        timestamp: hrl_now(),
        ..WriterConfig::default()
    };
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut w = LogWriter::new(BufWriter::new(out), config)?;
    let mut rng = Rng(SplitMix64::new(seed ^ 0x5EED));
    let mut buf = vec![0u8; size as usize];
    let sectors = (len - size) / 512 + 1;
    for _ in 0..writes {
        let at = rng.below(sectors) * 512;
        rng.fill(&mut buf);
        file.write_all_at(&buf, at)?;
        w.write(at, &buf, hrl_now())?;
    }
    file.sync_all()?;
    let (out, _) = w.finish(hrl_now())?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    host::set_generated(&site, &key, t.session, &lifeboat_engine::hex(&unique_id))?;
    if !quiet {
        crate::out::say!(
            "{item} disk {d}: {writes} write(s) of {size} bytes recorded in {}",
            log.display()
        );
    }
    Ok(())
}

/// Now, in an HRL timestamp: seconds since 2000-01-01 UTC.
fn hrl_now() -> u32 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    u32::try_from(unix.saturating_sub(lifeboat_hrl::HRL_EPOCH_UNIX_SECS)).unwrap_or(u32::MAX)
}

fn unhex(h: &str) -> Option<[u8; 16]> {
    let mut g = [0u8; 16];
    for (i, b) in g.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(g)
}

/// Creates a raw disk with a boot sector, text, records, random data and zero regions.
fn make_disk(path: &Path, len: u64, seed: u64) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(len)?;
    let mut rng = Rng(SplitMix64::new(seed));
    let mut mbr = [0u8; 512];
    mbr[..16].copy_from_slice(b"LIFEBOAT DEMO VM");
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    f.write_all_at(&mbr, 0)?;
    // About half the disk in 256 KiB regions; the rest stays zero (sparse).
    let region = 256u64 << 10;
    let mut buf = vec![0u8; region as usize];
    let mut at = region;
    while at + region <= len {
        if rng.below(2) == 0 {
            rng.fill(&mut buf);
            f.write_all_at(&buf, at)?;
        }
        at += region;
    }
    f.sync_all()?;
    Ok(())
}

/// Runs the demo in `dir` against the target's store.
pub(crate) async fn run(dir: &Path, target: &Target) -> Result<()> {
    // Only a directory an earlier demo made (or an empty one) is cleared.
    let marker = dir.join(".lifeboat-demo");
    if dir.exists() {
        let empty = fs::read_dir(dir)?.next().is_none();
        if !empty && !marker.exists() {
            bail!(
                "refusing to clear {}: it is not empty and no earlier demo made it",
                dir.display()
            );
        }
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir.join("vm"))?;
    fs::write(&marker, b"made by lifeboat demo; cleared by the next one\n")?;
    let target = Target {
        site: dir.join("site"),
        store: None,
        ..target.clone()
    };
    let store = open_store(&target, true).await?;
    demo(&store, dir, &target).await
}

struct Steps {
    start: Instant,
    n: u32,
}

impl Steps {
    fn step(&mut self, what: &str) {
        self.n += 1;
        println!(
            "\n== {}. {what} ({:.1} s)",
            self.n,
            self.start.elapsed().as_secs_f64()
        );
    }
}

/// BLAKE3 of the first `len` bytes of a file.
fn hash_file(path: &Path, len: u64) -> Result<blake3::Hash> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let have = f.metadata()?.len();
    if have < len {
        bail!("{} holds {have} bytes, expected {len}", path.display());
    }
    let mut h = blake3::Hasher::new();
    let mut at = 0;
    let mut buf = vec![0u8; 4 << 20];
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize())
}

/// BLAKE3 of the first `len` bytes of a blob.
async fn hash_blob(store: &dyn PageStore, blob: &str, len: u64) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MAX_PUT);
        h.update(&store.read(blob, None, at, n).await?);
        at += n;
    }
    Ok(h.finalize())
}

async fn hash_location(e: &Engine, l: &Location, len: u64) -> Result<blake3::Hash> {
    match l {
        Location::File { path } => hash_file(path, len),
        Location::Blob { name, .. } => hash_blob(&**e.store(), name, len).await,
    }
}

/// BLAKE3 of every source disk.
fn source_hashes(e: &Engine, item: &str) -> Result<Vec<blake3::Hash>> {
    e.item(item)?
        .item
        .disks
        .iter()
        .map(|d| hash_file(&d.source, d.size))
        .collect()
}

async fn verify_replica(e: &Engine, item: &str) -> Result<()> {
    let want = source_hashes(e, item)?;
    let it = e.item(item)?.item;
    for (d, h) in want.iter().enumerate() {
        let got = hash_blob(&**e.store(), &it.blob(d), it.disks[d].size).await?;
        ensure!(got == *h, "replica of disk {d} differs from the source");
        println!(
            "   verified: replica disk {d} = source (BLAKE3 {})",
            &h.to_hex()[..16]
        );
    }
    Ok(())
}

async fn verify_locations(
    e: &Engine,
    item: &str,
    ls: &[Location],
    want: &[blake3::Hash],
    what: &str,
) -> Result<()> {
    let it = e.item(item)?.item;
    ensure!(
        ls.len() == want.len(),
        "{what}: {} disk(s), expected {}",
        ls.len(),
        want.len()
    );
    for (d, (l, h)) in ls.iter().zip(want).enumerate() {
        let got = hash_location(e, l, it.disks[d].size).await?;
        ensure!(
            got == *h,
            "{what} disk {d} differs from the expected content"
        );
        println!(
            "   verified: {what} disk {d} (BLAKE3 {})",
            &h.to_hex()[..16]
        );
    }
    Ok(())
}

async fn demo(store: &Store, dir: &Path, target: &Target) -> Result<()> {
    let mut s = Steps {
        start: Instant::now(),
        n: 0,
    };
    let mut e = commands::open(store, &target.site, false).await?;
    let item = if store.azure {
        format!("demo{}", &blake3::hash(&guid("demo")).to_hex()[..8])
    } else {
        "demo-vm".to_string()
    };
    let vm = dir.join("vm");
    let logs = dir.join("logs");
    fs::create_dir_all(&logs)?;
    let disks: Vec<PathBuf> = vec![vm.join("disk0.raw"), vm.join("disk1.raw")];

    s.step("Generate a VM: two raw disks (48 MiB + 16 MiB) with boot sector, text, records, zero regions");
    make_disk(&disks[0], 48 << 20, 1)?;
    make_disk(&disks[1], 16 << 20, 2)?;

    s.step(&format!(
        "Protect {item}: initial replication, one disk at a time"
    ));
    let policy = commands::policy(crate::Frequency::S30, 24)?;
    commands::protect(&mut e, &item, &disks, policy, 64 << 10).await?;
    verify_replica(&e, &item).await?;

    let mut log_n = 0u32;
    let mut record = |e: &Engine, d: usize, writes: u32, size: u64| -> Result<PathBuf> {
        log_n += 1;
        let p = logs.join(format!("log{log_n:03}-disk{d}.hrl"));
        guest_write(
            e,
            &item.clone(),
            d,
            &p,
            writes,
            size,
            u64::from(log_n),
            false,
        )?;
        Ok(p)
    };

    for round in 1..=2 {
        s.step(&format!(
            "Delta cycle {round}: guest writes recorded in HRL logs, replicated"
        ));
        let l0 = record(&e, 0, 48, 64 << 10)?;
        let l1 = record(&e, 1, 16, 16 << 10)?;
        commands::replicate(&mut e, &item, &[(0, l0.clone()), (1, l1.clone())], false).await?;
        verify_replica(&e, &item).await?;
        if round == 2 {
            println!("   replaying the same logs applies nothing twice:");
            commands::replicate(&mut e, &item, &[(0, l0), (1, l1)], false).await?;
            verify_replica(&e, &item).await?;
        }
    }

    s.step("A log over 50 % of disk 1 marks the item resync-required; resync sends only differing blocks");
    let big = record(&e, 1, 160, 64 << 10)?;
    commands::replicate(&mut e, &item, &[(1, big)], false).await?;
    let st = e.protection(&item)?;
    ensure!(
        st == ProtectionState::ResyncRequired,
        "expected ResyncRequired, got {st:?}"
    );
    commands::resync(&mut e, &item, &[]).await?;
    verify_replica(&e, &item).await?;

    s.step("Test failover to the latest point, verify, clean up (replication untouched)");
    let want = source_hashes(&e, &item)?;
    let ex =
        |sub: &str| commands::export(Some(&dir.join(sub)), crate::Format::Raw, store.azure, false);
    e.test_failover(&item, PointChoice::Latest, ex("test-failover"))
        .await?;
    let test_disks = e.item(&item)?.item.test.disks.clone();
    verify_locations(&e, &item, &test_disks, &want, "test failover").await?;
    e.command(Command::TestFailoverCleanup { item: item.clone() })
        .await?;

    s.step("Planned failover: last guest writes, source shut down, final delta, zero loss");
    let last = record(&e, 0, 8, 4096)?;
    let want = source_hashes(&e, &item)?;
    e.failover(&item, Failover::Planned(vec![(0, last)]), ex("recovered"))
        .await?;
    let recovered = e.item(&item)?.item.failover.disks.clone();
    verify_locations(&e, &item, &recovered, &want, "recovered").await?;

    s.step("Commit: one recovery point remains");
    e.command(Command::Commit { item: item.clone() }).await?;
    let points = e.item(&item)?.status.points.len();
    ensure!(points == 1, "{points} points after commit");
    println!("   {points} recovery point");

    s.step("The recovered machine runs and writes; failback brings the on-premises disks up to it");
    let mut rng = Rng(SplitMix64::new(99));
    let mut buf = vec![0u8; 64 << 10];
    let lease = Condition::lease(e.site().id());
    for (d, l) in recovered.iter().enumerate() {
        let len = e.item(&item)?.item.disks[d].size;
        for _ in 0..8 {
            let at = rng.below(len / buf.len() as u64) * buf.len() as u64;
            rng.fill(&mut buf);
            match l {
                Location::File { path } => OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .write_all_at(&buf, at)?,
                Location::Blob { name, .. } => {
                    e.store()
                        .write_pages(
                            name,
                            at,
                            Bytes::copy_from_slice(&buf),
                            e.store().content_crc64(&buf),
                            lease,
                        )
                        .await?
                }
            }
        }
    }
    let mut want = Vec::new();
    for (d, l) in recovered.iter().enumerate() {
        want.push(hash_location(&e, l, e.item(&item)?.item.disks[d].size).await?);
    }
    let originals: Vec<PathBuf> = e
        .item(&item)?
        .item
        .disks
        .iter()
        .map(|d| d.source.clone())
        .collect();
    commands::failback(&mut e, &item, &originals, false).await?;
    let got = source_hashes(&e, &item)?;
    ensure!(
        got == want,
        "on-premises disks differ from the recovered disks after failback"
    );
    println!("   verified: on-premises disks = recovered disks");

    s.step("Reprotect: replication towards the recovery site resumes");
    e.reprotect(&item).await?;
    let st = e.protection(&item)?;
    ensure!(
        st == ProtectionState::Protected,
        "expected Protected, got {st:?}"
    );
    verify_replica(&e, &item).await?;

    s.step("Jobs");
    let jobs: Vec<_> = e.jobs().into_iter().filter(|j| j.item() == item).collect();
    crate::read::print_jobs(&jobs);
    println!(
        "\ndemo finished in {:.1} s: every step verified",
        s.start.elapsed().as_secs_f64()
    );
    Ok(())
}
