//! Block signatures: one BLAKE3 digest per fixed-size block, zero blocks marked as such.

use std::io::{self, Read, Write};
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::block::{
    BlockSize, Progress, Scratch, digest_block, holds_no_data, read_into, run_chunks,
};
use lifeboat_source::ReadAt;

/// The digest of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Digest {
    /// Every byte of the block is zero (detected before hashing; nothing was hashed).
    Zero,
    /// The BLAKE3 hash of the block's bytes.
    Hash([u8; 32]),
}

/// The block signature of a disk: its length, its block size and one [`Digest`] per block
/// (the last block may be short).
///
/// ```
/// use lifeboat_resync::{BlockSize, Digest, Signature};
///
/// let mut disk = vec![0u8; 3 * 4096 + 100];
/// disk[5000] = 1;
/// let sig = Signature::compute(&disk, BlockSize::new(4096)?)?;
/// assert_eq!(sig.digests().len(), 4);
/// assert_eq!(sig.digests()[0], Digest::Zero);
/// assert!(matches!(sig.digests()[1], Digest::Hash(_)));
///
/// let bytes = sig.encode();
/// assert_eq!(Signature::decode(&bytes)?, sig);
/// # Ok::<(), lifeboat_resync::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SignatureParts")]
pub struct Signature {
    block_size: BlockSize,
    len: u64,
    digests: Vec<Digest>,
}

/// A signature as deserialised, before its block count is checked.
#[derive(Deserialize)]
struct SignatureParts {
    block_size: BlockSize,
    len: u64,
    digests: Vec<Digest>,
}

impl TryFrom<SignatureParts> for Signature {
    type Error = Error;

    fn try_from(p: SignatureParts) -> Result<Self, Error> {
        Signature::from_parts(p.block_size, p.len, p.digests)
    }
}

/// Magic bytes that open an encoded signature.
pub const SIGNATURE_MAGIC: [u8; 4] = *b"LBSG";
/// The encoding version this crate writes.
pub const SIGNATURE_VERSION: u8 = 1;
const HEADER_LEN: usize = 20;
const TAG_ZERO: u8 = 0;
const TAG_HASH: u8 = 1;

impl Signature {
    /// Computes the signature of `source` in one pass of large sequential reads.
    pub fn compute<S: ReadAt + ?Sized>(source: &S, block_size: BlockSize) -> Result<Self, Error> {
        Self::compute_with_progress(source, block_size, |_| ControlFlow::Continue(()))
    }

    /// Like [`Signature::compute`], reporting progress after each chunk; returning
    /// [`ControlFlow::Break`] abandons the computation with [`Error::Interrupted`].
    pub fn compute_with_progress<S: ReadAt + ?Sized>(
        source: &S,
        block_size: BlockSize,
        mut progress: impl FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Self, Error> {
        let len = source.size().map_err(|e| Error::io(0, e))?;
        let total = block_size.blocks(len);
        let mut digests = Vec::new();
        run_chunks(
            block_size,
            0..total,
            |scratch, blocks| chunk_digests(source, scratch, block_size, len, blocks),
            |blocks, chunk| {
                digests.extend(chunk);
                match progress(Progress::new(blocks.end, total, 0)) {
                    ControlFlow::Continue(()) => Ok(ControlFlow::Continue(())),
                    ControlFlow::Break(()) => Err(Error::Interrupted {
                        next_block: blocks.end,
                    }),
                }
            },
        )?;
        Ok(Signature {
            block_size,
            len,
            digests,
        })
    }

    /// A signature from its parts; `digests` must hold one digest per block of `len`.
    pub fn from_parts(
        block_size: BlockSize,
        len: u64,
        digests: Vec<Digest>,
    ) -> Result<Self, Error> {
        let expected = block_size.blocks(len);
        if digests.len() as u64 != expected {
            return Err(Error::BlockCount {
                expected,
                found: digests.len() as u64,
            });
        }
        Ok(Signature {
            block_size,
            len,
            digests,
        })
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// The length of the disk the signature describes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One digest per block, in disk order.
    pub fn digests(&self) -> &[Digest] {
        &self.digests
    }

    /// Replaces the digest of block `index` (for a writer that keeps a replica's
    /// signature current as it writes).
    pub fn set_digest(&mut self, index: u64, digest: Digest) -> Result<(), Error> {
        let count = self.digests.len() as u64;
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.digests.get_mut(i))
            .ok_or(Error::BlockCount {
                expected: count,
                found: index,
            })?;
        *slot = digest;
        Ok(())
    }

    /// The compact binary encoding (see [`SignatureWriter`] for the layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.digests.len() * 33 + 32);
        let mut w = SignatureWriter::new(&mut out, self.block_size, self.len)
            .expect("writing to a Vec cannot fail");
        for d in &self.digests {
            w.push(d).expect("writing to a Vec cannot fail");
        }
        w.finish().expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes [`Signature::encode`]'s output; truncated, corrupted or inconsistent input
    /// is an error, never a panic, and nothing is allocated beyond what the input holds.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = SignatureReader::new(bytes)?;
        let mut digests = Vec::with_capacity(r.remaining().min(bytes.len() as u64) as usize);
        while let Some(d) = r.next_digest()? {
            digests.push(d);
        }
        if !r.input.is_empty() {
            return Err(Error::BadSignature {
                offset: bytes.len() as u64 - r.input.len() as u64,
                reason: "trailing bytes after the trailer",
            });
        }
        Ok(Signature {
            block_size: r.block_size(),
            len: r.len(),
            digests,
        })
    }
}

