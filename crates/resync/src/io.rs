//! The seam a delta is written through (sources are read through
//! [`lifeboat_source::ReadAt`]).

use std::fs::File;
use std::io;

/// Where a delta is applied: positional writes, zeroing, and a length.
///
/// Implemented here for `Vec<u8>` and [`File`]; the engine implements it for a host's
/// disks (failback). Replica blobs are written through the page-blob crate's `PageWriter`,
/// not this trait.
pub trait BlockWriter {
    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

impl BlockWriter for Vec<u8> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if end > self.len() {
            self.resize(end, 0);
        }
        self[end - data.len()..end].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let n = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start.saturating_add(n).min(self.len());
        if start < end {
            self[start..end].fill(0);
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let n = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.resize(n, 0);
        Ok(())
    }
}

impl BlockWriter for File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::write_all_at(self, data, offset)
        }
        #[cfg(windows)]
        {
            let (mut data, mut offset) = (data, offset);
            while !data.is_empty() {
                let n = std::os::windows::fs::FileExt::seek_write(self, data, offset)?;
                data = &data[n..];
                offset += n as u64;
            }
            Ok(())
        }
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // Portable: write zeros in bounded pieces (a sparse-aware backend can punch holes).
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(len) as usize];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = PIECE.min(end - at) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}
