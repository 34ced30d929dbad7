//! `demo`, the main job, and `guest-write`, the stand-in for a running guest whose writes
//! Hyper-V's change tracking records in HRL logs.

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use lifeboat_hrl::{LogWriter, WriterConfig};
use lifeboat_pageblob::{Condition, PageStore, crc64};
use lifeboat_replication::{Command, PointChoice, ProtectionState};

use crate::agent::Agent;
use crate::commands;
use crate::disk;
use crate::state::{ItemState, Location};
use crate::{StoreKind, Target, open_store};

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
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
            _ => {
                for c in buf.chunks_mut(8) {
                    let v = self.next().to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
            }
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
/// records them in a new HRL log at `log`, chained after the disk's last log.
pub(crate) fn guest_write<S: PageStore + 'static>(
    a: &mut Agent<S>,
    item: &str,
    d: usize,
    log: &Path,
    writes: u32,
    size: u64,
    seed: u64,
) -> Result<()> {
    let it = a.item(item)?.clone();
    if !it.source_running {
        bail!("{item}'s source machine is shut down: it makes no writes");
    }
    let (path, len) = match (it.disks.get(d), it.sizes.get(d)) {
        (Some(p), Some(l)) => (p.clone(), *l),
        _ => bail!(
            "{item} has {} disk(s); there is no disk {d}",
            it.disks.len()
        ),
    };
    if size == 0 || !size.is_multiple_of(512) || size > len {
        bail!("--size must be a multiple of 512 and at most the disk's size");
    }
    let disk = disk::open_disk(&path, len)?;
    let t = &it.tracking[d];
    let unique_id = guid(&format!("{item}/{d}/{seed}"));
    let previous = if t.generated != [0; 16] {
        t.generated
    } else {
        t.last_log
    };
    let config = WriterConfig {
        unique_id,
        previous_unique_id: previous,
        vhd2_data_write_guid: t.write_guid,
        ..WriterConfig::default()
    };
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut w = LogWriter::new(BufWriter::new(file), config)?;
    let mut rng = Rng(seed ^ 0x5EED);
    let mut buf = vec![0u8; size as usize];
    let sectors = (len - size) / 512 + 1;
    for k in 0..writes {
        let at = rng.below(sectors) * 512;
        rng.fill(&mut buf);
        disk.write_all_at(&buf, at)?;
        w.write(at, &buf, k)?;
    }
    disk.sync_all()?;
    let (out, _) = w.finish(writes)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    a.item_mut(item)?.tracking[d].generated = unique_id;
    a.save()?;
    if !a.quiet {
        println!(
            "{item} disk {d}: {writes} write(s) of {size} bytes recorded in {}",
            log.display()
        );
    }
    Ok(())
}

/// Creates a raw disk with a boot sector, text, records, random data and zero regions.
fn make_disk(path: &Path, len: u64, seed: u64) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(len)?;
    let mut rng = Rng(seed);
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
        ..target.clone()
    };
    match open_store(&target).await? {
        StoreKind::Local(s) => demo(s, false, dir, &target).await,
        StoreKind::Azure(s) => demo(s, true, dir, &target).await,
    }
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

async fn hash_location<S: PageStore + 'static>(
    a: &Agent<S>,
    l: &Location,
    len: u64,
) -> Result<blake3::Hash> {
    match l {
        Location::File { path, .. } => disk::hash_file(path, len),
        Location::Blob { name, .. } => disk::hash_blob(&*a.store, name, None, len).await,
    }
}

/// BLAKE3 of every source disk.
fn source_hashes<S: PageStore + 'static>(a: &Agent<S>, item: &str) -> Result<Vec<blake3::Hash>> {
    let it = a.item(item)?;
    it.disks
        .iter()
        .zip(&it.sizes)
        .map(|(p, &l)| disk::hash_file(p, l))
        .collect()
}

async fn verify_replica<S: PageStore + 'static>(a: &Agent<S>, item: &str) -> Result<()> {
    let want = source_hashes(a, item)?;
    let it = a.item(item)?;
    for (d, h) in want.iter().enumerate() {
        let got = disk::hash_blob(&*a.store, &ItemState::blob(item, d), None, it.sizes[d]).await?;
        ensure!(got == *h, "replica of disk {d} differs from the source");
        println!(
            "   verified: replica disk {d} = source (BLAKE3 {})",
            &h.to_hex()[..16]
        );
    }
    Ok(())
}

