//! Replica digests kept in memory between batches, within a budget: each holds the slot
//! pages its last batch wrote (the rest stay in the store, read when a batch touches them).

use std::collections::HashMap;

use lifeboat_pageblob::ReplicaDigests;

/// What the engine keeps by default. A disk's digests hold the slot pages of its last
/// batch (32 bytes per 64 KiB block: 128 KiB for a 256 MiB copy piece), so this is room
/// for hundreds of disks; beyond it the least recently used go (their slots stay in the
/// store).
pub(crate) const DEFAULT_BUDGET: usize = 64 << 20;

/// Replica digests by blob, the least recently used evicted first once their memory
/// passes the budget. The entry just put always stays, whatever its size.
#[derive(Debug)]
pub(crate) struct DigestCache {
    entries: HashMap<String, (u64, ReplicaDigests)>,
    tick: u64,
    bytes: usize,
    budget: usize,
}

/// The memory one entry holds (its digests; the rest is small).
fn size(d: &ReplicaDigests) -> usize {
    d.memory()
}

impl Default for DigestCache {
    fn default() -> Self {
        DigestCache::with_budget(DEFAULT_BUDGET)
    }
}

impl DigestCache {
    /// An empty cache holding at most `budget` bytes of digests (and always the last put).
    pub(crate) fn with_budget(budget: usize) -> Self {
        DigestCache {
            entries: HashMap::new(),
            tick: 0,
            bytes: 0,
            budget,
        }
    }

    /// Takes `blob`'s digests out (a batch updates them, then puts them back).
    pub(crate) fn take(&mut self, blob: &str) -> Option<ReplicaDigests> {
        let (_, d) = self.entries.remove(blob)?;
        self.bytes -= size(&d);
        Some(d)
    }

    /// Keeps `blob`'s digests, evicting the least recently put others past the budget.
    pub(crate) fn put(&mut self, blob: String, digests: ReplicaDigests) {
        self.take(&blob);
        self.tick += 1;
        self.bytes += size(&digests);
        self.entries.insert(blob.clone(), (self.tick, digests));
        while self.bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(name, _)| **name != blob)
                .min_by_key(|(_, (tick, _))| *tick)
                .map(|(name, _)| name.clone())
            else {
                break;
            };
            self.take(&oldest);
        }
    }

    /// Bytes of digests held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use lifeboat_pageblob::PageStore;
    use lifeboat_resync::BlockSize;

    use super::*;

    #[tokio::test]
    async fn the_least_recently_put_go_first_and_the_last_put_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = lifeboat_pageblob::LocalStore::open(dir.path()).unwrap();
        let bs = BlockSize::new(4096).unwrap();
        // Scanned digests hold a slot for every block until they are saved.
        let mut made = 0;
        let mut one = async |blocks: u64| {
            made += 1;
            let (blob, len) = (format!("b{made}"), blocks * u64::from(bs.get()));
            store
                .create(&blob, len, 0, &Default::default())
                .await
                .unwrap();
            ReplicaDigests::scan_at(&store, &blob, None, len, bs, 0)
                .await
                .unwrap()
        };
        let per = size(&one(100).await);
        assert!(per > 0);
        let mut c = DigestCache::with_budget(2 * per);
        c.put("a".into(), one(100).await);
        c.put("b".into(), one(100).await);
        assert_eq!(c.bytes(), 2 * per);
        // Using "a" again makes "b" the oldest.
        let a = c.take("a").unwrap();
        c.put("a".into(), a);
        c.put("c".into(), one(100).await);
        assert!(c.take("b").is_none(), "b was the least recently used");
        assert!(c.take("a").is_some() && c.take("c").is_some());
        assert_eq!(c.bytes(), 0);
        // One entry larger than the budget still stays (the batch in hand needs it).
        c.put("big".into(), one(1000).await);
        assert!(c.bytes() > 2 * per);
        c.put("small".into(), one(1).await);
        assert!(c.take("big").is_none() && c.take("small").is_some());
    }
}
