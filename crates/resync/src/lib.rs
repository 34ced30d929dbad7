/*!
Fixed-block resynchronisation: BLAKE3 block signatures, `diff(source, target)` that finds
the differing blocks, `apply` that writes only those, and a hash-tree exchange that finds
them between two remote sides with few digests.

This crate performs no I/O of its own and reads no clock: disks are read through the
[`ReadAt`] trait of `lifeboat-source` and written through [`BlockWriter`] (both
implemented for byte buffers and [`std::fs::File`]); the hash-tree exchange is a request/response state machine
with no networking.

# Overview

- [`Signature`]: block size, disk length, one [`Digest`] per block (BLAKE3, or
  [`Digest::Zero`] for an all-zero block, detected before hashing). Compact versioned
  encoding, also streamed ([`SignatureWriter`], [`SignatureReader`], [`write_signature`]).
- [`diff`] / [`diff_with`]: a [`Delta`] of coalesced data and zero [`Extent`]s plus
  counters, from any pairing of local bytes and signatures, with progress, in ranges of
  blocks joined by [`Delta::append`]. Every progress callback of the crate stops the same
  way: [`Error::Interrupted`] naming the next block. [`apply`] writes a delta;
  `apply(diff(a, b), a → b)` makes `b` equal `a`.
- [`HashTree`] / [`TreeSync`]: fan-out-64 tree over the digests; the exchange asks only
  for children of differing nodes.

# Example

```
use lifeboat_resync as resync;

let source = vec![5u8; 1 << 20];
let mut replica = vec![5u8; 1 << 20];
replica[123_456] = 0;
replica[800_000..900_000].fill(0);

// The replica is remote: only its signature crosses the network.
let remote_sig = resync::Signature::compute(&replica, resync::BlockSize::DEFAULT)?;
let delta = resync::diff(&source, &remote_sig)?;
assert_eq!(delta.data_bytes(), 3 * 65536); // blocks 1, 12 and 13

resync::apply(&delta, source.as_slice(), &mut replica)?;
assert_eq!(replica, source);
# Ok::<(), resync::Error>(())
```

# Crate features

- `parallel` (off by default): hash and compare the blocks of each 8 MiB chunk on all
  cores with rayon. Below one chunk (a disk under 8 MiB) it does not pay.
- `fuzzing` (off by default): the model checks and input builders the fuzz targets share
  with the property tests (not a stable API).
*/
#![doc(test(attr(deny(warnings))))]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// What disks are read through (the workspace's one positional-read trait).
pub use lifeboat_source::ReadAt;

pub use crate::{
    block::{BlockDigester, BlockSize, Progress, digest_block, is_zero},
    diff::{
        ApplyStats, Delta, DiffOptions, Extent, ExtentKind, Side, apply, diff, diff_streamed,
        diff_with,
    },
    error::Error,
    io::BlockWriter,
    signature::{
        Digest, SIGNATURE_MAGIC, SIGNATURE_VERSION, Signature, SignatureReader, SignatureWriter,
        write_signature,
    },
    tree::{FANOUT, HashTree, Request, Response, TreeSync},
};

mod block;
mod diff;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod io;
mod signature;
mod tree;

#[cfg(test)]
mod tests;
