//! Differencing disks ([MS-VHDX] 2.6.2.6): the parent locator, and a chain opened from a
//! child down to its base, each link checked.

use lifeboat_source::ReadAt;

use crate::error::{Error, Result};
use crate::format::*;
use crate::reader::Vhdx;

/// The VHDX parent locator type (`B04AEFB7-D19E-4A81-B789-25B8E9445913`).
pub(crate) const LOCATOR_TYPE: [u8; 16] = guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// Chains deeper than this are refused (Hyper-V checkpoints make a link each).
pub const MAX_CHAIN: usize = 256;

/// Where a differencing disk's parent is, and which parent it must be: the locator's
/// key-value pairs (`parent_linkage`, `parent_linkage2`, `relative_path`, `volume_path`,
/// `absolute_win32_path`), in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// The pairs, keys and values as UTF-16 decoded.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The DataWriteGuids the parent may have (`parent_linkage`, then
    /// `parent_linkage2`), as stored in a header.
    pub fn linkages(&self) -> Vec<[u8; 16]> {
        ["parent_linkage", "parent_linkage2"]
            .iter()
            .filter_map(|k| self.get(k))
            .filter_map(parse_guid)
            .collect()
    }

    /// Parses the locator item at `at` (its bytes `b`).
    pub(crate) fn parse(b: &[u8], at: u64) -> Result<Self> {
        if b.len() < 20 || guid_at(b, 0) != LOCATOR_TYPE {
            return Err(Error::unsupported(
                "a parent locator of another type",
                at,
                "only the VHDX locator type B04AEFB7-D19E-4A81-B789-25B8E9445913 is specified",
            ));
        }
        let count = usize::from(u16_at(b, 18));
        if 20 + count * 12 > b.len() {
            return Err(Error::invalid(
                "parent locator",
                at + 18,
                format!(
                    "at most {} entries in {} bytes",
                    (b.len() - 20) / 12,
                    b.len()
                ),
                count.to_string(),
            ));
        }
        let text = |off: u32, len: u16, what: &str| -> Result<String> {
            let (off, len) = (off as usize, usize::from(len));
            let bytes = b.get(off..off.saturating_add(len)).filter(|_| len % 2 == 0);
            let bytes = bytes.ok_or_else(|| {
                Error::invalid(
                    "parent locator",
                    at,
                    format!(
                        "a {what} inside the item ({} bytes), of whole UTF-16 units",
                        b.len()
                    ),
                    format!("{len} bytes at {off}"),
                )
            })?;
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units)
                .map_err(|_| Error::invalid("parent locator", at + off as u64, "UTF-16", "not"))
        };
        let mut entries = Vec::with_capacity(count);
        for k in 0..count {
            let e = 20 + k * 12;
            let key = text(u32_at(b, e), u16_at(b, e + 8), "key")?;
            let value = text(u32_at(b, e + 4), u16_at(b, e + 10), "value")?;
            entries.push((key, value));
        }
        let locator = ParentLocator { entries };
        if locator.linkages().is_empty() {
            return Err(Error::invalid(
                "parent locator",
                at,
                "a parent_linkage GUID",
                "none",
            ));
        }
        Ok(locator)
    }
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` as a GUID's stored bytes.
pub(crate) fn parse_guid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let parts: Vec<&str> = s.split('-').collect();
    if !parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12]) {
        return None;
    }
    let d1 = u32::from_str_radix(parts[0], 16).ok()?;
    let d2 = u16::from_str_radix(parts[1], 16).ok()?;
    let d3 = u16::from_str_radix(parts[2], 16).ok()?;
    let tail = format!("{}{}", parts[3], parts[4]);
    let mut d4 = [0u8; 8];
    for (i, b) in d4.iter_mut().enumerate() {
        *b = u8::from_str_radix(tail.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(guid(d1, d2, d3, d4))
}

/// A GUID's stored bytes as `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`, as locators write it.
pub fn format_guid(g: &[u8; 16]) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    let tail: String = g[8..].iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{{{d1:08X}-{d2:04X}-{d3:04X}-{}-{}}}",
        &tail[..4],
        &tail[4..]
    )
}

/// Opens `source` and, for a differencing disk, its parents down to the base: `parent`
/// finds the file a locator names (paths are the embedder's business: relative to the
/// child's directory, on a volume, ...). Every link is checked (the parent's DataWriteGuid
/// is the child's linkage, sizes agree); a loop or a chain deeper than [`MAX_CHAIN`] is
/// refused.
pub fn open_chain<S: ReadAt>(
    source: S,
    mut parent: impl FnMut(&ParentLocator) -> Result<S>,
) -> Result<Vhdx<S>> {
    let mut chain = vec![Vhdx::open(source)?];
    let mut seen = vec![chain[0].info().data_write_guid];
    while let Some(locator) = chain.last().and_then(|v| v.parent_locator()).cloned() {
        if chain.len() > MAX_CHAIN {
            return Err(Error::unsupported(
                format!("a chain of more than {MAX_CHAIN} differencing disks"),
                0,
                "merge some of its checkpoints first",
            ));
        }
        let p = Vhdx::open(parent(&locator)?)?;
        let id = p.info().data_write_guid;
        if seen.contains(&id) {
            return Err(Error::invalid(
                "parent chain",
                0,
                "each disk once",
                format!(
                    "a loop back to the disk whose DataWriteGuid is {}",
                    format_guid(&id)
                ),
            ));
        }
        seen.push(id);
        chain.push(p);
    }
    let mut base = chain.pop().expect("one disk at least");
    while let Some(child) = chain.pop() {
        base = child.with_parent(base)?;
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_round_trip_as_locators_write_them() {
        let g = guid(0x0123_4567, 0x89AB, 0xCDEF, [1, 2, 3, 4, 5, 6, 7, 8]);
        let s = format_guid(&g);
        assert_eq!(s, "{01234567-89AB-CDEF-0102-030405060708}");
        assert_eq!(parse_guid(&s), Some(g));
        assert_eq!(parse_guid(&s.to_lowercase()), Some(g));
        assert_eq!(parse_guid("{0123-89AB}"), None);
    }
}
