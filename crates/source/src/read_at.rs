//! Positional reads: a length and `read_exact_at`.

use std::fs::File;
use std::io;
use std::ops::Range;

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
    fn read_vec_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_append_at(&mut buf, offset, len)?;
        Ok(buf)
    }

    /// Appends `len` bytes from `offset` to `buf`, as [`ReadAt::read_exact_at`] reads
    /// them (on an error `buf` may hold part of them). A file reads straight into the
    /// buffer's spare memory, without zeroing it first (on Unix; zeroing was a tenth of the
    /// CPU time of copying a disk).
    fn read_append_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
        let at = buf.len();
        buf.resize(at + len, 0);
        self.read_exact_at(&mut buf[at..], offset)
    }

    /// `len` bytes from `offset`, as [`ReadAt::read_vec_at`] reads them, placed in memory
    /// at `offset`'s place within a 64-byte line: the kernel copies a file's bytes (a
    /// read, and a later write into another file's page cache) at about a third of the
    /// speed into or out of memory placed otherwise (measured on AMD EPYC: 0.65 against
    /// 0.21 s of system time per GiB read in 64 MiB reads, 16 bytes off as the allocator
    /// places large blocks, against 0 or 64).
    ///
    /// ```
    /// use lifeboat_source::ReadAt;
    /// let data: Vec<u8> = (0..=255).collect();
    /// let got = data.read_bytes_at(3, 100).unwrap();
    /// assert_eq!(got[..], data[3..103]);
    /// assert_eq!(got.as_ptr() as usize % 64, 3);
    /// ```
    fn read_bytes_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = Vec::with_capacity(len.saturating_add(LINE));
        let pad = line_pad(buf.as_ptr(), offset);
        buf.resize(pad, 0);
        self.read_append_at(&mut buf, offset, len)?;
        Ok(Bytes::from(buf).slice(pad..))
    }

    /// The parts of `offset..offset + len` that may hold data, in order and apart; the
    /// rest reads as zeros and need not be read (a sparse file's holes, on Linux). A hint
    /// for skipping reads, not a promise that what it names holds anything but zeros: the
    /// default (and any source that cannot tell) names the whole range.
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        Ok(whole(offset, len))
    }
}

/// The bytes of a line of memory, as the kernel's copies see it (see [`line_pad`]).
pub const LINE: usize = 64;

/// How far past `at` a read of a source's byte `offset` should land so that it lies in
/// memory as it lies in the source's pages, relative to a [`LINE`]: the kernel copies a
/// file's bytes into memory placed otherwise (and out of it into another file's pages)
/// at about a third of the speed (see [`ReadAt::read_bytes_at`]). Less than [`LINE`]:
/// a buffer of `len + LINE` bytes holds `len` bytes placed so.
///
/// ```
/// use lifeboat_source::{LINE, line_pad};
/// let buf = vec![0u8; 4096 + LINE];
/// let pad = line_pad(buf.as_ptr(), 4096 + 5);
/// assert!(pad < LINE);
/// assert_eq!((buf.as_ptr() as usize + pad) % LINE, 5);
/// ```
pub fn line_pad(at: *const u8, offset: u64) -> usize {
    (offset as usize % LINE + LINE - at as usize % LINE) % LINE
}

/// A reusable read buffer that places each read as [`line_pad`] says: one allocation, grown
/// to the largest read asked of it.
///
/// ```
/// use lifeboat_source::{LINE, PlacedBuf, ReadAt};
/// let data: Vec<u8> = (0..=255).collect();
/// let mut buf = PlacedBuf::default();
/// let got = buf.slice(70, 10);
/// data.read_exact_at(got, 70)?;
/// assert_eq!(got.as_ptr() as usize % LINE, 70 % LINE);
/// assert_eq!(got, &data[70..80]);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct PlacedBuf(Vec<u8>);

impl PlacedBuf {
    /// `len` bytes (contents unspecified) placed for a read of a source's byte `offset`.
    pub fn slice(&mut self, offset: u64, len: usize) -> &mut [u8] {
        if self.0.len() < len + LINE {
            self.0 = vec![0; len + LINE];
        }
        let pad = line_pad(self.0.as_ptr(), offset);
        &mut self.0[pad..pad + len]
    }
}

