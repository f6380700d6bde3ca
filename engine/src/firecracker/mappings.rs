//! Firecracker's description of guest memory: the JSON array that arrives with
//! the userfaultfd, one object per region.
//!
//! ```json
//! [{"base_host_virt_addr":140233318285312,"size":134217728,"offset":0,
//!   "page_size":4096,"page_size_kib":4096}]
//! ```
//!
//! - `base_host_virt_addr`: where the region starts in Firecracker's address space
//!   (the userfaultfd's addresses are in that space, not ours);
//! - `size`: its length in bytes;
//! - `offset`: where its contents start in the snapshot memory file;
//! - `page_size`: bytes per page; `page_size_kib` is its deprecated twin whose value
//!   is *also* in bytes, despite its name. Either may be missing; if both are there
//!   they must agree.
//!
//! Nothing here is trusted before [`parse`] has checked it: page sizes are 4 KiB,
//! 2 MiB or 1 GiB, every address, size and offset is aligned, regions are non-empty
//! and do not overlap, and no sum overflows.

use serde::{Deserialize, Serialize};

/// The page sizes Firecracker can use: 4 KiB, or hugetlbfs 2 MiB (and 1 GiB).
pub const PAGE_SIZES: [u64; 3] = [4096, 2 << 20, 1 << 30];

/// Most regions accepted in one message (Firecracker sends one to a few).
pub const MAX_REGIONS: usize = 1024;

/// A checked guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegionMapping {
    /// Start in Firecracker's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of its contents in the snapshot memory file.
    pub offset: u64,
    /// Bytes per page.
    pub page_size: u64,
}

impl GuestRegionMapping {
    /// One past its last byte in Firecracker's address space.
    pub fn end(&self) -> u64 {
        self.base_host_virt_addr + self.size
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / self.page_size
    }

    /// Whether `addr` (Firecracker's address space) is inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr < self.end()
    }
}

/// The wire form, before any check.
/// Unknown fields are ignored, so that a newer Firecracker that adds one still
/// works.
#[derive(Debug, Deserialize)]
struct WireMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// Why a mappings message is refused. Regions are numbered from 0 as in the array.
#[derive(Debug, thiserror::Error)]
pub enum MappingsError {
    /// Not a JSON array of mapping objects.
    #[error("the mappings message is not a JSON array of guest memory mappings")]
    Json {
        /// serde_json's description, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// An empty array.
    #[error("the mappings message lists no guest memory region")]
    Empty,
    /// Too many regions.
    #[error("the mappings message lists {count} regions; at most {MAX_REGIONS} are accepted")]
    TooMany {
        /// How many.
        count: usize,
    },
    /// Neither `page_size` nor `page_size_kib`.
    #[error("region {index}: neither page_size nor page_size_kib is given")]
    NoPageSize {
        /// The region.
        index: usize,
    },
    /// `page_size` and `page_size_kib` differ.
    #[error("region {index}: page_size {page_size} and page_size_kib {page_size_kib} disagree (both are in bytes)")]
    PageSizeMismatch {
        /// The region.
        index: usize,
        /// `page_size`.
        page_size: u64,
        /// `page_size_kib`.
        page_size_kib: u64,
    },
    /// A page size other than 4 KiB, 2 MiB or 1 GiB.
    #[error("region {index}: page size {page_size} is not 4096, 2097152 or 1073741824 bytes")]
    BadPageSize {
        /// The region.
        index: usize,
        /// What was given.
        page_size: u64,
    },
    /// A zero size, or an address, size or offset that is not page-aligned, or a
    /// region that wraps around the address space.
    #[error(
        "region {index}: {what} {value:#x} is not a non-zero multiple of its {page_size}-byte page"
    )]
    Misaligned {
        /// The region.
        index: usize,
        /// `base_host_virt_addr`, `size` or `offset`.
        what: &'static str,
        /// The value.
        value: u64,
        /// The region's page size.
        page_size: u64,
    },
    /// A region ends beyond the address space or the file offsets overflow.
    #[error("region {index}: {what} overflows 64 bits")]
    Overflow {
        /// The region.
        index: usize,
        /// What overflows.
        what: &'static str,
    },
    /// Two regions overlap in Firecracker's address space.
    #[error("regions {first} and {second} overlap at {addr:#x}")]
    Overlap {
        /// The earlier region.
        first: usize,
        /// The later region.
        second: usize,
        /// Where.
        addr: u64,
    },
    /// A region extends past the end of the memory file.
    #[error("region {index} needs file bytes {offset:#x}..{end:#x}, but the memory file has only {file_len:#x} bytes")]
    BeyondFile {
        /// The region.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Its end in the file.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
}

