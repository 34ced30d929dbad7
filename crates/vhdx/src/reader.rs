//! [`Vhdx`]: a VHDX file opened read-only, its virtual disk read through it.

use std::io;
use std::ops::Range;
use std::sync::Mutex;

use lifeboat_source::ReadAt;

use crate::error::{Error, Result};
use crate::format::*;
use crate::log::{self, Overlay};
use crate::parent::{ParentLocator, format_guid};

/// Entries read per BAT page (4 KiB): the BAT is never loaded whole (a 64 TB disk with
/// 1 MiB blocks has a 512 MiB BAT).
const BAT_PAGE: u64 = 512;

/// What a range of the virtual disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data stored in the file.
    Data,
    /// Reads as zeros (never written, discarded, or explicitly zero): nothing to copy.
    Zero,
}

/// A run of the virtual disk of one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The virtual disk's bytes it covers.
    pub range: Range<u64>,
    /// Data or zeros.
    pub kind: ExtentKind,
}

/// What the file's headers and metadata say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The virtual disk's size in bytes.
    pub virtual_size: u64,
    /// Bytes per payload block (a power of two, 1 to 256 MiB).
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Changes whenever the virtual disk's data changes: the `Vhd2DataWriteGuid` an HRL
    /// log of this disk names.
    pub data_write_guid: [u8; 16],
    /// The virtual disk's id.
    pub disk_id: [u8; 16],
    /// Whether every block has space in the file (a fixed VHDX).
    pub leave_blocks_allocated: bool,
    /// Whether this is a differencing disk (`.avhdx`): what its blocks do not hold is its
    /// parent's.
    pub differencing: bool,
    /// The current header's sequence number.
    pub header_sequence: u64,
}

/// A VHDX file opened read-only over any positional reader (a file, a VSS snapshot, a
/// byte slice): it never writes, so a live disk's file is safe to read.
///
/// Fixed, dynamic and differencing VHDX are read (a differencing disk through the parent
/// attached with [`Vhdx::with_parent`], or opened with [`open_chain`]); a log that must be
/// replayed is replayed in memory.
///
/// [`open_chain`]: crate::open_chain
pub struct Vhdx<S> {
    pub(crate) source: S,
    /// What a replayed log changed, read over the file.
    pub(crate) overlay: Option<Overlay>,
    /// A differencing disk's parent locator.
    locator: Option<ParentLocator>,
    /// Its parent, once attached ([`Vhdx::with_parent`]).
    parent: Option<Box<Vhdx<S>>>,
    /// Where the current header is.
    pub(crate) header_at: u64,
    /// Whether [`Vhdx::begin_writes`] made it ready for writes in place.
    pub(crate) writable: bool,
    pub(crate) info: Info,
    bat_offset: u64,
    bat_len: u64,
    chunk_ratio: u64,
    /// The file's length as last read: read again only when a block seems to lie past it
    /// (a live file grows as blocks are allocated).
    file_len: std::sync::atomic::AtomicU64,
    /// The BAT page read last: (first entry, entries).
    page: Mutex<Option<(u64, Vec<u64>)>>,
}

