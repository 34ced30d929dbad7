//! The catalogue lives in the store: a lost site loses nothing failover needs, a stale
//! primary is fenced by the store itself, and several sites share one store.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_pageblob::{
    AzureStore, Condition, Credential, Expect, LeaseId, LocalStore, PageStore, StoreError, crc64,
};
use serde_json::Value;

use super::common::{AZURITE_KEY, MIB, Target, assert_same, azurite_url, bytes, make_disk, s};

/// The same store for several sites: an embedded store of its own directory, or an Azurite
/// container.
fn shared(root: &Path, local: bool, container: &str) -> Option<Target> {
    let site = root.join("site-a");
    if local {
        Some(Target {
            site,
            store: Some(root.join("store")),
            azure: None,
        })
    } else {
        Some(Target {
            site,
            store: None,
            azure: Some(azurite_url(container)?),
        })
    }
}

/// The store a target names, opened directly (as any tool with its credentials could).
fn open_store(t: &Target) -> Arc<dyn PageStore> {
    match (&t.store, &t.azure) {
        (Some(dir), _) => Arc::new(LocalStore::open(dir).unwrap()),
        (_, Some(url)) => Arc::new(
            AzureStore::new(
                url,
                Credential::SharedKey {
                    account: "devstoreaccount1".into(),
                    key: AZURITE_KEY.into(),
                },
            )
            .unwrap(),
        ),
        _ => unreachable!("shared stores only"),
    }
}

/// Everything in the store, as a listing a person could compare: every blob's entity tag,
/// size, sequence number, metadata and lease state, and its snapshots.
fn listing(store: &dyn PageStore) -> BTreeMap<String, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut out = BTreeMap::new();
        for name in store.list("lifeboat/").await.unwrap() {
            let p = store.properties(&name).await.unwrap();
            let snaps = store.snapshots(&name).await.unwrap_or_default();
            out.insert(
                name,
                format!(
                    "{} size {} seq {} md {:?} lease {:?} snapshots {snaps:?}",
                    p.etag, p.size, p.sequence_number, p.metadata, p.lease
                ),
            );
        }
        out
    })
}

fn guest_write(t: &Target, item: &str, disk: &str, log: &Path, seed: &str) {
    t.ok(&[
        "guest-write",
        item,
        "--disk",
        disk,
        "--log",
        s(log),
        "--writes",
        "24",
        "--size",
        "8K",
        "--seed",
        seed,
    ]);
}

/// A two-disk VM protected from `t`'s site, with two delta cycles replicated; returns its
/// disks and copies of them as each recovery point holds them (points 2 and 3).
fn protected_vm(t: &Target, root: &Path, item: &str) -> (Vec<PathBuf>, Vec<Vec<Vec<u8>>>) {
    let vm = root.join(format!("vm-{item}"));
    fs::create_dir_all(&vm).unwrap();
    let disks = vec![vm.join("d0.raw"), vm.join("d1.raw")];
    make_disk(&disks[0], 8 * MIB, 11);
    make_disk(&disks[1], 4 * MIB, 12);
    t.ok(&[
        "protect",
        item,
        "--disk",
        s(&disks[0]),
        "--disk",
        s(&disks[1]),
    ]);
    let mut at_points = Vec::new();
    for cycle in 0..2 {
        let (l0, l1) = (
            vm.join(format!("c{cycle}-0.hrl")),
            vm.join(format!("c{cycle}-1.hrl")),
        );
        guest_write(t, item, "0", &l0, &format!("{}", 10 + cycle));
        guest_write(t, item, "1", &l1, &format!("{}", 20 + cycle));
        let out = t.ok(&[
            "replicate",
            item,
            "--log",
            &format!("0={}", s(&l0)),
            "--log",
            &format!("1={}", s(&l1)),
        ]);
        assert!(out.contains("1 cycle(s) applied"), "{out}");
        at_points.push(disks.iter().map(|d| bytes(d)).collect());
    }
    (disks, at_points)
}

