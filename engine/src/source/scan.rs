//! Which pages the source ever populated, read once at the start of a session from
//! the kernel's page map. Pages never populated cost a header and no payload.

use crate::error::EngineError;
use crate::sys::guest::GuestArea;
use crate::sys::pagemap::populated_pages;

/// One bit per page: set when the page is present or swapped out.
#[derive(Debug, Clone)]
pub struct PopulatedMap {
    words: Vec<u64>,
    pages: u64,
}

impl PopulatedMap {
    /// Reads the page map of `area`.
    pub fn scan(area: GuestArea, page_size: u64) -> Result<PopulatedMap, EngineError> {
        let ps = usize::try_from(page_size)
            .map_err(|_| EngineError::Config("page size does not fit".into()))?;
        let words = populated_pages(area.base(), area.len(), ps)?;
        Ok(PopulatedMap {
            words,
            pages: (area.len() / ps) as u64,
        })
    }

    /// Every page populated (used when the page map cannot be read).
    pub fn all(pages: u64) -> PopulatedMap {
        let n = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        PopulatedMap {
            words: vec![u64::MAX; n],
            pages,
        }
    }

    /// True when `page` was ever populated.
    pub fn is_populated(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let w = usize::try_from(page / 64).unwrap_or(usize::MAX);
        self.words
            .get(w)
            .is_some_and(|x| x & (1u64 << (page % 64)) != 0)
    }

    /// Number of populated pages.
    pub fn count(&self) -> u64 {
        (0..self.pages).filter(|&p| self.is_populated(p)).count() as u64
    }
}
