//! The conformance suite every [`PageStore`] backend must pass: the rules Azure Storage
//! enforces, checked the same way against each backend.

use bytes::Bytes;

use crate::StoreError;
use crate::store::{
    Condition, Expect, LeaseId, LeaseState, MAX_PUT, Metadata, PAGE, PageStore, crc64,
};

/// What a backend is known not to do (Azurite returns the full page list for a diff).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skips {
    /// Skip the page-range diff assertions.
    pub diff_ranges: bool,
}

fn fail(what: &str, detail: impl std::fmt::Debug) -> String {
    format!("{what}: {detail:?}")
}

async fn put(s: &dyn PageStore, blob: &str, offset: u64, data: &[u8]) -> Result<(), StoreError> {
    s.write_pages(
        blob,
        offset,
        Bytes::copy_from_slice(data),
        Some(crc64(data)),
        Condition::NONE,
    )
    .await
}

macro_rules! expect_err {
    ($e:expr, $pat:pat, $what:expr) => {
        match $e {
            Err($pat) => {}
            other => return Err(fail($what, other)),
        }
    };
}

/// Runs every check against `store`, on blobs whose names start with `prefix`; returns
/// the first failure. The blobs are deleted at the end.
pub async fn run(store: &dyn PageStore, prefix: &str, skips: Skips) -> Result<(), String> {
    let blob = format!("{prefix}-conf");
    let copy = format!("{prefix}-conf-copy");
    let mib = 1u64 << 20;
    let md: Metadata = [("vm".to_string(), "alpha".to_string())].into();
    let s = store;

    // Create, properties, duplicates, alignment of the size.
    s.create(&blob, 16 * mib, 7, &md)
        .await
        .map_err(|e| fail("create", e))?;
    let p = s
        .properties(&blob)
        .await
        .map_err(|e| fail("properties", e))?;
    if (p.size, p.sequence_number, &p.metadata) != (16 * mib, 7, &md) {
        return Err(fail("properties after create", p));
    }
    expect_err!(
        s.create(&blob, mib, 0, &md).await,
        StoreError::AlreadyExists { .. } | StoreError::Http { status: 409, .. },
        "second create"
    );
    expect_err!(
        s.create(&format!("{prefix}-odd"), 1000, 0, &md).await,
        StoreError::Misaligned { .. } | StoreError::Http { status: 400, .. },
        "create of an unaligned size"
    );
    expect_err!(
        s.properties(&format!("{prefix}-missing")).await,
        StoreError::NotFound { .. } | StoreError::Http { status: 404, .. },
        "properties of a missing blob"
    );

    // Writes: alignment, the 4 MiB cap, the CRC, the end of the blob.
    let a = vec![0xA5u8; 64 * 1024];
    put(s, &blob, mib, &a)
        .await
        .map_err(|e| fail("aligned write", e))?;
    expect_err!(
        put(s, &blob, 100, &a).await,
        StoreError::Misaligned { .. } | StoreError::Http { status: 400, .. },
        "write at an unaligned offset"
    );
    expect_err!(
        put(s, &blob, 0, &a[..400]).await,
        StoreError::Misaligned { .. } | StoreError::Http { status: 400, .. },
        "write of an unaligned length"
    );
    let big = vec![1u8; (MAX_PUT + PAGE) as usize];
    expect_err!(
        put(s, &blob, 0, &big).await,
        StoreError::TooLarge { .. } | StoreError::Http { status: 413, .. },
        "write over 4 MiB"
    );
    put(s, &blob, 8 * mib, &big[..MAX_PUT as usize])
        .await
        .map_err(|e| fail("write of exactly 4 MiB", e))?;
    expect_err!(
        s.write_pages(
            &blob,
            0,
            Bytes::copy_from_slice(&a),
            Some(crc64(&a) ^ 1),
            Condition::NONE
        )
        .await,
        StoreError::ChecksumMismatch { .. },
        "write with a wrong CRC-64"
    );
    expect_err!(
        put(s, &blob, 16 * mib - 512, &a[..1024]).await,
        StoreError::OutOfRange { .. } | StoreError::Http { status: 416, .. },
        "write past the end"
    );
    // Several writes in one call (on a blob of their own): each as write_pages writes it;
    // one without a checksum, as a store that checks none is given them.
    let many_blob = format!("{prefix}-conf-many");
    s.create(&many_blob, 4 * mib, 0, &md)
        .await
        .map_err(|e| fail("create", e))?;
    let b: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let many = [
        (mib, Bytes::copy_from_slice(&a), Some(crc64(&a))),
        (3 * mib + 4096, Bytes::copy_from_slice(&b), None),
    ];
    s.write_pages_many(&many_blob, &many, Condition::NONE)
        .await
        .map_err(|e| fail("write_pages_many", e))?;
    for (offset, data, _) in &many {
        let got = s
            .read(&many_blob, None, *offset, data.len() as u64)
            .await
            .map_err(|e| fail("read after write_pages_many", e))?;
        if got[..] != data[..] {
            return Err("write_pages_many wrote other bytes than given".into());
        }
    }
    expect_err!(
        s.write_pages_many(
            &many_blob,
            &[(0, Bytes::copy_from_slice(&b), Some(crc64(&b) ^ 1))],
            Condition::NONE
        )
        .await,
        StoreError::ChecksumMismatch { .. },
        "write_pages_many with a wrong CRC-64"
    );
    s.delete(&many_blob, Condition::NONE)
        .await
        .map_err(|e| fail("delete", e))?;

    // Reads, clears, page ranges (merged).
    let got = s
        .read(&blob, None, mib, a.len() as u64)
        .await
        .map_err(|e| fail("read", e))?;
    if got[..] != a[..] {
        return Err("read back differs from what was written".into());
    }
    // Many reads at once: any alignment, in the order asked, each as `read` gives it.
    let want = [
        mib + 100..mib + 700,
        0..512,
        mib + 65_000..mib + 66_000,
        mib..mib,
    ];
    let got = s
        .read_ranges(&blob, None, &want)
        .await
        .map_err(|e| fail("read_ranges", e))?;
    for (r, g) in want.iter().zip(&got) {
        let one = s
            .read(&blob, None, r.start, r.end - r.start)
            .await
            .map_err(|e| fail("read of an unaligned range", e))?;
        if g[..] != one[..] {
            return Err(format!("read_ranges of {r:?} differs from read"));
        }
    }
    if got.len() != want.len() || got[0][..] != a[100..700] {
        return Err("read_ranges did not answer each range in order".into());
    }
    expect_err!(
        s.read_ranges(&blob, None, &[0..512, 16 * mib - 512..16 * mib + 512])
            .await,
        StoreError::OutOfRange { .. } | StoreError::Http { status: 416, .. },
        "read_ranges past the end"
    );
    s.clear_pages(&blob, mib, 4096, Condition::NONE)
        .await
        .map_err(|e| fail("clear", e))?;
    let got = s
        .read(&blob, None, mib, 8192)
        .await
        .map_err(|e| fail("read after clear", e))?;
    if got[..4096].iter().any(|&b| b != 0) || got[4096..] != a[4096..8192] {
        return Err("clear did not zero exactly its range".into());
    }
    let ranges = crate::store::merge_ranges(
        s.page_ranges(&blob, None)
            .await
            .map_err(|e| fail("page ranges", e))?,
    );
    if ranges != [mib + 4096..mib + 65536, 8 * mib..8 * mib + MAX_PUT] {
        return Err(fail("page ranges", ranges));
    }

    // Sequence numbers fence writers.
    expect_err!(
        s.write_pages(
            &blob,
            0,
            Bytes::copy_from_slice(&a[..512]),
            Some(crc64(&a[..512])),
            Condition::sequence_number(6)
        )
        .await,
        StoreError::ConditionFailed { .. } | StoreError::Http { status: 412, .. },
        "write with a stale sequence number"
    );
    s.write_pages(
        &blob,
        0,
        Bytes::copy_from_slice(&a[..512]),
        None,
        Condition::sequence_number(7),
    )
    .await
    .map_err(|e| fail("write with the right sequence number", e))?;
    s.set_sequence_number(&blob, 8, Condition::sequence_number(7))
        .await
        .map_err(|e| fail("set sequence number", e))?;
    expect_err!(
        s.set_sequence_number(&blob, 9, Condition::sequence_number(7))
            .await,
        StoreError::ConditionFailed { .. } | StoreError::Http { status: 412, .. },
        "set sequence number twice from 7"
    );
    expect_err!(
        s.clear_pages(&blob, 0, 512, Condition::sequence_number(7))
            .await,
        StoreError::ConditionFailed { .. } | StoreError::Http { status: 412, .. },
        "clear with a stale sequence number"
    );

    // Snapshots are isolated from later writes, copy out, diff, delete.
    let before = s
        .read(&blob, None, 0, 2 * mib)
        .await
        .map_err(|e| fail("read", e))?;
    let s1 = s
        .snapshot(&blob, Condition::NONE)
        .await
        .map_err(|e| fail("snapshot", e))?;
    put(s, &blob, 0, &[0x11; 4096])
        .await
        .map_err(|e| fail("write after snapshot", e))?;
    put(s, &blob, 3 * mib, &[0x22; 512])
        .await
        .map_err(|e| fail("write after snapshot", e))?;
    let s2 = s
        .snapshot(&blob, Condition::NONE)
        .await
        .map_err(|e| fail("second snapshot", e))?;
    put(s, &blob, 0, &[0x33; 512])
        .await
        .map_err(|e| fail("write after second snapshot", e))?;
    // A page unchanged between the two snapshots and changed after the second: only the
    // second holds its old bytes, which the first still needs once the second is deleted.
    put(s, &blob, mib + 8192, &[0x44; 512])
        .await
        .map_err(|e| fail("write after second snapshot", e))?;
    let snap = s
        .read(&blob, Some(&s1), 0, 2 * mib)
        .await
        .map_err(|e| fail("read snapshot", e))?;
    if snap != before {
        return Err("snapshot changed after writes to the blob".into());
    }
    let snap2 = s
        .read(&blob, Some(&s2), 0, 4096)
        .await
        .map_err(|e| fail("read second snapshot", e))?;
    if snap2.iter().any(|&b| b != 0x11) {
        return Err("second snapshot does not hold the bytes it was taken with".into());
    }
    // A snapshot keeps the sequence number and metadata it was taken with.
    let sp = s
        .snapshot_properties(&blob, &s1)
        .await
        .map_err(|e| fail("snapshot properties", e))?;
    if (sp.size, sp.sequence_number, &sp.metadata) != (16 * mib, 8, &md) {
        return Err(fail("snapshot properties", sp));
    }
    let list = s
        .snapshots(&blob)
        .await
        .map_err(|e| fail("list snapshots", e))?;
    if list != [s1.clone(), s2.clone()] {
        return Err(fail("snapshot list", list));
    }
    if !skips.diff_ranges {
        let d = crate::store::merge_ranges(
            s.diff_ranges(&blob, Some(&s2), &s1)
                .await
                .map_err(|e| fail("diff", e))?,
        );
        if d != [0..4096, 3 * mib..3 * mib + 512] {
            return Err(fail("diff ranges between snapshots", d));
        }
    }
    s.copy_snapshot(&blob, &s1, &copy)
        .await
        .map_err(|e| fail("copy snapshot", e))?;
    let copied = s
        .read(&copy, None, 0, 2 * mib)
        .await
        .map_err(|e| fail("read copy", e))?;
    if copied != before {
        return Err("copy of a snapshot differs from the snapshot".into());
    }
    // Deleting the older snapshot keeps the newer one intact, and vice versa.
    s.delete_snapshot(&blob, &s2)
        .await
        .map_err(|e| fail("delete snapshot", e))?;
    let snap = s
        .read(&blob, Some(&s1), 0, 2 * mib)
        .await
        .map_err(|e| fail("read snapshot after delete", e))?;
    if snap != before {
        return Err("deleting a newer snapshot changed an older one".into());
    }
    expect_err!(
        s.read(&blob, Some(&s2), 0, 512).await,
        StoreError::NotFound { .. } | StoreError::Http { status: 404, .. },
        "read of a deleted snapshot"
    );

    // Metadata and resize.
    let md2: Metadata = [("lastseq".to_string(), "8".to_string())].into();
    s.set_metadata(&blob, &md2, Condition::NONE)
        .await
        .map_err(|e| fail("set metadata", e))?;
    s.resize(&blob, 32 * mib, Condition::NONE)
        .await
        .map_err(|e| fail("resize", e))?;
    let p = s
        .properties(&blob)
        .await
        .map_err(|e| fail("properties", e))?;
    if (p.size, p.sequence_number, &p.metadata) != (32 * mib, 8, &md2) {
        return Err(fail("properties after resize and metadata", p));
    }
    expect_err!(
        s.resize(&blob, 32 * mib + 100, Condition::NONE).await,
        StoreError::Misaligned { .. } | StoreError::Http { status: 400, .. },
        "resize to an unaligned size"
    );
    let tail = s
        .read(&blob, None, 30 * mib, 4096)
        .await
        .map_err(|e| fail("read grown tail", e))?;
    if tail.iter().any(|&b| b != 0) {
        return Err("grown tail does not read as zeros".into());
    }

    for b in [&copy, &blob] {
        s.delete(b, Condition::NONE)
            .await
            .map_err(|e| fail("delete", e))?;
    }
    expect_err!(
        s.properties(&blob).await,
        StoreError::NotFound { .. } | StoreError::Http { status: 404, .. },
        "properties after delete"
    );
    leases(s, prefix).await?;
    documents(s, prefix).await
}

