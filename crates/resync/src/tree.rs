//! A hash tree over block digests, and a sans-IO exchange that finds the differing blocks
//! of two remote disks with O(changed × log n) digests instead of a whole signature.

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::diff::{Delta, Extent, ExtentKind, push_extent};
use crate::signature::{Digest, Signature};

/// Children per node.
pub const FANOUT: u64 = 64;

type Node = [u8; 32];

/// A hash tree (fan-out [`FANOUT`]) over the block digests of a [`Signature`].
///
/// Leaves bind each block's length as well as its digest, so a block cut short by a
/// length change never matches. Both sides of an exchange build their tree with the same
/// leaf count: the larger of the two disks' block counts (exchange lengths first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashTree {
    /// `levels[0]` are the leaves; the last level is the root alone.
    levels: Vec<Vec<Node>>,
}

impl HashTree {
    /// Builds the tree of `sig` with `leaves` leaves (at least the signature's block count;
    /// leaves past the disk's end are marked absent).
    pub fn new(sig: &Signature, leaves: u64) -> Result<Self, Error> {
        let blocks = sig.digests().len() as u64;
        if leaves < blocks {
            return Err(Error::BadExchange {
                reason: "fewer leaves than the signature has blocks",
            });
        }
        let bs = sig.block_size();
        let absent = *blake3::hash(b"lifeboat-resync absent block").as_bytes();
        let mut level: Vec<Node> = Vec::with_capacity(leaves as usize);
        for (i, d) in sig.digests().iter().enumerate() {
            let r = bs.range(i as u64, sig.len());
            let mut h = blake3::Hasher::new();
            h.update(&(r.end - r.start).to_le_bytes());
            match d {
                Digest::Zero => h.update(&[0]),
                Digest::Hash(x) => h.update(&[1]).update(x),
            };
            level.push(*h.finalize().as_bytes());
        }
        level.resize(leaves as usize, absent);
        let mut levels = vec![level];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let above = below
                .chunks(FANOUT as usize)
                .map(|c| {
                    let mut h = blake3::Hasher::new();
                    for n in c {
                        h.update(n);
                    }
                    *h.finalize().as_bytes()
                })
                .collect();
            levels.push(above);
        }
        Ok(HashTree { levels })
    }

    /// The leaf count.
    pub fn leaves(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Levels, leaves included.
    pub fn height(&self) -> u32 {
        self.levels.len() as u32
    }

    /// The root digest (`None` for an empty tree).
    pub fn root(&self) -> Option<[u8; 32]> {
        self.levels.last().and_then(|l| l.first()).copied()
    }

    /// Answers a peer's [`Request`] with the digests it names.
    pub fn answer(&self, req: &Request) -> Result<Response, Error> {
        let level = self
            .levels
            .get(req.level as usize)
            .ok_or(Error::BadExchange {
                reason: "request names a level the tree does not have",
            })?;
        let digests = req
            .nodes
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| level.get(i))
                    .copied()
                    .ok_or(Error::BadExchange {
                        reason: "request names a node the tree does not have",
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Response { digests })
    }
}

/// "Send me the digests of these nodes of this level" (level 0 = leaves).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The tree level.
    pub level: u32,
    /// Node indices within the level, ascending.
    pub nodes: Vec<u64>,
}

/// The digests a [`Request`] asked for, in its order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// One digest per requested node.
    pub digests: Vec<[u8; 32]>,
}

impl Request {
    /// Bytes on the wire in a plain encoding (level + count + 8 per index).
    pub fn wire_len(&self) -> u64 {
        8 + 8 * self.nodes.len() as u64
    }
}

impl Response {
    /// Bytes on the wire in a plain encoding (count + 32 per digest).
    pub fn wire_len(&self) -> u64 {
        4 + 32 * self.digests.len() as u64
    }
}

