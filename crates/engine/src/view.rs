//! Reading the catalogue without acting for anything: what `status`, `points` and `jobs`
//! need beside an engine at work (a service), and when the store cannot be reached.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use lifeboat_pageblob::{LeaseId, PageStore};
use lifeboat_replication::{Job, JobAction, PlanRecord};

use crate::catalog::{self, Item};
use crate::engine::ItemView;
use crate::error::{Error, Result};

/// Where a [`Catalogue`] was read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The store: as current as it gets.
    Store,
    /// The site's cache of the documents it last wrote or read (the store could not be
    /// reached): as of `written`, the oldest document's time.
    Cache {
        /// When the oldest cached document was written.
        written: SystemTime,
    },
}

/// Every item's (and plan's) catalogue document, read without the site's lock and without writing
/// anything: the read side beside an [`Engine`](crate::Engine) at work.
#[derive(Debug)]
pub struct Catalogue {
    items: BTreeMap<String, Item>,
    plans: BTreeMap<String, PlanRecord>,
    site: Option<LeaseId>,
    source: Source,
}

impl Catalogue {
    /// Reads every item's document from the store; `site` (the site's directory, and the
    /// store's description for messages) says which items are this site's (none when
    /// `None`). A site set up with another store is refused ([`Error::WrongStore`]).
    pub async fn read(store: &dyn PageStore, site: Option<(&Path, &str)>) -> Result<Catalogue> {
        if let Some((dir, desc)) = site {
            crate::site::check_store(dir, store, desc).await?;
        }
        let site_dir = site.map(|(dir, _)| dir);
        let (items, plans) = catalog::read_all(store).await?;
        let items = items.into_iter().map(|(n, (doc, ..))| (n, doc)).collect();
        let plans = plans
            .into_iter()
            .map(|(doc, ..)| (doc.record.plan().name.clone(), doc.record))
            .collect();
        Ok(Catalogue {
            items,
            plans,
            site: site_dir.and_then(crate::site::id_of),
            source: Source::Store,
        })
    }

    /// A catalogue of nothing, as read from a store that was never written (no site has
    /// protected anything into it); it names no site.
    pub fn empty() -> Catalogue {
        Catalogue {
            items: BTreeMap::new(),
            plans: BTreeMap::new(),
            site: None,
            source: Source::Store,
        }
    }

    /// The documents the site in `site_dir` last wrote or read, from its cache.
    pub fn cached(site_dir: &Path) -> Result<Catalogue> {
        let dir = site_dir.join("cache");
        let entries = std::fs::read_dir(&dir).map_err(Error::io(format!(
            "reading the site's cache {}",
            dir.display()
        )))?;
        let mut items = BTreeMap::new();
        let mut oldest: Option<SystemTime> = None;
        for e in entries.flatten() {
            let file = e.file_name();
            let Some(name) = file.to_str().map(|n| n.replace('%', "/")) else {
                continue;
            };
            let Some(item) = catalog::item_of(&name) else {
                continue;
            };
            let path = e.path();
            let bytes =
                std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))?;
            let doc: Item = serde_json::from_slice(&bytes).map_err(|err| Error::Catalog {
                name: path.display().to_string(),
                reason: err.to_string(),
            })?;
            if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                oldest = Some(oldest.map_or(t, |o| o.min(t)));
            }
            items.insert(item.to_owned(), doc);
        }
        Ok(Catalogue {
            items,
            plans: BTreeMap::new(),
            site: crate::site::id_of(site_dir),
            source: Source::Cache {
                written: oldest.unwrap_or(SystemTime::UNIX_EPOCH),
            },
        })
    }

    /// Where it was read.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// One item, with its status at `now` (never before its owner's last clock).
    pub fn item(&self, name: &str, now: Duration) -> Result<ItemView<'_>> {
        let doc = self
            .items
            .get(name)
            .ok_or_else(|| Error::UnknownItem(name.to_owned()))?;
        Ok(self.view(doc, now))
    }

    /// Every item, by name.
    pub fn items(&self, now: Duration) -> impl Iterator<Item = ItemView<'_>> + '_ {
        self.items.values().map(move |doc| self.view(doc, now))
    }

    /// Every recovery plan, by name (none when read from the site's cache).
    pub fn plans(&self) -> impl Iterator<Item = &PlanRecord> + '_ {
        self.plans.values()
    }

    /// Every item's and plan's jobs, oldest first within each.
    pub fn jobs(&self) -> Vec<&Job> {
        self.items
            .values()
            .flat_map(|doc| doc.replication.jobs())
            .chain(self.plans.values().flat_map(PlanRecord::jobs))
            .collect()
    }

    /// What an administrator can do with a job now.
    pub fn allowed_actions(&self, job: &Job) -> Vec<JobAction> {
        let status = self
            .items
            .get(job.item())
            .map(|doc| doc.replication.status(doc.clock));
        lifeboat_replication::allowed_actions(job, status.as_ref())
    }

    fn view<'a>(&self, doc: &'a Item, now: Duration) -> ItemView<'a> {
        ItemView {
            item: doc,
            status: doc.replication.status(now.max(doc.clock)),
            owned: self.site == Some(doc.owner.site),
        }
    }
}