fn check_out(dir: &Path, want: &[Vec<u8>]) {
    for (d, w) in want.iter().enumerate() {
        let got = bytes(&dir.join(format!("disk{d}.raw")));
        assert!(got == *w, "{}: disk {d} differs", dir.display());
    }
}

/// Protect, replicate two cycles, lose the site; a fresh site lists the item and its
/// points, test-fails-over to the older point and fails over to the latest, byte-exact;
/// commit; a rebuilt on-premises site fails back and reprotects.
fn disaster_drill(local: bool) {
    let root = tempfile::tempdir().unwrap();
    let Some(a) = shared(root.path(), local, "drill") else {
        return;
    };
    let (disks, at) = protected_vm(&a, root.path(), "vm1");
    let points_before = a.json(&["points", "vm1"]);
    fs::remove_dir_all(&a.site).unwrap();

    // A site that never protected the item reads it from the store alone.
    let b = a.at(&root.path().join("site-b"));
    let st = b.json(&["status", "vm1"]);
    assert_eq!(st[0]["state"], "protected", "{st}");
    assert_eq!(st[0]["owned_here"], false);
    let points = b.json(&["points", "vm1"]);
    assert_eq!(
        points, points_before,
        "the points, their times and consistency"
    );
    let ids: Vec<u64> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(points[0]["time"].as_str().unwrap().ends_with('Z'));
    assert!(points[0]["app_consistent"].is_boolean());
    b.json(&["jobs", "vm1"]);

    // Acting for it needs ownership: the refusal says how to get it.
    let tf = root.path().join("tf");
    let r = b.fails(&["test-failover", "vm1", "--point", "2", "--out", s(&tf)]);
    assert!(r.contains("take-over vm1"), "{r}");
    b.ok(&["take-over", "vm1"]);
    b.ok(&[
        "test-failover",
        "vm1",
        "--point",
        &ids[1].to_string(),
        "--out",
        s(&tf),
    ]);
    check_out(&tf, &at[0]);
    b.ok(&["test-failover-cleanup", "vm1"]);

    let uf = root.path().join("uf");
    b.ok(&[
        "failover",
        "vm1",
        "--unplanned",
        "--point",
        "latest",
        "--out",
        s(&uf),
    ]);
    check_out(&uf, &at[1]);
    assert_eq!(b.state("vm1"), "unplanned_failover_completed");
    b.ok(&["commit", "vm1"]);
    assert_eq!(b.state("vm1"), "failover_committed");

    // The recovered machine writes (on the embedded store it runs on the files in uf).
    if local {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(uf.join("disk1.raw"))
            .unwrap();
        f.write_all_at(&[0x5C; 16384], MIB).unwrap();
    }

    // The on-premises site is rebuilt: new disks, a new site directory.
    let c = a.at(&root.path().join("site-c"));
    let new: Vec<PathBuf> = (0..2)
        .map(|d| root.path().join(format!("new{d}.raw")))
        .collect();
    let out = c.ok(&["failback", "vm1", "--to", s(&new[0]), "--to", s(&new[1])]);
    assert!(out.contains("Failback completed"), "{out}");
    for (d, n) in new.iter().enumerate() {
        assert_same(n, &uf.join(format!("disk{d}.raw")));
    }
    c.ok(&["reprotect", "vm1"]);
    assert_eq!(c.state("vm1"), "protected");
    let st = c.json(&["status", "vm1"]);
    assert_eq!(st[0]["owned_here"], true);
    assert_eq!(
        st[0]["disks"][0]["path"],
        s(&new[0].canonicalize().unwrap())
    );
    // The replica follows the new disks.
    let check = root.path().join("check");
    c.ok(&["test-failover", "vm1", "--out", s(&check)]);
    for (d, n) in new.iter().enumerate() {
        assert_same(&check.join(format!("disk{d}.raw")), n);
    }
    drop(disks);
}

#[test]
fn disaster_drill_on_an_embedded_store() {
    disaster_drill(true);
}

