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

# Crate features

None.
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
    site::Site,
};

mod actions;
pub mod catalog;
mod data;
mod engine;
mod error;
mod host;
mod site;
