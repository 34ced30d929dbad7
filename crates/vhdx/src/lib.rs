/*!
Read-only VHDX virtual disks ([MS-VHDX]), the format Hyper-V stores disks in, and a
writer of new dynamic VHDX files.

[`Vhdx::open`] checks the file identifier, both headers (CRC-32C; the valid one with the
higher sequence number is current), both region tables, and the metadata items (block
size, virtual size, sector sizes, disk id), refusing unknown *required* regions and items.
The BAT is read a 4 KiB page at a time as the disk is read, never whole. The virtual disk
reads through [`Vhdx::read_at`] or as a [`lifeboat_source::ReadAt`] (what initial
replication and resync read), and [`Vhdx::extents`] says which ranges hold data and which
read as zeros, so a copy sends only allocated blocks. [`Info::data_write_guid`] is the
`Vhd2DataWriteGuid` HRL logs of the disk name. A file not closed cleanly (a header with a
LogGuid set: Hyper-V had it open, or crashed) has its log replayed **in memory** (spec
2.3.3: the newest complete sequence whose head's tail lies in it, tail to head; bytes up to
the head's LastFileOffset read as zeros past the end; a file shorter than its
FlushedFileOffset is refused). Nothing is ever written to the file: a live disk or a VSS
snapshot is safe to read.

[`write_dynamic`] writes a virtual disk as a new dynamic VHDX, zero blocks unallocated
(`qemu-img check` and `compare` accept what it writes): the engine's `--format vhdx`
test-failover and failover output.

A differencing disk (`.avhdx`, a Hyper-V checkpoint) reads through its parent:
[`open_chain`] opens the chain from the child down (the embedder resolves each
[`ParentLocator`] to a file), checks each link (the parent's DataWriteGuid is the child's
`parent_linkage`, the sizes agree) and refuses loops; a partially present block is read
sector by sector as its sector bitmap says.

[`Vhdx::begin_writes`] and [`Vhdx::write_at`] write into an existing VHDX in place (a
failback onto the on-premises disk): a new header with a new DataWriteGuid first, as the
spec requires, then the data, into blocks the file holds (every block of a fixed VHDX).

Not done yet, refused with [`Error::Unsupported`] rather than guessed: logs over 256 MiB,
allocating blocks of a dynamic VHDX (it must go through the log to be crash-safe), writing
into a differencing disk. The `testing` feature adds hand-made differencing chains for
tests (no Linux tool writes one).

This crate performs no I/O of its own: it reads through `ReadAt` (files, byte slices)
and writes through any `Write + Seek`.

# Example

```
use std::io::Cursor;
use lifeboat_vhdx::{ExtentKind, Vhdx, WriteOptions, write_dynamic};

// A 4 MiB disk: 1 MiB of data, then zeros.
let mut disk = vec![0u8; 4 << 20];
disk[..1 << 20].fill(0xAB);
let mut file = Cursor::new(Vec::new());
let opts = WriteOptions { block_size: 1 << 20, ..WriteOptions::default() };
write_dynamic(&disk, opts, &mut file)?;

let vhdx = Vhdx::open(file.into_inner())?;
assert_eq!(vhdx.info().virtual_size, 4 << 20);
let extents = vhdx.extents()?;
assert_eq!(extents[0].kind, ExtentKind::Data);
assert_eq!(extents[1].range, (1 << 20)..(4 << 20));
let mut buf = [0u8; 512];
vhdx.read_at(&mut buf, 1000)?;
assert_eq!(buf, [0xAB; 512]);
# Ok::<(), Box<dyn std::error::Error>>(())
```
*/
#![doc(test(attr(deny(warnings))))]

pub use crate::{
    error::{Error, Result},
    inplace::WriteAt,
    parent::{MAX_CHAIN, ParentLocator, format_guid, open_chain},
    reader::{Extent, ExtentKind, Info, Vhdx},
    writer::{WriteOptions, write_dynamic},
};

mod error;
mod format;
mod inplace;
mod log;
mod parent;
mod reader;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

/// Whether `head` (a file's first bytes) is a VHDX file's identifier.
///
/// ```
/// assert!(lifeboat_vhdx::is_vhdx(b"vhdxfile\0\0"));
/// assert!(!lifeboat_vhdx::is_vhdx(b"conectix"));
/// ```
pub fn is_vhdx(head: &[u8]) -> bool {
    head.starts_with(b"vhdxfile")
}
