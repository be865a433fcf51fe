//! Page sources: where the contents of a page come from when the guest first touches it.
//!
//! The fault handler asks a source to fill a buffer for one or more pages, holding the memory
//! map's read lock. The image source is this VMM's "userland backend" in the sense of the seed
//! commit: it does file I/O and allocates a buffer in the fault path.

use std::sync::Arc;

use crate::PAGE_SIZE;

use crate::ram_image::{RamImage, RamImageError};

/// What a source put in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The buffer holds the data.
    Data,
    /// The pages are all zeroes (the buffer holds zeroes, or was left untouched).
    Zero,
}

/// A source of page contents.
pub trait PageSource: Send + Sync {
    /// Fills `buf` (a whole number of pages) with the contents of guest RAM at `offset` (in
    /// RAM laid end to end, as a memory image holds it; see [`GuestRam`](crate::GuestRam)).
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<Fill, RamImageError>;
}

/// Every page starts as zeroes.
#[derive(Debug, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn fill(&self, _offset: u64, _buf: &mut [u8]) -> Result<Fill, RamImageError> {
        Ok(Fill::Zero)
    }
}

/// Pages come from a memory image.
#[derive(Debug)]
pub struct RamImageSource {
    image: Arc<RamImage>,
}

impl RamImageSource {
    /// A source reading from `image`.
    pub fn new(image: Arc<RamImage>) -> Self {
        RamImageSource { image }
    }
}

impl PageSource for RamImageSource {
    fn fill(&self, gpa: u64, buf: &mut [u8]) -> Result<Fill, RamImageError> {
        fail::fail_point!("source-read", |_| Err(RamImageError::Io {
            path: self.image.path().into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }));
        debug_assert_eq!(buf.len() as u64 % PAGE_SIZE, 0);
        // One fstat: a hole needs no read, so only this notices an image changed meanwhile.
        self.image.check_unchanged()?;
        if self.image.is_hole(gpa, buf.len() as u64) {
            return Ok(Fill::Zero);
        }
        // File I/O in the fault path: this is the userland backend whose progress a collapse
        // must never block by allocating under the write lock.
        self.image.read_at(buf, gpa)?;
        if buf.iter().all(|&b| b == 0) {
            return Ok(Fill::Zero);
        }
        Ok(Fill::Data)
    }
}
