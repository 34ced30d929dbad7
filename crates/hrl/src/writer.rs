//! Writing a log the way Hyper-V does: open header (EOLLocation 0), an empty first
//! metadata block, then batches of payloads each followed by their metadata block, and on
//! `finish` the final header.

use std::io::{self, Seek, SeekFrom, Write};

use crate::checksum::checksum;
use crate::error::Error;
use crate::format::{
    COOKIE, DEFAULT_METADATA_SIZE, Entry, HEADER_SIZE, Header, MetadataHeader, OP_WRITE, VERSION_2,
    valid_metadata_size,
};
use crate::reader::Reader;
use lifeboat_source::ReadAt;

/// What a new log says about itself. [`Default`] gives a Hyper-V-like log: MetadataSize
/// 4096, creator `ct` version 10.0, DataChecksums computed, an empty first block, zero ids
/// and timestamp 0 (set the ids and time you have).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Size of each metadata block: at least 64, and 32 + a multiple of 32.
    pub metadata_size: u32,
    /// Creation time, seconds since 2000-01-01 UTC (the header's TimeStamp).
    pub timestamp: u32,
    /// This log's id.
    pub unique_id: [u8; 16],
    /// The id of the log before this one in the chain (zero for the first).
    pub previous_unique_id: [u8; 16],
    /// The VHDX DataWriteGuid of the tracked disk when tracking started.
    pub vhd2_data_write_guid: [u8; 16],
    /// The header's CreatorApplication.
    pub creator_application: [u8; 4],
    /// The header's CreatorVersion.
    pub creator_version: u32,
    /// Compute each entry's DataChecksum (`true`, as the spec says) or leave it 0 (as
    /// Hyper-V does).
    pub data_checksums: bool,
    /// Begin with an empty metadata block at offset 4096, as Hyper-V does.
    pub initial_empty_block: bool,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            metadata_size: DEFAULT_METADATA_SIZE,
            timestamp: 0,
            unique_id: [0; 16],
            previous_unique_id: [0; 16],
            vhd2_data_write_guid: [0; 16],
            creator_application: *b"ct\0\0",
            creator_version: 0x000A_0000,
            data_checksums: true,
            initial_empty_block: true,
        }
    }
}

/// Appends writes to an HRL v2 log.
///
/// Payloads go straight to `W` (wrap a file in a [`std::io::BufWriter`]); only the
/// metadata of the open batch is held in memory. The header says EOLLocation 0 until
/// [`LogWriter::finish`], so a crash leaves a log that readers refuse or salvage, never
/// one that looks complete. `finish` flushes `W`; call `sync_all` on a file afterwards for
/// durability.
///
/// ```
/// use std::io::Cursor;
/// use lifeboat_hrl::{LogWriter, Reader, WriterConfig};
///
/// let config = WriterConfig { unique_id: [1; 16], timestamp: 100, ..WriterConfig::default() };
/// let mut w = LogWriter::new(Cursor::new(Vec::new()), config)?;
/// w.write(0, b"first", 100)?;
/// w.end_batch()?; // close the metadata block, e.g. once per copy interval
/// w.write(0, b"FIRST", 101)?;
/// let (file, header) = w.finish(102)?;
/// let bytes = file.into_inner();
/// assert_eq!(header.eol_location, bytes.len() as u64);
///
/// let log = Reader::new(bytes.as_slice())?;
/// assert_eq!(log.blocks().len(), 3); // the empty first block and two batches
/// # Ok::<(), lifeboat_hrl::Error>(())
/// ```
#[derive(Debug)]
pub struct LogWriter<W> {
    inner: W,
    header: Header,
    data_checksums: bool,
    /// Bytes written so far (the next append offset).
    pos: u64,
    /// Entries of the open batch.
    pending: Vec<Entry>,
    /// Offset of the last metadata block written.
    last_block: Option<u64>,
    total_entries: u64,
    /// Reused buffer for one metadata block.
    block: Vec<u8>,
}

fn io_at(offset: u64) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { offset, source }
}

impl<W: Write + Seek> LogWriter<W> {
    /// Starts a log in `inner` (written from offset 0): the open header and, if
    /// configured, the empty first metadata block.
    pub fn new(inner: W, config: WriterConfig) -> Result<Self, Error> {
        let header = Header {
            cookie: COOKIE,
            log_format_version: VERSION_2,
            timestamp: config.timestamp,
            creator_application: config.creator_application,
            creator_version: config.creator_version,
            original_size: 0,
            current_size: 0,
            checksum: 0,
            eol_location: 0,
            error_code: 0,
            metadata_size: config.metadata_size,
            unique_id: config.unique_id,
            previous_unique_id: config.previous_unique_id,
            last_modified_timestamp: config.timestamp,
            total_metadata_entries: 0,
            file_type: 0,
            flags: [0; 2],
            vhd2_data_write_guid: config.vhd2_data_write_guid,
            reserved: Box::new([0; 3970]),
        };
        let mut w = Self::with_header(inner, header, config.data_checksums)?;
        if config.initial_empty_block {
            w.end_block()?;
        }
        Ok(w)
    }

