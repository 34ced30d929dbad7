//! Properties shared by the tests and the fuzz targets, and the naive reference they are
//! checked against. Not a stable API.

use std::ops::ControlFlow;

use crate::{
    BlockSize, Delta, DiffOptions, Extent, ExtentKind, HashTree, Side, Signature, TreeSync, apply,
    diff, diff_with,
};

/// The obviously-correct diff: block by block, by the rules [`diff`] documents.
pub fn naive_diff(a: &[u8], b: &[u8], bs: BlockSize) -> Vec<Extent> {
    let n = bs.get() as usize;
    let mut out: Vec<Extent> = Vec::new();
    let mut i = 0;
    while i * n < a.len() {
        let sa = &a[i * n..((i + 1) * n).min(a.len())];
        let tb = if i * n < b.len() {
            &b[i * n..((i + 1) * n).min(b.len())]
        } else {
            &[][..]
        };
        let zero = sa.iter().all(|&x| x == 0);
        let kind = if zero {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        };
        let differs = if tb.is_empty() { !zero } else { sa != tb };
        if differs {
            let e = Extent {
                offset: (i * n) as u64,
                len: sa.len() as u64,
                kind,
            };
            match out.last_mut() {
                Some(l) if l.kind == e.kind && l.offset + l.len == e.offset => l.len += e.len,
                _ => out.push(e),
            }
        }
        i += 1;
    }
    out
}

/// Every way of diffing `a` against `b` (bytes/bytes, bytes/signature, signature/bytes,
/// signature/signature, the hash-tree exchange, and a diff cut into two ranges)
/// agrees with [`naive_diff`], and applying the delta to `b` gives `a`.
pub fn check_diff_apply(a: &[u8], b: &[u8], bs: BlockSize) -> Result<(), String> {
    let e = |x: crate::Error| x.to_string();
    let expected = naive_diff(a, b, bs);
    let opts = DiffOptions {
        block_size: bs,
        ..DiffOptions::default()
    };
    let flat = diff_with(a, b, opts, |_| ControlFlow::Continue(())).map_err(e)?;
    if flat.extents != expected {
        return Err(format!(
            "local diff {:?} != naive {:?}",
            flat.extents, expected
        ));
    }
    let (sa, sb) = (
        Signature::compute(a, bs).map_err(e)?,
        Signature::compute(b, bs).map_err(e)?,
    );
    let sides: [(Side<'_>, Side<'_>, &str); 3] = [
        (Side::Bytes(a), Side::Signature(&sb), "bytes/signature"),
        (Side::Signature(&sa), Side::Bytes(b), "signature/bytes"),
        (
            Side::Signature(&sa),
            Side::Signature(&sb),
            "signature/signature",
        ),
    ];
    for (s, t, what) in sides {
        let d = diff(s, t).map_err(e)?;
        if d != flat {
            return Err(format!("{what} diff {d:?} != local {flat:?}"));
        }
    }
    // Streamed signature, in windows small enough to cross several.
    for window in [1, 3, 1 << 16] {
        let bytes = sb.encode();
        let mut reader = crate::SignatureReader::new(bytes.as_slice()).map_err(e)?;
        let d = crate::diff::diff_streamed_windowed(
            Side::Bytes(a),
            &mut reader,
            opts,
            |_| ControlFlow::Continue(()),
            window,
        )
        .map_err(e)?;
        if d != flat {
            return Err(format!(
                "streamed diff (window {window}) {d:?} != local {flat:?}"
            ));
        }
    }
    let tree = tree_delta(&sa, &sb)?;
    if tree != flat {
        return Err(format!("tree exchange {tree:?} != flat {flat:?}"));
    }
    // A stop asked for by the progress callback is an error naming where it stopped.
    let total = bs.blocks(a.len() as u64);
    match diff_with(a, b, opts, |_| ControlFlow::Break(())) {
        Err(crate::Error::Interrupted { next_block }) if next_block > 0 && next_block <= total => {}
        other if total == 0 => drop(other),
        other => return Err(format!("a diff asked to stop gave {other:?}")),
    }
    // Cut into two steps (at the middle, odd sizes included) and joined, as one pass.
    let cut = total / 2;
    let mut first = diff_with(
        a,
        b,
        DiffOptions {
            end_block: Some(cut),
            ..opts
        },
        |_| ControlFlow::Continue(()),
    )
    .map_err(e)?;
    if first.next_block != cut || (cut < total && first.is_complete()) {
        return Err(format!(
            "a step to block {cut} ended at {}",
            first.next_block
        ));
    }
    let rest = diff_with(
        a,
        b,
        DiffOptions {
            start_block: first.next_block,
            ..opts
        },
        |_| ControlFlow::Continue(()),
    )
    .map_err(e)?;
    first.append(rest).map_err(e)?;
    if first != flat {
        return Err("a diff in two steps differs from one pass".into());
    }
    let mut target = b.to_vec();
    apply(&flat, a, &mut target).map_err(e)?;
    if target != a {
        return Err("apply(diff(a, b), b) != a".into());
    }
    if flat.data_bytes() + flat.zero_bytes() != flat.bytes_differing() {
        return Err("byte counters disagree".into());
    }
    Ok(())
}

/// Runs the hash-tree exchange between two signatures, in memory.
pub fn tree_delta(source: &Signature, target: &Signature) -> Result<Delta, String> {
    let e = |x: crate::Error| x.to_string();
    let leaves = source.block_size().blocks(source.len().max(target.len()));
    let remote = HashTree::new(target, leaves).map_err(e)?;
    let mut sync = TreeSync::new(HashTree::new(source, leaves).map_err(e)?);
    while let Some(req) = sync.poll_request() {
        let resp = remote.answer(&req).map_err(e)?;
        sync.handle_response(&resp).map_err(e)?;
    }
    sync.into_delta(source, target.len()).map_err(e)
}

/// Splits fuzz input into two disks and a block size.
pub fn split(data: &[u8]) -> (Vec<u8>, Vec<u8>, BlockSize) {
    let (head, rest) = data.split_at(data.len().min(3));
    let shift = head.first().map_or(0, |b| b % 4);
    let bs = BlockSize::new(512 << shift).unwrap_or_default();
    let cut = head
        .get(1)
        .map_or(0, |&c| rest.len() * usize::from(c) / 256);
    let scale = head.get(2).map_or(1, |&s| 1 + usize::from(s % 8));
    // Stretch inputs so they span several blocks; keep runs of zeros (zero blocks).
    let stretch = |p: &[u8]| -> Vec<u8> {
        p.iter()
            .flat_map(|&x| std::iter::repeat_n(x, scale * 64))
            .collect()
    };
    let a = stretch(&rest[..cut]);
    let mut b = a.clone();
    let edits = stretch(&rest[cut..]);
    for (k, w) in edits.chunks(7).enumerate() {
        let at = (k * 997 + usize::from(w[0]) * 31) % (b.len() + 1);
        if w[0] % 5 == 0 {
            b.truncate(at);
        } else if w[0] % 5 == 1 {
            b.extend_from_slice(w);
        } else if at < b.len() {
            b[at] = w[w.len() - 1];
        }
    }
    (a, b, bs)
}

/// Decoding arbitrary bytes as a signature never panics, and whatever decodes re-encodes
/// to the same bytes.
pub fn check_decode(data: &[u8]) -> Result<(), String> {
    if let Ok(sig) = Signature::decode(data)
        && sig.encode() != data
    {
        return Err("decoded signature re-encodes differently".into());
    }
    Ok(())
}
