/*!
Replica disks as page blobs: the [`PageStore`] trait (what replication needs from Azure
page blobs, object-safe), [`AzureStore`] (Azure Storage through the official SDK),
[`LocalStore`] (the embedded default: sparse files with copy-on-write snapshots,
crash-safe state, shareable between processes), [`PageWriter`] (aligned, coalesced,
fenced, retried page requests), the fixed-VHD [`vhd`] footer that makes a blob an
attachable disk; with the `testing` feature, a fault-injecting `FaultyStore` decorator and
the `conformance` suite every backend passes.

Besides pages, a store holds small documents written only if unchanged
([`PageStore::put_doc`] with [`Expect`]: ETag `If-Match` / `If-None-Match`, so two writers
never both win) and leases ([`PageStore::acquire_lease`], [`Condition::lease`]): a leased
blob takes writes from its holder only, and a take-over ([`PageStore::break_lease`], then
acquire) fences the previous holder in the storage service itself.

This is the async edge of Lifeboat: it uses tokio (blocking file work runs on
`spawn_blocking`) and, for retries, `lifeboat-retry`.

# Example

```
use std::sync::Arc;
use bytes::Bytes;
use lifeboat_pageblob::{
    Change, Condition, LeaseId, LocalStore, PageStore, PageWriter, StoreError, WriterConfig, vhd,
};

# #[tokio::main(flavor = "current_thread")]
# async fn main() -> Result<(), Box<dyn std::error::Error>> {
let dir = tempfile::tempdir()?;
let store: Arc<dyn PageStore> = Arc::new(LocalStore::open(dir.path())?);
let disk_len = 8 << 20;
store.create("vm1/disk0", vhd::blob_size(disk_len), 0, &Default::default()).await?;
let mine = LeaseId([7; 16]);
store.acquire_lease("vm1/disk0", mine).await?;

// Batch 0: data (unaligned edges need an edge source; these are aligned) and a zero range.
let writer = PageWriter::new(store.clone(), "vm1/disk0", WriterConfig::default()).leased(Some(mine));
let changes = vec![
    Change::Data { offset: 4096, data: Bytes::from(vec![7u8; 8192]) },
    Change::Zero { offset: 1 << 20, len: 1 << 20 },
];
let report = writer.apply_batch(0, changes.clone(), None).await?;
assert_eq!((report.put_requests, report.clear_requests), (1, 1));

// Replaying the same batch is refused: the blob moved on to sequence number 1.
assert!(writer.apply_batch(0, changes, None).await.is_err());
assert_eq!(store.properties("vm1/disk0").await?.sequence_number, 1);

// Nobody else writes the leased blob.
let page = Bytes::from(vec![0u8; 512]);
let crc = Some(lifeboat_pageblob::crc64(&page));
let theirs = store.write_pages("vm1/disk0", 0, page, crc, Condition::NONE).await;
assert!(matches!(theirs, Err(StoreError::Leased { .. })));

// A recovery point costs no copy.
let point = store.snapshot("vm1/disk0", Condition::lease(mine)).await?;
assert_eq!(store.read("vm1/disk0", Some(&point), 4096, 4).await?[..], [7, 7, 7, 7]);
# Ok(()) }
```

# Credentials

[`Credential::SharedKey`] (our signing policy; also Azurite's dev account),
[`Credential::Sas`] (a SAS token in the container URL) and [`Credential::Token`] (any Entra
ID `TokenCredential`, https only; tested against Azurite's OAuth mode with a test CA through
[`AzureStore::with_transport`]).

# Crate features

- `azure_identity`: `Credential::managed_identity()` and `Credential::developer_tools()`
  (Azure CLI / Azure Developer CLI sign-in) from the official `azure_identity` crate.
- `testing`: scaffolding for tests of stores and of their users: `FaultyStore` (a
  decorator that injects faults into a real store) and the `conformance` suite.
*/
#![doc(test(attr(deny(warnings))))]

pub use crate::{
    azure::{AZURITE_ACCOUNT, AZURITE_KEY, AzureStore, Credential, account_sas},
    digests::{BatchDigests, Checked, ReplicaDigests, digests_blob},
    error::{StoreError, Unreachable},
    local::LocalStore,
    store::{
        Condition, Doc, ETag, Expect, LeaseId, LeaseState, MAX_PUT, Metadata, PAGE, PageStore,
        Properties, READ_MERGE_GAP, READS_IN_FLIGHT, check_blob_name, crc64, merge_ranges,
    },
    writer::{
        BatchReport, Change, OpenBatch, PageWriter, Throttle, WriteError, WriterConfig,
        WriterProgress,
    },
};

mod azure;
#[cfg(feature = "testing")]
pub mod conformance;
mod digests;
mod error;
#[cfg(feature = "testing")]
mod faults;
mod local;
mod store;
pub mod vhd;
mod writer;

#[cfg(feature = "testing")]
pub use crate::faults::{Fault, FaultyStore, Request, Seen, SeenRead};