    /// Starts a log with `header` as the template (EOLLocation and CurrentSize are
    /// cleared until `finish`).
    fn with_header(mut inner: W, mut header: Header, data_checksums: bool) -> Result<Self, Error> {
        let ms = header.metadata_size;
        if !valid_metadata_size(ms) {
            return Err(Error::BadMetadataSize { found: ms });
        }
        let final_eol = header.eol_location;
        let final_size = header.current_size;
        header.eol_location = 0;
        header.current_size = header.original_size;
        let bytes = header.encode();
        inner.seek(SeekFrom::Start(0)).map_err(io_at(0))?;
        inner.write_all(&bytes).map_err(io_at(0))?;
        header.eol_location = final_eol;
        header.current_size = final_size;
        Ok(LogWriter {
            inner,
            header,
            data_checksums,
            pos: HEADER_SIZE,
            pending: Vec::new(),
            last_block: None,
            total_entries: 0,
            block: vec![0; ms as usize],
        })
    }

    /// Logs one guest write of `data` at `disk_offset`, at `timestamp` (seconds since
    /// 2000-01-01 UTC). A full batch (all slots of a block used) is closed first.
    pub fn write(&mut self, disk_offset: u64, data: &[u8], timestamp: u32) -> Result<(), Error> {
        let len = data.len() as u64;
        let data_length = u32::try_from(len).map_err(|_| Error::WriteTooLarge { len })?;
        if disk_offset.checked_add(len).is_none() {
            return Err(Error::WriteOverflow { disk_offset, len });
        }
        let entry = Entry {
            byte_offset: disk_offset,
            checksum: 0,
            data_length,
            timestamp,
            meta_operation: OP_WRITE,
            data_checksum: if self.data_checksums {
                checksum(data)
            } else {
                0
            },
            location: 0,
            reserved: [0; 6],
        };
        self.push(entry, data)
    }

    /// Appends `data` as the payload of `entry` (whose other fields are kept as given).
    fn push(&mut self, entry: Entry, data: &[u8]) -> Result<(), Error> {
        if self.pending.len() as u32 >= self.header.slots_per_block() {
            self.end_block()?;
        }
        self.inner.write_all(data).map_err(io_at(self.pos))?;
        self.pos += data.len() as u64;
        self.pending.push(entry);
        Ok(())
    }

    /// Closes the open batch with its metadata block, if it has any writes. Hyper-V
    /// closes a batch when its slots are full or when it flushes; call this at the same
    /// points (e.g. once per copy interval).
    pub fn end_batch(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.end_block()
    }

    /// Writes the metadata block of the open batch, even an empty one.
    fn end_block(&mut self) -> Result<(), Error> {
        let m = self.pos;
        self.block.fill(0);
        for (i, e) in self.pending.iter_mut().enumerate() {
            let sealed = e.seal();
            self.block[32 * (1 + i)..32 * (2 + i)].copy_from_slice(&sealed);
        }
        let mut md = MetadataHeader {
            previous_metadata_location: self.last_block.map_or(0, |p| m - p),
            valid_metadata_entries: self.pending.len() as u32,
            checksum: 0,
            reserved: [0; 16],
        };
        md.encode_into(&mut self.block[..32]);
        md.checksum = MetadataHeader::computed_checksum(&self.block);
        md.encode_into(&mut self.block[..32]);
        self.inner.write_all(&self.block).map_err(io_at(m))?;
        self.pos += self.block.len() as u64;
        self.total_entries += self.pending.len() as u64;
        self.pending.clear();
        self.last_block = Some(m);
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.pos
    }

    /// Whether nothing but the header has been written.
    pub fn is_empty(&self) -> bool {
        self.pos == HEADER_SIZE
    }

    /// Closes the open batch and writes the final header (EOLLocation, CurrentSize,
    /// LastModifiedTimeStamp = `now`, TotalMetadataEntries, checksum), then flushes.
    /// Returns the sink and the header written.
    pub fn finish(mut self, now: u32) -> Result<(W, Header), Error> {
        self.end_batch()?;
        if self.last_block.is_none() {
            // A log needs at least one metadata block to say where it ends.
            self.end_block()?;
        }
        self.header.eol_location = self.pos;
        self.header.current_size = self.pos;
        self.header.last_modified_timestamp = now;
        self.header.total_metadata_entries = self.total_entries;
        self.write_header()
    }

    fn write_header(mut self) -> Result<(W, Header), Error> {
        let bytes = self.header.encode();
        self.inner.seek(SeekFrom::Start(0)).map_err(io_at(0))?;
        self.inner.write_all(&bytes).map_err(io_at(0))?;
        self.inner
            .seek(SeekFrom::Start(self.pos))
            .map_err(io_at(self.pos))?;
        self.inner.flush().map_err(io_at(0))?;
        Ok((self.inner, self.header))
    }
}

/// Re-encodes a log that was read: the header as stored, every block with its entries as
/// stored (DataChecksums included), every payload. For a log read in strict mode the
/// output equals the input up to EOLLocation, byte for byte.
pub fn reencode<S: ReadAt, W: Write + Seek>(log: &Reader<S>, out: W) -> Result<W, Error> {
    let mut w = LogWriter::with_header(out, log.header().clone(), false)?;
    let mut buf = Vec::new();
    for block in log.blocks() {
        let mut file_offset = block.data_start;
        for e in &block.entries {
            buf.resize(e.data_length as usize, 0);
            log.source()
                .read_exact_at(&mut buf, file_offset)
                .map_err(io_at(file_offset))?;
            file_offset += u64::from(e.data_length);
            w.push(*e, &buf)?;
        }
        w.end_block()?;
    }
    w.write_header().map(|(w, _)| w)
}
