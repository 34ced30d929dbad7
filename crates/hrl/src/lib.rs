/*!
Byte-exact reader and writer for Hyper-V Replica Log (`.hrl`) files, as published in
Microsoft's open specification [MS-HRL]: every write a virtual machine made to a disk,
oldest first.

This crate performs no I/O of its own and reads no clock: it reads through the [`ReadAt`]
trait of `lifeboat-source` (implemented for byte slices, [`bytes::Bytes`] and
[`std::fs::File`]), writes through any `Write + Seek`, and takes timestamps as arguments.

# Overview

- [`Reader`] validates a log (header, checksums, the metadata chain walked back from
  EOLLocation, payload layout, DataChecksums) and yields its writes oldest first, the
  replay order. Zero-copy over memory; positional reads over a file with memory bounded by
  the metadata. [`ReadOptions`] selects strict (default) or lenient reading, and salvage of
  logs that were not closed cleanly.
- [`LogWriter`] produces HRL v2 files the way Hyper-V does; [`reencode`] writes a read log
  back byte for byte.
- [`ChangeMap`] folds a chain of logs into the minimal set of final extents, checking that
  each log names its predecessor.
- [`checksum`] / [`byte_sum`]: the MS-HRL checksum, vectorised.

# Example

```
use std::io::Cursor;
use lifeboat_hrl::{ChangeMap, LogWriter, Reader, WriterConfig};

// Record three guest writes, the last overriding part of the first.
let config = WriterConfig { unique_id: [7; 16], ..WriterConfig::default() };
let mut w = LogWriter::new(Cursor::new(Vec::new()), config)?;
w.write(0, &[0xAA; 4096], 1)?;
w.write(65536, &[0xBB; 512], 2)?;
w.write(1024, &[0xCC; 512], 3)?;
let (file, _header) = w.finish(4)?;
let bytes = file.into_inner();

// Replay it onto a disk image, oldest first.
let log = Reader::new(bytes.as_slice())?;
let mut disk = vec![0u8; 1 << 20];
for (write, payload) in log.writes_with_payloads() {
    let at = write.disk_offset as usize;
    disk[at..at + payload.len()].copy_from_slice(payload);
}
assert_eq!(disk[1024], 0xCC);
assert_eq!(disk[2048], 0xAA);

// Or fold it into what a shipper has to send.
let mut map = ChangeMap::new();
map.add_log(&log)?;
assert_eq!(map.unique_bytes(), 4096 + 512);
# Ok::<(), lifeboat_hrl::Error>(())
```

# Where the rules come from

The format details, test vectors and resolved ambiguities follow the project's
implementer's reference of [MS-HRL] v6.0 (`shared/spec/ms-hrl.md`): little-endian packed
structures, the complemented byte-sum checksum, the backward metadata chain, slot order as
write order, and the salvage walk of §4.4.

# Crate features

- `fuzzing` (off by default): the model checks and input builders the fuzz targets share
  with the property tests (not a stable API).

[MS-HRL]: https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-hrl/
*/
#![doc(test(attr(deny(warnings))))]

/// Where log bytes come from (the workspace's one positional-read trait).
pub use lifeboat_source::ReadAt;

pub use crate::{
    changemap::{ChangeMap, Extent, Piece},
    checksum::{byte_sum, checksum},
    error::{Error, Warning},
    format::{
        COOKIE, DEFAULT_METADATA_SIZE, Entry, HEADER_SIZE, HRL_EPOCH_UNIX_SECS, Header,
        MetadataHeader, OP_WRITE, RECORD_SIZE, VERSION_1, VERSION_2,
    },
    reader::{Block, ReadOptions, Reader, Salvage, WriteRef},
    writer::{LogWriter, WriterConfig, reencode},
};

mod changemap;
mod checksum;
mod error;
mod format;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod reader;
mod writer;

#[cfg(test)]
mod tests;
