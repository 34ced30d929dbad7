//! The page-write journal of a [`LocalStore`](super::LocalStore) blob: what page writes,
//! clears and copy-on-write preservations changed since the last sync point, appended one
//! line per change beside `state.json` instead of rewriting the whole state each time.
//!
//! The file is a header naming the durable state it follows (generation and entity tag),
//! then one record per change:
//!
//! ```text
//! H <generation> 0 <etag> <crc>      the base: state.json of this generation and etag
//! W <start> <end> <etag> <crc>       pages written (allocated), the blob's new etag
//! C <start> <end> <etag> <crc>       pages cleared, the blob's new etag
//! P <start> <end> <snapshot> <crc>   pages whose old bytes the snapshot's file now holds
//! L <start> <end> lost <crc>         pages a failed flush may have lost (until rewritten)
//! ```
//!
//! `<crc>` is the CRC-64 of the line before it, in hex. Replay stops at the first line
//! that is incomplete, malformed or fails its CRC (a power loss may tear or zero what was
//! appended since the last fsync); a header that names another state (a sync point made
//! the journal stale before it was emptied) makes the whole file void.

use std::ops::Range;

use super::State;
use crate::store::crc64;

/// One change recorded in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Record {
    /// Pages written: allocated from now on.
    Write { range: Range<u64>, etag: String },
    /// Pages cleared: no longer allocated.
    Clear { range: Range<u64>, etag: String },
    /// The snapshot's file holds these pages' bytes as of the snapshot.
    Preserve { range: Range<u64>, snapshot: String },
    /// A flush of the data file failed after these pages were written: they may not be
    /// on disk until written (or cleared) again.
    Lost { range: Range<u64> },
}

impl Record {
    /// The pages it names.
    fn range(&self) -> &Range<u64> {
        match self {
            Record::Write { range, .. }
            | Record::Clear { range, .. }
            | Record::Preserve { range, .. }
            | Record::Lost { range } => range,
        }
    }
}

/// Where a state stands in its blob's journal (not serialised with the state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Position {
    /// Bytes of the journal the state includes (0: none, not even a header).
    pub end: u64,
    /// The file holds bytes past `end` that are not valid records (a torn tail or a stale
    /// journal): they are cut before the next append.
    pub dirty: bool,
}

/// The header line for a journal following the durable state `st`.
pub(super) fn header(st: &State) -> Vec<u8> {
    line('H', st.generation, 0, &st.etag)
}

/// The line recording `rec`.
pub(super) fn encode(rec: &Record) -> Vec<u8> {
    match rec {
        Record::Write { range, etag } => line('W', range.start, range.end, etag),
        Record::Clear { range, etag } => line('C', range.start, range.end, etag),
        Record::Preserve { range, snapshot } => line('P', range.start, range.end, snapshot),
        Record::Lost { range } => line('L', range.start, range.end, "lost"),
    }
}

fn line(kind: char, a: u64, b: u64, tag: &str) -> Vec<u8> {
    debug_assert!(!tag.is_empty() && !tag.contains([' ', '\n']));
    let body = format!("{kind} {a} {b} {tag}");
    format!("{body} {:016x}\n", crc64(body.as_bytes())).into_bytes()
}

/// One parsed line: kind, two numbers, tag.
type Line<'a> = (char, u64, u64, &'a str);

/// Parses one line (without its newline); `None` if it is not a whole, valid line.
fn parse_line(text: &[u8]) -> Option<Line<'_>> {
    let text = std::str::from_utf8(text).ok()?;
    let (body, crc) = text.rsplit_once(' ')?;
    if crc.len() != 16 || u64::from_str_radix(crc, 16).ok()? != crc64(body.as_bytes()) {
        return None;
    }
    let mut it = body.split(' ');
    let kind = it.next()?;
    let a = it.next()?.parse().ok()?;
    let b = it.next()?.parse().ok()?;
    let tag = it.next()?;
    if it.next().is_some() || kind.len() != 1 || tag.is_empty() {
        return None;
    }
    Some((kind.chars().next()?, a, b, tag))
}

/// The whole, valid lines at the start of `bytes`, each with the offset just past it;
/// the first line that is not whole and valid ends them.
fn lines(bytes: &[u8]) -> Vec<(Line<'_>, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(n) = bytes[at..].iter().position(|&b| b == b'\n') {
        let Some(parsed) = parse_line(&bytes[at..at + n]) else {
            break;
        };
        at += n + 1;
        out.push((parsed, at));
    }
    out
}

