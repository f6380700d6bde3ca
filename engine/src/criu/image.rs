//! CRIU image files: the few that a lazy-pages daemon reads, decoded
//! strictly.
//!
//! # Format
//! Taken from CRIU 4.2 (`criu/include/magic.h`, `criu/image.c`,
//! `criu/protobuf.c`, `images/*.proto`):
//!
//! ```text
//!  u32 IMG_COMMON_MAGIC   (0x54564319; absent in inventory.img)
//!  u32 image magic        (PAGEMAP_MAGIC, PSTREE_MAGIC, MM_MAGIC, ...)
//!  { u32 size, size bytes of one protobuf message } ...   until end of file
//! ```
//!
//! Integers are native-endian (little-endian on every machine CRIU's lazy
//! pages run on). `pagemap-PID.img` holds one `pagemap_head` (the id N of
//! `pages-N.img`) and then `pagemap_entry` records in address order;
//! `pages-N.img` is raw: the pages of every entry flagged `PE_PRESENT`,
//! back to back, in the order of the entries.
//!
//! The message types are written here by hand with `prost` (field numbers
//! from `images/pagemap.proto`, `pstree.proto`, `mm.proto`, `vma.proto`).
//! Fields this daemon does not use are skipped as unknown fields.
//!
//! # Hazards
//! Images come from another machine and may be damaged: every size is
//! bounded before anything is allocated ([`MAX_PAGEMAP_BYTES`] and friends),
//! proto2 `required` fields are checked (prost itself would default them),
//! addresses must be page-aligned, entries sorted and disjoint, and flags
//! known. A bad file gives an [`ImageError`] naming the file, the byte offset
//! and what is wrong; never a panic.

use std::path::{Path, PathBuf};

/// Heads every image but the inventory (`IMG_COMMON_MAGIC`, "Sarov").
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// Heads service files such as statistics (`IMG_SERVICE_MAGIC`).
pub const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `inventory.img` (`INVENTORY_MAGIC`, "Veliky Novgorod").
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// `pstree.img` (`PSTREE_MAGIC`, "Kyiv").
pub const PSTREE_MAGIC: u32 = 0x5027_3030;
/// `pagemap-PID.img` (`PAGEMAP_MAGIC`, "Vladimir").
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// `mm-PID.img` (`MM_MAGIC`, "Pskov").
pub const MM_MAGIC: u32 = 0x5749_2820;

/// Pagemap flag: the pages are in the parent snapshot (pre-dump).
pub const PE_PARENT: u32 = 1 << 0;
/// Pagemap flag: the pages may be restored lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// Pagemap flag: the pages are in `pages-N.img`.
pub const PE_PRESENT: u32 = 1 << 2;
const PE_KNOWN: u32 = PE_PARENT | PE_LAZY | PE_PRESENT;

/// The page size of every CRIU image this daemon reads (x86-64, aarch64 4K).
pub const PAGE_SIZE: u64 = 4096;

/// Highest user address plus one on any Linux CRIU supports (57-bit
/// virtual addresses); pagemap and VMA ranges must end at or below it.
pub const MAX_USER_ADDR: u64 = 1 << 57;

/// Largest `pagemap-PID.img` accepted (an entry is under 40 bytes and covers
/// at least one page: this is over 6 million entries).
pub const MAX_PAGEMAP_BYTES: u64 = 256 << 20;
/// Largest `pstree.img` accepted.
pub const MAX_PSTREE_BYTES: u64 = 64 << 20;
/// Largest `mm-PID.img` accepted (65530 VMAs take about 4 MiB).
pub const MAX_MM_BYTES: u64 = 64 << 20;
/// Largest `inventory.img` accepted.
pub const MAX_INVENTORY_BYTES: u64 = 1 << 20;

/// Largest single `pagemap_entry` or `pagemap_head` record (at most 36
/// bytes are meaningful; a few unknown fields are tolerated).
pub const MAX_PAGEMAP_RECORD: usize = 256;
/// Largest single `pstree_entry` record (its thread list).
pub const MAX_PSTREE_RECORD: usize = 4 << 20;
/// Largest single `mm_entry` record (its VMA list).
pub const MAX_MM_RECORD: usize = 32 << 20;