/// Parses and checks the mappings message.
pub fn parse(json: &[u8]) -> Result<Vec<GuestRegionMapping>, MappingsError> {
    let wire: Vec<WireMapping> =
        serde_json::from_slice(json).map_err(|source| MappingsError::Json { source })?;
    if wire.is_empty() {
        return Err(MappingsError::Empty);
    }
    if wire.len() > MAX_REGIONS {
        return Err(MappingsError::TooMany { count: wire.len() });
    }
    let mut out = Vec::with_capacity(wire.len());
    for (index, w) in wire.iter().enumerate() {
        let page_size = match (w.page_size, w.page_size_kib) {
            (None, None) => return Err(MappingsError::NoPageSize { index }),
            (Some(a), Some(b)) if a != b => {
                return Err(MappingsError::PageSizeMismatch {
                    index,
                    page_size: a,
                    page_size_kib: b,
                })
            }
            (Some(a), _) | (None, Some(a)) => a,
        };
        if !PAGE_SIZES.contains(&page_size) {
            return Err(MappingsError::BadPageSize { index, page_size });
        }
        let aligned = |what: &'static str, value: u64, nonzero: bool| {
            if value.is_multiple_of(page_size) && (!nonzero || value > 0) {
                Ok(())
            } else {
                Err(MappingsError::Misaligned {
                    index,
                    what,
                    value,
                    page_size,
                })
            }
        };
        aligned("base_host_virt_addr", w.base_host_virt_addr, true)?;
        aligned("size", w.size, true)?;
        // The file is read with 4 KiB granularity whatever the guest's page size.
        if !w.offset.is_multiple_of(PAGE_SIZES[0]) {
            return Err(MappingsError::Misaligned {
                index,
                what: "offset",
                value: w.offset,
                page_size: PAGE_SIZES[0],
            });
        }
        if w.base_host_virt_addr.checked_add(w.size).is_none() {
            return Err(MappingsError::Overflow {
                index,
                what: "base_host_virt_addr + size",
            });
        }
        if w.offset.checked_add(w.size).is_none() {
            return Err(MappingsError::Overflow {
                index,
                what: "offset + size",
            });
        }
        out.push(GuestRegionMapping {
            base_host_virt_addr: w.base_host_virt_addr,
            size: w.size,
            offset: w.offset,
            page_size,
        });
    }
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| out[i].base_host_virt_addr);
    for pair in order.windows(2) {
        let (a, b) = (out[pair[0]], out[pair[1]]);
        if b.base_host_virt_addr < a.end() {
            return Err(MappingsError::Overlap {
                first: pair[0].min(pair[1]),
                second: pair[0].max(pair[1]),
                addr: b.base_host_virt_addr,
            });
        }
    }
    Ok(out)
}

/// The message as Firecracker writes it: each region with both `page_size` and
/// its deprecated twin `page_size_kib` (in bytes too). For a VMM that hands its
/// memory to an external handler the way Firecracker does.
pub fn to_json(regions: &[GuestRegionMapping]) -> String {
    #[derive(Serialize)]
    struct Out {
        base_host_virt_addr: u64,
        size: u64,
        offset: u64,
        page_size: u64,
        page_size_kib: u64,
    }
    let out: Vec<Out> = regions
        .iter()
        .map(|r| Out {
            base_host_virt_addr: r.base_host_virt_addr,
            size: r.size,
            offset: r.offset,
            page_size: r.page_size,
            page_size_kib: r.page_size,
        })
        .collect();
    // Serialising plain integers cannot fail.
    serde_json::to_string(&out).unwrap_or_default()
}