/// Leases: one writer per blob, enforced by the store, and a take-over (break, acquire)
/// that fences the previous holder.
async fn leases(s: &dyn PageStore, prefix: &str) -> Result<(), String> {
    let blob = format!("{prefix}/leased/disk0");
    let (mine, theirs) = (LeaseId([1; 16]), LeaseId([2; 16]));
    let w = |c: Condition| {
        let data = Bytes::from_static(&[7; 512]);
        let crc = s.content_crc64(&data);
        s.write_pages(&blob, 0, data, crc, c)
    };
    s.create(&blob, 1 << 20, 0, &Metadata::new())
        .await
        .map_err(|e| fail("create", e))?;
    expect_err!(
        w(Condition::lease(mine)).await,
        StoreError::NotLeased { .. },
        "a lease id on a blob no lease holds"
    );
    s.acquire_lease(&blob, mine)
        .await
        .map_err(|e| fail("acquire", e))?;
    s.acquire_lease(&blob, mine)
        .await
        .map_err(|e| fail("acquire again by the holder", e))?;
    let p = s
        .properties(&blob)
        .await
        .map_err(|e| fail("properties", e))?;
    if p.lease != LeaseState::Leased {
        return Err(fail("lease state after acquire", p.lease));
    }
    expect_err!(
        s.acquire_lease(&blob, theirs).await,
        StoreError::Leased { .. },
        "acquire by another while leased"
    );
    expect_err!(
        w(Condition::NONE).await,
        StoreError::Leased { .. },
        "write without the lease"
    );
    expect_err!(
        w(Condition::lease(theirs)).await,
        StoreError::Leased { .. },
        "write with another lease"
    );
    w(Condition::lease(mine))
        .await
        .map_err(|e| fail("write with the lease", e))?;
    for (what, r) in [
        (
            "set sequence number without the lease",
            s.set_sequence_number(&blob, 5, Condition::NONE).await,
        ),
        (
            "set metadata without the lease",
            s.set_metadata(&blob, &Metadata::new(), Condition::NONE)
                .await,
        ),
        (
            "resize without the lease",
            s.resize(&blob, 2 << 20, Condition::NONE).await,
        ),
        (
            "delete without the lease",
            s.delete(&blob, Condition::NONE).await,
        ),
    ] {
        expect_err!(r, StoreError::Leased { .. }, what);
    }
    expect_err!(
        s.snapshot(&blob, Condition::lease(theirs)).await,
        StoreError::Leased { .. },
        "snapshot with another lease"
    );
    let snap = s
        .snapshot(&blob, Condition::lease(mine))
        .await
        .map_err(|e| fail("snapshot with the lease", e))?;
    // A take-over: the lease is broken and another acquires it; the old holder is fenced.
    s.break_lease(&blob).await.map_err(|e| fail("break", e))?;
    s.acquire_lease(&blob, theirs)
        .await
        .map_err(|e| fail("acquire after break", e))?;
    expect_err!(
        w(Condition::lease(mine)).await,
        StoreError::Leased { .. },
        "write with the broken lease"
    );
    expect_err!(
        s.snapshot(&blob, Condition::lease(mine)).await,
        StoreError::Leased { .. },
        "snapshot with the broken lease"
    );
    w(Condition::lease(theirs))
        .await
        .map_err(|e| fail("write by the new holder", e))?;
    // Snapshots carry no lease: deleting one needs none.
    s.delete_snapshot(&blob, &snap)
        .await
        .map_err(|e| fail("delete snapshot of a leased blob", e))?;
    s.release_lease(&blob, theirs)
        .await
        .map_err(|e| fail("release", e))?;
    s.break_lease(&blob)
        .await
        .map_err(|e| fail("break of a blob no lease holds", e))?;
    s.delete(&blob, Condition::NONE)
        .await
        .map_err(|e| fail("delete after release", e))
}