impl<S: ReadAt> Vhdx<S> {
    /// Opens and checks the file: its identifier, both headers (the valid one with the
    /// higher sequence number is current), the log (replayed in memory when the current
    /// header's LogGuid is set), both region tables, the metadata items. The BAT is read
    /// page by page as the disk is read.
    pub fn open(source: S) -> Result<Self> {
        let file_len = source.size().map_err(|e| Error::Io {
            offset: 0,
            source: e,
        })?;
        let mut ident = [0u8; 8];
        read(&source, &mut ident, 0, file_len)?;
        if &ident != b"vhdxfile" {
            return Err(Error::NotVhdx { found: ident });
        }
        let header = current_header(&source, file_len)?;
        let overlay = if header.log_guid == [0; 16] {
            None
        } else if header.log_version != 0 {
            return Err(Error::unsupported(
                format!("log version {}", header.log_version),
                header.at + 64,
                "only log version 0 is specified",
            ));
        } else {
            // The log may hold updates that did not reach their place: replayed in memory,
            // the file untouched.
            Some(log::replay(
                &source,
                file_len,
                header.at,
                header.log_guid,
                header.log_offset,
                header.log_len,
            )?)
        };
        let view = View {
            source: &source,
            overlay: overlay.as_ref(),
        };
        let file_len = view.len(file_len);
        let regions = region_table(&view, file_len)?;
        let find = |id: &[u8; 16], name: &str| {
            regions
                .iter()
                .find(|r| &r.0 == id)
                .map(|r| (r.1, r.2))
                .ok_or_else(|| {
                    Error::invalid(
                        "region table",
                        REGION_TABLES[0],
                        format!("a {name} region"),
                        "none",
                    )
                })
        };
        let (bat_offset, bat_len) = find(&BAT_REGION, "BAT")?;
        let (meta_offset, meta_len) = find(&METADATA_REGION, "metadata")?;
        for (offset, len, name) in [
            (bat_offset, bat_len, "BAT"),
            (meta_offset, meta_len, "metadata"),
        ] {
            if !offset.is_multiple_of(MIB) || offset < MIB || offset.saturating_add(len) > file_len
            {
                return Err(Error::invalid(
                    format!("{name} region"),
                    offset,
                    format!(
                        "1 MiB-aligned, after the first MiB, within the file ({file_len} bytes)"
                    ),
                    format!("{len} bytes at {offset}"),
                ));
            }
        }
        let meta = metadata(&view, meta_offset, meta_len)?;
        let info = Info {
            virtual_size: meta.virtual_size,
            block_size: meta.block_size,
            logical_sector_size: meta.logical,
            physical_sector_size: meta.physical,
            data_write_guid: header.data_write_guid,
            disk_id: meta.disk_id,
            leave_blocks_allocated: meta.leave_allocated,
            differencing: meta.locator.is_some(),
            header_sequence: header.sequence,
        };
        let chunk_ratio = ((1u64 << 23) * u64::from(meta.logical)) / u64::from(meta.block_size);
        let blocks = info.virtual_size.div_ceil(u64::from(meta.block_size));
        let entries = if blocks == 0 {
            0
        } else {
            blocks + (blocks - 1) / chunk_ratio
        };
        if entries.saturating_mul(8) > bat_len {
            return Err(Error::invalid(
                "BAT region",
                bat_offset,
                format!("at least {} bytes for {blocks} blocks", entries * 8),
                format!("{bat_len} bytes"),
            ));
        }
        Ok(Vhdx {
            source,
            overlay,
            locator: meta.locator,
            parent: None,
            header_at: header.at,
            writable: false,
            info,
            bat_offset,
            bat_len,
            chunk_ratio,
            file_len: std::sync::atomic::AtomicU64::new(file_len),
            page: Mutex::new(None),
        })
    }

