//! Commands that need no site: HRL inspection and replay, and `resync::diff` on files.

use std::fs::{File, OpenOptions};
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use lifeboat_hrl::{ChangeMap, Reader};
use lifeboat_resync::{BlockSize, DiffOptions, Side};
use serde_json::json;

use crate::HrlCmd;
use lifeboat_engine::hex;

/// `hrl inspect` and `hrl apply`.
pub(crate) fn hrl(cmd: &HrlCmd, json: bool) -> Result<()> {
    match cmd {
        HrlCmd::Inspect { file } => inspect(file, json),
        HrlCmd::Apply { files, disk } => apply(files, disk),
    }
}

fn load(path: &Path) -> Result<Reader<Bytes>> {
    let bytes =
        Bytes::from(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    Reader::new(bytes).with_context(|| format!("{} is not a valid HRL log", path.display()))
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let log = load(path)?;
    let h = log.header();
    let writes: Vec<_> = log
        .writes_with_payloads()
        .map(|(w, p)| (w.disk_offset, w.len, w.timestamp, blake3::hash(p)))
        .collect();
    if json {
        let v = json!({
            "file": path,
            "version": h.log_format_version,
            "unique_id": hex(&h.unique_id),
            "previous_unique_id": hex(&h.previous_unique_id),
            "vhd2_data_write_guid": hex(&h.vhd2_data_write_guid),
            "eol_location": h.eol_location,
            "timestamp": h.timestamp,
            "total_metadata_entries": h.total_metadata_entries,
            "logged_bytes": log.logged_bytes(),
            "warnings": log.warnings().iter().map(|w| format!("{w:?}")).collect::<Vec<_>>(),
            "writes": writes.iter().map(|(o, l, t, b)| json!({
                "offset": o, "length": l, "timestamp": t, "blake3": b.to_hex().as_str(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", path.display());
    println!(
        "  version {:#x}, unique id {}, previous {}",
        h.log_format_version,
        hex(&h.unique_id),
        hex(&h.previous_unique_id)
    );
    println!(
        "  data-write guid {}, EOLLocation {}, {} entries, {} bytes of writes",
        hex(&h.vhd2_data_write_guid),
        h.eol_location,
        h.total_metadata_entries,
        log.logged_bytes()
    );
    for w in log.warnings() {
        println!("  warning: {w:?}");
    }
    for (o, l, t, b) in &writes {
        println!("  write offset {o:>12} length {l:>8} time {t:>10} blake3 {b}");
    }
    Ok(())
}

fn apply(files: &[PathBuf], disk: &Path) -> Result<()> {
    let logs = files.iter().map(|f| load(f)).collect::<Result<Vec<_>>>()?;
    // The chain is checked (and the final extents folded) before the disk is touched.
    let mut map = ChangeMap::new();
    for (f, l) in files.iter().zip(&logs) {
        map.add_log(l)
            .with_context(|| format!("{} does not follow the log before it", f.display()))?;
    }
    let out = OpenOptions::new()
        .write(true)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    let len = out.metadata()?.len();
    if let Some(p) = map.pieces().find(|p| p.disk_end() > len) {
        bail!(
            "a write reaches byte {} but {} is {len} bytes",
            p.disk_end(),
            disk.display()
        );
    }
    for p in map.pieces() {
        let src = logs[p.log].source();
        let at = p.file_offset as usize;
        out.write_all_at(&src[at..at + p.len as usize], p.disk_offset)?;
    }
    out.sync_all()?;
    println!(
        "{} log(s) applied to {}: {} bytes logged, {} bytes written",
        logs.len(),
        disk.display(),
        map.logged_bytes(),
        map.unique_bytes()
    );
    Ok(())
}

/// `diff SOURCE TARGET [--apply]`.
pub(crate) fn diff(
    source: &Path,
    target: &Path,
    block_size: u64,
    apply: bool,
    json: bool,
) -> Result<()> {
    let bs = u32::try_from(block_size)
        .ok()
        .and_then(|b| BlockSize::new(b).ok())
        .with_context(|| format!("--block-size {block_size} is not a valid block size"))?;
    let src = File::open(source).with_context(|| format!("opening {}", source.display()))?;
    let mut tgt = OpenOptions::new()
        .read(true)
        .write(apply)
        .open(target)
        .with_context(|| format!("opening {}", target.display()))?;
    let delta = lifeboat_resync::diff_with(
        Side::Local(&src),
        Side::Local(&tgt),
        DiffOptions {
            block_size: bs,
            ..DiffOptions::default()
        },
        |_| ControlFlow::Continue(()),
    )?;
    let stats = if apply {
        let s = lifeboat_resync::apply(&delta, &src, &mut tgt)?;
        tgt.sync_all()?;
        Some(s)
    } else {
        None
    };
    if json {
        let v = json!({
            "block_size": bs.get(),
            "source_len": delta.source_len,
            "target_len": delta.target_len,
            "blocks_compared": delta.blocks_compared,
            "bytes_differing": delta.bytes_differing(),
            "extents": delta.extents.iter().map(|e| json!({
                "offset": e.offset, "len": e.len, "kind": format!("{:?}", e.kind).to_lowercase(),
            })).collect::<Vec<_>>(),
            "applied": stats.map(|s| json!({"data_bytes": s.data_bytes, "zero_bytes": s.zero_bytes})),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} blocks compared, {} differ in {} extent(s): {} data bytes, {} zero bytes",
            delta.blocks_compared,
            delta.bytes_differing() / u64::from(bs.get()).max(1),
            delta.extents.len(),
            delta.data_bytes(),
            delta.zero_bytes()
        );
        if let Some(s) = stats {
            println!(
                "applied: {} bytes written, {} bytes zeroed",
                s.data_bytes, s.zero_bytes
            );
        }
    }
    // Like `cmp`: 1 when the files differed (even if --apply made them equal since).
    if delta.extents.is_empty() && delta.source_len == delta.target_len {
        Ok(())
    } else {
        Err(crate::Exit(crate::exit::DIFFERENT).into())
    }
}

/// `disk inspect`: what an image is.
pub(crate) fn inspect_disk(path: &Path, json: bool) -> Result<()> {
    use crate::human::size;
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    if crate::host::is_vhdx_file(&f)? {
        let v = crate::host::open_vhdx(path, f).with_context(|| path.display().to_string())?;
        let i = v.info().clone();
        let allocated = v.allocated()?;
        let hex = |g: &[u8; 16]| g.iter().map(|b| format!("{b:02x}")).collect::<String>();
        // The parents, nearest first: each one's locator and DataWriteGuid.
        let mut parents = Vec::new();
        let mut at = &v;
        while let (Some(l), Some(p)) = (at.parent_locator(), at.parent_disk()) {
            let name = l
                .get("relative_path")
                .or_else(|| l.get("absolute_win32_path"))
                .unwrap_or("?")
                .to_owned();
            parents.push((name, hex(&p.info().data_write_guid)));
            at = p;
        }
        let kind = match (i.differencing, i.leave_blocks_allocated) {
            (true, _) => "vhdx-differencing",
            (false, true) => "vhdx-fixed",
            (false, false) => "vhdx-dynamic",
        };
        if json {
            let out = json!({
                "format": kind,
                "parents": parents
                    .iter()
                    .map(|(p, g)| json!({"locator": p, "data_write_guid": g}))
                    .collect::<Vec<_>>(),
                "virtual_size": i.virtual_size,
                "file_size": len,
                "block_size": i.block_size,
                "logical_sector_size": i.logical_sector_size,
                "physical_sector_size": i.physical_sector_size,
                "allocated": allocated,
                "data_write_guid": hex(&i.data_write_guid),
                "disk_id": hex(&i.disk_id),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "{}: VHDX ({}), virtual size {} ({} bytes), {} in blocks of {}, {} sectors of {} bytes (physical {})",
                path.display(),
                kind.trim_start_matches("vhdx-"),
                size(i.virtual_size),
                i.virtual_size,
                size(allocated),
                size(u64::from(i.block_size)),
                i.virtual_size / u64::from(i.logical_sector_size),
                i.logical_sector_size,
                i.physical_sector_size
            );
            println!(
                "  data write GUID {} (HRL logs of this disk name it)",
                hex(&i.data_write_guid)
            );
            for (n, (p, g)) in parents.iter().enumerate() {
                println!("  parent {}: {p} (data write GUID {g})", n + 1);
            }
        }
        return Ok(());
    }
    let mut tail = [0u8; 8];
    let vhd = len >= 512
        && std::os::unix::fs::FileExt::read_at(&f, &mut tail, len - 512).is_ok()
        && &tail == b"conectix";
    let (format, virtual_size) = if vhd {
        ("vhd-fixed", len - 512)
    } else {
        ("raw", len)
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"format": format, "virtual_size": virtual_size, "file_size": len})
            )?
        );
    } else {
        println!(
            "{}: {}, virtual size {} ({virtual_size} bytes)",
            path.display(),
            if vhd {
                "fixed VHD (raw data and a 512-byte footer)"
            } else {
                "raw image"
            },
            size(virtual_size)
        );
    }
    Ok(())
}