/// A line's record; `None` for a header, an unknown kind, or an empty or reversed range
/// (none of which a store writes after the header).
fn record(&(kind, a, b, tag): &Line<'_>) -> Option<Record> {
    if a >= b {
        return None;
    }
    let (range, tag) = (a..b, tag.to_owned());
    Some(match kind {
        'W' => Record::Write { range, etag: tag },
        'C' => Record::Clear { range, etag: tag },
        'P' => Record::Preserve {
            range,
            snapshot: tag,
        },
        'L' => Record::Lost { range },
        _ => return None,
    })
}

/// Applies the records that lead `lines` (up to the first line that is not one, or names
/// pages past the blob's end: no store writes such a line, so it is damage, as a line
/// whose checksum fails); returns the offset just past the last one applied, `start` if
/// none.
fn apply_lines(st: &mut State, lines: &[(Line<'_>, usize)], start: usize) -> usize {
    let mut end = start;
    for (line, after) in lines {
        let Some(rec) = record(line).filter(|r| r.range().end <= st.size) else {
            break;
        };
        apply(st, &rec);
        end = *after;
    }
    end
}

/// Replays a whole journal file onto `st`, the durable state it should follow; returns
/// the state's position in the file. A journal whose header names another state is void.
pub(super) fn replay_all(st: &mut State, bytes: &[u8]) -> Position {
    let lines = lines(bytes);
    let end = match lines.first() {
        Some(&(('H', g, 0, etag), header_end)) if g == st.generation && etag == st.etag => {
            apply_lines(st, &lines[1..], header_end)
        }
        _ => 0,
    };
    Position {
        end: end as u64,
        dirty: end < bytes.len(),
    }
}

/// Replays records (no header) appended after the state's position; returns how many of
/// `bytes` were valid records applied, and whether any were not.
pub(super) fn replay_tail(st: &mut State, bytes: &[u8]) -> Position {
    let end = apply_lines(st, &lines(bytes), 0);
    Position {
        end: end as u64,
        dirty: end < bytes.len(),
    }
}

/// The pages the records of `bytes` (a journal up to a state's position in it) wrote or
/// cleared: the changes since the state's last sync point.
pub(super) fn changed(bytes: &[u8]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for (line, _) in lines(bytes) {
        match record(&line) {
            Some(Record::Write { range, .. } | Record::Clear { range, .. }) => out.push(range),
            Some(Record::Preserve { .. } | Record::Lost { .. }) | None => {}
        }
    }
    crate::store::merge_ranges(out)
}

/// Applies one change to a state: the single rule shared by the writer (before appending
/// it) and by replay.
pub(super) fn apply(st: &mut State, rec: &Record) {
    match rec {
        Record::Write { range, etag } => {
            add_range(&mut st.ranges, range.clone());
            cut_range(&mut st.lost, range);
            st.etag.clone_from(etag);
        }
        Record::Clear { range, etag } => {
            cut_range(&mut st.ranges, range);
            cut_range(&mut st.lost, range);
            st.etag.clone_from(etag);
        }
        Record::Lost { range } => add_range(&mut st.lost, range.clone()),
        Record::Preserve { range, snapshot } => {
            // Only the newest snapshot preserves (older ones share its pages); a record
            // for another was made before that snapshot went: nothing left to note.
            if let Some(s) = st.snapshots.last_mut().filter(|s| &s.id == snapshot) {
                add_range(&mut s.preserved, range.clone());
            }
        }
    }
}

/// Adds `r` to sorted, merged `ranges`, keeping them so (no re-sort of the whole list).
pub(super) fn add_range(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.start >= r.end {
        return;
    }
    // The first range that ends at or after r.start (could merge), the first that starts
    // after r.end (cannot).
    let lo = ranges.partition_point(|x| x.end < r.start);
    let hi = ranges.partition_point(|x| x.start <= r.end);
    if lo == hi {
        ranges.insert(lo, r);
        return;
    }
    let merged = ranges[lo].start.min(r.start)..ranges[hi - 1].end.max(r.end);
    ranges.splice(lo..hi, [merged]);
}

/// Removes `cut` from sorted, merged `ranges`.
pub(super) fn cut_range(ranges: &mut Vec<Range<u64>>, cut: &Range<u64>) {
    if cut.start >= cut.end {
        return;
    }
    let lo = ranges.partition_point(|x| x.end <= cut.start);
    let hi = ranges.partition_point(|x| x.start < cut.end);
    if lo >= hi {
        return;
    }
    let mut keep = Vec::with_capacity(2);
    if ranges[lo].start < cut.start {
        keep.push(ranges[lo].start..cut.start);
    }
    if ranges[hi - 1].end > cut.end {
        keep.push(cut.end..ranges[hi - 1].end);
    }
    ranges.splice(lo..hi, keep);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::merge_ranges;
    use proptest::prelude::*;

    fn base() -> State {
        State {
            generation: 7,
            etag: "\"0x00000000000000AA\"".into(),
            size: 1 << 20,
            ..State::default()
        }
    }

    #[test]
    fn a_record_past_the_blobs_end_ends_replay() {
        let mut file = header(&base());
        file.extend(encode(&write(0, 512, "\"e1\"")));
        let whole = file.len();
        // A whole line with a good checksum that names pages the blob does not have.
        file.extend(encode(&write(1 << 20, (1 << 20) + 512, "\"e2\"")));
        file.extend(encode(&write(512, 1024, "\"e3\"")));
        let mut st = base();
        let pos = replay_all(&mut st, &file);
        assert_eq!((pos.end, pos.dirty), (whole as u64, true));
        assert_eq!(st.ranges, vec![0..512]);
    }

    fn write(a: u64, b: u64, tag: &str) -> Record {
        Record::Write {
            range: a..b,
            etag: tag.into(),
        }
    }

    #[test]
    fn a_journal_replays_to_the_state_its_writer_held() {
        let mut held = base();
        let mut file = header(&held);
        for rec in [
            write(0, 512, "\"e1\""),
            write(1024, 2048, "\"e2\""),
            Record::Clear {
                range: 0..1536,
                etag: "\"e3\"".into(),
            },
        ] {
            apply(&mut held, &rec);
            file.extend(encode(&rec));
        }
        let mut replayed = base();
        let pos = replay_all(&mut replayed, &file);
        assert_eq!(pos.end, file.len() as u64);
        assert!(!pos.dirty);
        assert_eq!(replayed.ranges, vec![1536..2048]);
        assert_eq!(replayed.etag, "\"e3\"");
        assert_eq!(held.ranges, replayed.ranges);
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_replay_at_the_last_whole_record() {
        let mut file = header(&base());
        file.extend(encode(&write(0, 512, "\"e1\"")));
        let whole = file.len();
        let second = encode(&write(512, 1024, "\"e2\""));
        // Torn: half a line.
        let mut torn = file.clone();
        torn.extend(&second[..second.len() / 2]);
        // Corrupt: a whole line whose CRC does not match (a zeroed block, a flipped bit).
        let mut flipped = file.clone();
        let mut bad = second.clone();
        bad[2] ^= 1;
        flipped.extend(&bad);
        let mut zeroed = file.clone();
        zeroed.extend(vec![0u8; 40]);
        zeroed.push(b'\n');
        for f in [torn, flipped, zeroed] {
            let mut st = base();
            let pos = replay_all(&mut st, &f);
            assert_eq!((pos.end, pos.dirty), (whole as u64, true));
            assert_eq!(st.ranges, vec![0..512]);
        }
    }

    #[test]
    fn a_journal_for_another_state_is_void() {
        let mut file = header(&base());
        file.extend(encode(&write(0, 512, "\"e1\"")));
        let mut newer = base();
        newer.generation += 1;
        let pos = replay_all(&mut newer, &file);
        assert_eq!((pos.end, pos.dirty), (0, true));
        assert!(newer.ranges.is_empty());
        assert_eq!(replay_all(&mut base(), b""), Position::default());
    }

    proptest! {
        /// Incremental insertion and cutting agree with rebuilding the list from scratch.
        #[test]
        fn ranges_kept_incrementally_match_a_rebuild(
            ops in prop::collection::vec((any::<bool>(), 0u64..64, 1u64..16), 0..64)
        ) {
            let mut fast: Vec<Range<u64>> = Vec::new();
            let mut pages = [false; 80];
            for (add, at, len) in ops {
                let r = at..at + len;
                if add { add_range(&mut fast, r.clone()) } else { cut_range(&mut fast, &r) }
                pages[r.start as usize..r.end as usize].fill(add);
            }
            let slow = merge_ranges(
                (0..80u64).filter(|&p| pages[p as usize]).map(|p| p..p + 1).collect(),
            );
            prop_assert_eq!(fast, slow);
        }
    }
}