/// `pagemap_head` (images/pagemap.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapHeadMsg {
    /// N of `pages-N.img` (`required uint32 pages_id = 1`).
    #[prost(uint32, optional, tag = "1")]
    pub pages_id: Option<u32>,
}

/// `pagemap_entry` (images/pagemap.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapEntryMsg {
    /// First address (`required uint64 vaddr = 1`).
    #[prost(uint64, optional, tag = "1")]
    pub vaddr: Option<u64>,
    /// Pages, as written by old CRIUs (`required uint32 compat_nr_pages = 2`).
    #[prost(uint32, optional, tag = "2")]
    pub compat_nr_pages: Option<u32>,
    /// Old form of `PE_PARENT` (`optional bool in_parent = 3`).
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    /// `PE_*` flags (`optional uint32 flags = 4`).
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    /// Pages (`optional uint64 nr_pages = 5`); wins over `compat_nr_pages`.
    #[prost(uint64, optional, tag = "5")]
    pub nr_pages: Option<u64>,
}

/// `pstree_entry` (images/pstree.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PstreeEntryMsg {
    /// `required uint32 pid = 1`.
    #[prost(uint32, optional, tag = "1")]
    pub pid: Option<u32>,
    /// `required uint32 ppid = 2`.
    #[prost(uint32, optional, tag = "2")]
    pub ppid: Option<u32>,
    /// `required uint32 pgid = 3`.
    #[prost(uint32, optional, tag = "3")]
    pub pgid: Option<u32>,
    /// `required uint32 sid = 4`.
    #[prost(uint32, optional, tag = "4")]
    pub sid: Option<u32>,
    /// `repeated uint32 threads = 5`.
    #[prost(uint32, repeated, packed = "false", tag = "5")]
    pub threads: Vec<u32>,
}

/// `mm_entry` (images/mm.proto): only its VMAs are read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MmEntryMsg {
    /// `repeated vma_entry vmas = 14`.
    #[prost(message, repeated, tag = "14")]
    pub vmas: Vec<VmaEntryMsg>,
}

/// `vma_entry` (images/vma.proto): the fields a lazy-pages daemon needs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct VmaEntryMsg {
    /// `required uint64 start = 1`.
    #[prost(uint64, optional, tag = "1")]
    pub start: Option<u64>,
    /// `required uint64 end = 2`.
    #[prost(uint64, optional, tag = "2")]
    pub end: Option<u64>,
    /// `required uint32 prot = 5`.
    #[prost(uint32, optional, tag = "5")]
    pub prot: Option<u32>,
    /// `required uint32 flags = 6` (`MAP_*`).
    #[prost(uint32, optional, tag = "6")]
    pub flags: Option<u32>,
    /// `required uint32 status = 7` (`VMA_AREA_*`).
    #[prost(uint32, optional, tag = "7")]
    pub status: Option<u32>,
}

