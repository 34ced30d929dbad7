//! Integration tests, one binary:
//! - conformance of LocalStore, and its durability across reopen;
//! - PageWriter: alignment, coalescing, the 4 MiB cap, fencing, faults (via FaultyStore);
//! - the fixed-VHD footer, checked with qemu-img.

use std::ops::Range;
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_pageblob::conformance::{self, Skips};
use lifeboat_pageblob::{
    Change, Condition, Fault, FaultyStore, LocalStore, MAX_PUT, PAGE, PageStore, PageWriter,
    Throttle, WriteError, WriterConfig, vhd,
};

const MIB: u64 = 1 << 20;

fn random(len: usize, seed: u64) -> Vec<u8> {
    lifeboat_source::SplitMix64::new(seed).bytes(len)
}

fn store() -> (tempfile::TempDir, Arc<LocalStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(dir.path().join("site")).unwrap();
    (dir, Arc::new(s))
}

async fn read_all<S: PageStore>(s: &S, blob: &str, len: u64) -> Vec<u8> {
    s.read(blob, None, 0, len).await.unwrap().to_vec()
}

#[tokio::test]
async fn local_store_passes_the_conformance_suite() {
    let (_d, s) = store();
    conformance::run(&*s, "local", Skips::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn faulty_decorator_over_local_store_passes_conformance_when_no_fault_is_planned() {
    let (_d, s) = store();
    let f = FaultyStore::new(LocalStore::clone(&s));
    conformance::run(&f, "decorated", Skips::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn local_store_state_survives_reopen_and_snapshots_copy_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site");
    {
        let s = LocalStore::open(&root).unwrap();
        s.create("d", 64 * MIB, 3, &[("k".into(), "v".into())].into())
            .await
            .unwrap();
        let data = random(MIB as usize, 1);
        s.write_pages(
            "d",
            0,
            Bytes::from(data.clone()),
            Some(lifeboat_pageblob::crc64(&data)),
            Condition::NONE,
        )
        .await
        .unwrap();
        s.set_sequence_number("d", 4, Condition::sequence_number(3))
            .await
            .unwrap();
        let snap = s.snapshot("d", Condition::NONE).await.unwrap();
        // A snapshot of a 64 MiB blob allocates nothing until a page changes.
        assert!(!root.join("d").join(format!("snap-{snap}")).exists());
        s.write_pages(
            "d",
            0,
            Bytes::from(vec![9u8; 512]),
            Some(lifeboat_pageblob::crc64(&[9u8; 512])),
            Condition::NONE,
        )
        .await
        .unwrap();
        let preserved = std::fs::metadata(root.join("d").join(format!("snap-{snap}"))).unwrap();
        assert!(
            preserved.len() <= 512,
            "only the changed page was preserved: {}",
            preserved.len()
        );
    }
    let s = LocalStore::open(&root).unwrap();
    let p = s.properties("d").await.unwrap();
    assert_eq!(
        (p.size, p.sequence_number, p.metadata["k"].as_str()),
        (64 * MIB, 4, "v")
    );
    let snaps = s.snapshots("d").await.unwrap();
    assert_eq!(snaps.len(), 1);
    let old = s.read("d", Some(&snaps[0]), 0, 512).await.unwrap();
    assert_eq!(old[..], random(MIB as usize, 1)[..512]);
    assert_eq!(s.read("d", None, 0, 512).await.unwrap()[..], [9u8; 512]);
    assert!(matches!(
        s.create("../escape", 512, 0, &Default::default()).await,
        Err(lifeboat_pageblob::StoreError::BadName { .. })
    ));
}

/// Page writes between sync points are not fsynced; a power loss that tears the journal
/// they appended to leaves the blob as of its last sync point plus the whole lines before
/// the tear: its snapshots, their preserved pages and its sequence number whole.
#[tokio::test]
async fn a_torn_journal_after_page_writes_falls_back_to_its_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site");
    let s = LocalStore::open(&root).unwrap();
    s.create("d", 4 * MIB, 3, &Default::default())
        .await
        .unwrap();
    let data = random(MIB as usize, 2);
    let put = |s: &LocalStore, at: u64, bytes: Vec<u8>| {
        let crc = Some(lifeboat_pageblob::crc64(&bytes));
        let s = s.clone();
        async move {
            s.write_pages("d", at, Bytes::from(bytes), crc, Condition::NONE)
                .await
        }
    };
    put(&s, 0, data.clone()).await.unwrap();
    s.set_sequence_number("d", 4, Condition::NONE)
        .await
        .unwrap();
    let snap = s.snapshot("d", Condition::NONE).await.unwrap();
    // Overwrites the snapshot's pages (preserved first), then writes new ones.
    put(&s, 0, random(MIB as usize, 3)).await.unwrap();
    put(&s, MIB, data.clone()).await.unwrap();
    // Between sync points the pages written are listed (from the journal).
    let ranges = s.page_ranges("d", None).await.unwrap();
    assert_eq!(ranges, vec![0..2 * MIB]);
    // A power loss tears the journal's last line (the second write's).
    let journal = root.join("d").join("journal");
    let bytes = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, &bytes[..bytes.len() - 10]).unwrap();
    drop(s);
    let s = LocalStore::open(&root).unwrap();
    assert_eq!(s.properties("d").await.unwrap().sequence_number, 4);
    assert_eq!(s.snapshots("d").await.unwrap(), vec![snap.clone()]);
    assert_eq!(s.page_ranges("d", None).await.unwrap(), vec![0..MIB]);
    assert_eq!(
        s.read("d", Some(&snap), 0, MIB).await.unwrap()[..],
        data[..]
    );
    // Writes go on after the torn line (cut before the next one is appended).
    put(&s, 2 * MIB, data.clone()).await.unwrap();
    let s2 = LocalStore::open(&root).unwrap();
    assert_eq!(
        s2.page_ranges("d", None).await.unwrap(),
        vec![0..MIB, 2 * MIB..3 * MIB]
    );
    // A sync point includes the journal and empties it.
    s.set_sequence_number("d", 5, Condition::NONE)
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    let s3 = LocalStore::open(&root).unwrap();
    assert_eq!(
        s3.page_ranges("d", None).await.unwrap(),
        vec![0..MIB, 2 * MIB..3 * MIB]
    );
    assert_eq!(
        s3.read("d", Some(&snap), 0, MIB).await.unwrap()[..],
        data[..]
    );
}

/// One step of the embedded store's model test.
#[derive(Clone, Debug)]
enum StoreOp {
    Write { page: u64, pages: u64, seed: u64 },
    Clear { page: u64, pages: u64 },
    Prepare { page: u64, pages: u64 },
    Snapshot,
    DeleteSnapshot(usize),
    Reopen,
}

fn store_op() -> impl proptest::strategy::Strategy<Value = StoreOp> {
    use proptest::prelude::*;
    let span = (0u64..32).prop_flat_map(|p| (Just(p), 1..=(32 - p).min(8)));
    prop_oneof![
        4 => (span.clone(), any::<u64>())
            .prop_map(|((page, pages), seed)| StoreOp::Write { page, pages, seed }),
        1 => span.clone().prop_map(|(page, pages)| StoreOp::Clear { page, pages }),
        1 => span.prop_map(|(page, pages)| StoreOp::Prepare { page, pages }),
        1 => Just(StoreOp::Snapshot),
        1 => (0usize..4).prop_map(StoreOp::DeleteSnapshot),
        1 => Just(StoreOp::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// The embedded store against a byte model: after any mix of writes, clears,
    /// announced overwrites, snapshots taken and deleted, and reopenings (the journal
    /// replayed), the blob and every snapshot read exactly as the model says, the allocated
    /// ranges cover every non-zero page, and a diff from each snapshot covers every page
    /// that changed since it.
    #[test]
    fn local_store_matches_a_byte_model(ops in proptest::collection::vec(store_op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            const PAGES: u64 = 32;
            let dir = tempfile::tempdir().unwrap();
            let mut s = LocalStore::open_unsynced(dir.path()).unwrap();
            s.create("d", PAGES * PAGE, 0, &Default::default()).await.unwrap();
            let mut now = vec![0u8; (PAGES * PAGE) as usize];
            let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
            let bytes = |page: u64, pages: u64| (page * PAGE) as usize..((page + pages) * PAGE) as usize;
            for op in ops {
                match op {
                    StoreOp::Write { page, pages, seed } => {
                        let data = random((pages * PAGE) as usize, seed);
                        let crc = Some(lifeboat_pageblob::crc64(&data));
                        s.write_pages("d", page * PAGE, Bytes::from(data.clone()), crc, Condition::NONE)
                            .await
                            .unwrap();
                        now[bytes(page, pages)].copy_from_slice(&data);
                    }
                    StoreOp::Clear { page, pages } => {
                        s.clear_pages("d", page * PAGE, pages * PAGE, Condition::NONE).await.unwrap();
                        now[bytes(page, pages)].fill(0);
                    }
                    StoreOp::Prepare { page, pages } => {
                        let r = page * PAGE..(page + pages) * PAGE;
                        s.prepare_overwrite("d", &[r], Condition::NONE).await.unwrap();
                    }
                    StoreOp::Snapshot => {
                        let id = s.snapshot("d", Condition::NONE).await.unwrap();
                        snaps.push((id, now.clone()));
                    }
                    StoreOp::DeleteSnapshot(k) => {
                        if k < snaps.len() {
                            let (id, _) = snaps.remove(k);
                            s.delete_snapshot("d", &id).await.unwrap();
                        }
                    }
                    StoreOp::Reopen => s = LocalStore::open_unsynced(dir.path()).unwrap(),
                }
                let len = PAGES * PAGE;
                assert_eq!(read_all(&s, "d", len).await, now);
                let ranges = s.page_ranges("d", None).await.unwrap();
                for p in 0..PAGES {
                    let nonzero = now[bytes(p, 1)].iter().any(|&b| b != 0);
                    let listed = ranges.iter().any(|r| r.contains(&(p * PAGE)));
                    assert!(!nonzero || listed, "page {p} holds data but is not listed");
                }
                for (id, then) in &snaps {
                    let got = s.read("d", Some(id), 0, len).await.unwrap();
                    assert_eq!(&got[..], &then[..], "snapshot {id}");
                    let diff = s.diff_ranges("d", None, id).await.unwrap();
                    for p in 0..PAGES {
                        if then[bytes(p, 1)] != now[bytes(p, 1)] {
                            assert!(
                                diff.iter().any(|r| r.contains(&(p * PAGE))),
                                "page {p} changed since {id} but is not in {diff:?}"
                            );
                        }
                    }
                }
            }
        });
    }
}

#[tokio::test]
async fn writer_aligns_coalesces_caps_and_applies_exactly() {
    let (_d, s) = store();
    let f = Arc::new(FaultyStore::new(LocalStore::clone(&s)));
    let size = 32 * MIB;
    f.create("d", size, 0, &Default::default()).await.unwrap();
    let mut expected = vec![0u8; size as usize];
    // The replica's current bytes serve as the edge source for unaligned changes.
    let base = random(size as usize, 2);
    f.write_pages(
        "d",
        0,
        Bytes::from(base[..(4 * MIB) as usize].to_vec()),
        Some(lifeboat_pageblob::crc64(&base[..(4 * MIB) as usize])),
        Condition::NONE,
    )
    .await
    .unwrap();
    expected[..(4 * MIB) as usize].copy_from_slice(&base[..(4 * MIB) as usize]);
    let edges = expected.clone();

    let big = random((10 * MIB) as usize, 3);
    let changes = vec![
        Change::Data {
            offset: 100,
            data: Bytes::from(vec![1u8; 50]),
        }, // inside one page
        Change::Data {
            offset: 700,
            data: Bytes::from(vec![2u8; 1000]),
        }, // shares a page with the next
        Change::Data {
            offset: 1700,
            data: Bytes::from(vec![3u8; 300]),
        },
        Change::Zero {
            offset: 5000,
            len: 3 * MIB,
        }, // unaligned zero range
        Change::Data {
            offset: 8 * MIB,
            data: Bytes::from(big.clone()),
        }, // 10 MiB: three requests
    ];
    for c in &changes {
        match c {
            Change::Data { offset, data } => {
                expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
            }
            Change::Zero { offset, len } => {
                expected[*offset as usize..(*offset + *len) as usize].fill(0)
            }
        }
    }
    let writer = PageWriter::new(f.clone(), "d", WriterConfig::default());
    assert!(matches!(
        writer.apply_batch(0, changes.clone(), None).await,
        Err(WriteError::NeedEdges { .. })
    ));
    let seen_before = f.seen().len();
    let report = writer.apply_batch(0, changes, Some(&edges)).await.unwrap();
    assert_eq!(read_all(&*f, "d", size).await, expected);
    let sent = &f.seen()[seen_before..];
    for r in sent {
        assert_eq!(r.offset % PAGE, 0, "{r:?}");
        assert_eq!(r.len % PAGE, 0, "{r:?}");
        if r.kind == "put" {
            assert!(r.len <= MAX_PUT, "{r:?}");
        }
    }
    // Pages 0..2 (three changes) coalesce into one Put; the zero range is one Clear plus
    // its two edge pages; 10 MiB is three Puts.
    assert_eq!(report.clear_requests, 1);
    assert_eq!(report.put_requests, 1 + 2 + 3, "{sent:?}");
    assert_eq!(s.properties("d").await.unwrap().sequence_number, 1);
}

#[tokio::test]
async fn writer_refuses_replays_and_second_writers() {
    let (_d, s) = store();
    s.create("d", 4 * MIB, 0, &Default::default())
        .await
        .unwrap();
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    let batch = vec![Change::Data {
        offset: 0,
        data: Bytes::from(vec![5u8; 4096]),
    }];
    w.apply_batch(0, batch.clone(), None).await.unwrap();
    match w.apply_batch(0, batch.clone(), None).await {
        Err(WriteError::Fenced {
            expected: 0,
            found: 1,
        }) => {}
        other => panic!("{other:?}"),
    }
    // A second writer that thinks it is at 5.
    let other = PageWriter::new(s.clone(), "d", WriterConfig::default());
    assert!(matches!(
        other.apply_batch(5, batch, None).await,
        Err(WriteError::Fenced {
            expected: 5,
            found: 1
        })
    ));
    assert_eq!(s.properties("d").await.unwrap().sequence_number, 1);
}

fn fast_retries() -> WriterConfig {
    let mut c = WriterConfig::default();
    c.retry = c.retry.scaled(1, 1000);
    c
}

#[tokio::test]
async fn recoverable_faults_are_retried_and_the_blob_ends_exact() {
    // Writes one by one (a remote store's way) and in groups (the embedded store's: a
    // fault inside a group retries the whole group).
    for (fault, group) in [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Timeout,
        Fault::ResetAfterApply,
    ]
    .into_iter()
    .flat_map(|f| [(f, 0), (f, 8 * MIB)])
    {
        let (_d, s) = store();
        let f = Arc::new(FaultyStore::new(LocalStore::clone(&s)));
        f.group_writes(group);
        f.create("d", 16 * MIB, 0, &Default::default())
            .await
            .unwrap();
        let data = random((9 * MIB) as usize, 4);
        f.fail_nth(2, fault);
        f.fail_nth(3, fault);
        let w = PageWriter::new(f.clone(), "d", fast_retries());
        let report = w
            .apply_batch(
                0,
                vec![Change::Data {
                    offset: MIB,
                    data: Bytes::from(data.clone()),
                }],
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(report.retries, 2, "{fault:?} {group}");
        // Three Put Pages (4 + 4 + 1 MiB), whether sent alone or in groups.
        assert_eq!(report.put_requests, 3, "{fault:?} {group}");
        let got = f.read("d", None, MIB, data.len() as u64).await.unwrap();
        assert_eq!(got[..], data[..], "{fault:?} {group}");
        assert!(
            f.seen()
                .iter()
                .all(|r| r.len <= MAX_PUT && r.offset % PAGE == 0)
        );
    }
}

#[tokio::test]
async fn non_recoverable_faults_surface_as_errors() {
    for (fault, status) in [
        (Fault::Status(403), 403),
        (Fault::Status(404), 404),
        (Fault::Status(400), 400),
    ] {
        let (_d, s) = store();
        let f = Arc::new(FaultyStore::new(LocalStore::clone(&s)));
        f.create("d", 4 * MIB, 0, &Default::default())
            .await
            .unwrap();
        f.fail_nth(1, fault);
        let w = PageWriter::new(f.clone(), "d", fast_retries());
        match w
            .apply_batch(
                0,
                vec![Change::Data {
                    offset: 0,
                    data: Bytes::from(vec![1u8; 512]),
                }],
                None,
            )
            .await
        {
            Err(WriteError::Store {
                attempts: 1,
                source,
                ..
            }) => assert_eq!(source.status(), Some(status)),
            other => panic!("{fault:?}: {other:?}"),
        }
        // The batch did not complete: the sequence number did not move.
        assert_eq!(f.properties("d").await.unwrap().sequence_number, 0);
    }
    // An injected 412 is a fencing failure.
    let (_d, s) = store();
    let f = Arc::new(FaultyStore::new(LocalStore::clone(&s)));
    f.create("d", 4 * MIB, 0, &Default::default())
        .await
        .unwrap();
    f.fail_nth(1, Fault::Status(412));
    let w = PageWriter::new(f.clone(), "d", fast_retries());
    let r = w
        .apply_batch(
            0,
            vec![Change::Data {
                offset: 0,
                data: Bytes::from(vec![1u8; 512]),
            }],
            None,
        )
        .await;
    assert!(
        matches!(
            r,
            Err(WriteError::Store { .. }) | Err(WriteError::Fenced { .. })
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn scattered_one_percent_change_needs_the_minimum_number_of_requests() {
    let (_d, local) = store();
    // Requests sent one by one, as to Azure (a local store's groups cut runs where
    // changes meet: a put there costs nothing).
    let s = Arc::new(FaultyStore::new(LocalStore::clone(&local)));
    let size = 256 * MIB;
    s.create("d", size, 0, &Default::default()).await.unwrap();
    // 1 % of 64 KiB blocks, scattered (no two adjacent): 40 runs of one block.
    let blocks = size / 65536;
    let changes: Vec<Change> = (0..blocks / 100)
        .map(|k| Change::Data {
            offset: k * 100 * 65536 + (k % 7) * 4096,
            data: Bytes::from(vec![k as u8 + 1; 65536]),
        })
        .collect();
    let n = changes.len() as u64;
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    let report = w.apply_batch(0, changes, None).await.unwrap();
    assert_eq!(
        report.put_requests, n,
        "one request per scattered block is the minimum"
    );
    // The same blocks made contiguous coalesce into ceil(bytes / 4 MiB) requests.
    let contiguous: Vec<Change> = (0..n)
        .map(|k| Change::Data {
            offset: k * 65536,
            data: Bytes::from(vec![1u8; 65536]),
        })
        .collect();
    let report = w.apply_batch(1, contiguous, None).await.unwrap();
    assert_eq!(report.put_requests, (n * 65536).div_ceil(MAX_PUT));
}

#[tokio::test(start_paused = true)]
async fn throttle_spaces_requests_in_virtual_time() {
    let (_d, s) = store();
    s.create("d", 16 * MIB, 0, &Default::default())
        .await
        .unwrap();
    let config = WriterConfig {
        throttle: Some(Throttle::new(4 * MIB)),
        in_flight: 1,
        ..WriterConfig::default()
    };
    let w = PageWriter::new(s.clone(), "d", config);
    let start = tokio::time::Instant::now();
    w.apply_batch(
        0,
        vec![Change::Data {
            offset: 0,
            data: Bytes::from(vec![1u8; (12 * MIB) as usize]),
        }],
        None,
    )
    .await
    .unwrap();
    // Three 4 MiB requests at 4 MiB/s: the third may start after 2 s.
    assert!(
        start.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

/// Writers whose configs are clones of one share its throttle: two blobs written at once
/// take as long as their bytes at the one rate (virtual time).
#[tokio::test(start_paused = true)]
async fn writers_share_one_throttle() {
    let (_d, s) = store();
    for b in ["a", "b"] {
        s.create(b, 16 * MIB, 0, &Default::default()).await.unwrap();
    }
    let config = WriterConfig {
        throttle: Some(Throttle::new(4 * MIB)),
        ..WriterConfig::default()
    };
    let batch = || {
        vec![Change::Data {
            offset: 0,
            data: Bytes::from(vec![1u8; (8 * MIB) as usize]),
        }]
    };
    let (a, b) = (
        PageWriter::new(s.clone(), "a", config.clone()),
        PageWriter::new(s.clone(), "b", config),
    );
    let start = tokio::time::Instant::now();
    let (ra, rb) = tokio::join!(
        a.apply_batch(0, batch(), None),
        b.apply_batch(0, batch(), None)
    );
    ra.unwrap();
    rb.unwrap();
    // 16 MiB at 4 MiB/s: the last 4 MiB request may start after 3 s, not 1 s as with a
    // limit per writer.
    assert!(
        start.elapsed() >= std::time::Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

fn qemu_img(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("qemu-img").args(args).output().ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

#[tokio::test]
async fn replica_blob_with_footer_is_a_fixed_vhd_qemu_accepts() {
    let ci = std::env::var_os("CI").is_some();
    if qemu_img(&["--version"]).is_none() {
        assert!(!ci, "qemu-img is required in CI");
        eprintln!("skipping: qemu-img not installed");
        return;
    }
    let (dir, s) = store();
    let disk_len = 5 * MIB + 3 * 512; // not a whole MiB: the virtual size rounds up
    let disk = random(disk_len as usize, 5);
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, &disk).unwrap();
    let size = vhd::blob_size(disk_len);
    s.create("vm0", size, 0, &Default::default()).await.unwrap();
    let w = PageWriter::new(s.clone(), "vm0", WriterConfig::default());
    let footer = vhd::Footer::fixed(vhd::virtual_size(disk_len), [3; 16], 0).encode();
    w.apply_batch(
        0,
        vec![
            Change::Data {
                offset: 0,
                data: Bytes::from(disk.clone()),
            },
            Change::Data {
                offset: vhd::virtual_size(disk_len),
                data: Bytes::copy_from_slice(&footer),
            },
        ],
        None,
    )
    .await
    .unwrap();
    let path = s.data_path("vm0").unwrap();
    let path = path.to_str().unwrap();
    let (ok, info) = qemu_img(&["info", "-f", "vpc", "--output=json", path]).unwrap();
    assert!(ok, "{info}");
    assert!(
        info.contains(&format!(
            "\"virtual-size\": {}",
            vhd::virtual_size(disk_len)
        )),
        "{info}"
    );
    let (ok, cmp) = qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        path,
        raw.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "qemu-img compare: {cmp}");
    // And the footer parses back.
    let tail = s.read("vm0", None, size - 512, 512).await.unwrap();
    let f = vhd::Footer::decode(&tail).unwrap();
    assert_eq!(f.current_size, vhd::virtual_size(disk_len));
    // A corrupted footer is refused.
    let mut bad = footer;
    bad[100] ^= 1;
    assert!(vhd::Footer::decode(&bad).is_err());
}

#[test]
fn geometry_and_footer_match_what_qemu_img_writes() {
    if qemu_img(&["--version"]).is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img is required in CI"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mib in [10u64, 127, 300, 2048, 70_000] {
        let path = dir.path().join(format!("q{mib}.vhd"));
        let p = path.to_str().unwrap();
        // Without force_size, qemu rounds the size to what its CHS geometry covers.
        let (ok, out) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            p,
            &format!("{mib}M"),
        ])
        .unwrap();
        assert!(ok, "{out}");
        let bytes = std::fs::read(&path).map(|b| b[b.len() - 512..].to_vec());
        let tail = match bytes {
            Ok(t) => t,
            Err(_) => {
                // Large sparse images: read only the footer.
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open(&path).unwrap();
                f.seek(SeekFrom::End(-512)).unwrap();
                let mut t = vec![0u8; 512];
                f.read_exact(&mut t).unwrap();
                t
            }
        };
        let theirs = vhd::Footer::decode(&tail).unwrap();
        let (c, h, sct) = theirs.geometry;
        assert_eq!(
            theirs.current_size,
            u64::from(c) * u64::from(h) * u64::from(sct) * 512
        );
        assert_eq!(
            vhd::geometry(theirs.current_size),
            theirs.geometry,
            "{mib} MiB"
        );
    }
}

/// The Azurite endpoint the test script started (`AZURITE_BLOB_PORT`), if it answers;
/// with `CI=true` an unanswering Azurite fails the test instead of skipping it.
fn azurite() -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let ci = std::env::var_os("CI").is_some();
    let Some(port) = std::env::var("AZURITE_BLOB_PORT")
        .ok()
        .and_then(|p| p.parse::<u16>().ok())
    else {
        assert!(
            !ci,
            "CI=true but AZURITE_BLOB_PORT is not set: scripts/test starts Azurite"
        );
        eprintln!("skipping: AZURITE_BLOB_PORT not set");
        return None;
    };
    let mut answer = String::new();
    let ok = std::net::TcpStream::connect(("127.0.0.1", port))
        .and_then(|mut s| {
            write!(s, "GET /devstoreaccount1?comp=list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            s.read_to_string(&mut answer)
        })
        .is_ok();
    assert!(ok || !ci, "Azurite on port {port} does not answer");
    ok.then_some((port, answer))
}

fn azure_store(port: u16, container: &str) -> lifeboat_pageblob::AzureStore {
    lifeboat_pageblob::AzureStore::new(
        &format!(
            "http://127.0.0.1:{port}/{}/{container}",
            lifeboat_pageblob::AZURITE_ACCOUNT
        ),
        lifeboat_pageblob::Credential::SharedKey {
            account: lifeboat_pageblob::AZURITE_ACCOUNT.into(),
            key: lifeboat_pageblob::AZURITE_KEY.into(),
        },
    )
    .unwrap()
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// The writer sends the embedded store no checksum (its bytes never leave the process):
/// bytes changed between the writer and the store (a fault no in-process write has) land
/// changed, where a remote store refuses them (see
/// `azure_writer_retries_faults_and_fences_on_azurite`). Asked for checksums
/// (`FaultyStore::checksum_writes`, as the engine's simulation asks), the writer sends
/// each write's CRC-64: the changed write is refused and sent again, and lands whole.
#[tokio::test]
async fn a_write_changed_on_the_way_is_refused_only_when_checksummed() {
    for checksummed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(FaultyStore::new(LocalStore::open(dir.path()).unwrap()));
        if checksummed {
            f.checksum_writes();
        }
        f.create("d", 4 * MIB, 0, &Default::default())
            .await
            .unwrap();
        let crc = checksummed.then(|| lifeboat_pageblob::crc64(b"any"));
        assert_eq!(f.content_crc64(b"any"), crc);
        f.fail_nth(1, Fault::Corrupt);
        let data = random(MIB as usize, 8);
        let w = PageWriter::new(f.clone(), "d", fast_retries());
        let change = Change::Data {
            offset: 0,
            data: Bytes::from(data.clone()),
        };
        let report = w.apply_batch(0, vec![change], None).await.unwrap();
        assert_eq!(report.retries, u64::from(checksummed));
        let mut want = data.clone();
        if !checksummed {
            want[0] ^= 1;
        }
        assert!(f.read("d", None, 0, MIB).await.unwrap()[..] == want[..]);
    }
}

#[tokio::test]
async fn azure_store_passes_the_conformance_suite_on_azurite() {
    let Some((port, answer)) = azurite() else {
        return;
    };
    let store = azure_store(port, &unique("conf"));
    store.ensure_container().await.unwrap();
    // Azurite answers a page-range diff with the full list: skip only that assertion there.
    let skips = Skips {
        diff_ranges: answer.contains("Azurite"),
    };
    conformance::run(&store, "azure", skips).await.unwrap();
}

#[tokio::test]
async fn azure_writer_retries_faults_and_fences_on_azurite() {
    let Some((port, _)) = azurite() else { return };
    let store = azure_store(port, &unique("writer"));
    store.ensure_container().await.unwrap();
    let f = Arc::new(FaultyStore::new(store));
    f.create("d", 16 * MIB, 0, &Default::default())
        .await
        .unwrap();
    let data = random((9 * MIB + 4096) as usize, 6);
    f.fail_nth(1, Fault::Status(503));
    f.fail_nth(3, Fault::ResetAfterApply);
    // Bytes changed on the way: refused by the checksum the write carries, then sent again.
    f.fail_nth(4, Fault::Corrupt);
    let w = PageWriter::new(f.clone(), "d", fast_retries());
    let report = w
        .apply_batch(
            0,
            vec![Change::Data {
                offset: 512,
                data: Bytes::from(data.clone()),
            }],
            None,
        )
        .await
        .unwrap();
    assert_eq!(report.retries, 3);
    assert_eq!(
        f.read("d", None, 512, data.len() as u64).await.unwrap()[..],
        data[..]
    );
    assert!(
        f.seen()
            .iter()
            .all(|r| r.len <= MAX_PUT && r.offset % PAGE == 0 && r.len % PAGE == 0)
    );
    assert!(matches!(
        w.apply_batch(
            0,
            vec![Change::Zero {
                offset: 0,
                len: 512
            }],
            None
        )
        .await,
        Err(WriteError::Fenced {
            expected: 0,
            found: 1
        })
    ));
    f.fail_nth(f.seen().len() as u64 + 1, Fault::Status(403));
    assert!(matches!(
        w.apply_batch(
            1,
            vec![Change::Zero {
                offset: 0,
                len: 512
            }],
            None
        )
        .await,
        Err(WriteError::Store { attempts: 1, .. })
    ));
}

/// The parts of a batch sent at once share the writer's requests in flight: three parts of
/// four puts and a clear each, sent together by a writer allowing 2, have at most 2
/// requests under way at the store (each waits 20 ms there, so those out together are seen
/// together), and every page lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_sent_at_once_share_the_requests_in_flight() {
    let (_d, local) = store();
    let s = Arc::new(FaultyStore::new(LocalStore::clone(&local)));
    s.create("d", 3 * MIB, 0, &Default::default())
        .await
        .unwrap();
    s.pace(std::time::Duration::from_millis(20));
    let config = WriterConfig {
        in_flight: 2,
        max_request: 64 << 10,
        ..WriterConfig::default()
    };
    let w = PageWriter::new(s.clone(), "d", config);
    let part = |i: u64| {
        let at = i * MIB;
        vec![
            Change::Data {
                offset: at,
                data: Bytes::from(random(256 << 10, i)),
            },
            Change::Zero {
                offset: at + (512 << 10),
                len: 64 << 10,
            },
        ]
    };
    let open = w
        .begin(0, std::slice::from_ref(&(0..3 * MIB)))
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        w.send(&open, part(0), None),
        w.send(&open, part(1), None),
        w.send(&open, part(2), None)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    let report = w.finish(open).await.unwrap();
    assert_eq!((report.put_requests, report.clear_requests), (12, 3));
    assert_eq!(s.most_at_once(), 2, "requests under way at once");
    for i in 0..3 {
        let got = s.read("d", None, i * MIB, 256 << 10).await.unwrap();
        assert_eq!(&got[..], &random(256 << 10, i)[..], "part {i}");
    }
}

/// The digests a batch computes from the bytes it sends equal those of the replica as it
/// lands: random batches of aligned, unaligned, adjacent and zero changes (a batch never
/// overlaps itself: the writer refuses that), in a disk whose last block is short. Blocks
/// covered in part are read back after the batch (one batch in three), completed by
/// `read_rest` while the batch is sent (then no byte of the replica is read after it
/// lands), or the batch is sent in two parts at once, each with its own digests joined
/// (`PageWriter::begin`, `send`, `finish`; `BatchDigests::join`: blocks both parts touch
/// are read back).
#[tokio::test]
async fn batch_digests_from_sent_bytes_equal_the_replica_as_it_lands() {
    use lifeboat_pageblob::{BatchDigests, ReplicaDigests};
    use lifeboat_resync::{BlockSize, Signature};
    let (_d, local) = store();
    let s = Arc::new(FaultyStore::new(LocalStore::clone(&local)));
    let len = 4 * MIB + 8192;
    let bs = BlockSize::new(16384).unwrap();
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut digests = ReplicaDigests::zeroed(len, bs, 0);
    let mut edges = vec![0u8; len as usize];
    let mut rng = lifeboat_source::SplitMix64::new(0x2545_F491_4F6C_DD1D);
    let mut next = move |n: u64| rng.below(n);
    for seq in 0..40u64 {
        let mut changes = Vec::new();
        for _ in 0..1 + next(6) {
            let offset = match next(3) {
                0 => next(len / 16384) * 16384,
                1 => next(len / 512) * 512,
                _ => next(len - 1),
            };
            let n = (1 + next(70_000)).min(len - offset);
            changes.push(match next(4) {
                0 => Change::Zero { offset, len: n },
                _ => Change::Data {
                    offset,
                    data: Bytes::from(random(n as usize, seq * 100 + offset)),
                },
            });
        }
        changes.sort_by_key(|c| c.range().start);
        let mut end = 0;
        changes.retain(|c| {
            let keep = c.range().start >= end;
            if keep {
                end = c.range().end;
            }
            keep
        });
        let mut batch = BatchDigests::of(&changes, bs, len);
        let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
        let source: &[u8] = &edges;
        let edges_of = Some(&source as &dyn lifeboat_source::ReadAt);
        if seq % 3 == 0 {
            w.apply_batch(seq, changes, edges_of).await.unwrap();
        } else if seq % 3 == 2 {
            let pages = changes
                .iter()
                .map(|c| c.range().start / PAGE * PAGE..c.range().end.div_ceil(PAGE) * PAGE);
            let ranges = lifeboat_pageblob::merge_ranges(pages.collect());
            let (a, b): (Vec<_>, Vec<_>) = changes
                .into_iter()
                .enumerate()
                .partition(|(i, _)| i % 2 == 0);
            let [a, b]: [Vec<Change>; 2] = [a, b].map(|p| p.into_iter().map(|(_, c)| c).collect());
            batch = BatchDigests::of(&a, bs, len);
            batch.join(BatchDigests::of(&b, bs, len));
            let open = w.begin(seq, &ranges).await.unwrap();
            let (x, y) = tokio::join!(w.send(&open, a, edges_of), w.send(&open, b, edges_of));
            x.unwrap();
            y.unwrap();
            let at = s.properties("d").await.unwrap().sequence_number;
            assert_eq!(at, seq, "a batch's parts landed, not yet finished");
            let report = w.finish(open).await.unwrap();
            assert_eq!(s.properties("d").await.unwrap().sequence_number, seq + 1);
            assert!(
                report.put_requests + report.clear_requests > 0,
                "{report:?}"
            );
        } else {
            let all = changes.clone();
            let (sent, rest) = tokio::join!(
                w.apply_batch(seq, changes, Some(&source as &dyn lifeboat_source::ReadAt)),
                batch.read_rest(&*s, "d", &all)
            );
            sent.unwrap();
            rest.unwrap();
        }
        let reads_before = s.reads().len();
        digests.update_with(&*s, "d", batch, seq + 1).await.unwrap();
        if seq % 3 == 1 {
            let back: Vec<_> = s.reads()[reads_before..]
                .iter()
                .filter(|r| r.blob == "d")
                .cloned()
                .collect();
            assert!(back.is_empty(), "batch {seq} read back {back:?}");
        }
        let replica = read_all(&*s, "d", len).await;
        assert_eq!(
            digests.signature(&*s).await.unwrap(),
            Signature::compute(&replica, bs).unwrap(),
            "batch {seq}"
        );
        // Saved digests hold only the pages just written (the next batch reads the slot
        // pages it touches in part); loaded ones hold none.
        match seq % 4 {
            1 => digests.save(&*s, "d", None).await.unwrap(),
            3 => {
                digests.save(&*s, "d", None).await.unwrap();
                digests = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
                assert_eq!(digests.memory(), 0);
            }
            _ => {}
        }
        edges = replica;
    }
}

/// Parts of a batch that both write a block whole (overlapping: which lands last is the
/// writer's business) leave it to be read back; blocks one part alone gives stay known.
#[test]
fn joined_batch_digests_read_back_a_block_two_parts_write() {
    use lifeboat_pageblob::BatchDigests;
    use lifeboat_resync::{BlockSize, digest_block};
    let (bs, len) = (BlockSize::new(4096).unwrap(), 4 * 4096);
    let data = |offset: u64, n: usize, fill: u8| Change::Data {
        offset,
        data: Bytes::from(vec![fill; n]),
    };
    let mut joined = BatchDigests::of(&[data(0, 8192, 1)], bs, len);
    joined.join(BatchDigests::of(&[data(4096, 8192, 2)], bs, len));
    let mut known = joined.known().to_vec();
    known.sort_by_key(|&(b, _)| b);
    assert_eq!(
        known,
        vec![(0, digest_block(&[1; 4096])), (2, digest_block(&[2; 4096]))]
    );
    assert_eq!(joined.rest(), std::slice::from_ref(&(4096..8192)));
}

/// Saving digests over a snapshot of them (every recovery point takes one) announces
/// every slot page it rewrites in one `prepare_overwrite` before the first write: a store
/// whose snapshots copy pages on their first change preserves them all at once (two
/// fsyncs), not once per run of pages.
#[tokio::test]
async fn digests_saved_over_a_snapshot_announce_every_rewritten_page_at_once() {
    use lifeboat_pageblob::{ReplicaDigests, digests_blob};
    use lifeboat_resync::BlockSize;
    let (_d, local) = store();
    let s = Arc::new(FaultyStore::new(LocalStore::clone(&local)));
    let len = 64 * MIB;
    let bs = BlockSize::DEFAULT;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut digests = ReplicaDigests::zeroed(len, bs, 0);
    digests.save(&*s, "d", None).await.unwrap();
    s.snapshot(&digests_blob("d"), Condition::NONE)
        .await
        .unwrap();
    // Writes far apart: their slot pages make separate runs.
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    let touched: Vec<Range<u64>> = (0..6).map(|k| k * 10 * MIB..k * 10 * MIB + 4096).collect();
    let changes = touched
        .iter()
        .map(|r| Change::Data {
            offset: r.start,
            data: Bytes::from(vec![1u8; 4096]),
        })
        .collect();
    w.apply_batch(0, changes, None).await.unwrap();
    digests.update(&*s, "d", &touched, 1).await.unwrap();
    let (puts_before, prepared_before) = (s.seen().len(), s.prepared().len());
    digests.save(&*s, "d", None).await.unwrap();
    let name = digests_blob("d");
    let prepared: Vec<_> = s.prepared()[prepared_before..]
        .iter()
        .filter(|(b, _)| *b == name)
        .cloned()
        .collect();
    assert_eq!(prepared.len(), 1, "one announcement: {prepared:?}");
    let puts = &s.seen()[puts_before..];
    assert_eq!(puts.len(), 6, "one slot page per write: {puts:?}");
    for p in puts {
        let covered = prepared[0]
            .1
            .iter()
            .any(|r| r.start <= p.offset && p.offset + p.len <= r.end);
        assert!(covered, "{p:?} was not announced in {:?}", prepared[0].1);
    }
    let loaded = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
    let replica = read_all(&*s, "d", len).await;
    let want = lifeboat_resync::Signature::compute(&replica, bs).unwrap();
    assert_eq!(loaded.signature(&*s).await.unwrap(), want);
}

#[tokio::test]
async fn replica_digests_follow_batches_persist_and_drive_a_resync() {
    use lifeboat_pageblob::ReplicaDigests;
    use lifeboat_resync::{BlockSize, ExtentKind, Signature, diff};
    let (_d, s) = store();
    let len = 8 * MIB;
    let bs = BlockSize::DEFAULT;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut digests = ReplicaDigests::zeroed(len, bs, 0);
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    let changes = vec![
        Change::Data {
            offset: 0,
            data: Bytes::from(random(200_192, 7)),
        },
        Change::Data {
            offset: 5 * MIB + 512,
            data: Bytes::from(vec![3u8; 4096]),
        },
        Change::Zero {
            offset: 4 * 65536,
            len: 65536,
        },
    ];
    let touched: Vec<_> = changes.iter().map(Change::range).collect();
    w.apply_batch(0, changes, None).await.unwrap();
    digests.update(&*s, "d", &touched, 1).await.unwrap();
    let replica = read_all(&*s, "d", len).await;
    let want = Signature::compute(&replica, bs).unwrap();
    assert_eq!(digests.signature(&*s).await.unwrap(), want);
    digests.save(&*s, "d", None).await.unwrap();
    let loaded = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
    assert_eq!(loaded.signature(&*s).await.unwrap(), want);
    assert_eq!(loaded.sequence_number(), 1);

    // A batch without a digest update leaves the stored digests stale: load says so.
    w.apply_batch(
        1,
        vec![Change::Data {
            offset: 7 * MIB,
            data: Bytes::from(vec![9u8; 512]),
        }],
        None,
    )
    .await
    .unwrap();
    assert!(ReplicaDigests::load(&*s, "d").await.unwrap().is_none());
    assert_eq!(digests.verify(&*s, "d").await.unwrap(), [7 * MIB / 65536]);
    let rebuilt = ReplicaDigests::rebuild(&*s, "d", len, bs).await.unwrap();
    assert!(rebuilt.verify(&*s, "d").await.unwrap().is_empty());
    assert_eq!(rebuilt.sequence_number(), 2);

    // A batch that lands only in part (its pages, not its sequence number): the digests
    // marked before it no longer claim the blob's sequence number, and load says so.
    let mut rebuilt = rebuilt;
    rebuilt.save(&*s, "d", None).await.unwrap();
    assert!(ReplicaDigests::is_current(&*s, "d").await.unwrap());
    rebuilt.begin_batch(&*s, "d", None).await.unwrap();
    s.write_pages(
        "d",
        MIB,
        Bytes::from(vec![5u8; 512]),
        Some(lifeboat_pageblob::crc64(&[5u8; 512])),
        Condition::NONE,
    )
    .await
    .unwrap();
    assert_eq!(s.properties("d").await.unwrap().sequence_number, 2);
    assert!(!ReplicaDigests::is_current(&*s, "d").await.unwrap());
    assert!(ReplicaDigests::load(&*s, "d").await.unwrap().is_none());
    let rebuilt = ReplicaDigests::rebuild(&*s, "d", len, bs).await.unwrap();

    // Resync a source disk against the stored digests without reading the replica.
    let mut source = read_all(&*s, "d", len).await;
    source[3 * MIB as usize..3 * MIB as usize + 10].fill(0xEE);
    source[6 * MIB as usize..7 * MIB as usize].fill(0);
    let delta = diff(&source, &rebuilt.signature(&*s).await.unwrap()).unwrap();
    let changes: Vec<Change> = delta
        .extents
        .iter()
        .map(|e| match e.kind {
            ExtentKind::Data => Change::Data {
                offset: e.offset,
                data: Bytes::copy_from_slice(
                    &source[e.offset as usize..(e.offset + e.len) as usize],
                ),
            },
            ExtentKind::Zero => Change::Zero {
                offset: e.offset,
                len: e.len,
            },
        })
        .collect();
    assert_eq!(delta.data_bytes(), 65536);
    w.apply_batch(2, changes, None).await.unwrap();
    assert_eq!(read_all(&*s, "d", len).await, source);
}

#[tokio::test]
async fn azure_store_with_an_account_sas_on_azurite() {
    let Some((port, _)) = azurite() else { return };
    let sas = lifeboat_pageblob::account_sas(
        lifeboat_pageblob::AZURITE_ACCOUNT,
        lifeboat_pageblob::AZURITE_KEY,
        "2099-01-01T00:00:00Z",
    )
    .unwrap();
    let url = format!(
        "http://127.0.0.1:{port}/{}/{}?{sas}",
        lifeboat_pageblob::AZURITE_ACCOUNT,
        unique("sas")
    );
    let s = lifeboat_pageblob::AzureStore::new(&url, lifeboat_pageblob::Credential::Sas).unwrap();
    s.ensure_container().await.unwrap();
    s.create("d", 4 * MIB, 0, &Default::default())
        .await
        .unwrap();
    let w = PageWriter::new(Arc::new(s), "d", WriterConfig::default());
    w.apply_batch(
        0,
        vec![Change::Data {
            offset: 4096,
            data: Bytes::from(vec![6u8; 8192]),
        }],
        None,
    )
    .await
    .unwrap();
    // A wrong signature is refused, non-recoverably.
    let bad = url.replace("sig=", "sig=x");
    let s = lifeboat_pageblob::AzureStore::new(&bad, lifeboat_pageblob::Credential::Sas).unwrap();
    let e = s.properties("d").await.unwrap_err();
    assert_eq!(
        lifeboat_retry::Classify::class(&e),
        lifeboat_retry::Class::NonRecoverable,
        "{e}"
    );
}

/// An Entra ID stand-in: an unsigned JWT with the claims Azure Storage checks (Azurite in
/// `--oauth basic` mode validates audience, issuer and times, not the signature).
#[derive(Debug)]
struct TestToken;

#[async_trait::async_trait]
impl azure_core::credentials::TokenCredential for TestToken {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        use base64::Engine as _;
        assert_eq!(scopes, ["https://storage.azure.com/.default"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64.encode(format!(
            r#"{{"aud":"https://storage.azure.com","iss":"https://sts.windows.net/ab1f708d-50f6-404c-a006-d71b2ac7a606/","iat":{},"nbf":{},"exp":{},"oid":"lifeboat-test"}}"#,
            now - 60,
            now - 60,
            now + 3600
        ));
        Ok(azure_core::credentials::AccessToken::new(
            format!("{header}.{claims}."),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

/// The production path: a bearer token over https (Azurite with `--oauth basic`, its test
/// CA trusted by the transport) passes the same conformance suite.
#[tokio::test]
async fn azure_store_with_a_token_credential_over_https_passes_the_conformance_suite() {
    let ci = std::env::var_os("CI").is_some();
    let (Ok(port), Ok(ca)) = (
        std::env::var("AZURITE_OAUTH_BLOB_PORT"),
        std::env::var("AZURITE_OAUTH_CA"),
    ) else {
        assert!(
            !ci,
            "CI=true but scripts/test did not start Azurite with OAuth"
        );
        eprintln!("skipping: AZURITE_OAUTH_BLOB_PORT not set");
        return;
    };
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_merge([ca])
        .build()
        .unwrap();
    let transport = azure_core::http::Transport::new(std::sync::Arc::new(client));
    let url = format!(
        "https://127.0.0.1:{port}/{}/{}",
        lifeboat_pageblob::AZURITE_ACCOUNT,
        unique("token")
    );
    let store = lifeboat_pageblob::AzureStore::with_transport(
        &url,
        lifeboat_pageblob::Credential::Token(std::sync::Arc::new(TestToken)),
        Some(transport),
    )
    .unwrap();
    store.ensure_container().await.unwrap();
    conformance::run(&store, "token", Skips { diff_ranges: true })
        .await
        .unwrap();

    // Without the token (anonymous) the same request is refused: the token is what is used.
    let bad = lifeboat_pageblob::AzureStore::with_transport(
        &url,
        lifeboat_pageblob::Credential::Sas,
        Some(azure_core::http::Transport::new(std::sync::Arc::new(
            reqwest::Client::builder()
                .tls_certs_merge([reqwest::Certificate::from_pem(
                    &std::fs::read(std::env::var("AZURITE_OAUTH_CA").unwrap()).unwrap(),
                )
                .unwrap()])
                .build()
                .unwrap(),
        ))),
    )
    .unwrap();
    let e = bad
        .create("anonymous", 512, 0, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e.status(), Some(401 | 403 | 404)), "{e:?}");
}

/// With the `azure_identity` feature, production credentials are one call away (whether
/// they yield a token depends on the machine: a managed identity, or `az login`).
#[cfg(feature = "azure_identity")]
#[test]
fn azure_identity_credentials_are_token_credentials() {
    for c in [
        lifeboat_pageblob::Credential::developer_tools().unwrap(),
        lifeboat_pageblob::Credential::managed_identity().unwrap(),
    ] {
        assert!(
            matches!(c, lifeboat_pageblob::Credential::Token(_)),
            "{c:?}"
        );
    }
}

/// `known_zero` says a range is zeros only where every block it touches is recorded as
/// zeros, read from the stored slots as from those held: never for data, an unknown block,
/// an empty range or one past the end.
#[tokio::test]
async fn replica_digests_know_which_ranges_hold_zeros() {
    use lifeboat_pageblob::ReplicaDigests;
    use lifeboat_resync::BlockSize;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(LocalStore::open(dir.path()).unwrap());
    let len = 64 * MIB;
    let bs = BlockSize::DEFAULT; // 64 KiB
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    let at = 10 * MIB + 4096; // inside block 160
    w.apply_batch(
        0,
        vec![Change::Data {
            offset: at,
            data: Bytes::from(random(4096, 9)),
        }],
        None,
    )
    .await
    .unwrap();
    let mut d = ReplicaDigests::rebuild(&*s, "d", len, bs).await.unwrap();
    d.save(&*s, "d", None).await.unwrap();
    let block = 64 << 10;
    let ranges = [
        0..MIB,                     // zeros
        10 * MIB..10 * MIB + 512,   // the written block, not the written bytes
        10 * MIB - 512..10 * MIB,   // the block before it
        10 * MIB + block..11 * MIB, // after it
        9 * MIB..11 * MIB,          // across it
        5 * MIB..5 * MIB,           // empty
        len - 4096..len + 4096,     // past the end
        30 * MIB..30 * MIB + 1,     // to be forgotten
        28 * MIB..32 * MIB,         // slot pages around it
    ];
    let want = [true, false, true, true, false, false, false, true, true];
    assert_eq!(d.known_zero(&*s, &ranges).await.unwrap(), want);
    // Loaded again: the slots are read from the store.
    let mut loaded = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
    assert_eq!(loaded.known_zero(&*s, &ranges).await.unwrap(), want);
    loaded
        .forget(&*s, std::slice::from_ref(&ranges[7]), 1)
        .await
        .unwrap();
    let got = loaded.known_zero(&*s, &ranges).await.unwrap();
    assert_eq!(got[..7], want[..7]);
    assert!(!got[7], "an unknown block is not zero");
    assert_eq!(loaded.unknown(&*s).await.unwrap(), [30 * MIB / block]);
    assert!(d.unknown(&*s).await.unwrap().is_empty());
    assert!(!got[8], "nor a range holding one");
    // Checked against the blob's bytes: listed apart from damage (it matches none).
    let actual = ReplicaDigests::scan_at(&*s, "d", None, len, bs, 1)
        .await
        .unwrap();
    let c = loaded.check(&*s, &actual).await.unwrap();
    assert_eq!((c.damaged, c.unknown), (vec![], vec![30 * MIB / block]));
}

/// Asking which ranges hold zeros keeps none of the slot pages it read: a copy of a thin
/// disk asks it of every block, and the memory held follows what batches write.
#[tokio::test]
async fn known_zero_holds_no_pages_it_read() {
    use lifeboat_pageblob::ReplicaDigests;
    use lifeboat_resync::BlockSize;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(LocalStore::open(dir.path()).unwrap());
    let len = 256 * MIB;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut d = ReplicaDigests::rebuild(&*s, "d", len, BlockSize::DEFAULT)
        .await
        .unwrap();
    d.save(&*s, "d", None).await.unwrap();
    let held = d.memory();
    let pieces: Vec<_> = (0..len / MIB).map(|i| i * MIB..(i + 1) * MIB).collect();
    assert!(d.known_zero(&*s, &pieces).await.unwrap().iter().all(|&z| z));
    assert_eq!(d.memory(), held, "slot pages read to answer were kept");
}

/// A range held first (`hold_range`) is asked about a part at a time reading each slot
/// page once: digests loaded from their blob (which may hold any page) asked about a
/// 4 MiB piece's four 1 MiB segments read the piece's slot pages in one request, and then
/// none; without it each segment's page is read again (four requests); held pages go at
/// the next save, which keeps only what it wrote.
#[tokio::test]
async fn a_range_held_is_asked_about_reading_each_slot_page_once() {
    use lifeboat_pageblob::{ReplicaDigests, digests_blob};
    use lifeboat_resync::BlockSize;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(FaultyStore::new(LocalStore::open(dir.path()).unwrap()));
    let len = 64 * MIB;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut d = ReplicaDigests::rebuild(&*s, "d", len, BlockSize::DEFAULT)
        .await
        .unwrap();
    d.save(&*s, "d", None).await.unwrap();
    let name = digests_blob("d");
    let reads = || s.reads().iter().filter(|r| r.blob == name).count();
    let segments: Vec<_> = (8..12).map(|i| i * MIB..(i + 1) * MIB).collect();
    for hold in [true, false] {
        let mut loaded = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
        let (before, held) = (reads(), loaded.memory());
        if hold {
            loaded.hold_range(&*s, 8 * MIB..12 * MIB).await.unwrap();
            assert_eq!(reads() - before, 1, "the piece's pages in one request");
        }
        for seg in &segments {
            let known = loaded.known_zero(&*s, std::slice::from_ref(seg)).await;
            assert_eq!(known.unwrap(), [true]);
        }
        let want = if hold { 1 } else { 4 };
        assert_eq!(reads() - before, want, "digests reads (held first: {hold})");
        loaded.save(&*s, "d", None).await.unwrap();
        assert_eq!(loaded.memory(), held, "pages held after the save");
    }
}

/// Digests that made their blob read none of its pages they never wrote (zeros), and
/// read back those they wrote in an earlier save and no longer hold.
#[tokio::test]
async fn digests_read_only_the_pages_their_blob_may_hold() {
    use lifeboat_pageblob::{BatchDigests, ReplicaDigests, digests_blob};
    use lifeboat_resync::BlockSize;
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(FaultyStore::new(LocalStore::open(dir.path()).unwrap()));
    let (len, bs, block) = (64 * MIB, BlockSize::DEFAULT, 64 << 10);
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut d = ReplicaDigests::rebuild(&*s, "d", len, bs).await.unwrap();
    d.save(&*s, "d", None).await.unwrap();
    // Two batches of one block each, in slot pages 0 and 37, saved one after the other:
    // only the second's page stays held.
    for (seq, b) in [(0, 0u64), (1, 600)] {
        let changes = vec![Change::Data {
            offset: b * block,
            data: Bytes::from(random(block as usize, b)),
        }];
        let batch = BatchDigests::of(&changes, bs, len);
        PageWriter::new(s.clone(), "d", WriterConfig::default())
            .apply_batch(seq, changes, None)
            .await
            .unwrap();
        d.update_with(&*s, "d", batch, seq + 1).await.unwrap();
        d.save(&*s, "d", None).await.unwrap();
    }
    let name = digests_blob("d");
    let reads = |s: &FaultyStore<LocalStore>| s.reads().iter().filter(|r| r.blob == name).count();
    let before = reads(&s);
    let at = |b: u64| b * block..(b + 1) * block;
    let known = d
        .known_zero(&*s, &[at(0), at(300), at(600), at(1023)])
        .await
        .unwrap();
    assert_eq!(known, [false, true, false, true]);
    assert_eq!(reads(&s) - before, 1, "only page 0 is read back");
}

/// Saving digests after a small batch writes only the slot pages of the touched blocks
/// (the cost follows the batch, not the disk), and what loads back is what was saved.
#[tokio::test]
async fn replica_digests_save_writes_only_the_touched_slots() {
    use lifeboat_pageblob::{FaultyStore, ReplicaDigests, digests_blob};
    use lifeboat_resync::{BlockSize, Signature};
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(FaultyStore::new(LocalStore::open(dir.path()).unwrap()));
    let len = 256 * MIB; // 4096 blocks of 64 KiB: 128 KiB of slots
    let bs = BlockSize::DEFAULT;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    w.apply_batch(
        0,
        vec![Change::Data {
            offset: 0,
            data: Bytes::from(random(MIB as usize, 3)),
        }],
        None,
    )
    .await
    .unwrap();
    let mut digests = ReplicaDigests::rebuild(&*s, "d", len, bs).await.unwrap();
    digests.save(&*s, "d", None).await.unwrap();
    let before = s.seen().len();
    // One block far into the disk changes.
    let at = 200 * MIB + 4096;
    w.apply_batch(
        1,
        vec![Change::Data {
            offset: at,
            data: Bytes::from(vec![1u8; 4096]),
        }],
        None,
    )
    .await
    .unwrap();
    let touched = [Range {
        start: at,
        end: at + 4096,
    }];
    digests.update(&*s, "d", &touched, 2).await.unwrap();
    digests.save(&*s, "d", None).await.unwrap();
    let writes: Vec<_> = s.seen()[before..]
        .iter()
        .filter(|x| x.kind == "put")
        .cloned()
        .collect();
    // The data write and one 512-byte slot page: block 3200's slot is at byte 3200 * 32,
    // in page 200 of the digests blob.
    let slot_page = (at / 65536) * 32 / 512 * 512;
    assert!(
        writes.iter().any(|x| x.offset == slot_page && x.len == 512),
        "{writes:?}"
    );
    assert_eq!(writes.len(), 2, "{writes:?}");
    let loaded = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
    assert_eq!(loaded.sequence_number(), 2);
    let replica = read_all(&*s, "d", len).await;
    let want = Signature::compute(&replica, bs).unwrap();
    assert_eq!(loaded.signature(&*s).await.unwrap(), want);
    assert_eq!(digests.signature(&*s).await.unwrap(), want);
    assert!(s.inner().properties(&digests_blob("d")).await.is_ok());
}

/// Two stores on one root (as two processes) writing pages of one blob in turn, each with
/// the state it last saw cached: every write and every sequence number of the other is
/// seen, whether the other's last step was a page write (the journal) or a sync point.
#[tokio::test]
async fn local_stores_sharing_a_root_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        LocalStore::open(dir.path()).unwrap(),
        LocalStore::open(dir.path()).unwrap(),
    );
    a.create("d", 64 * 512, 0, &Default::default())
        .await
        .unwrap();
    let page = Bytes::from(vec![7u8; 512]);
    let crc = Some(lifeboat_pageblob::crc64(&page));
    let mut seq = 0;
    for i in 0..32u64 {
        let (me, other) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        // A page write alone appends to the journal; every third step also moves the
        // sequence number, every fifth makes a sync point.
        let cond = Condition::sequence_number(seq);
        me.write_pages("d", i * 1024, page.clone(), crc, cond)
            .await
            .unwrap();
        let seen = other.page_ranges("d", None).await.unwrap();
        assert_eq!(seen.len() as u64, i + 1, "after write {i}: {seen:?}");
        if i % 3 == 0 {
            seq += 1;
            me.set_sequence_number("d", seq, Condition::default())
                .await
                .unwrap();
        }
        if i % 5 == 0 {
            me.sync("d").await.unwrap();
        }
        assert_eq!(other.properties("d").await.unwrap().sequence_number, seq);
    }
}

/// Two processes sharing one embedded store (each with its own handle, hence its own OS
/// lock): of many writers replacing the same version of a document at once, exactly one
/// wins, and no write is torn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_store_handles_race_on_one_document_and_one_wins() {
    use lifeboat_pageblob::Expect;
    let dir = tempfile::tempdir().unwrap();
    let first = LocalStore::open(dir.path()).unwrap();
    let v0 = first
        .put_doc(
            "cat/items/vm.json",
            Bytes::from_static(b"0"),
            Expect::Absent,
            None,
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let root = dir.path().to_path_buf();
        let v0 = v0.clone();
        tasks.push(tokio::spawn(async move {
            let s = LocalStore::open(root).unwrap();
            s.put_doc(
                "cat/items/vm.json",
                Bytes::from(vec![b'a' + i; 4096]),
                Expect::Version(v0),
                None,
            )
            .await
        }));
    }
    let mut won = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(_) => won.push(i),
            Err(lifeboat_pageblob::StoreError::Changed { .. }) => {}
            Err(e) => panic!("writer {i}: {e}"),
        }
    }
    assert_eq!(won.len(), 1, "winners: {won:?}");
    let doc = first.get_doc("cat/items/vm.json").await.unwrap().unwrap();
    assert_eq!(doc.data[..], vec![b'a' + won[0] as u8; 4096][..]);
}

/// Plain http only to this machine (an emulator).
#[tokio::test]
async fn azure_store_requires_https_but_for_this_machine() {
    use lifeboat_pageblob::{AzureStore, Credential};
    for url in [
        "http://example.com/c",
        "http://10.0.0.1/devstoreaccount1/c",
        "ftp://127.0.0.1/c",
    ] {
        let r = AzureStore::new(url, Credential::Sas);
        assert!(
            matches!(&r, Err(lifeboat_pageblob::StoreError::Config { what: "container URL", detail }) if detail.contains("https")),
            "{url}: {r:?}"
        );
    }
    for url in [
        "http://127.0.0.1:1/a/c",
        "http://localhost:1/a/c",
        "http://[::1]:1/a/c",
    ] {
        AzureStore::new(url, Credential::Sas).unwrap();
    }
}

/// A Set Sequence Number that landed but whose reply was lost: the leased writer's retry
/// finds the blob at its batch's next number, which only it could have set, and the batch
/// succeeds (it used to end as fenced, and the item Critical).
#[tokio::test]
async fn a_lost_set_sequence_number_reply_is_not_a_failed_batch() {
    use lifeboat_pageblob::{LeaseId, Request};
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(FaultyStore::new(LocalStore::open(dir.path()).unwrap()));
    s.create("d", 1 << 20, 0, &Default::default())
        .await
        .unwrap();
    let lease = LeaseId([9; 16]);
    s.acquire_lease("d", lease).await.unwrap();
    let w = PageWriter::new(s.clone(), "d", fast_retries()).leased(Some(lease));
    let change = || {
        vec![Change::Data {
            offset: 0,
            data: Bytes::from(vec![5u8; 4096]),
        }]
    };
    s.fail_next(Request::SetSequenceNumber, 1, Fault::ResetAfterApply);
    w.apply_batch(0, change(), None).await.unwrap();
    assert_eq!(s.properties("d").await.unwrap().sequence_number, 1);
    // Without a lease nothing proves whose update it was: the batch is reported fenced.
    let s2 = Arc::new(FaultyStore::new(
        LocalStore::open(dir.path().join("b")).unwrap(),
    ));
    s2.create("d", 1 << 20, 0, &Default::default())
        .await
        .unwrap();
    let w2 = PageWriter::new(s2.clone(), "d", fast_retries());
    s2.fail_next(Request::SetSequenceNumber, 1, Fault::ResetAfterApply);
    assert!(matches!(
        w2.apply_batch(0, change(), None).await,
        Err(lifeboat_pageblob::WriteError::Fenced { .. })
    ));
}

/// The digests of a 1 TiB replica cost memory and reads by batch, not by disk (the slots
/// blob is 512 MiB): loading them reads metadata only; a batch reads the slot pages of the
/// blocks it covers in part (a slot page whose every block it covers whole is not read),
/// reads back only the block it covers in part, and saves the pages it touched; memory
/// holds those pages and nothing else; every slot it wrote is the block's digest.
#[tokio::test]
async fn digests_of_a_large_replica_read_and_hold_only_the_slots_a_batch_touches() {
    use lifeboat_pageblob::{BatchDigests, FaultyStore, ReplicaDigests, digests_blob};
    use lifeboat_resync::{BlockSize, Digest, digest_block};
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(FaultyStore::new(LocalStore::open(dir.path()).unwrap()));
    let len = 1u64 << 40;
    let bs = BlockSize::DEFAULT;
    const GIB: u64 = 1 << 30;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let mut digests = ReplicaDigests::zeroed(len, bs, 0);
    digests.save(&*s, "d", None).await.unwrap();
    assert_eq!(digests.memory(), 0);
    let mut digests = ReplicaDigests::load(&*s, "d").await.unwrap().unwrap();
    assert!(s.reads().is_empty(), "loading reads no slot");

    let (part, whole, zeros) = (300 * GIB + 4096, 700 * GIB, 900 * GIB);
    let changes = vec![
        // In part: block 300 GiB / 64 KiB is read back and re-hashed.
        Change::Data {
            offset: part,
            data: Bytes::from(random(4096, 1)),
        },
        // One whole block: hashed from the bytes sent; its slot page (16 blocks) is read.
        Change::Data {
            offset: whole,
            data: Bytes::from(random(65536, 2)),
        },
        // 16 whole zero blocks filling one slot page: that page is not read.
        Change::Zero {
            offset: zeros,
            len: MIB,
        },
    ];
    let batch = BatchDigests::of(&changes, bs, len);
    let w = PageWriter::new(s.clone(), "d", WriterConfig::default());
    w.apply_batch(0, changes, None).await.unwrap();
    let before = s.reads().len();
    digests.update_with(&*s, "d", batch, 1).await.unwrap();
    digests.save(&*s, "d", None).await.unwrap();
    let reads = &s.reads()[before..];
    let slot_page = |at: u64| at / 65536 * 32 / 512 * 512;
    let name = digests_blob("d");
    let mut slot_reads: Vec<_> = reads
        .iter()
        .filter(|r| r.blob == name)
        .map(|r| (r.offset, r.len))
        .collect();
    slot_reads.sort_unstable();
    assert_eq!(
        slot_reads,
        [(slot_page(part), 512), (slot_page(whole), 512)],
        "{reads:?}"
    );
    let data_reads: Vec<_> = reads.iter().filter(|r| r.blob == "d").collect();
    assert_eq!(data_reads.len(), 1, "{reads:?}");
    assert_eq!(
        (data_reads[0].offset, data_reads[0].len),
        (300 * GIB, 65536)
    );
    assert_eq!(digests.memory(), 3 * 512, "the three slot pages written");
    assert!(ReplicaDigests::is_current(&*s, "d").await.unwrap());

    // Every slot of the three pages is the digest of its block as the replica holds it.
    for at in [part, whole, zeros] {
        let page = s.read(&name, None, slot_page(at), 512).await.unwrap();
        let first = slot_page(at) / 32;
        for (k, slot) in page.chunks(32).enumerate() {
            let block = first + k as u64;
            let bytes = s.read("d", None, block * 65536, 65536).await.unwrap();
            let want = match digest_block(&bytes) {
                Digest::Zero => [0u8; 32],
                Digest::Hash(h) => h,
            };
            assert_eq!(slot, want, "block {block}");
        }
    }
}

/// The default `read_ranges` (a remote store's) reads ranges less than a MiB apart in one
/// request of at most 4 MiB, a few requests at a time, and answers each range as `read`
/// would, in the order asked: unsorted, overlapping, nested, empty, reversed (empty, as
/// the embedded store reads one) and oversized ranges.
#[tokio::test]
#[allow(clippy::reversed_empty_ranges)]
async fn default_read_ranges_merges_nearby_ranges_into_few_requests() {
    use lifeboat_pageblob::{MAX_PUT, READ_MERGE_GAP};
    let (_d, local) = store();
    let s = FaultyStore::new(LocalStore::clone(&local));
    let len = 16 * MIB;
    s.create("d", len, 0, &Default::default()).await.unwrap();
    let data = random(len as usize, 7);
    for at in (0..len).step_by(MAX_PUT as usize) {
        let chunk = Bytes::copy_from_slice(&data[at as usize..(at + MAX_PUT) as usize]);
        let crc = Some(lifeboat_pageblob::crc64(&chunk));
        s.write_pages("d", at, chunk, crc, Condition::NONE)
            .await
            .unwrap();
    }
    let want = [
        5 * MIB..5 * MIB + 100,
        0..512,
        100..700,
        700..700,
        600_000..600_100,
        600_000 + READ_MERGE_GAP + 200..600_000 + READ_MERGE_GAP + 300,
        2 * MIB + 500_000..2 * MIB + 500_010,
        5 * MIB + 50..5 * MIB + 60,
        8 * MIB..12 * MIB + 512,
        12 * MIB + 1024..12 * MIB + 2048,
        // Reversed: read as empty.
        600_050..600_040,
    ];
    let before = s.reads().len();
    let got = s.read_ranges("d", None, &want).await.unwrap();
    assert_eq!(got.len(), want.len());
    for (r, g) in want.iter().zip(&got) {
        let end = r.end.max(r.start);
        assert_eq!(g[..], data[r.start as usize..end as usize], "{r:?}");
    }
    let spans: Vec<Range<u64>> = s.reads()[before..]
        .iter()
        .map(|r| r.offset..r.offset + r.len)
        .collect();
    assert_eq!(
        spans,
        [
            // Gaps under a MiB: one request.
            0..600_100,
            // A MiB or more past the last: another, which then takes what is near it.
            600_000 + READ_MERGE_GAP + 200..2 * MIB + 500_010,
            5 * MIB..5 * MIB + 100,
            // Over 4 MiB alone, and what follows would make it longer still.
            8 * MIB..12 * MIB + 512,
            12 * MIB + 1024..12 * MIB + 2048,
        ]
    );
}
