//! Properties shared by the property tests and the fuzz targets. Not a stable API.

use std::collections::BTreeMap;
use std::io::Cursor;

use crate::{ChangeMap, LogWriter, ReadOptions, Reader, WriterConfig, reencode};

/// Reads arbitrary bytes in every mode. Nothing may panic, and a log the strict reader
/// accepts must re-encode to exactly its bytes up to EOLLocation.
pub fn check_parse(data: &[u8]) -> Result<(), String> {
    if let Ok(log) = Reader::new(data) {
        let out = reencode(&log, Cursor::new(Vec::new()))
            .map_err(|e| format!("re-encoding an accepted log failed: {e}"))?
            .into_inner();
        let end = usize::try_from(log.end()).map_err(|e| e.to_string())?;
        if out[..] != data[..end] {
            let at = out.iter().zip(data).position(|(a, b)| a != b);
            return Err(format!(
                "re-encoded log differs from its input at byte {at:?}"
            ));
        }
        let mut n = 0u64;
        log.for_each_write(|w, p| {
            n += 1;
            if p.len() != w.len as usize {
                return Err(crate::Error::WriteTooLarge {
                    len: p.len() as u64,
                });
            }
            Ok(())
        })
        .map_err(|e| format!("accepted log failed to replay: {e}"))?;
        if n != log.writes().count() as u64 {
            return Err("replay and writes() disagree".into());
        }
    }
    for options in [
        ReadOptions::lenient(),
        ReadOptions::lenient().salvage(true),
        ReadOptions::strict().salvage(true).verify_data(false),
    ] {
        if let Ok(log) = Reader::with_options(data, options) {
            let _ = log.for_each_write(|_, _| Ok::<(), crate::Error>(()));
            let mut map = ChangeMap::new();
            let _ = map.add_log(&log);
        }
    }
    Ok(())
}

/// One guest write for [`check_chain`].
#[derive(Clone, Debug)]
pub struct Op {
    /// Disk offset.
    pub disk_offset: u64,
    /// Payload.
    pub data: Vec<u8>,
    /// Timestamp.
    pub timestamp: u32,
    /// Close the batch after this write.
    pub end_batch: bool,
}

/// Decodes a chain of logs of small writes from arbitrary bytes.
pub fn ops_from_bytes(data: &[u8]) -> (u32, Vec<Vec<Op>>) {
    let mut it = data.iter().copied();
    let mut next = || it.next();
    let metadata_size = 64 + 32 * u32::from(next().unwrap_or(0) % 8);
    let mut logs = vec![Vec::new()];
    while let (Some(a), Some(b), Some(c), Some(d)) = (next(), next(), next(), next()) {
        if a == 0xFF {
            logs.push(Vec::new());
            continue;
        }
        let disk_offset = u64::from(a) * 97 + u64::from(b);
        let len = usize::from(c % 64) * usize::from(1 + d % 4);
        let data = (0..len).map(|i| (i as u8).wrapping_mul(d) ^ b).collect();
        let op = Op {
            disk_offset,
            data,
            timestamp: u32::from(a) << 8 | u32::from(d),
            end_batch: d & 0x10 != 0,
        };
        if let Some(log) = logs.last_mut() {
            log.push(op);
        }
    }
    (metadata_size, logs)
}

/// Writes each log of `logs` with [`LogWriter`] (linked by ids), reads it back, and checks
/// that the writes come back identical and in order, that replaying them gives the same
/// disk as a naive byte model, and that the [`ChangeMap`] of the chain describes exactly
/// the bytes the model holds.
pub fn check_chain(
    logs: &[Vec<Op>],
    metadata_size: u32,
    data_checksums: bool,
) -> Result<(), String> {
    let mut model: BTreeMap<u64, u8> = BTreeMap::new();
    let mut files = Vec::new();
    for (i, ops) in logs.iter().enumerate() {
        let config = WriterConfig {
            metadata_size,
            unique_id: id(i + 1),
            previous_unique_id: if i == 0 { [0; 16] } else { id(i) },
            data_checksums,
            ..WriterConfig::default()
        };
        let mut w = LogWriter::new(Cursor::new(Vec::new()), config).map_err(|e| e.to_string())?;
        for op in ops {
            w.write(op.disk_offset, &op.data, op.timestamp)
                .map_err(|e| e.to_string())?;
            if op.end_batch {
                w.end_batch().map_err(|e| e.to_string())?;
            }
            for (k, &b) in op.data.iter().enumerate() {
                model.insert(op.disk_offset + k as u64, b);
            }
        }
        let (file, header) = w.finish(7).map_err(|e| e.to_string())?;
        let bytes = file.into_inner();
        if header.eol_location != bytes.len() as u64 {
            return Err("EOLLocation is not the file length".into());
        }
        files.push(bytes);
    }

    let mut map = ChangeMap::new();
    let mut replayed: BTreeMap<u64, u8> = BTreeMap::new();
    for (ops, bytes) in logs.iter().zip(&files) {
        let log = Reader::new(bytes.as_slice()).map_err(|e| format!("own log rejected: {e}"))?;
        if log.warnings().iter().any(crate::Warning::is_strict_error) {
            return Err(format!("own log has warnings: {:?}", log.warnings()));
        }
        let got: Vec<_> = log.writes_with_payloads().collect();
        if got.len() != ops.len() {
            return Err(format!(
                "{} writes read back, {} written",
                got.len(),
                ops.len()
            ));
        }
        for ((w, payload), op) in got.iter().zip(ops) {
            if w.disk_offset != op.disk_offset || *payload != op.data || w.timestamp != op.timestamp
            {
                return Err(format!("write {w:?} read back differs from {op:?}"));
            }
            for (k, &b) in payload.iter().enumerate() {
                replayed.insert(w.disk_offset + k as u64, b);
            }
        }
        map.add_log(&log).map_err(|e| e.to_string())?;
    }
    if replayed != model {
        return Err("replayed disk differs from the model".into());
    }
    // The change map must describe exactly the model's bytes, each once.
    let mut from_map = BTreeMap::new();
    let mut last_end = None;
    for e in map.extents() {
        if last_end.is_some_and(|end| end >= e.disk_offset) {
            return Err("extents overlap, touch or are out of order".into());
        }
        last_end = Some(e.disk_offset + e.len);
        let mut at = e.disk_offset;
        for p in &e.pieces {
            if p.disk_offset != at {
                return Err("pieces do not tile their extent".into());
            }
            let file = &files[p.log];
            for k in 0..p.len {
                from_map.insert(p.disk_offset + k, file[(p.file_offset + k) as usize]);
            }
            at += p.len;
        }
        if at != e.disk_offset + e.len {
            return Err("pieces do not fill their extent".into());
        }
    }
    if from_map != model {
        return Err("change map differs from the model".into());
    }
    if map.unique_bytes() != model.len() as u64 {
        return Err(format!(
            "unique bytes {} != {}",
            map.unique_bytes(),
            model.len()
        ));
    }
    let logged: u64 = logs.iter().flatten().map(|o| o.data.len() as u64).sum();
    if map.logged_bytes() != logged {
        return Err("logged bytes miscounted".into());
    }
    for bytes in &files {
        check_parse(bytes)?;
    }
    Ok(())
}

fn id(n: usize) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&(n as u64).to_le_bytes());
    id[15] = 0x4C;
    id
}