/// Documents: conditional writes (two writers never both win), leases, listing by prefix.
async fn documents(s: &dyn PageStore, prefix: &str) -> Result<(), String> {
    let doc = format!("{prefix}/catalog/items/vm1.json");
    let other = format!("{prefix}/catalog/items/vm2.json");
    let lease = LeaseId([3; 16]);
    if s.get_doc(&doc)
        .await
        .map_err(|e| fail("get missing", e))?
        .is_some()
    {
        return Err("a missing document reads as present".into());
    }
    let v1 = s
        .put_doc(&doc, Bytes::from_static(b"{\"v\":1}"), Expect::Absent, None)
        .await
        .map_err(|e| fail("create document", e))?;
    expect_err!(
        s.put_doc(&doc, Bytes::from_static(b"{}"), Expect::Absent, None)
            .await,
        StoreError::Changed { .. },
        "second create of a document"
    );
    let got = s
        .get_doc(&doc)
        .await
        .map_err(|e| fail("get", e))?
        .ok_or("a written document is missing")?;
    if (&got.data[..], &got.etag) != (&b"{\"v\":1}"[..], &v1) {
        return Err(fail("document read back", got));
    }
    let v2 = s
        .put_doc(
            &doc,
            Bytes::from_static(b"{\"v\":2}"),
            Expect::Version(v1.clone()),
            None,
        )
        .await
        .map_err(|e| fail("replace the version read", e))?;
    if v2 == v1 {
        return Err("a replaced document kept its entity tag".into());
    }
    expect_err!(
        s.put_doc(&doc, Bytes::from_static(b"{}"), Expect::Version(v1), None)
            .await,
        StoreError::Changed { .. },
        "replace a version that is no longer current"
    );
    expect_err!(
        s.put_doc(
            &other,
            Bytes::from_static(b"{}"),
            Expect::Version(v2.clone()),
            None
        )
        .await,
        StoreError::Changed { .. },
        "replace a document that does not exist"
    );
    // A leased document takes writes from its holder only; leasing is not a change.
    s.acquire_lease(&doc, lease)
        .await
        .map_err(|e| fail("lease a document", e))?;
    let after = s
        .get_doc(&doc)
        .await
        .map_err(|e| fail("get", e))?
        .ok_or("document vanished")?
        .etag;
    if after != v2 {
        return Err(fail("entity tag after a lease was acquired", (v2, after)));
    }
    expect_err!(
        s.put_doc(
            &doc,
            Bytes::from_static(b"{}"),
            Expect::Version(v2.clone()),
            None
        )
        .await,
        StoreError::Leased { .. },
        "write a leased document without the lease"
    );
    s.put_doc(
        &doc,
        Bytes::from_static(b"{\"v\":3}"),
        Expect::Version(v2),
        Some(lease),
    )
    .await
    .map_err(|e| fail("write a leased document with the lease", e))?;
    s.put_doc(&other, Bytes::from_static(b"{}"), Expect::Absent, None)
        .await
        .map_err(|e| fail("create a second document", e))?;
    let names = s
        .list(&format!("{prefix}/catalog/items/"))
        .await
        .map_err(|e| fail("list", e))?;
    if names != [doc.clone(), other.clone()] {
        return Err(fail("list by prefix", names));
    }
    expect_err!(
        s.get_doc("bad//name").await,
        StoreError::BadName { .. }
            | StoreError::Http { status: 400, .. }
            | StoreError::NotFound { .. },
        "a malformed name"
    );
    s.delete(&doc, Condition::lease(lease))
        .await
        .map_err(|e| fail("delete a leased document", e))?;
    s.delete(&other, Condition::NONE)
        .await
        .map_err(|e| fail("delete a document", e))?;
    if !s
        .list(&format!("{prefix}/catalog/"))
        .await
        .map_err(|e| fail("list", e))?
        .is_empty()
    {
        return Err("deleted documents are still listed".into());
    }
    Ok(())
}