/// What is wrong with one record of an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    /// A proto2 `required` field is absent.
    #[error("{message} lacks its required field {field}")]
    Missing {
        /// The message type.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
    /// An address that is not a multiple of the page size.
    #[error("address {addr:#x} is not page-aligned")]
    Unaligned {
        /// The address.
        addr: u64,
    },
    /// An entry of zero pages.
    #[error("entry at {vaddr:#x} has no pages")]
    Empty {
        /// Its address.
        vaddr: u64,
    },
    /// A range past the end of the user address space.
    #[error("range {start:#x} + {pages} pages runs past the user address space")]
    OutOfRange {
        /// Its start.
        start: u64,
        /// Its length in pages.
        pages: u64,
    },
    /// Entries that are not in address order or overlap.
    #[error("entry at {vaddr:#x} starts before the previous one ends ({prev_end:#x}): entries must be sorted and disjoint")]
    Unsorted {
        /// Its address.
        vaddr: u64,
        /// End of the previous entry.
        prev_end: u64,
    },
    /// Flag bits this daemon does not know.
    #[error("unknown pagemap flags {flags:#x}")]
    Flags {
        /// The flags.
        flags: u32,
    },
    /// A VMA whose end is not after its start.
    #[error("VMA {start:#x}-{end:#x} is empty or reversed")]
    BadVma {
        /// Its start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// The image has no records where at least one is required.
    #[error("the image holds no {message}")]
    NoRecord {
        /// What was expected.
        message: &'static str,
    },
    /// More records than a reader allows.
    #[error("more than {max} records")]
    TooMany {
        /// The limit.
        max: usize,
    },
}

/// Why an image cannot be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file cannot be opened or read.
    #[error("{path}: cannot read it")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any image of its kind should be.
    #[error("{path}: {size} bytes, more than the {max} a {kind} image may have")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
        /// The kind of image.
        kind: &'static str,
    },
    /// The magic numbers at its start are not those of its kind.
    #[error("{path}: not a CRIU {kind} image (magic {found:#010x}, expected {expected:#010x})")]
    Magic {
        /// The file.
        path: PathBuf,
        /// The kind of image.
        kind: &'static str,
        /// What is there.
        found: u32,
        /// What should be.
        expected: u32,
    },
    /// The file ends inside a size field or a record.
    #[error("{path}: truncated at byte {offset} (a {want}-byte {what} does not fit in the {left} bytes left)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the cut record starts.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// Bytes it needs.
        want: u64,
        /// Bytes left in the file.
        left: u64,
    },
    /// A record size larger than any record of its kind.
    #[error(
        "{path}: the record at byte {offset} claims {size} bytes; a {message} is at most {max}"
    )]
    RecordTooLarge {
        /// The file.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// The size it claims.
        size: u64,
        /// The limit.
        max: usize,
        /// The message type.
        message: &'static str,
    },
    /// The record is not valid protobuf for its message type.
    #[error("{path}: the record at byte {offset} is not a valid {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// The message type.
        message: &'static str,
        /// What prost found.
        #[source]
        source: prost::DecodeError,
    },
    /// The record decodes but its contents are invalid.
    #[error("{path}: the record at byte {offset}: {what}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// What is wrong.
        what: BadRecord,
    },
}

/// The kind of an image: its magic, file-size limit and record-size limit.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// For messages: "pagemap", "pstree", ...
    pub name: &'static str,
    /// Its magic (after `IMG_COMMON_MAGIC`).
    pub magic: u32,
    /// Whether `IMG_COMMON_MAGIC` comes first (all but the inventory).
    pub common: bool,
    /// Largest file.
    pub max_bytes: u64,
    /// Largest record.
    pub max_record: usize,
}

/// `pagemap-PID.img`.
pub const PAGEMAP: Kind = Kind {
    name: "pagemap",
    magic: PAGEMAP_MAGIC,
    common: true,
    max_bytes: MAX_PAGEMAP_BYTES,
    max_record: MAX_PAGEMAP_RECORD,
};
/// `pstree.img`.
pub const PSTREE: Kind = Kind {
    name: "pstree",
    magic: PSTREE_MAGIC,
    common: true,
    max_bytes: MAX_PSTREE_BYTES,
    max_record: MAX_PSTREE_RECORD,
};
/// `mm-PID.img`.
pub const MM: Kind = Kind {
    name: "mm",
    magic: MM_MAGIC,
    common: true,
    max_bytes: MAX_MM_BYTES,
    max_record: MAX_MM_RECORD,
};
/// `inventory.img`.
pub const INVENTORY: Kind = Kind {
    name: "inventory",
    magic: INVENTORY_MAGIC,
    common: false,
    max_bytes: MAX_INVENTORY_BYTES,
    max_record: 1 << 20,
};

/// One record of an image: its byte offset and its protobuf bytes.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Offset of its size field in the file.
    pub offset: u64,
    /// The message bytes.
    pub bytes: &'a [u8],
}