/// The requesting side of a hash-tree exchange: it holds the source's tree and walks down
/// from the root, one round trip per level, asking only for the children of nodes that
/// differ. Sans-IO: carry each [`Request`] to the peer's [`HashTree::answer`] and feed the
/// [`Response`] back.
///
/// ```
/// use lifeboat_resync::{BlockSize, HashTree, Signature, TreeSync, diff};
///
/// let source = vec![7u8; 1 << 20];
/// let mut target = source.clone();
/// target[300_000] = 0;
/// let bs = BlockSize::new(4096)?;
/// let (s, t) = (Signature::compute(&source, bs)?, Signature::compute(&target, bs)?);
/// let leaves = bs.blocks(s.len().max(t.len()));
///
/// let remote = HashTree::new(&t, leaves)?;                 // on the target's side
/// let mut sync = TreeSync::new(HashTree::new(&s, leaves)?); // on the source's side
/// while let Some(req) = sync.poll_request() {
///     let resp = remote.answer(&req)?;                      // the network round trip
///     sync.handle_response(&resp)?;
/// }
/// let delta = sync.into_delta(&s, t.len())?;
/// assert_eq!(delta, diff(&s, &t)?);
/// # Ok::<(), lifeboat_resync::Error>(())
/// ```
#[derive(Debug)]
pub struct TreeSync {
    local: HashTree,
    next: Option<Request>,
    in_flight: Option<Request>,
    differing: Vec<u64>,
    bytes: u64,
    rounds: u32,
}

impl TreeSync {
    /// Starts an exchange from the root of the source's tree.
    pub fn new(local: HashTree) -> Self {
        let next = (local.leaves() > 0).then(|| Request {
            level: local.height() - 1,
            nodes: vec![0],
        });
        TreeSync {
            local,
            next,
            in_flight: None,
            differing: Vec::new(),
            bytes: 0,
            rounds: 0,
        }
    }

    /// The next request to send, if the exchange is not finished.
    #[must_use]
    pub fn poll_request(&mut self) -> Option<Request> {
        let req = self.next.take()?;
        self.in_flight = Some(req.clone());
        Some(req)
    }

    /// Feeds the peer's answer to the last request.
    pub fn handle_response(&mut self, resp: &Response) -> Result<(), Error> {
        let req = self.in_flight.take().ok_or(Error::BadExchange {
            reason: "response without a request",
        })?;
        if resp.digests.len() != req.nodes.len() {
            return Err(Error::BadExchange {
                reason: "response length differs from the request",
            });
        }
        self.rounds += 1;
        self.bytes += req.wire_len() + resp.wire_len();
        let mine = &self.local.levels[req.level as usize];
        let differ = req
            .nodes
            .iter()
            .zip(&resp.digests)
            .filter(|(i, d)| mine[**i as usize] != **d)
            .map(|(i, _)| *i);
        if req.level == 0 {
            self.differing.extend(differ);
            return Ok(());
        }
        let below = self.local.levels[req.level as usize - 1].len() as u64;
        let nodes: Vec<u64> = differ
            .flat_map(|p| p * FANOUT..((p + 1) * FANOUT).min(below))
            .collect();
        if !nodes.is_empty() {
            self.next = Some(Request {
                level: req.level - 1,
                nodes,
            });
        }
        Ok(())
    }

    /// Whether no request is pending or in flight.
    pub fn is_done(&self) -> bool {
        self.next.is_none() && self.in_flight.is_none()
    }

    /// Differing leaves found so far, ascending.
    pub fn differing_blocks(&self) -> &[u64] {
        &self.differing
    }

    /// Request and response bytes exchanged so far.
    pub fn bytes_exchanged(&self) -> u64 {
        self.bytes
    }

    /// Round trips so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// The delta that makes a target of `target_len` bytes equal to `source` (whose tree
    /// this exchange held), exactly as [`diff`](crate::diff) of the two signatures would.
    pub fn into_delta(self, source: &Signature, target_len: u64) -> Result<Delta, Error> {
        if !self.is_done() {
            return Err(Error::BadExchange {
                reason: "the exchange is not finished",
            });
        }
        let bs = source.block_size();
        let blocks = source.digests().len() as u64;
        let mut delta = Delta::starting(bs, source.len(), target_len, 0);
        delta.blocks_compared = blocks;
        delta.next_block = blocks;
        for &i in self.differing.iter().filter(|&&i| i < blocks) {
            let zero = source.digests()[i as usize] == Digest::Zero;
            if zero && bs.range(i, target_len).is_empty() {
                continue; // past the target's end: the resize reads as zeros
            }
            let r = bs.range(i, source.len());
            let kind = if zero {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            push_extent(
                &mut delta.extents,
                Extent {
                    offset: r.start,
                    len: r.end - r.start,
                    kind,
                },
            );
        }
        Ok(delta)
    }
}