    /// The file as read: through the replayed log's overlay, if there was one.
    fn view(&self) -> View<'_> {
        View {
            source: &self.source,
            overlay: self.overlay.as_ref(),
        }
    }

    /// Whether a log was replayed (in memory) to open the file.
    pub fn log_replayed(&self) -> bool {
        self.overlay.is_some()
    }

    /// What the headers and metadata say.
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The underlying reader.
    pub fn into_inner(self) -> S {
        self.source
    }

    /// A BAT entry: (state, file offset), the offset checked to lie in the file (after
    /// the first MiB) for the states that have one.
    fn bat(&self, index: u64, len: u64) -> Result<(u64, u64)> {
        let first = index / BAT_PAGE * BAT_PAGE;
        let mut page = self.page.lock().unwrap_or_else(|p| p.into_inner());
        if page.as_ref().is_none_or(|(f, _)| *f != first) {
            let n = BAT_PAGE.min(self.bat_len / 8 - first);
            let mut buf = vec![0u8; (n * 8) as usize];
            let at = self.bat_offset + first * 8;
            self.view().read_file(&mut buf, at)?;
            let entries = (0..n as usize).map(|i| u64_at(&buf, i * 8)).collect();
            *page = Some((first, entries));
        }
        let (_, entries) = page.as_ref().expect("read above");
        let raw = entries[(index - first) as usize];
        drop(page);
        let (state, offset) = (raw & 7, (raw >> 20) << 20);
        let at = self.bat_offset + index * 8;
        if matches!(state, state::FULLY_PRESENT | state::PARTIALLY_PRESENT) {
            use std::sync::atomic::Ordering::Relaxed;
            let end = offset.saturating_add(len);
            let mut file_len = self.file_len.load(Relaxed);
            if end > file_len.next_multiple_of(MIB) {
                let on_disk = self.source.size().map_err(|e| Error::Io {
                    offset: at,
                    source: e,
                })?;
                file_len = self.view().len(on_disk);
                self.file_len.store(file_len, Relaxed);
            }
            if offset < MIB || end > file_len.next_multiple_of(MIB) {
                return Err(Error::invalid(
                    format!("BAT entry {index}"),
                    at,
                    format!("a block after the first MiB and within the file ({file_len} bytes)"),
                    format!("a block at {offset}"),
                ));
            }
        }
        Ok((state, offset))
    }

    /// Where payload block `block`'s bytes are.
    pub(crate) fn place(&self, block: u64) -> Result<Place> {
        let index = block + block / self.chunk_ratio;
        let (state, offset) = self.bat(index, u64::from(self.info.block_size))?;
        let at = self.bat_offset + index * 8;
        Ok(match state {
            state::FULLY_PRESENT => Place::File(offset),
            state::ZERO | state::UNMAPPED => Place::Zero,
            state::NOT_PRESENT | state::UNDEFINED if self.info.differencing => Place::Parent,
            state::NOT_PRESENT | state::UNDEFINED => Place::Zero,
            state::PARTIALLY_PRESENT if self.info.differencing => {
                // The chunk's sector bitmap entry follows its payload entries.
                let chunk = block / self.chunk_ratio;
                let sb_index = chunk * (self.chunk_ratio + 1) + self.chunk_ratio;
                let (sb_state, sb_offset) = self.bat(sb_index, MIB)?;
                if sb_state != state::FULLY_PRESENT {
                    return Err(Error::invalid(
                        format!("BAT entry {sb_index} (sector bitmap)"),
                        self.bat_offset + sb_index * 8,
                        format!(
                            "a present sector bitmap block (block {block} is partially present)"
                        ),
                        format!("state {sb_state}"),
                    ));
                }
                Place::Partial {
                    data: offset,
                    bitmap: sb_offset,
                    first_sector: (block % self.chunk_ratio) * u64::from(self.info.block_size)
                        / u64::from(self.info.logical_sector_size),
                }
            }
            state::PARTIALLY_PRESENT => {
                return Err(Error::invalid(
                    format!("BAT entry {index}"),
                    at,
                    "no partially present block (the file has no parent)",
                    "state 7",
                ));
            }
            other => {
                return Err(Error::invalid(
                    format!("BAT entry {index}"),
                    at,
                    "a payload state of 0, 1, 2, 3, 6 or 7",
                    other.to_string(),
                ));
            }
        })
    }

    /// The parent, for a read this differencing disk does not hold.
    fn parent(&self, at: u64) -> Result<&Vhdx<S>> {
        self.parent.as_deref().ok_or_else(|| {
            Error::unsupported(
                "a read of the parent's data",
                at,
                "attach the parent first (`Vhdx::with_parent`, or open with `open_chain`)",
            )
        })
    }

    /// The virtual disk's extents in order, adjacent ones of a kind merged. Reads the BAT
    /// page by page (a differencing disk's parent's too, for what the child leaves to it).
    pub fn extents(&self) -> Result<Vec<Extent>> {
        let bs = u64::from(self.info.block_size);
        let size = self.info.virtual_size;
        let inherited = match &self.parent {
            Some(p) => p.extents()?,
            None => Vec::new(),
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |range: Range<u64>, kind: ExtentKind| match out.last_mut() {
            Some(e) if e.kind == kind && e.range.end == range.start => e.range.end = range.end,
            _ => out.push(Extent { range, kind }),
        };
        for block in 0..size.div_ceil(bs) {
            let range = block * bs..((block + 1) * bs).min(size);
            match self.place(block)? {
                Place::File(_) | Place::Partial { .. } => push(range, ExtentKind::Data),
                Place::Zero => push(range, ExtentKind::Zero),
                Place::Parent => {
                    self.parent(range.start)?;
                    for e in inherited
                        .iter()
                        .filter(|e| e.range.end > range.start && e.range.start < range.end)
                    {
                        let r = e.range.start.max(range.start)..e.range.end.min(range.end);
                        push(r, e.kind);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes of the virtual disk whose blocks hold data (in this file or, for a
    /// differencing disk, its parents).
    pub fn allocated(&self) -> Result<u64> {
        Ok(self
            .extents()?
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| e.range.end - e.range.start)
            .sum())
    }

    /// A differencing disk's parent locator.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.locator.as_ref()
    }

    /// The attached parent, if any.
    pub fn parent_disk(&self) -> Option<&Vhdx<S>> {
        self.parent.as_deref()
    }

    /// Attaches a differencing disk's parent (itself complete: its own parent attached),
    /// checking the link: the parent's DataWriteGuid is the locator's `parent_linkage`
    /// (or `parent_linkage2`), and the virtual and logical sector sizes agree.
    pub fn with_parent(mut self, parent: Vhdx<S>) -> Result<Self> {
        let Some(locator) = &self.locator else {
            return Err(Error::invalid(
                "file parameters",
                0,
                "a differencing disk (HasParent) to attach a parent to",
                "a disk without a parent",
            ));
        };
        let found = parent.info.data_write_guid;
        if !locator.linkages().contains(&found) {
            return Err(Error::invalid(
                "parent locator",
                0,
                format!(
                    "a parent whose DataWriteGuid is {} (parent_linkage)",
                    locator
                        .linkages()
                        .first()
                        .map_or_else(String::new, format_guid)
                ),
                format!(
                    "{} (the parent changed since the child was made, or it is another disk)",
                    format_guid(&found)
                ),
            ));
        }
        let (a, b) = (&self.info, &parent.info);
        if a.virtual_size != b.virtual_size || a.logical_sector_size != b.logical_sector_size {
            return Err(Error::invalid(
                "parent",
                0,
                format!(
                    "{} bytes in {}-byte sectors, as the child",
                    a.virtual_size, a.logical_sector_size
                ),
                format!(
                    "{} bytes in {}-byte sectors",
                    b.virtual_size, b.logical_sector_size
                ),
            ));
        }
        self.parent = Some(Box::new(parent));
        Ok(self)
    }

    /// Fills `buf` with the virtual disk's bytes from `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.info.virtual_size;
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        let bs = u64::from(self.info.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / bs;
            let within = at % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let part = &mut buf[done..done + n];
            match self.place(block)? {
                Place::File(file_offset) => {
                    self.view().read_file(part, file_offset + within)?;
                }
                Place::Zero => part.fill(0),
                Place::Parent => self.parent(at)?.read_at(part, at)?,
                Place::Partial {
                    data,
                    bitmap,
                    first_sector,
                } => self.read_partial(part, at, data + within, bitmap, first_sector, within)?,
            }
            done += n;
        }
        Ok(())
    }
}

impl<S: ReadAt> Vhdx<S> {
    /// Reads `part` (virtual offset `at`, `within` bytes into its block, at `data` in the
    /// file) from a partially present block: each sector from this file when its bit in
    /// the sector bitmap is set, else from the parent.
    fn read_partial(
        &self,
        part: &mut [u8],
        at: u64,
        data: u64,
        bitmap: u64,
        first_sector: u64,
        within: u64,
    ) -> Result<()> {
        let ss = u64::from(self.info.logical_sector_size);
        let (first, last) = (within / ss, (within + part.len() as u64 - 1) / ss);
        let (lo, hi) = ((first_sector + first) / 8, (first_sector + last) / 8);
        let mut bits = vec![0u8; (hi - lo + 1) as usize];
        self.view().read_file(&mut bits, bitmap + lo)?;
        let present = |s: u64| {
            let bit = first_sector + s;
            bits[(bit / 8 - lo) as usize] >> (bit % 8) & 1 == 1
        };
        let mut s = first;
        while s <= last {
            let here = present(s);
            let mut e = s;
            while e < last && present(e + 1) == here {
                e += 1;
            }
            // The run of sectors s..=e, clipped to the part.
            let from = (s * ss).max(within) - within;
            let to = ((e + 1) * ss).min(within + part.len() as u64) - within;
            let piece = &mut part[from as usize..to as usize];
            if here {
                self.view().read_file(piece, data + from)?;
            } else {
                self.parent(at + from)?.read_at(piece, at + from)?;
            }
            s = e + 1;
        }
        Ok(())
    }
}

/// Where a payload block's bytes are.
pub(crate) enum Place {
    /// In this file, at this offset.
    File(u64),
    /// Zeros.
    Zero,
    /// The parent's (a differencing disk's block not present).
    Parent,
    /// Sector by sector, as the sector bitmap (at `bitmap`) says: this file's block at
    /// `data`, or the parent; `first_sector` is the block's first bit in the bitmap.
    Partial {
        data: u64,
        bitmap: u64,
        first_sector: u64,
    },
}

/// The virtual disk, as a [`ReadAt`]: what initial replication and resync read.
impl<S: ReadAt> ReadAt for Vhdx<S> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.info.virtual_size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset).map_err(io::Error::from)
    }

    /// The blocks of the range that hold data (here or, for a differencing disk, in a
    /// parent), from the BAT: unallocated and zero blocks are left out.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        let bs = u64::from(self.info.block_size);
        let end = offset.saturating_add(len).min(self.info.virtual_size);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut push = |r: Range<u64>| match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        };
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let stop = (block + 1).saturating_mul(bs).min(end);
            match self.place(block)? {
                Place::Zero => {}
                Place::Parent => {
                    for r in self.parent(at)?.data_ranges(at, stop - at)? {
                        push(r);
                    }
                }
                Place::File(_) | Place::Partial { .. } => push(at..stop),
            }
            at = stop;
        }
        Ok(out)
    }
}