/// Reads a whole image file, refusing one larger than its kind allows
/// before reading it.
pub fn read_file(path: &Path, kind: &Kind) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let read_err = |source| ImageError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > kind.max_bytes {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            size,
            max: kind.max_bytes,
            kind: kind.name,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // A file that grew since the size check is cut at the limit plus one
    // byte, which the check below then refuses.
    file.take(kind.max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > kind.max_bytes {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            max: kind.max_bytes,
            kind: kind.name,
        });
    }
    Ok(bytes)
}

/// Checks the magic numbers of `bytes` and splits the rest into records.
pub fn records<'a>(
    path: &Path,
    kind: &Kind,
    message: &'static str,
    bytes: &'a [u8],
) -> Result<Vec<Record<'a>>, ImageError> {
    let mut at = 0usize;
    let word = |at: usize, what: &'static str| -> Result<u32, ImageError> {
        let b = bytes.get(at..at + 4).ok_or_else(|| ImageError::Truncated {
            path: path.to_owned(),
            offset: at as u64,
            what,
            want: 4,
            left: bytes.len().saturating_sub(at) as u64,
        })?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if kind.common {
        let m = word(0, "magic")?;
        if m != IMG_COMMON_MAGIC {
            return Err(ImageError::Magic {
                path: path.to_owned(),
                kind: kind.name,
                found: m,
                expected: IMG_COMMON_MAGIC,
            });
        }
        at = 4;
    }
    let m = word(at, "magic")?;
    if m != kind.magic {
        return Err(ImageError::Magic {
            path: path.to_owned(),
            kind: kind.name,
            found: m,
            expected: kind.magic,
        });
    }
    at += 4;
    let mut out = Vec::new();
    while at < bytes.len() {
        let size = word(at, "record size")?;
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        if len > kind.max_record {
            return Err(ImageError::RecordTooLarge {
                path: path.to_owned(),
                offset: at as u64,
                size: u64::from(size),
                max: kind.max_record,
                message,
            });
        }
        let body = bytes
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| ImageError::Truncated {
                path: path.to_owned(),
                offset: at as u64,
                what: message,
                want: u64::from(size),
                left: bytes.len().saturating_sub(at + 4) as u64,
            })?;
        out.push(Record {
            offset: at as u64,
            bytes: body,
        });
        at += 4 + len;
    }
    Ok(out)
}

fn decode<M: prost::Message + Default>(
    path: &Path,
    rec: &Record<'_>,
    message: &'static str,
) -> Result<M, ImageError> {
    M::decode(rec.bytes).map_err(|source| ImageError::Decode {
        path: path.to_owned(),
        offset: rec.offset,
        message,
        source,
    })
}

fn bad(path: &Path, offset: u64, what: BadRecord) -> ImageError {
    ImageError::Bad {
        path: path.to_owned(),
        offset,
        what,
    }
}

/// One checked pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// First address (page-aligned).
    pub vaddr: u64,
    /// Pages (at least one).
    pub pages: u64,
    /// `PE_*` flags, with the old `in_parent` form folded in.
    pub flags: u32,
    /// Byte offset of its first page in `pages-N.img`, if `PE_PRESENT`.
    pub pages_offset: Option<u64>,
    /// Offset of the record in the pagemap file, for messages.
    pub record: u64,
}

impl PagemapEntry {
    /// One past its last byte.
    pub fn end(&self) -> u64 {
        self.vaddr + self.pages * PAGE_SIZE
    }
    /// Restored lazily (`PE_LAZY`).
    pub fn is_lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }
    /// Its pages are in the parent snapshot (`PE_PARENT`).
    pub fn in_parent(&self) -> bool {
        self.flags & PE_PARENT != 0
    }
    /// Its pages are in `pages-N.img` (`PE_PRESENT`).
    pub fn in_pages_image(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }
}

/// A task's checked pagemap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// N of `pages-N.img`.
    pub pages_id: u32,
    /// Entries in address order (as in the file).
    pub entries: Vec<PagemapEntry>,
    /// Bytes of `pages-N.img` the entries account for.
    pub pages_bytes: u64,
}

