//! Positional reads: a length and `read_exact_at`.

use std::fs::File;
use std::io;

use bytes::Bytes;

/// Something with a length that can be read at an offset: a log file, a disk image, a
/// replica blob, a buffer.
///
/// Reads are positional and take `&self`, so one source can be shared by several workers
/// (hence `Sync`). A source held in memory also exposes its bytes through
/// [`ReadAt::as_slice`], so readers can borrow rather than copy.
pub trait ReadAt: Sync {
    /// The length in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`; a source too short to fill it is an error
    /// ([`io::ErrorKind::UnexpectedEof`]), never a short read.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// All bytes, when the source is in memory.
    fn as_slice(&self) -> Option<&[u8]> {
        None
    }

    /// `len` bytes from `offset` in a new buffer, as [`ReadAt::read_exact_at`] reads them.
    /// A file reads straight into the new buffer's memory, without zeroing it first (on
    /// Unix; zeroing was a tenth of the CPU time of copying a disk).
    fn read_vec_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// `data[offset..offset + buf.len()]` into `buf`, or `UnexpectedEof`.
fn slice_read(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|s| Some(s..s.checked_add(buf.len())?))
        .and_then(|r| data.get(r))
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    buf.copy_from_slice(src);
    Ok(())
}

/// The in-memory sources: all read through their bytes.
macro_rules! in_memory {
    ($($t:ty),*) => {$(
        impl ReadAt for $t {
            fn size(&self) -> io::Result<u64> {
                Ok(<[u8]>::len(self) as u64)
            }

            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                slice_read(self, buf, offset)
            }

            fn as_slice(&self) -> Option<&[u8]> {
                Some(self)
            }
        }
    )*};
}

in_memory!([u8], Vec<u8>, Bytes);

impl ReadAt for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
        }
        #[cfg(windows)]
        {
            let (mut buf, mut offset) = (buf, offset);
            while !buf.is_empty() {
                match std::os::windows::fs::FileExt::seek_read(self, buf, offset) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        buf = &mut buf[n..];
                        offset += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }

    #[cfg(unix)]
    fn read_vec_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        buf.reserve_exact(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(self, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The allocation may hold more than asked for, and a read may fill it.
        buf.truncate(len);
        Ok(buf)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        (**self).as_slice()
    }

    fn read_vec_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        (**self).read_vec_at(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Every source reads the same bytes, refuses the same out-of-range reads, and says
    /// the same length.
    #[test]
    fn every_source_reads_alike() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let bytes = Bytes::from(data.clone());
        let sources: [&dyn ReadAt; 4] = [&data, &data.as_slice(), &bytes, &file];
        for s in sources {
            assert_eq!(s.size().unwrap(), 1000);
            let mut buf = [0u8; 10];
            s.read_exact_at(&mut buf, 990).unwrap();
            assert_eq!(buf, data[990..]);
            for offset in [991, 1000] {
                let e = s.read_exact_at(&mut buf, offset).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "offset {offset}");
            }
            // An end past u64::MAX (the file says InvalidInput, the buffers UnexpectedEof).
            assert!(s.read_exact_at(&mut buf, u64::MAX).is_err());
            s.read_exact_at(&mut [], 1000).unwrap();
            assert_eq!(s.read_vec_at(3, 997).unwrap(), data[3..]);
            assert_eq!(s.read_vec_at(1000, 0).unwrap(), b"");
            let e = s.read_vec_at(500, 501).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
        assert!(file.as_slice().is_none());
        assert_eq!(bytes.as_slice(), Some(&data[..]));
    }
}