async fn verify_locations<S: PageStore + 'static>(
    a: &Agent<S>,
    item: &str,
    ls: &[Location],
    want: &[blake3::Hash],
    what: &str,
) -> Result<()> {
    let it = a.item(item)?;
    ensure!(
        ls.len() == want.len(),
        "{what}: {} disk(s), expected {}",
        ls.len(),
        want.len()
    );
    for (d, (l, h)) in ls.iter().zip(want).enumerate() {
        let got = hash_location(a, l, it.sizes[d]).await?;
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

async fn demo<S: PageStore + 'static>(
    store: Arc<S>,
    azure: bool,
    dir: &Path,
    target: &Target,
) -> Result<()> {
    let mut s = Steps {
        start: Instant::now(),
        n: 0,
    };
    let mut a = Agent::open(store, &target.site, azure, false)?;
    let item = if azure {
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
    commands::protect(&mut a, &item, &disks, policy, 64 << 10).await?;
    verify_replica(&a, &item).await?;

    let mut log_n = 0u32;
    let mut record = |a: &mut Agent<S>, d: usize, writes: u32, size: u64| -> Result<PathBuf> {
        log_n += 1;
        let p = logs.join(format!("log{log_n:03}-disk{d}.hrl"));
        guest_write(a, &item.clone(), d, &p, writes, size, u64::from(log_n))?;
        Ok(p)
    };

    for round in 1..=2 {
        s.step(&format!(
            "Delta cycle {round}: guest writes recorded in HRL logs, replicated"
        ));
        let l0 = record(&mut a, 0, 48, 64 << 10)?;
        let l1 = record(&mut a, 1, 16, 16 << 10)?;
        commands::replicate(&mut a, &item, &[(0, l0.clone()), (1, l1.clone())]).await?;
        verify_replica(&a, &item).await?;
        if round == 2 {
            println!("   replaying the same logs applies nothing twice:");
            commands::replicate(&mut a, &item, &[(0, l0), (1, l1)]).await?;
            verify_replica(&a, &item).await?;
        }
    }

    s.step("A log over 50 % of disk 1 marks the item resync-required; resync sends only differing blocks");
    let big = record(&mut a, 1, 160, 64 << 10)?;
    commands::replicate(&mut a, &item, &[(1, big)]).await?;
    let st = a.protection(&item)?;
    ensure!(
        st == ProtectionState::ResyncRequired,
        "expected ResyncRequired, got {st:?}"
    );
    commands::resync(&mut a, &item, &[]).await?;
    verify_replica(&a, &item).await?;

    s.step("Test failover to the latest point, verify, clean up (replication untouched)");
    let want = source_hashes(&a, &item)?;
    let ex = |sub: &str| crate::state::Export {
        dir: Some(dir.join(sub)),
        vhd: false,
    };
    commands::test_failover(&mut a, &item, PointChoice::Latest, ex("test-failover")).await?;
    let test_disks = a.item(&item)?.test_disks.clone();
    verify_locations(&a, &item, &test_disks, &want, "test failover").await?;
    a.command(Command::TestFailoverCleanup { item: item.clone() })
        .await?;

    s.step("Planned failover: last guest writes, source shut down, final delta, zero loss");
    let last = record(&mut a, 0, 8, 4096)?;
    let want = source_hashes(&a, &item)?;
    let logs = [(0, last)];
    commands::failover(
        &mut a,
        &item,
        commands::Failover::Planned(&logs),
        ex("recovered"),
    )
    .await?;
    let recovered = a.item(&item)?.recovered.clone();
    verify_locations(&a, &item, &recovered, &want, "recovered").await?;

    s.step("Commit: one recovery point remains");
    a.command(Command::Commit { item: item.clone() }).await?;
    let now = a.now();
    let points = a
        .state
        .coordinator
        .status(&item, now)
        .map_or(0, |st| st.points.len());
    ensure!(points == 1, "{points} points after commit");
    println!("   {points} recovery point");

    s.step("The recovered machine runs and writes; failback brings the on-premises disks up to it");
    let mut rng = Rng(99);
    let mut buf = vec![0u8; 64 << 10];
    for (d, l) in recovered.iter().enumerate() {
        let len = a.item(&item)?.sizes[d];
        for _ in 0..8 {
            let at = rng.below(len / buf.len() as u64) * buf.len() as u64;
            rng.fill(&mut buf);
            match l {
                Location::File { path, .. } => OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .write_all_at(&buf, at)?,
                Location::Blob { name, .. } => {
                    a.store
                        .write_pages(
                            name,
                            at,
                            Bytes::copy_from_slice(&buf),
                            crc64(&buf),
                            Condition::NONE,
                        )
                        .await?
                }
            }
        }
    }
    let mut want = Vec::new();
    for (d, l) in recovered.iter().enumerate() {
        want.push(hash_location(&a, l, a.item(&item)?.sizes[d]).await?);
    }
    let originals = a.item(&item)?.disks.clone();
    commands::failback(&mut a, &item, &originals, false).await?;
    let got = source_hashes(&a, &item)?;
    ensure!(
        got == want,
        "on-premises disks differ from the recovered disks after failback"
    );
    println!("   verified: on-premises disks = recovered disks");

    s.step("Reprotect: replication towards the recovery site resumes");
    commands::reprotect(&mut a, &item).await?;
    let st = a.protection(&item)?;
    ensure!(
        st == ProtectionState::Protected,
        "expected Protected, got {st:?}"
    );
    verify_replica(&a, &item).await?;

    s.step("Jobs");
    let jobs: Vec<_> = a.state.coordinator.jobs().collect();
    commands::print_jobs(&a, &jobs);
    println!(
        "\ndemo finished in {:.1} s: every step verified",
        s.start.elapsed().as_secs_f64()
    );
    Ok(())
}