/// Decodes and checks a pagemap image held in memory; `path` names it in
/// errors. This is the fuzzed entry point.
pub fn parse_pagemap(path: &Path, bytes: &[u8]) -> Result<Pagemap, ImageError> {
    let recs = records(path, &PAGEMAP, "pagemap_entry", bytes)?;
    let (head, rest) = recs.split_first().ok_or_else(|| {
        bad(
            path,
            bytes.len() as u64,
            BadRecord::NoRecord {
                message: "pagemap_head",
            },
        )
    })?;
    let h: PagemapHeadMsg = decode(path, head, "pagemap_head")?;
    let pages_id = h.pages_id.ok_or_else(|| {
        bad(
            path,
            head.offset,
            BadRecord::Missing {
                message: "pagemap_head",
                field: "pages_id",
            },
        )
    })?;
    let mut entries = Vec::with_capacity(rest.len());
    let mut prev_end = 0u64;
    let mut pages_bytes = 0u64;
    for rec in rest {
        let e: PagemapEntryMsg = decode(path, rec, "pagemap_entry")?;
        let here = |what| bad(path, rec.offset, what);
        let vaddr = e.vaddr.ok_or_else(|| {
            here(BadRecord::Missing {
                message: "pagemap_entry",
                field: "vaddr",
            })
        })?;
        // CRIU writes `compat_nr_pages` (required) and `nr_pages`; the latter
        // wins (criu/pagemap.c: init_compat_pagemap_entry).
        let pages = match (e.nr_pages, e.compat_nr_pages) {
            (Some(n), _) => n,
            (None, Some(n)) => u64::from(n),
            (None, None) => {
                return Err(here(BadRecord::Missing {
                    message: "pagemap_entry",
                    field: "nr_pages",
                }))
            }
        };
        let mut flags = match e.flags {
            Some(f) => f,
            None if e.in_parent == Some(true) => 0,
            None => PE_PRESENT,
        };
        if e.in_parent == Some(true) {
            flags |= PE_PARENT;
        }
        if flags & !PE_KNOWN != 0 {
            return Err(here(BadRecord::Flags { flags }));
        }
        if vaddr % PAGE_SIZE != 0 {
            return Err(here(BadRecord::Unaligned { addr: vaddr }));
        }
        if pages == 0 {
            return Err(here(BadRecord::Empty { vaddr }));
        }
        let end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|b| vaddr.checked_add(b))
            .filter(|&e| e <= MAX_USER_ADDR)
            .ok_or_else(|| {
                here(BadRecord::OutOfRange {
                    start: vaddr,
                    pages,
                })
            })?;
        if vaddr < prev_end {
            return Err(here(BadRecord::Unsorted { vaddr, prev_end }));
        }
        prev_end = end;
        let pages_offset = if flags & PE_PRESENT != 0 {
            let at = pages_bytes;
            // Cannot overflow: the sum of disjoint ranges below 2^57.
            pages_bytes += pages * PAGE_SIZE;
            Some(at)
        } else {
            None
        };
        entries.push(PagemapEntry {
            vaddr,
            pages,
            flags,
            pages_offset,
            record: rec.offset,
        });
    }
    Ok(Pagemap {
        pages_id,
        entries,
        pages_bytes,
    })
}

/// `DIR/pagemap-PID.img`.
pub fn pagemap_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("pagemap-{pid}.img"))
}

/// `DIR/pages-N.img`.
pub fn pages_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("pages-{id}.img"))
}

/// Reads and checks `DIR/pagemap-PID.img`.
pub fn read_pagemap(dir: &Path, pid: u32) -> Result<Pagemap, ImageError> {
    let path = pagemap_path(dir, pid);
    let bytes = read_file(&path, &PAGEMAP)?;
    parse_pagemap(&path, &bytes)
}

/// One process of the checkpointed tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PstreeEntry {
    /// Its pid (in its own pid namespace, as the restore sends it).
    pub pid: u32,
    /// Its parent's pid (0 for the root).
    pub ppid: u32,
    /// Its threads.
    pub threads: Vec<u32>,
}

/// Most processes a `pstree.img` may list.
pub const MAX_TASKS: usize = 1 << 20;

