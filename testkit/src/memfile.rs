//! Snapshot memory files with known contents, in a temporary directory that is
//! removed when the test ends.

// Test harness: page counts of test files fit in u64 and usize alike.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{fill_pseudo_random, mix, PAGE};

/// A temporary directory for one test, removed on drop.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl TestDir {
    /// `$TMPDIR/rf-<pid>-<name>`, empty.
    pub fn new(name: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("rf-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TestDir(p)
    }

    /// A path inside the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Page `page` of the memory file made from `seed`: one page in eight is all
/// zeros (a handler serves it with `UFFDIO_ZEROPAGE`), the others pseudo-random.
pub fn file_page(seed: u64, page: u64, out: &mut [u8]) {
    let h = mix(seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    if h.is_multiple_of(8) {
        out.fill(0);
    } else {
        fill_pseudo_random(h, out);
    }
}

/// Writes a memory file of `len` bytes (a multiple of 4 KiB) whose pages are
/// [`file_page`]`(seed, ..)`, and opens it for reading. The all-zero pages
/// are left as holes, as in a sparse snapshot file (a handler can serve them
/// without reading them).
pub fn write_memory_file(path: &Path, seed: u64, len: usize) -> File {
    let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(len as u64)
        .unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
    let mut page = vec![0u8; PAGE];
    for p in 0..(len / PAGE) as u64 {
        file_page(seed, p, &mut page);
        if page.iter().any(|&b| b != 0) {
            f.write_all_at(&page, p * PAGE as u64)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }
    drop(f);
    File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// The bytes a region sees: page `page` of region `region`, where regions of
/// `sizes` lie one after the other in the file (as Firecracker writes them).
pub fn region_page(seed: u64, sizes: &[usize], region: usize, page: u64, out: &mut [u8]) {
    let first: usize = sizes[..region].iter().sum::<usize>() / PAGE;
    file_page(seed, first as u64 + page, out);
}