impl<S> std::fmt::Debug for Vhdx<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// The file, with a replayed log's changes over it.
struct View<'a> {
    source: &'a dyn ReadAt,
    overlay: Option<&'a Overlay>,
}

impl View<'_> {
    /// The file's length (after replay) when `on_disk` bytes are on disk.
    fn len(&self, on_disk: u64) -> u64 {
        self.overlay.map_or(on_disk, |o| o.len().max(on_disk))
    }

    fn read_file(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.overlay {
            Some(o) => o.read(self.source, buf, offset),
            None => self
                .source
                .read_exact_at(buf, offset)
                .map_err(|e| Error::Io { offset, source: e }),
        }
    }
}

impl ReadAt for View<'_> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len(self.source.size()?))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_file(buf, offset).map_err(io::Error::from)
    }
}

/// Reads `buf.len()` bytes at `offset`, refusing reads past the file's end.
fn read(source: &dyn ReadAt, buf: &mut [u8], offset: u64, file_len: u64) -> Result<()> {
    if offset + buf.len() as u64 > file_len {
        return Err(Error::invalid(
            "file",
            offset,
            format!("at least {} bytes", offset + buf.len() as u64),
            format!("{file_len} bytes"),
        ));
    }
    source
        .read_exact_at(buf, offset)
        .map_err(|e| Error::Io { offset, source: e })
}

