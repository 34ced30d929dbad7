/*!
Where Lifeboat's bytes come from, in one place the other crates share.

- [`ReadAt`]: a length and positional reads. The HRL reader walks logs through it, resync
  hashes and compares disks through it, the VHDX reader reads its file through it, and the
  engine's disks and blobs implement it. Implemented here for byte slices, `Vec<u8>`,
  [`bytes::Bytes`] and [`std::fs::File`]. [`ReadAt::data_ranges`] says what may hold data
  (a sparse file's data segments on Linux, a VHDX's allocated blocks): readers skip the
  rest, which reads as zeros. [`ReadAt::read_bytes_at`], [`PlacedBuf`] and [`line_pad`]
  place what is read in memory as it lies in the source's pages (the kernel copies it 3x
  faster so).
- [`SplitMix64`]: a small seeded generator, the one used for retry jitter, for test and
  bench inputs, and for the demo's data: the same seed gives the same bytes everywhere.

This crate holds no logic of the cores (no digest rule, no log format): only these two
seams, so the cores can share them without depending on one another. It does no I/O of
its own beyond the [`std::fs::File`] implementation of [`ReadAt`].

# Example

```
use lifeboat_source::{ReadAt, SplitMix64};

let data = SplitMix64::new(7).bytes(4096);
let mut buf = [0u8; 16];
data.read_exact_at(&mut buf, 100)?;
assert_eq!(buf, data[100..116]);
assert_eq!(data.size()?, 4096);
// Reading past the end is an error, never a short read.
assert!(data.read_exact_at(&mut buf, 4090).is_err());
// The same seed, the same bytes.
assert_eq!(SplitMix64::new(7).bytes(4096), data);
// A buffer cannot tell where its zeros are: all of it may hold data.
assert_eq!(data.data_ranges(1000, 24)?, std::iter::once(1000..1024).collect::<Vec<_>>());
# Ok::<(), std::io::Error>(())
```
*/
#![doc(test(attr(deny(warnings))))]

pub use crate::{
    read_at::{LINE, PlacedBuf, ReadAt, line_pad},
    seeded::SplitMix64,
};

mod read_at;
mod seeded;