/// `offset..offset + len` as the one range that may hold data (none when empty).
fn whole(offset: u64, len: u64) -> Vec<Range<u64>> {
    let range = offset..offset.saturating_add(len);
    (len > 0).then_some(range).into_iter().collect()
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
    fn read_append_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
        let (start, end) = (buf.len(), buf.len().saturating_add(len));
        buf.reserve_exact(len);
        if buf.capacity() - end > 4096 {
            // A read fills all the spare memory it is given: not a large spare's worth
            // for a small read (zeroing what is read costs less).
            buf.resize(end, 0);
            return self.read_exact_at(&mut buf[start..], offset);
        }
        while buf.len() < end {
            let at = offset + (buf.len() - start) as u64;
            match rustix::io::pread(self, rustix::buffer::spare_capacity(buf), at) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The allocation may hold more than asked for, and a read may fill it.
        buf.truncate(end);
        Ok(())
    }

    /// The file's data segments (`SEEK_DATA` / `SEEK_HOLE`) within the range; the whole
    /// range where the file system cannot tell. Positional reads are unaffected by the
    /// seeks (they move the file's offset).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        use rustix::fs::{SeekFrom, seek};
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let data = match seek(self, SeekFrom::Data(at)) {
                Ok(d) => d,
                // No data from `at` to the end of the file.
                Err(rustix::io::Errno::NXIO) => break,
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP) => {
                    return Ok(whole(offset, len));
                }
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let hole = seek(self, SeekFrom::Hole(data))?.min(end);
            if hole <= data {
                // A file changing under us: claim the rest rather than guess.
                out.push(data..end);
                break;
            }
            out.push(data..hole);
            at = hole;
        }
        Ok(out)
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

    fn read_append_at(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> io::Result<()> {
        (**self).read_append_at(buf, offset, len)
    }

    fn read_bytes_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        (**self).read_bytes_at(offset, len)
    }

    fn data_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
        (**self).data_ranges(offset, len)
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
            // Appended after what the buffer holds, whatever its spare memory.
            for spare in [0, 100, 1 << 20] {
                let mut buf = Vec::with_capacity(24 + spare);
                buf.extend_from_slice(b"head");
                s.read_append_at(&mut buf, 10, 20).unwrap();
                assert_eq!(buf[..4], *b"head");
                assert_eq!(buf[4..], data[10..30]);
            }
            // Placed as they lie in a 64-byte line of the source.
            for (offset, len) in [(0, 1000), (3, 997), (64 + 17, 100), (999, 1), (1000, 0)] {
                let got = s.read_bytes_at(offset, len).unwrap();
                assert_eq!(got[..], data[offset as usize..offset as usize + len]);
                if len > 0 {
                    assert_eq!(got.as_ptr() as usize % 64, offset as usize % 64);
                }
            }
            let e = s.read_bytes_at(500, 501).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        }
        assert!(file.as_slice().is_none());
        assert_eq!(bytes.as_slice(), Some(&data[..]));
    }

    /// A sparse file names its data segments and skips its holes; every other source,
    /// and a file system that cannot tell, names the whole range. Whatever is named,
    /// everything outside it reads as zeros.
    #[test]
    fn data_ranges_name_what_may_hold_data() {
        const MIB: u64 = 1 << 20;
        let file = tempfile::tempfile().unwrap();
        file.set_len(8 * MIB).unwrap();
        let chunk = vec![0xA5u8; MIB as usize];
        for at in [MIB, 2 * MIB, 6 * MIB] {
            std::os::unix::fs::FileExt::write_all_at(&file, &chunk, at).unwrap();
        }
        file.sync_all().unwrap();
        let all = file.read_vec_at(0, (8 * MIB) as usize).unwrap();
        for (offset, len) in [(0, 8 * MIB), (MIB / 2, 5 * MIB), (3 * MIB, 3 * MIB), (0, 0)] {
            let named = file.data_ranges(offset, len).unwrap();
            let mut at = offset;
            for r in &named {
                assert!(
                    at <= r.start && r.start < r.end && r.end <= offset + len,
                    "{named:?}"
                );
                assert!(all[at as usize..r.start as usize].iter().all(|&b| b == 0));
                at = r.end;
            }
            assert!(
                all[at as usize..(offset + len) as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
            // Every byte of data is named.
            let data = (offset..offset + len)
                .filter(|&i| all[i as usize] != 0)
                .count() as u64;
            let in_named: u64 = named
                .iter()
                .map(|r| (r.start..r.end).filter(|&i| all[i as usize] != 0).count() as u64)
                .sum();
            assert_eq!(in_named, data);
            if cfg!(target_os = "linux") {
                // ext4, xfs, btrfs and tmpfs report holes: the named bytes are the data.
                let named_len: u64 = named.iter().map(|r| r.end - r.start).sum();
                assert_eq!(named_len, data, "{offset}+{len}: {named:?}");
            }
        }
        let v = all.clone();
        let one = |r: Range<u64>| -> Vec<Range<u64>> { std::iter::once(r).collect() };
        assert_eq!(v.data_ranges(5, 10).unwrap(), one(5..15));
        assert!(v.data_ranges(5, 0).unwrap().is_empty());
        let by_ref = <&File as ReadAt>::data_ranges(&&file, 0, 2 * MIB).unwrap();
        assert_eq!(by_ref, one(MIB..2 * MIB));
    }
}