struct Header {
    /// Its file offset.
    at: u64,
    sequence: u64,
    data_write_guid: [u8; 16],
    /// Set while the log may hold updates to replay.
    log_guid: [u8; 16],
    log_version: u16,
    log_len: u64,
    log_offset: u64,
}

/// The current header: of the valid ones, the higher sequence number.
fn current_header(source: &dyn ReadAt, file_len: u64) -> Result<Header> {
    let mut best: Option<Header> = None;
    let mut why = Vec::new();
    for (i, &at) in HEADERS.iter().enumerate() {
        let mut b = vec![0u8; HEADER_LEN];
        read(source, &mut b, at, file_len)?;
        let name = format!("header {}", i + 1);
        if &b[0..4] != b"head" {
            why.push(Error::invalid(
                name,
                at,
                "signature \"head\"",
                format!("{:02X?}", &b[0..4]),
            ));
            continue;
        }
        let (stored, actual) = (u32_at(&b, 4), checksum_with_zeroed(&b, 4));
        if stored != actual {
            why.push(Error::invalid(
                name,
                at + 4,
                format!("CRC-32C {actual:#010x}"),
                format!("{stored:#010x}"),
            ));
            continue;
        }
        let sequence = u64_at(&b, 8);
        let log_guid = guid_at(&b, 48);
        let (log_version, version) = (u16_at(&b, 64), u16_at(&b, 66));
        if version != 1 {
            return Err(Error::invalid(
                name,
                at + 66,
                "version 1",
                version.to_string(),
            ));
        }
        if best.as_ref().is_none_or(|h| sequence > h.sequence) {
            best = Some(Header {
                at,
                sequence,
                data_write_guid: guid_at(&b, 32),
                log_guid,
                log_version,
                log_len: u64::from(u32_at(&b, 68)),
                log_offset: u64_at(&b, 72),
            });
        }
    }
    best.ok_or_else(|| why.remove(0))
}