/// Streams a signature's encoding, so a 2 TiB disk's digests never sit in memory at once.
///
/// Layout, version 1 (all integers little-endian):
///
/// | bytes | field |
/// |---|---|
/// | 0..4 | magic `LBSG` |
/// | 4 | version, 1 |
/// | 5..8 | reserved, 0 |
/// | 8..12 | block size (a power of two ≥ 512) |
/// | 12..20 | disk length |
/// | then, per block | tag `0` (zero block) or tag `1` followed by the 32-byte BLAKE3 hash |
/// | last 32 | BLAKE3 of every byte before it |
#[derive(Debug)]
pub struct SignatureWriter<W> {
    out: W,
    hasher: blake3::Hasher,
    remaining: u64,
}

impl<W: Write> SignatureWriter<W> {
    /// Writes the header for a disk of `len` bytes.
    pub fn new(mut out: W, block_size: BlockSize, len: u64) -> io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&SIGNATURE_MAGIC);
        header[4] = SIGNATURE_VERSION;
        header[8..12].copy_from_slice(&block_size.get().to_le_bytes());
        header[12..20].copy_from_slice(&len.to_le_bytes());
        out.write_all(&header)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        Ok(SignatureWriter {
            out,
            hasher,
            remaining: block_size.blocks(len),
        })
    }

    /// Appends the next block's digest.
    pub fn push(&mut self, digest: &Digest) -> io::Result<()> {
        if self.remaining == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more digests than blocks",
            ));
        }
        self.remaining -= 1;
        match digest {
            Digest::Zero => self.put(&[TAG_ZERO]),
            Digest::Hash(h) => {
                self.put(&[TAG_HASH])?;
                self.put(h)
            }
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hasher.update(b);
        self.out.write_all(b)
    }

    /// Writes the trailer; every block must have had its digest.
    pub fn finish(mut self) -> io::Result<W> {
        if self.remaining != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fewer digests than blocks",
            ));
        }
        let trailer = self.hasher.finalize();
        self.out.write_all(trailer.as_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Computes `source`'s signature straight into `out`, holding one chunk in memory.
pub fn write_signature<S: ReadAt + ?Sized, W: Write>(
    source: &S,
    block_size: BlockSize,
    out: W,
) -> Result<W, Error> {
    let len = source.size().map_err(|e| Error::io(0, e))?;
    let mut w = SignatureWriter::new(out, block_size, len).map_err(|e| Error::io(0, e))?;
    run_chunks(
        block_size,
        0..block_size.blocks(len),
        |scratch, blocks| chunk_digests(source, scratch, block_size, len, blocks),
        |blocks, chunk| {
            for d in chunk {
                w.push(&d)
                    .map_err(|e| Error::io(blocks.start * u64::from(block_size.get()), e))?;
            }
            Ok(ControlFlow::Continue(()))
        },
    )?;
    w.finish().map_err(|e| Error::io(len, e))
}

/// Reads blocks `blocks` of `source` and digests each.
fn chunk_digests<S: ReadAt + ?Sized>(
    source: &S,
    scratch: &mut Scratch,
    block_size: BlockSize,
    len: u64,
    blocks: std::ops::Range<u64>,
) -> Result<Vec<Digest>, Error> {
    let start = block_size.range(blocks.start, len).start;
    let end = block_size.range(blocks.end - 1, len).end;
    // A chunk the source says holds no data (a sparse file's hole) is not read.
    if holds_no_data(source, start, end - start)? {
        return Ok(vec![Digest::Zero; (blocks.end - blocks.start) as usize]);
    }
    let data = read_into(source, &mut scratch.a, start, end - start)?;
    Ok(data
        .chunks(block_size.get() as usize)
        .map(digest_block)
        .collect())
}

/// Reads an encoded signature one digest at a time, checking the trailer at the end.
#[derive(Debug)]
pub struct SignatureReader<R> {
    input: R,
    hasher: blake3::Hasher,
    block_size: BlockSize,
    len: u64,
    remaining: u64,
    offset: u64,
}

impl<R: Read> SignatureReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, Error> {
        let mut header = [0u8; HEADER_LEN];
        read_exact(&mut input, &mut header, 0)?;
        if header[0..4] != SIGNATURE_MAGIC {
            return Err(Error::BadSignature {
                offset: 0,
                reason: "bad magic (expected LBSG)",
            });
        }
        if header[4] != SIGNATURE_VERSION || header[5..8] != [0; 3] {
            return Err(Error::BadSignature {
                offset: 4,
                reason: "unsupported version",
            });
        }
        let raw_bs = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let block_size = BlockSize::new(raw_bs).map_err(|_| Error::BadSignature {
            offset: 8,
            reason: "block size is not a power of two of at least 512",
        })?;
        let mut l = [0u8; 8];
        l.copy_from_slice(&header[12..20]);
        let len = u64::from_le_bytes(l);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        Ok(SignatureReader {
            input,
            hasher,
            block_size,
            len,
            remaining: block_size.blocks(len),
            offset: HEADER_LEN as u64,
        })
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// The disk length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the disk is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Digests not yet read.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The next digest, or `None` after the last one (once the trailer has checked out).
    pub fn next_digest(&mut self) -> Result<Option<Digest>, Error> {
        if self.remaining == 0 {
            if self.offset != u64::MAX {
                let mut trailer = [0u8; 32];
                read_exact(&mut self.input, &mut trailer, self.offset)?;
                if *self.hasher.finalize().as_bytes() != trailer {
                    return Err(Error::BadSignature {
                        offset: self.offset,
                        reason: "trailer checksum mismatch (corrupted signature)",
                    });
                }
                self.offset = u64::MAX;
            }
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        read_exact(&mut self.input, &mut tag, self.offset)?;
        self.hasher.update(&tag);
        let d = match tag[0] {
            TAG_ZERO => {
                self.offset += 1;
                Digest::Zero
            }
            TAG_HASH => {
                let mut h = [0u8; 32];
                read_exact(&mut self.input, &mut h, self.offset + 1)?;
                self.hasher.update(&h);
                self.offset += 33;
                Digest::Hash(h)
            }
            _ => {
                return Err(Error::BadSignature {
                    offset: self.offset,
                    reason: "unknown block tag",
                });
            }
        };
        self.remaining -= 1;
        Ok(Some(d))
    }
}

fn read_exact<R: Read>(input: &mut R, buf: &mut [u8], offset: u64) -> Result<(), Error> {
    input.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::BadSignature {
                offset,
                reason: "truncated",
            }
        } else {
            Error::io(offset, e)
        }
    })
}