#[test]
fn disaster_drill_on_azurite() {
    disaster_drill(false);
}

/// The old site comes back after an unplanned failover (its directory restored from a
/// copy): replicate, resync and protect are refused with a reason, and nothing in the
/// store changes, even when the stale site's lease is used on the store directly.
fn stale_primary(local: bool) {
    let root = tempfile::tempdir().unwrap();
    let Some(a) = shared(root.path(), local, "stale") else {
        return;
    };
    let (disks, _) = protected_vm(&a, root.path(), "vm1");
    let late = root.path().join("late.hrl");
    guest_write(&a, "vm1", "0", &late, "99");
    let backup = root.path().join("site-a-copy");
    copy_dir(&a.site, &backup);
    fs::remove_dir_all(&a.site).unwrap();

    let b = a.at(&root.path().join("site-b"));
    b.ok(&[
        "failover",
        "vm1",
        "--unplanned",
        "--out",
        s(&root.path().join("uf")),
    ]);
    assert_eq!(b.state("vm1"), "unplanned_failover_completed");

    fs::rename(&backup, &a.site).unwrap();
    let store = open_store(&a);
    let before = listing(&*store);
    assert!(before.len() >= 5, "{before:?}");
    let r = a.fails(&["replicate", "vm1", "--log", &format!("0={}", s(&late))]);
    assert!(r.contains("failed over") && r.contains("site-b"), "{r}");
    assert_eq!(r.lines().count(), 1);
    let r = a.fails(&["resync", "vm1"]);
    assert!(r.contains("owned by site"), "{r}");
    let r = a.fails(&[
        "protect",
        "vm1",
        "--disk",
        s(&disks[0]),
        "--disk",
        s(&disks[1]),
    ]);
    assert!(r.contains("already protected"), "{r}");
    assert_eq!(listing(&*store), before, "the stale site changed the store");

    // Old code that skips the ownership check still writes with its own lease: the store
    // refuses every write.
    let site_file: Value = serde_json::from_slice(&bytes(&a.site.join("site.json"))).unwrap();
    let stale: LeaseId = site_file["site"].as_str().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let l = Condition::lease(stale);
        let page = Bytes::from(vec![0xEE; 512]);
        let crc = Some(crc64(&page));
        let disk = "lifeboat/items/vm1/disk0";
        let doc = "lifeboat/items/vm1/catalog.json";
        let etag = store.get_doc(doc).await.unwrap().unwrap().etag;
        let refused = |r: Result<(), StoreError>, what: &str| {
            assert!(
                matches!(r, Err(StoreError::Leased { .. })),
                "{what} with the stale lease: {r:?}"
            )
        };
        refused(
            store.write_pages(disk, 0, page.clone(), crc, l).await,
            "Put Page",
        );
        refused(store.clear_pages(disk, 0, 512, l).await, "Clear Pages");
        refused(
            store.snapshot(disk, l).await.map(drop),
            "a snapshot (a recovery point)",
        );
        refused(
            store.set_sequence_number(disk, 999, l).await,
            "Set Sequence Number",
        );
        refused(
            store.set_metadata(disk, &Default::default(), l).await,
            "metadata",
        );
        refused(
            store
                .write_pages(&format!("{disk}.digests"), 0, page.clone(), crc, l)
                .await,
            "a digests write",
        );
        refused(
            store
                .put_doc(
                    doc,
                    Bytes::from_static(b"{}"),
                    Expect::Version(etag),
                    Some(stale),
                )
                .await
                .map(drop),
            "a catalogue write",
        );
        refused(store.delete(disk, l).await, "Delete Blob");
    });
    assert_eq!(listing(&*store), before, "a stale write landed");
}

#[test]
fn a_stale_primary_is_fenced_on_an_embedded_store() {
    stale_primary(true);
}

#[test]
fn a_stale_primary_is_fenced_on_azurite() {
    stale_primary(false);
}

