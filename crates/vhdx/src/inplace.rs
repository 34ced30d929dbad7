//! Writes into an existing VHDX in place: a failback onto the on-premises disk. Only into
//! blocks the file holds (every block of a fixed VHDX): allocating a dynamic disk's block
//! would have to go through the log to be crash-safe, so it is refused instead.

use std::io;

use lifeboat_source::ReadAt;

use crate::error::{Error, Result};
use crate::format::*;
use crate::reader::{Place, Vhdx};

/// The file a VHDX is written through in place (the same file the reader reads):
/// positional writes and a durability barrier.
pub trait WriteAt {
    /// Writes all of `data` at `offset`.
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes every write so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

#[cfg(unix)]
impl WriteAt for std::fs::File {
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl WriteAt for Vec<u8> {
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(data.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.len() {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: ReadAt> Vhdx<S> {
    /// Prepares writes in place through `file` (this file, opened for writing): refused
    /// for a differencing disk (a checkpoint's chain) and for a file whose log had to be
    /// replayed (whoever wrote it may still have it open). As [MS-VHDX] requires before
    /// the first change to the disk's data, a new current header carrying
    /// `file_write_guid` and `data_write_guid` (fresh random values) is written into the
    /// other header slot, with the next sequence number, and made durable: a crash leaves
    /// one valid current header either way.
    pub fn begin_writes<W: WriteAt>(
        &mut self,
        file: &mut W,
        file_write_guid: [u8; 16],
        data_write_guid: [u8; 16],
    ) -> Result<()> {
        self.check_writable()?;
        let mut h = vec![0u8; HEADER_LEN];
        self.source
            .read_exact_at(&mut h, self.header_at)
            .map_err(|e| Error::Io {
                offset: self.header_at,
                source: e,
            })?;
        let seq = self.info.header_sequence + 1;
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..32].copy_from_slice(&file_write_guid);
        h[32..48].copy_from_slice(&data_write_guid);
        h[4..8].fill(0);
        let crc = crc32c(&h);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
        let other = if self.header_at == HEADERS[0] {
            HEADERS[1]
        } else {
            HEADERS[0]
        };
        let io = |offset: u64| move |e| Error::Io { offset, source: e };
        file.write_all_at(other, &h).map_err(io(other))?;
        file.sync().map_err(io(other))?;
        self.header_at = other;
        self.info.header_sequence = seq;
        self.info.data_write_guid = data_write_guid;
        self.writable = true;
        Ok(())
    }

    /// Whether every byte of the virtual disk can be written in place: not a differencing
    /// disk, no log left to replay, every block held by the file (a fixed VHDX). Reads the
    /// BAT; writes nothing.
    pub fn check_writable(&self) -> Result<()> {
        if self.info.differencing {
            return Err(Error::unsupported(
                "writing into a differencing disk",
                0,
                "a checkpoint's chain is Hyper-V's to change",
            ));
        }
        if self.overlay.is_some() {
            return Err(Error::unsupported(
                "writing into a file whose log was not replayed",
                self.header_at + 48,
                "its writer may still have it open: shut the machine down cleanly first",
            ));
        }
        let bs = u64::from(self.info.block_size);
        for block in 0..self.info.virtual_size.div_ceil(bs) {
            if !matches!(self.place(block)?, Place::File(_)) {
                return Err(not_held(block, block * bs));
            }
        }
        Ok(())
    }

    /// Writes `data` at virtual `offset` in place through `file`, after
    /// [`Vhdx::begin_writes`]. Every block the write touches must be held by the file (a
    /// fixed VHDX's all are); otherwise nothing is written.
    pub fn write_at<W: WriteAt>(&self, file: &mut W, offset: u64, data: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported(
                "a write before begin_writes",
                0,
                "call Vhdx::begin_writes first (it records the new DataWriteGuid)",
            ));
        }
        let size = self.info.virtual_size;
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { offset, len, size });
        }
        let bs = u64::from(self.info.block_size);
        let mut pieces = Vec::new();
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let (block, within) = (at / bs, at % bs);
            let n = (bs - within).min(len - done);
            match self.place(block)? {
                Place::File(file_offset) => pieces.push((file_offset + within, done, n)),
                _ => return Err(not_held(block, at)),
            }
            done += n;
        }
        for (at, from, n) in pieces {
            file.write_all_at(at, &data[from as usize..(from + n) as usize])
                .map_err(|e| Error::Io {
                    offset: at,
                    source: e,
                })?;
        }
        Ok(())
    }
}

/// A write into a block the file does not hold, refused.
fn not_held(block: u64, at: u64) -> Error {
    Error::unsupported(
        format!("a write into block {block}, which the file does not hold"),
        at,
        "allocating a block of a dynamic VHDX is not done (it must go through the VHDX log \
         to be crash-safe)",
    )
}