/// Decodes and checks `pstree.img` held in memory.
pub fn parse_pstree(path: &Path, bytes: &[u8]) -> Result<Vec<PstreeEntry>, ImageError> {
    let recs = records(path, &PSTREE, "pstree_entry", bytes)?;
    if recs.len() > MAX_TASKS {
        return Err(bad(path, 0, BadRecord::TooMany { max: MAX_TASKS }));
    }
    let mut out = Vec::with_capacity(recs.len());
    for rec in &recs {
        let e: PstreeEntryMsg = decode(path, rec, "pstree_entry")?;
        let missing = |field| {
            bad(
                path,
                rec.offset,
                BadRecord::Missing {
                    message: "pstree_entry",
                    field,
                },
            )
        };
        let pid = e.pid.ok_or_else(|| missing("pid"))?;
        let ppid = e.ppid.ok_or_else(|| missing("ppid"))?;
        e.pgid.ok_or_else(|| missing("pgid"))?;
        e.sid.ok_or_else(|| missing("sid"))?;
        out.push(PstreeEntry {
            pid,
            ppid,
            threads: e.threads,
        });
    }
    if out.is_empty() {
        return Err(bad(
            path,
            bytes.len() as u64,
            BadRecord::NoRecord {
                message: "pstree_entry",
            },
        ));
    }
    Ok(out)
}

/// Reads and checks `DIR/pstree.img`.
pub fn read_pstree(dir: &Path) -> Result<Vec<PstreeEntry>, ImageError> {
    let path = dir.join("pstree.img");
    let bytes = read_file(&path, &PSTREE)?;
    parse_pstree(&path, &bytes)
}

/// One VMA of a task, as dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// `MAP_*` flags.
    pub flags: u32,
    /// `VMA_AREA_*` status bits.
    pub status: u32,
}

/// Decodes and checks `mm-PID.img` held in memory: its VMAs, sorted and
/// disjoint.
pub fn parse_mm(path: &Path, bytes: &[u8]) -> Result<Vec<Vma>, ImageError> {
    let recs = records(path, &MM, "mm_entry", bytes)?;
    let rec = recs.first().ok_or_else(|| {
        bad(
            path,
            bytes.len() as u64,
            BadRecord::NoRecord {
                message: "mm_entry",
            },
        )
    })?;
    let mm: MmEntryMsg = decode(path, rec, "mm_entry")?;
    let mut out = Vec::with_capacity(mm.vmas.len());
    let mut prev_end = 0u64;
    for v in &mm.vmas {
        let missing = |field| {
            bad(
                path,
                rec.offset,
                BadRecord::Missing {
                    message: "vma_entry",
                    field,
                },
            )
        };
        let start = v.start.ok_or_else(|| missing("start"))?;
        let end = v.end.ok_or_else(|| missing("end"))?;
        let flags = v.flags.ok_or_else(|| missing("flags"))?;
        let status = v.status.ok_or_else(|| missing("status"))?;
        if start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
            let addr = if start % PAGE_SIZE != 0 { start } else { end };
            return Err(bad(path, rec.offset, BadRecord::Unaligned { addr }));
        }
        if end <= start {
            return Err(bad(path, rec.offset, BadRecord::BadVma { start, end }));
        }
        if start < prev_end {
            return Err(bad(
                path,
                rec.offset,
                BadRecord::Unsorted {
                    vaddr: start,
                    prev_end,
                },
            ));
        }
        prev_end = end;
        out.push(Vma {
            start,
            end,
            flags,
            status,
        });
    }
    Ok(out)
}

/// Reads and checks `DIR/mm-PID.img`.
pub fn read_mm(dir: &Path, pid: u32) -> Result<Vec<Vma>, ImageError> {
    let path = dir.join(format!("mm-{pid}.img"));
    let bytes = read_file(&path, &MM)?;
    parse_mm(&path, &bytes)
}