/// The region table's entries (GUID, file offset, length), from the first valid copy.
fn region_table(source: &dyn ReadAt, file_len: u64) -> Result<Vec<([u8; 16], u64, u64)>> {
    let mut first_error = None;
    for (i, &at) in REGION_TABLES.iter().enumerate() {
        let mut b = vec![0u8; REGION_TABLE_LEN];
        read(source, &mut b, at, file_len)?;
        let name = format!("region table {}", i + 1);
        let bad = if &b[0..4] != b"regi" {
            Some(Error::invalid(
                &name,
                at,
                "signature \"regi\"",
                format!("{:02X?}", &b[0..4]),
            ))
        } else if u32_at(&b, 4) != checksum_with_zeroed(&b, 4) {
            Some(Error::invalid(
                &name,
                at + 4,
                format!("CRC-32C {:#010x}", checksum_with_zeroed(&b, 4)),
                format!("{:#010x}", u32_at(&b, 4)),
            ))
        } else if u32_at(&b, 8) > 2047 {
            Some(Error::invalid(
                &name,
                at + 8,
                "at most 2047 entries",
                u32_at(&b, 8).to_string(),
            ))
        } else {
            None
        };
        if let Some(e) = bad {
            first_error.get_or_insert(e);
            continue;
        }
        let mut out = Vec::new();
        for k in 0..u32_at(&b, 8) as usize {
            let e = 16 + k * 32;
            let id = guid_at(&b, e);
            let (offset, len, required) = (
                u64_at(&b, e + 16),
                u64::from(u32_at(&b, e + 24)),
                u32_at(&b, e + 28) & 1,
            );
            if id != BAT_REGION && id != METADATA_REGION && required == 1 {
                return Err(Error::unsupported(
                    format!("a required region {:02X?}", id),
                    at + e as u64,
                    "unknown to this reader (a newer VHDX feature)",
                ));
            }
            out.push((id, offset, len));
        }
        return Ok(out);
    }
    Err(first_error.expect("two tables, both bad"))
}

struct Meta {
    block_size: u32,
    leave_allocated: bool,
    locator: Option<ParentLocator>,
    virtual_size: u64,
    logical: u32,
    physical: u32,
    disk_id: [u8; 16],
}

