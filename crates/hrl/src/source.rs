//! Where log bytes come from: anything with a length that can be read at an offset.

use std::fs::File;
use std::io;

use bytes::Bytes;

/// A source of log bytes: a length and positional reads.
///
/// Implemented for in-memory buffers (`[u8]`, `Vec<u8>`, [`Bytes`]), which also expose
/// their bytes through [`ReadAt::as_slice`] so payloads are borrowed rather than copied,
/// and for [`File`] (positional reads; nothing is read until asked for, so a log far larger
/// than memory can be walked).
pub trait ReadAt {
    /// The length of the source in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` from `offset`; a short source is an error
    /// ([`io::ErrorKind::UnexpectedEof`]).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// All bytes, when the source is in memory.
    fn as_slice(&self) -> Option<&[u8]> {
        None
    }
}

fn slice_read(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).ok();
    let src = start
        .and_then(|s| Some(s..s.checked_add(buf.len())?))
        .and_then(|r| data.get(r))
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    buf.copy_from_slice(src);
    Ok(())
}

impl ReadAt for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        slice_read(self, buf, offset)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl ReadAt for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        self.as_slice().size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        slice_read(self, buf, offset)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl ReadAt for Bytes {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        slice_read(self, buf, offset)
    }

    fn as_slice(&self) -> Option<&[u8]> {
        Some(self)
    }
}

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
}