/// Checks that every region lies inside a memory file of `file_len` bytes, and
/// returns how many bytes of the file the regions use (the furthest end).
pub fn check_against_file(
    regions: &[GuestRegionMapping],
    file_len: u64,
) -> Result<u64, MappingsError> {
    let mut furthest = 0u64;
    for (index, r) in regions.iter().enumerate() {
        // `parse` checked that this cannot overflow.
        let end = r.offset + r.size;
        if end > file_len {
            return Err(MappingsError::BeyondFile {
                index,
                offset: r.offset,
                end,
                file_len,
            });
        }
        furthest = furthest.max(end);
    }
    Ok(furthest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(extra: &str) -> String {
        format!(r#"[{{"base_host_virt_addr":140233318285312,"size":134217728,"offset":0{extra}}}]"#)
    }

    #[test]
    fn firecracker_example_parses() {
        let m = parse(one(r#","page_size":4096,"page_size_kib":4096"#).as_bytes()).unwrap();
        assert_eq!(
            m,
            vec![GuestRegionMapping {
                base_host_virt_addr: 140_233_318_285_312,
                size: 134_217_728,
                offset: 0,
                page_size: 4096
            }]
        );
        assert_eq!(m[0].pages(), 32768);
    }

    #[test]
    fn written_as_firecracker_writes_it_and_read_back() {
        let m = parse(one(r#","page_size":4096"#).as_bytes()).unwrap();
        assert_eq!(
            to_json(&m),
            one(r#","page_size":4096,"page_size_kib":4096"#)
        );
        assert_eq!(parse(to_json(&m).as_bytes()).unwrap(), m);
    }

    #[test]
    fn either_page_size_field_alone() {
        assert!(parse(one(r#","page_size":4096"#).as_bytes()).is_ok());
        assert!(parse(one(r#","page_size_kib":4096"#).as_bytes()).is_ok());
        assert!(matches!(
            parse(one("").as_bytes()),
            Err(MappingsError::NoPageSize { index: 0 })
        ));
    }

    #[test]
    fn disagreeing_page_sizes_are_refused() {
        let e = parse(one(r#","page_size":4096,"page_size_kib":4"#).as_bytes()).unwrap_err();
        assert!(matches!(e, MappingsError::PageSizeMismatch { .. }), "{e}");
        assert!(e.to_string().contains("disagree"));
    }

    #[test]
    fn huge_pages_are_accepted_and_aligned() {
        let two_m =
            r#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size":2097152}]"#;
        assert_eq!(parse(two_m.as_bytes()).unwrap()[0].pages(), 2);
        let bad = r#"[{"base_host_virt_addr":4096,"size":4194304,"offset":0,"page_size":2097152}]"#;
        assert!(matches!(
            parse(bad.as_bytes()),
            Err(MappingsError::Misaligned {
                what: "base_host_virt_addr",
                ..
            })
        ));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "[]",
            "null",
            r#"{"base_host_virt_addr":0}"#,
            r#"[{"base_host_virt_addr":-1,"size":4096,"offset":0,"page_size":4096}]"#,
            r#"[{"base_host_virt_addr":4096,"size":0,"offset":0,"page_size":4096}]"#,
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":1,"page_size":4096}]"#,
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":8192}]"#,
            r#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]"#,
            "\u{0}\u{1}garbage",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let j =
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"later":1}]"#;
        assert!(parse(j.as_bytes()).is_ok());
    }

    #[test]
    fn overlaps_are_refused() {
        let j = r#"[{"base_host_virt_addr":8192,"size":8192,"offset":0,"page_size":4096},
                    {"base_host_virt_addr":4096,"size":8192,"offset":8192,"page_size":4096}]"#;
        assert!(matches!(
            parse(j.as_bytes()),
            Err(MappingsError::Overlap {
                first: 0,
                second: 1,
                addr: 8192
            })
        ));
    }

    #[test]
    fn regions_must_fit_the_file() {
        let j = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},
                    {"base_host_virt_addr":65536,"size":8192,"offset":8192,"page_size":4096}]"#;
        let m = parse(j.as_bytes()).unwrap();
        assert_eq!(check_against_file(&m, 16384).unwrap(), 16384);
        let e = check_against_file(&m, 12288).unwrap_err();
        assert!(
            matches!(e, MappingsError::BeyondFile { index: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("memory file"));
    }
}