/// The metadata items this reader needs, checked; an unknown required item is refused.
fn metadata(source: &dyn ReadAt, region: u64, region_len: u64) -> Result<Meta> {
    let mut t = vec![0u8; METADATA_TABLE_LEN.min(region_len as usize)];
    source
        .read_exact_at(&mut t, region)
        .map_err(|e| Error::Io {
            offset: region,
            source: e,
        })?;
    if t.len() < 32 || &t[0..8] != b"metadata" {
        return Err(Error::invalid(
            "metadata table",
            region,
            "signature \"metadata\"",
            format!("{:02X?}", &t[..t.len().min(8)]),
        ));
    }
    let count = u16_at(&t, 10) as usize;
    if count > 2047 || 32 + count * 32 > t.len() {
        return Err(Error::invalid(
            "metadata table",
            region + 10,
            "at most 2047 entries",
            count.to_string(),
        ));
    }
    let mut items: Vec<([u8; 16], u64, u32, u32)> = Vec::new();
    for k in 0..count {
        let e = 32 + k * 32;
        let (id, offset, len, flags) = (
            guid_at(&t, e),
            u64::from(u32_at(&t, e + 16)),
            u32_at(&t, e + 20),
            u32_at(&t, e + 24),
        );
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if flags & 4 != 0 && !known.contains(&id) {
            return Err(Error::unsupported(
                format!("a required metadata item {id:02X?}"),
                region + e as u64,
                "unknown to this reader (a newer VHDX feature)",
            ));
        }
        if len > 0 && (offset < METADATA_TABLE_LEN as u64 || offset + u64::from(len) > region_len) {
            return Err(Error::invalid(
                "metadata entry",
                region + e as u64,
                format!("an item inside the metadata region, after its table ({region_len} bytes)"),
                format!("{len} bytes at {offset}"),
            ));
        }
        items.push((id, region + offset, len, flags));
    }
    let item = |id: &[u8; 16], name: &str, want: u32| -> Result<Vec<u8>> {
        let (_, at, len, _) = items.iter().find(|i| &i.0 == id).ok_or_else(|| {
            Error::invalid("metadata table", region, format!("a {name} item"), "none")
        })?;
        if *len < want {
            return Err(Error::invalid(
                format!("{name} item"),
                *at,
                format!("{want} bytes"),
                format!("{len} bytes"),
            ));
        }
        let mut b = vec![0u8; want as usize];
        source.read_exact_at(&mut b, *at).map_err(|e| Error::Io {
            offset: *at,
            source: e,
        })?;
        Ok(b)
    };
    let fp = item(&FILE_PARAMETERS, "file parameters", 8)?;
    let fp_at = items
        .iter()
        .find(|i| i.0 == FILE_PARAMETERS)
        .map_or(region, |i| i.1);
    let block_size = u32_at(&fp, 0);
    if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
        return Err(Error::invalid(
            "file parameters",
            fp_at,
            "a block size that is a power of two from 1 to 256 MiB",
            block_size.to_string(),
        ));
    }
    let has_parent = u32_at(&fp, 4) & 2 != 0;
    let locator = if has_parent {
        let (_, at, len, _) = *items
            .iter()
            .find(|i| i.0 == PARENT_LOCATOR)
            .ok_or_else(|| {
                Error::invalid(
                    "metadata table",
                    region,
                    "a parent locator item (the file has a parent)",
                    "none",
                )
            })?;
        Some(ParentLocator::parse(
            &item(&PARENT_LOCATOR, "parent locator", len)?,
            at,
        )?)
    } else {
        None
    };
    let vs = item(&VIRTUAL_DISK_SIZE, "virtual disk size", 8)?;
    let virtual_size = u64_at(&vs, 0);
    let sector = |id: &[u8; 16], name: &str| -> Result<u32> {
        let v = u32_at(&item(id, name, 4)?, 0);
        if v != 512 && v != 4096 {
            let at = items.iter().find(|i| &i.0 == id).map_or(region, |i| i.1);
            return Err(Error::invalid(name, at, "512 or 4096", v.to_string()));
        }
        Ok(v)
    };
    let logical = sector(&LOGICAL_SECTOR_SIZE, "logical sector size")?;
    let physical = sector(&PHYSICAL_SECTOR_SIZE, "physical sector size")?;
    if virtual_size == 0
        || !virtual_size.is_multiple_of(u64::from(logical))
        || virtual_size > 64 << 40
    {
        let at = items
            .iter()
            .find(|i| i.0 == VIRTUAL_DISK_SIZE)
            .map_or(region, |i| i.1);
        return Err(Error::invalid(
            "virtual disk size",
            at,
            format!("a multiple of {logical}, at most 64 TiB"),
            virtual_size.to_string(),
        ));
    }
    let disk_id = item(&VIRTUAL_DISK_ID, "virtual disk id", 16)?;
    Ok(Meta {
        block_size,
        // Ignored for a differencing disk.
        leave_allocated: !has_parent && u32_at(&fp, 4) & 1 != 0,
        locator,
        virtual_size,
        logical,
        physical,
        disk_id: guid_at(&disk_id, 0),
    })
}
