//! The resync tool the comparison script (`benches/resync-compare.sh`) times next to rsync,
//! b3sum and `qemu-img compare`.
//!
//! ```text
//! resync-bench local  SOURCE TARGET [--apply]   byte-compare two local images
//! resync-bench remote SOURCE TARGET [--apply]   stream TARGET's signature through a file
//!                                               (its side), diff SOURCE against it (ours)
//! resync-bench remote-memory SOURCE TARGET       the same with the signature held in memory
//! resync-bench tree   SOURCE TARGET             hash both, run the hash-tree exchange
//! resync-bench signature FILE...                 the signatures of the files (what b3sum
//!                                               of the same files is compared with)
//! resync-bench copy-floor SOURCE TARGET [MIB]    the least an initial copy does, on one
//!                                               thread: SOURCE's data read in 1 MiB steps
//!                                               (two buffers in turn), each 64 KiB block's
//!                                               digest, written to TARGET 256 KiB at
//!                                               a time, one fdatasync;
//!                                               with MIB, the same in pieces of MIB MiB
//!                                               (each read whole into one of two buffers,
//!                                               then written, as protect's pieces are)
//! ```
//! Prints one line of `key=value` counters.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter};
use std::ops::ControlFlow;
use std::process::ExitCode;

use lifeboat_resync::{
    BlockSize, DiffOptions, HashTree, Signature, SignatureReader, TreeSync, apply, diff,
    diff_streamed, write_signature,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("resync-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, files @ ..] = args.as_slice()
        && mode == "signature"
    {
        for f in files {
            let sig = Signature::compute(&File::open(f)?, BlockSize::DEFAULT)?;
            println!("{f} blocks={}", sig.digests().len());
        }
        return Ok(());
    }
    if args.first().is_some_and(|m| m == "copy-floor") {
        let [_, src, tgt, piece @ ..] = args.as_slice() else {
            return Err("usage: resync-bench copy-floor SOURCE TARGET [MIB]".into());
        };
        let piece = match piece {
            [] => 1,
            [mib] => mib
                .parse::<u64>()
                .ok()
                .filter(|&m| (1..=1024).contains(&m))
                .ok_or("copy-floor: MIB is a whole number of MiB from 1 to 1024")?,
            _ => return Err("usage: resync-bench copy-floor SOURCE TARGET [MIB]".into()),
        };
        let blocks = copy_floor(&File::open(src)?, &File::create(tgt)?, piece << 20)?;
        println!("blocks={blocks}");
        return Ok(());
    }
    let (mode, src, tgt) = match args.as_slice() {
        [m, s, t, ..] => (m.as_str(), s, t),
        _ => {
            return Err(
                "usage: resync-bench local|remote|remote-memory|tree SOURCE TARGET [--apply]"
                    .into(),
            );
        }
    };
    let do_apply = args.iter().any(|a| a == "--apply");
    let source = File::open(src)?;
    let bs = BlockSize::DEFAULT;
    let (delta, sent_digests) = match mode {
        "local" => (diff(&source, &File::open(tgt)?)?, 0),
        "remote" => {
            // The target's side streams its signature out; ours streams it back in, so
            // memory stays bounded whatever the disk size.
            let path =
                std::env::temp_dir().join(format!("resync-bench-{}.sig", std::process::id()));
            write_signature(&File::open(tgt)?, bs, BufWriter::new(File::create(&path)?))?;
            let wire = std::fs::metadata(&path)?.len();
            let mut reader = SignatureReader::new(BufReader::new(File::open(&path)?))?;
            let delta = diff_streamed(&source, &mut reader, DiffOptions::default(), |_| {
                ControlFlow::Continue(())
            })?;
            std::fs::remove_file(&path)?;
            (delta, wire)
        }
        "remote-memory" => {
            // The same, holding the target's signature in memory (for comparison).
            let sig = Signature::compute(&File::open(tgt)?, bs)?;
            let wire = sig.encode().len() as u64;
            (diff(&source, &sig)?, wire)
        }
        "tree" => {
            let s = Signature::compute(&source, bs)?;
            let t = Signature::compute(&File::open(tgt)?, bs)?;
            let leaves = bs.blocks(s.len().max(t.len()));
            let remote = HashTree::new(&t, leaves)?;
            let mut sync = TreeSync::new(HashTree::new(&s, leaves)?);
            while let Some(req) = sync.poll_request() {
                sync.handle_response(&remote.answer(&req)?)?;
            }
            let exchanged = sync.bytes_exchanged();
            println!(
                "flat_signature_bytes={} tree_bytes={} rounds={}",
                t.encode().len(),
                exchanged,
                sync.rounds()
            );
            (sync.into_delta(&s, t.len())?, exchanged)
        }
        other => return Err(format!("unknown mode {other}").into()),
    };
    if do_apply {
        let mut target = OpenOptions::new().write(true).open(tgt)?;
        apply(&delta, &source, &mut target)?;
        target.sync_all()?;
    }
    println!(
        "blocks_compared={} extents={} data_bytes={} zero_bytes={} digest_bytes={} source_len={}",
        delta.blocks_compared,
        delta.extents.len(),
        delta.data_bytes(),
        delta.zero_bytes(),
        sent_digests,
        delta.source_len
    );
    Ok(())
}

/// Copies `source`'s data (what its holes leave) into `target` at the same offsets,
/// digesting each block of `BlockSize::DEFAULT` as `lifeboat protect` does, on one thread:
/// each `piece` bytes of the disk are read in 1 MiB steps into one of two buffers (each
/// step's blocks digested right after its read), then written 256 KiB at a time (as the
/// embedded store writes: larger writes cost more CPU, ADR 0008). With 1 MiB pieces (each
/// buffer a step's worth, held in the CPU's caches) it is the CPU floor of an initial copy by
/// buffered I/O, which `benches/agent-compare.sh` sets beside `protect`; with protect's
/// 4 MiB segments, what a buffer the caches do not hold costs beside it. Returns the
/// blocks digested.
fn copy_floor(source: &File, target: &File, piece: u64) -> std::io::Result<u64> {
    use lifeboat_source::ReadAt;
    use std::os::unix::fs::FileExt;
    const STEP: u64 = 1 << 20;
    const WRITE: u64 = 256 << 10;
    let size = source.size()?;
    target.set_len(size)?;
    let block = BlockSize::DEFAULT.get() as usize;
    let data = source.data_ranges(0, size)?;
    // Placed as the bytes lie in the page cache (as protect's buffers are): 16 bytes off,
    // where the allocator places a large block, the kernel's copies in and out run at a
    // third of the speed, and the floor was no floor.
    let mut bufs = [
        lifeboat_source::PlacedBuf::default(),
        lifeboat_source::PlacedBuf::default(),
    ];
    let mut blocks = 0;
    let mut start = 0;
    while start < size {
        let end = start.saturating_add(piece).min(size);
        let buf = bufs[(start / piece % 2) as usize].slice(start, (end - start) as usize);
        let first = data.partition_point(|r| r.end <= start);
        let inside: Vec<(u64, u64)> = data[first..]
            .iter()
            .take_while(|r| r.start < end)
            .map(|r| (r.start.max(start), r.end.min(end)))
            .collect();
        let place = |at: u64| (at - start) as usize;
        for &(from, to) in &inside {
            let mut at = from;
            while at < to {
                let n = STEP.min(to - at);
                let step = &mut buf[place(at)..place(at + n)];
                ReadAt::read_exact_at(source, step, at)?;
                for b in step.chunks(block) {
                    std::hint::black_box(lifeboat_resync::digest_block(b));
                    blocks += 1;
                }
                at += n;
            }
        }
        for &(from, to) in &inside {
            let mut at = from;
            while at < to {
                let n = WRITE.min(to - at);
                target.write_all_at(&buf[place(at)..place(at + n)], at)?;
                at += n;
            }
        }
        start = end;
    }
    target.sync_data()?;
    Ok(blocks)
}