/// Two sites protect two items into one store at once; a third lists both; the first
/// item cannot be protected again from the second site; a plan spanning both items runs
/// from the third site.
fn two_sites_one_store(local: bool) {
    let root = tempfile::tempdir().unwrap();
    let Some(a) = shared(root.path(), local, "twosites") else {
        return;
    };
    let b = a.at(&root.path().join("site-b"));
    let mut disks = Vec::new();
    for (name, seed) in [("alpha", 31), ("beta", 32)] {
        let d = root.path().join(format!("{name}.raw"));
        make_disk(&d, 8 * MIB, seed);
        disks.push(d);
    }
    let children: Vec<_> = [(&a, "alpha", &disks[0]), (&b, "beta", &disks[1])]
        .into_iter()
        .map(|(t, item, d)| t.cmd(&["protect", item, "--disk", s(d)]).spawn().unwrap())
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let logs: Vec<PathBuf> = ["alpha", "beta"]
        .iter()
        .map(|n| root.path().join(format!("{n}.hrl")))
        .collect();
    guest_write(&a, "alpha", "0", &logs[0], "5");
    guest_write(&b, "beta", "0", &logs[1], "6");
    let children: Vec<_> = [(&a, "alpha", &logs[0]), (&b, "beta", &logs[1])]
        .into_iter()
        .map(|(t, item, l)| {
            t.cmd(&["replicate", item, "--log", &format!("0={}", s(l))])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }

    let c = a.at(&root.path().join("site-c"));
    let st = c.json(&["status"]);
    let owners: Vec<(String, String)> = st
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["item"].as_str().unwrap().to_owned(),
                i["owner"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(owners.len(), 2, "{st}");
    assert!(
        owners[0].0 == "alpha" && owners[0].1.ends_with("site-a"),
        "{owners:?}"
    );
    assert!(
        owners[1].0 == "beta" && owners[1].1.ends_with("site-b"),
        "{owners:?}"
    );
    for i in st.as_array().unwrap() {
        assert_eq!(i["points"].as_array().unwrap().len(), 2, "{i}");
    }
    let r = b.fails(&["protect", "alpha", "--disk", s(&disks[0])]);
    assert!(
        r.contains("already protected") && r.contains("site-a"),
        "{r}"
    );

    // A plan over both sites' items, run from a third.
    c.ok(&[
        "plan", "create", "dr", "--group", "alpha", "--group", "beta",
    ]);
    let out = root.path().join("plan-out");
    let text = c.ok(&["plan", "failover", "dr", "--unplanned", "--out", s(&out)]);
    assert!(text.contains("plan dr: done"), "{text}");
    for (item, d) in [("alpha", &disks[0]), ("beta", &disks[1])] {
        assert_eq!(c.state(item), "unplanned_failover_completed");
        assert_same(&out.join(item).join("disk0.raw"), d);
    }
}

#[test]
fn two_sites_share_an_embedded_store() {
    two_sites_one_store(true);
}

#[test]
fn two_sites_share_an_azurite_container() {
    two_sites_one_store(false);
}

/// A site set up with one store refuses another; the site directory alone cannot pass
/// for the store; a store emptied or lost where it was is said to be so.
#[test]
fn a_site_refuses_another_store() {
    let root = tempfile::tempdir().unwrap();
    let t = Target {
        site: root.path().join("site"),
        store: Some(root.path().join("store1")),
        azure: None,
    };
    t.ok(&["resume"]);
    assert!(t.site.join("site.json").exists());
    let other = Target {
        store: Some(root.path().join("store2")),
        ..t.clone()
    };
    let r = other.fails(&["status"]);
    assert!(r.contains("store1") && r.contains("store2"), "{r}");
    let default = Target {
        store: None,
        ..t.clone()
    };
    assert!(default.fails(&["status"]).contains("store1"));
    fs::remove_dir_all(root.path().join("store1")).unwrap();
    let r = t.fails(&["status"]);
    assert!(r.contains("emptied, replaced or lost"), "{r}");
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).unwrap();
        }
    }
}