/// Builds an image in memory: magics, then each message with its size.
/// For tests and tools that write images (CRIU's writer is the reference).
pub fn encode_image<M: prost::Message>(kind: &Kind, msgs: &[&M]) -> Vec<u8> {
    let mut out = Vec::new();
    if kind.common {
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    }
    out.extend_from_slice(&kind.magic.to_le_bytes());
    for m in msgs {
        let body = m.encode_to_vec();
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}

/// Builds a pagemap image: the head, then the entries.
pub fn encode_pagemap(pages_id: u32, entries: &[PagemapEntryMsg]) -> Vec<u8> {
    let mut out = encode_image(
        &PAGEMAP,
        &[&PagemapHeadMsg {
            pages_id: Some(pages_id),
        }],
    );
    for e in entries {
        let body = prost::Message::encode_to_vec(e);
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vaddr: u64, pages: u64, flags: u32) -> PagemapEntryMsg {
        PagemapEntryMsg {
            vaddr: Some(vaddr),
            compat_nr_pages: Some(0),
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(pages),
        }
    }

    fn p() -> &'static Path {
        Path::new("pagemap-1.img")
    }

    #[test]
    fn a_pagemap_as_criu_4_2_writes_it() {
        // The first bytes of a real pagemap-1.img written by `criu dump`.
        let real: &[u8] = &[
            0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, 0x02, 0x00, 0x00, 0x00, 0x08, 0x01,
            0x0e, 0x00, 0x00, 0x00, 0x08, 0x80, 0xc0, 0xf5, 0xce, 0xe8, 0xb4, 0x15, 0x10, 0x00,
            0x20, 0x04, 0x28, 0x01, 0x0e, 0x00, 0x00, 0x00, 0x08, 0x80, 0x80, 0xf6, 0xce, 0xe8,
            0xb4, 0x15, 0x10, 0x00, 0x20, 0x04, 0x28, 0x02,
        ];
        let pm = parse_pagemap(p(), real).unwrap();
        assert_eq!(pm.pages_id, 1);
        assert_eq!(pm.entries.len(), 2);
        assert_eq!(pm.entries[0].vaddr, 0x55a6_89dd_6000);
        assert_eq!(pm.entries[0].pages, 1);
        assert_eq!(pm.entries[0].flags, PE_PRESENT);
        assert_eq!(pm.entries[1].pages, 2);
        assert_eq!(pm.entries[1].pages_offset, Some(4096));
        assert_eq!(pm.pages_bytes, 3 * 4096);
    }

    #[test]
    fn offsets_count_only_entries_in_the_pages_image() {
        let img = encode_pagemap(
            7,
            &[
                entry(0x1000, 2, PE_PRESENT),
                entry(0x10000, 3, PE_LAZY),
                entry(0x20000, 4, PE_LAZY | PE_PRESENT),
                PagemapEntryMsg {
                    vaddr: Some(0x30000),
                    compat_nr_pages: Some(5),
                    in_parent: Some(true),
                    flags: None,
                    nr_pages: None,
                },
            ],
        );
        let pm = parse_pagemap(p(), &img).unwrap();
        assert_eq!(pm.pages_id, 7);
        let offs: Vec<_> = pm.entries.iter().map(|e| e.pages_offset).collect();
        assert_eq!(offs, vec![Some(0), None, Some(2 * 4096), None]);
        assert!(pm.entries[3].in_parent());
        assert_eq!(pm.entries[3].pages, 5);
        assert_eq!(pm.pages_bytes, 6 * 4096);
    }

    #[test]
    fn damaged_pagemaps_are_refused_with_the_reason() {
        let ok = encode_pagemap(1, &[entry(0x1000, 1, PE_LAZY)]);
        // Wrong magic.
        let mut m = ok.clone();
        m[4] ^= 1;
        assert!(matches!(
            parse_pagemap(p(), &m),
            Err(ImageError::Magic { .. })
        ));
        // Cut inside a record.
        let e = parse_pagemap(p(), &ok[..ok.len() - 1]).unwrap_err();
        assert!(matches!(e, ImageError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("pagemap-1.img"), "{e}");
        // A huge size field is refused before anything is allocated.
        let mut m = ok[..8].to_vec();
        m.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_pagemap(p(), &m),
            Err(ImageError::RecordTooLarge { .. })
        ));
        // No head.
        let e = parse_pagemap(p(), &ok[..8]).unwrap_err();
        assert!(matches!(
            e,
            ImageError::Bad {
                what: BadRecord::NoRecord { .. },
                ..
            }
        ));
        // Garbage protobuf.
        let mut m = ok[..8].to_vec();
        m.extend_from_slice(&2u32.to_le_bytes());
        m.extend_from_slice(&[0xff, 0xff]);
        assert!(matches!(
            parse_pagemap(p(), &m),
            Err(ImageError::Decode { .. })
        ));
        type Expect = fn(&BadRecord) -> bool;
        let cases: Vec<(PagemapEntryMsg, Expect)> = vec![
            (entry(0x1001, 1, PE_LAZY), |w| {
                matches!(w, BadRecord::Unaligned { .. })
            }),
            (entry(0x1000, 0, PE_LAZY), |w| {
                matches!(w, BadRecord::Empty { .. })
            }),
            (entry(0x1000, 1, 0x80), |w| {
                matches!(w, BadRecord::Flags { .. })
            }),
            (entry(MAX_USER_ADDR - 4096, 2, PE_LAZY), |w| {
                matches!(w, BadRecord::OutOfRange { .. })
            }),
            (entry(0x1000, u64::MAX, PE_LAZY), |w| {
                matches!(w, BadRecord::OutOfRange { .. })
            }),
            (
                PagemapEntryMsg {
                    vaddr: None,
                    ..entry(0, 1, 0)
                },
                |w| matches!(w, BadRecord::Missing { field: "vaddr", .. }),
            ),
            (
                PagemapEntryMsg {
                    nr_pages: None,
                    compat_nr_pages: None,
                    ..entry(0x1000, 1, 0)
                },
                |w| {
                    matches!(
                        w,
                        BadRecord::Missing {
                            field: "nr_pages",
                            ..
                        }
                    )
                },
            ),
        ];
        for (e, want) in cases {
            let img = encode_pagemap(1, std::slice::from_ref(&e));
            match parse_pagemap(p(), &img) {
                Err(ImageError::Bad { what, .. }) => assert!(want(&what), "{e:?}: {what}"),
                other => panic!("{e:?}: {other:?}"),
            }
        }
        // Overlapping entries.
        let img = encode_pagemap(1, &[entry(0x1000, 4, PE_LAZY), entry(0x3000, 1, PE_LAZY)]);
        let e = parse_pagemap(p(), &img).unwrap_err();
        assert!(e.to_string().contains("sorted and disjoint"), "{e}");
    }

    #[test]
    fn pstree_and_mm_round_trip() {
        let tree = encode_image(
            &PSTREE,
            &[
                &PstreeEntryMsg {
                    pid: Some(1),
                    ppid: Some(0),
                    pgid: Some(1),
                    sid: Some(1),
                    threads: vec![1, 5],
                },
                &PstreeEntryMsg {
                    pid: Some(2),
                    ppid: Some(1),
                    pgid: Some(1),
                    sid: Some(1),
                    threads: vec![2],
                },
            ],
        );
        let t = parse_pstree(Path::new("pstree.img"), &tree).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].threads, vec![1, 5]);
        assert_eq!(t[1].ppid, 1);
        let vma = |start, end| VmaEntryMsg {
            start: Some(start),
            end: Some(end),
            prot: Some(3),
            flags: Some(0x22),
            status: Some(1),
        };
        let mm = encode_image(
            &MM,
            &[&MmEntryMsg {
                vmas: vec![vma(0x1000, 0x3000), vma(0x3000, 0x8000)],
            }],
        );
        let v = parse_mm(Path::new("mm-1.img"), &mm).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].end, 0x8000);
        let mm = encode_image(
            &MM,
            &[&MmEntryMsg {
                vmas: vec![vma(0x3000, 0x3000)],
            }],
        );
        assert!(parse_mm(Path::new("mm-1.img"), &mm).is_err());
    }
}
