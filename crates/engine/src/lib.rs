/*!
The Lifeboat driver as a library. It keeps the catalogue in the replica store, acts for the
items its site owns, and performs the replication state machine's actions against a host's
disks, HRL logs and a page store.

# Overview

- [`Engine`]: open one on a site directory and a [`PageStore`](lifeboat_pageblob::PageStore)
  ([`Engine::builder`]); then [`protect`](Engine::protect), [`replicate`](Engine::replicate),
  [`test_failover`](Engine::test_failover), [`failover`](Engine::failover),
  [`failback`](Engine::failback), [`reprotect`](Engine::reprotect), any
  [`command`](Engine::command) of the state machine, recovery plans and job actions. Every
  step is saved in the catalogue before the next; a new engine on the same site carries on
  what an interrupted one left ([`drive`](Engine::drive)).
- The catalogue ([`catalog`]): one document per item and per plan in the store, beside the
  replicas, written only if unchanged since read, each item leased to its owning site.
  Any site holding the store can read every item, take one over
  ([`take_over`](Engine::take_over), done by an unplanned failover) and fail it over; the
  store itself refuses the old owner's writes from then on.
- [`Host`]: what differs per embedder (disks by name, machines, hooks); [`FileHost`] for
  image files, [`MemoryHost`] for tests. [`Clock`]: the engine's only clock.
- [`Error`]: typed, and classified recoverable or not ([`lifeboat_retry::Classify`]).

The engine does not decide: `lifeboat-replication` does. It does not parse logs, compare
blocks or speak HTTP itself: `lifeboat-hrl`, `lifeboat-resync` and `lifeboat-pageblob` do.
It reads no clock but its [`Clock`] and runs no machine but through its [`Host`].

# Example

Protect a machine, replicate a log its guest's writes were recorded in, lose the site, and
fail over from another site that has nothing but the store:

```
use std::sync::Arc;
use lifeboat_engine::{Engine, Export, Failover, MemoryHost, Replicated};
use lifeboat_hrl::{LogWriter, WriterConfig};
use lifeboat_pageblob::{LocalStore, PageStore};
use lifeboat_replication::{PointChoice, ProtectionState, ReplicationPolicy};

# #[tokio::main(flavor = "current_thread")]
# async fn main() -> Result<(), Box<dyn std::error::Error>> {
let dir = tempfile::tempdir()?;
let store: Arc<dyn PageStore> = Arc::new(LocalStore::open(dir.path().join("store"))?);
let host = Arc::new(MemoryHost::new());
host.add_disk("vm1/disk0", vec![0u8; 4 << 20]);

let mut site = Engine::builder(store.clone(), dir.path().join("site"))
    .host(host.clone())
    .open()
    .await?;
site.protect("vm1", &["vm1/disk0".into()], ReplicationPolicy::default(), 64 << 10)
    .await?;

// The guest writes; the host's change tracking records the write in an HRL log.
host.write("vm1/disk0", 8192, &[7; 4096])?;
let tracking = &site.item("vm1")?.item.disks[0].tracking;
let config = WriterConfig {
    unique_id: [1; 16],
    previous_unique_id: tracking.last_log, // where the disk's chain starts
    vhd2_data_write_guid: tracking.write_guid,
    ..WriterConfig::default()
};
let log = dir.path().join("l1.hrl");
let mut w = LogWriter::new(std::fs::File::create(&log)?, config)?;
w.write(8192, &[7; 4096], 0)?;
w.finish(1)?;
let r = site.replicate("vm1", &[(0, log)], false).await?;
assert!(matches!(r, Replicated::Applied { cycles: 1, .. }));

// The site is lost. Another one, with only the store, fails the machine over.
drop(site);
std::fs::remove_dir_all(dir.path().join("site"))?;
let mut recovery = Engine::builder(store, dir.path().join("recovery"))
    .host(host.clone())
    .open()
    .await?;
let out = dir.path().join("recovered");
let export = Export { dir: Some(out.clone()), ..Export::default() };
recovery.failover("vm1", Failover::Unplanned(PointChoice::Latest), export).await?;
assert_eq!(recovery.protection("vm1")?, ProtectionState::UnplannedFailoverCompleted);
assert_eq!(std::fs::read(out.join("disk0.raw"))?, host.disk("vm1/disk0").unwrap());
# Ok(()) }
```

# Crate features

- `sim`: the whole-engine deterministic simulation (`sim::run`), for `scripts/soak`; not a
  stable API.
*/
#![doc(test(attr(deny(warnings))))]

pub use crate::{
    catalog::{
        Disk as CatalogDisk, Export, Guid, Item, Location, Materialized, Owner, SCHEMA, SyncReport,
        Tracking, check_name, hex, replica_blob,
    },
    engine::{Engine, EngineBuilder, Event, Failover, ItemView, Observer, Replicated, Task},
    error::{Error, Result},
    host::{Clock, Disk, FileHost, Host, MemoryDisk, MemoryHost, SystemClock},
    logs::{LogOutcome, Staged},
    site::Site,
    verify::Verified,
    view::{Catalogue, Source},
};

mod actions;
pub mod catalog;
mod copy;
mod data;
mod digest_cache;
mod engine;
mod error;
mod host;
mod logs;
#[cfg(any(test, feature = "sim"))]
#[doc(hidden)]
pub mod sim;
mod site;
mod verify;
mod view;

#[cfg(test)]
mod tests;
