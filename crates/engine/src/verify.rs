//! Online verify (DRBD's `verify`, ZFS's scrub): every block of a replica, or of a recovery
//! point, checked against the digests recorded as it was written, and the live replica
//! against the source disk. Verify changes nothing; repair re-sends exactly the blocks that
//! differ from the source.

use lifeboat_pageblob::{ReplicaDigests, digests_blob};
use lifeboat_replication::{Command, PointId};
use lifeboat_resync::{BlockSize, Signature};

use crate::catalog::replica_blob;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// What verify found on one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// The disk.
    pub disk: usize,
    /// The recovery point checked; `None` for the live replica.
    pub point: Option<u64>,
    /// Blocks checked.
    pub blocks: u64,
    /// The block size.
    pub block_size: u32,
    /// Blocks whose bytes differ from the digests recorded when they were written: damage
    /// (bit rot, a write that bypassed Lifeboat).
    pub damaged: Vec<u64>,
    /// Blocks whose digests were recorded unknown (a batch cut short, whose pages could
    /// not be read back as they landed): not checked; a resync, or a repair, sends them
    /// from the source.
    pub unknown: Vec<u64>,
    /// Blocks where the live replica differs from the source disk, when asked (writes not
    /// replicated yet show here too: compare a quiet or snapshotted source).
    pub unlike_source: Option<Vec<u64>>,
    /// Why a check could not be made.
    pub note: Option<String>,
}

impl Verified {
    /// Whether nothing is wrong (nor unknown).
    pub fn clean(&self) -> bool {
        self.damaged.is_empty()
            && self.unknown.is_empty()
            && self.unlike_source.as_ref().is_none_or(Vec::is_empty)
    }
}

impl Engine {
    /// Checks every disk of an item: its live replica, or recovery point `point`, against
    /// the digests recorded when it was written; with `against_source`, the live replica
    /// against the source disks too. Reads everything, changes nothing; any site can.
    pub async fn verify(
        &mut self,
        item: &str,
        point: Option<PointId>,
        against_source: bool,
    ) -> Result<Vec<Verified>> {
        let doc = self.item(item)?.item.clone();
        if let Some(p) = point
            && !doc.points.contains_key(&p.0)
        {
            return Err(Error::Invalid(format!(
                "{item} has no recovery point {}",
                p.0
            )));
        }
        let bs = BlockSize::new(doc.block_size)?;
        let mut out = Vec::new();
        for (d, disk) in doc.disks.iter().enumerate() {
            let blob = replica_blob(item, d);
            let mut v = Verified {
                disk: d,
                point: point.map(|p| p.0),
                blocks: bs.blocks(disk.size),
                block_size: bs.get(),
                ..Verified::default()
            };
            let (stored, snapshot) = match point {
                Some(p) => {
                    let snap = doc.points[&p.0].get(d).cloned();
                    let dsnap = doc.point_digests.get(&p.0).and_then(|s| s.get(d)).cloned();
                    let (Some(snap), Some(dsnap)) = (snap, dsnap) else {
                        v.note = Some("no digests were recorded with this point".into());
                        out.push(v);
                        continue;
                    };
                    (
                        ReplicaDigests::load_at(&*self.store, &blob, &dsnap).await?,
                        Some(snap),
                    )
                }
                None => (ReplicaDigests::load(&*self.store, &blob).await?, None),
            };
            let seq = stored.as_ref().map_or(0, ReplicaDigests::sequence_number);
            let actual = ReplicaDigests::scan_at(
                &*self.store,
                &blob,
                snapshot.as_deref(),
                disk.size,
                bs,
                seq,
            )
            .await?;
            match &stored {
                Some(stored) => {
                    let c = stored.check(&*self.store, &actual).await?;
                    (v.damaged, v.unknown) = (c.damaged, c.unknown);
                }
                None => {
                    v.note = Some("the stored digests are stale (a batch was cut short)".into())
                }
            }
            if against_source && point.is_none() {
                let src = self.open_source(&disk.source, disk.size)?;
                let sig = Signature::compute(&*src, bs)?;
                let replica = actual.signature(&*self.store).await?;
                v.unlike_source = Some(
                    sig.digests()
                        .iter()
                        .zip(replica.digests())
                        .enumerate()
                        .filter(|(_, (a, b))| a != b)
                        .map(|(i, _)| i as u64)
                        .collect(),
                );
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Repairs the live replica of an item this site acts for: the digests of damaged
    /// blocks are made to describe what the blocks hold, then a resync compares the
    /// source with them and sends exactly the blocks that differ (damaged ones, writes
    /// not yet replicated, and blocks recorded unknown). Returns what verify found before
    /// the repair.
    pub async fn repair(&mut self, item: &str) -> Result<Vec<Verified>> {
        self.require_owned(item)?;
        let found = self.verify(item, None, false).await?;
        let lease = Some(self.site.id());
        for v in found.iter().filter(|v| !v.damaged.is_empty()) {
            let blob = replica_blob(item, v.disk);
            let mut stored = ReplicaDigests::load(&*self.store, &blob)
                .await?
                .ok_or_else(|| {
                    Error::Invalid(format!("{} has stale digests", digests_blob(&blob)))
                })?;
            stored
                .rehash_blocks(&*self.store, &blob, &v.damaged)
                .await?;
            stored.save(&*self.store, &blob, lease).await?;
            self.forget_digests(&blob);
        }
        self.command(Command::Resync {
            item: item.to_owned(),
        })
        .await?;
        Ok(found)
    }
}
