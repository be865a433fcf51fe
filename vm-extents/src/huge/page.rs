//! One huge page: a zeroed, populated 2 MiB host page (hugetlb or THP) at its own 2 MiB-aligned
//! address, how to get one now, and the move that makes it part of another mapping. A THP is
//! *verified* to be mapped huge (`PAGEMAP_SCAN`), since the kernel may silently fall back to
//! 4 KiB pages; such a page is never handed out.

use std::io;
use std::ptr::NonNull;

use crate::{EXTENT_SIZE, HostAddr};

use crate::host_view;

/// What kind of host page a [`HugePage`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PageKind {
    /// From the hugetlb pool.
    Hugetlb,
    /// A transparent huge page.
    Thp,
}

/// Why no huge page could be had.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The kernel had no page to give.
    #[error("no {kind:?} huge page available")]
    Exhausted {
        /// The kind asked for.
        kind: PageKind,
        /// The mmap or madvise error.
        #[source]
        source: io::Error,
    },
    /// THP gave 4 KiB pages instead of a huge one.
    #[error("the kernel backed a THP allocation with 4 KiB pages (fragmented memory?)")]
    NotHuge,
    /// An injected allocator gave up (tests).
    #[error("allocation gave up: {0}")]
    GaveUp(String),
}

/// One zeroed, populated 2 MiB host page, mapped at its own 2 MiB-aligned address. Unmapped
/// on drop unless [`HugePage::move_to`] moved it into guest RAM.
#[derive(Debug)]
pub struct HugePage {
    addr: NonNull<u8>,
    kind: PageKind,
    /// Which page this is, for the tests' account of pages alive ([`live`]).
    #[cfg(test)]
    id: u64,
}

/// The tests' account of the huge pages alive: one id per page ever made (addresses are
/// reused as soon as a page is unmapped, ids never are), gone once the page is unmapped or
/// moved into guest RAM.
#[cfg(test)]
pub(crate) mod live {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    static NEXT: AtomicU64 = AtomicU64::new(0);
    static LIVE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

    pub(super) fn born() -> u64 {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        LIVE.lock().unwrap().insert(id);
        id
    }

    pub(super) fn gone(id: u64) {
        LIVE.lock().unwrap().remove(&id);
    }

    /// Whether page `id` is still alive (mapped and owned by a `HugePage`).
    pub(crate) fn is_alive(id: u64) -> bool {
        LIVE.lock().unwrap().contains(&id)
    }
}

// SAFETY: the page is plain memory owned by this value.
unsafe impl Send for HugePage {}

impl HugePage {
    fn new(addr: NonNull<u8>, kind: PageKind) -> Self {
        HugePage {
            addr,
            kind,
            #[cfg(test)]
            id: live::born(),
        }
    }

    /// Which page this is (tests only).
    #[cfg(test)]
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The page's host address.
    pub fn addr(&self) -> HostAddr {
        HostAddr::of(self.addr.as_ptr())
    }

    /// The page as a mutable byte slice, for copying guest data in before it is mapped.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: we own the 2 MiB mapping and hand out one exclusive borrow of it.
        unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), EXTENT_SIZE as usize) }
    }

    /// Its kind.
    pub fn kind(&self) -> PageKind {
        self.kind
    }

    /// Moves the page over `dst` with `mremap`, replacing whatever was mapped there; from then
    /// on the mapping at `dst` owns it (and unmaps it with the rest). On failure the page is
    /// handed back, still mapped where it was, with whether `dst` is still mapped: the kernel
    /// unmaps the destination before it moves, and a move that fails after that (`ENOMEM`
    /// near `vm.max_map_count`) leaves a hole where the caller's memory was.
    ///
    /// # Safety
    /// `dst` must be 2 MiB aligned and start 2 MiB of a mapping the caller owns, whose old
    /// pages nothing relies on any more (they are unmapped). For guest RAM that means the
    /// extent is held exclusively, so that no other thread of ours reads or replaces it (the
    /// memory map's write side, or the extent's claim: a 2 MiB fault takes it with the read
    /// side, since only the extent's shard handler can act on it), and its old pages hold
    /// nothing to lose: copied into this page while write-protected, or never populated.
    pub unsafe fn move_to(self, dst: HostAddr) -> Result<PageKind, MoveFailed> {
        if crate::fires!("mremap-hole") {
            // As the kernel does on a late failure: the destination is gone, the page is not.
            // SAFETY: per the caller's contract, `dst` is 2 MiB of the caller's own mapping.
            unsafe { libc::munmap(dst.as_ptr(), EXTENT_SIZE as usize) };
            return Err(MoveFailed {
                page: self,
                source: io::Error::from_raw_os_error(libc::ENOMEM),
                hole: true,
            });
        }
        // SAFETY: per the caller's contract for `dst`; the source is our own 2 MiB mapping.
        let moved = unsafe {
            libc::mremap(
                self.addr.as_ptr().cast(),
                EXTENT_SIZE as usize,
                EXTENT_SIZE as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst.as_ptr::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            return Err(MoveFailed {
                page: self,
                source,
                hole: !is_mapped(dst),
            });
        }
        let kind = self.kind;
        #[cfg(test)]
        live::gone(self.id);
        std::mem::forget(self);
        Ok(kind)
    }
}

/// A move that did not happen.
#[derive(Debug)]
pub struct MoveFailed {
    /// The page, still the caller's.
    pub page: HugePage,
    /// What the system said.
    pub source: io::Error,
    /// Whether the destination was unmapped all the same (it must be mapped again).
    pub hole: bool,
}

/// Whether the page at `addr` is mapped at all (`mincore` says `ENOMEM` for a hole).
fn is_mapped(addr: HostAddr) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore only reports on the range and writes one byte into `v`.
    let r = unsafe { libc::mincore(addr.as_ptr(), 4096, &mut v) };
    !(r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM))
}

impl Drop for HugePage {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; nothing else refers to it.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), EXTENT_SIZE as usize) };
        #[cfg(test)]
        live::gone(self.id);
    }
}

/// Hands out huge pages. The collapse thread's only way to get one, so tests can inject an
/// allocator that blocks or fails.
pub trait HugePageAllocator: Send + Sync {
    /// One zeroed, populated huge page.
    fn alloc(&self) -> Result<HugePage, AllocError>;

    /// `pages` pages will be asked for soon (the collapse thread's next batch): an allocator
    /// that works ahead of demand may start on them now.
    fn expect(&self, _pages: usize) {}
}

/// Maps `len` bytes of private anonymous memory with extra `flags`, at a kernel-chosen address.
pub(crate) fn map_anonymous(len: usize, flags: libc::c_int) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(p.cast()).expect("mmap never returns null on success"))
}

/// Faults the whole page in with one write to its first byte: the fault allocates and zeroes
/// the 2 MiB page (THP or hugetlb) under the page's own VMA lock. `MADV_POPULATE_WRITE` would
/// do it through the process-wide `mmap_lock` instead, held for the whole zeroing, and every
/// `mremap` of a collapse or an extent-granular fault would wait behind it (the seed commit's
/// problem, one level down: measured at 5-8 ms per `mremap` while the refill thread worked).
fn touch(page: &HugePage) {
    // SAFETY: the first byte of a writable mapping we own.
    unsafe { page.addr.as_ptr().write_volatile(0) };
}

fn madvise(page: &HugePage, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: advice on a mapping we own; it changes no contents we rely on (populating
    // fills zeroes, collapsing keeps contents).
    if unsafe { libc::madvise(page.addr.as_ptr().cast(), EXTENT_SIZE as usize, advice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Allocates and populates one hugetlb page now.
pub fn alloc_hugetlb() -> Result<HugePage, AllocError> {
    let exhausted = |source| AllocError::Exhausted {
        kind: PageKind::Hugetlb,
        source,
    };
    let addr = map_anonymous(EXTENT_SIZE as usize, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB)
        .map_err(exhausted)?;
    let page = HugePage::new(addr, PageKind::Hugetlb);
    madvise(&page, libc::MADV_POPULATE_WRITE).map_err(exhausted)?;
    Ok(page)
}

/// Allocates one THP now, populated and verified to be mapped huge.
pub fn alloc_thp() -> Result<HugePage, AllocError> {
    let exhausted = |source| AllocError::Exhausted {
        kind: PageKind::Thp,
        source,
    };
    let len = 2 * EXTENT_SIZE as usize;
    let raw = map_anonymous(len, libc::MAP_NORESERVE).map_err(exhausted)?;
    let start = raw.as_ptr() as usize;
    let aligned = start.next_multiple_of(EXTENT_SIZE as usize);
    // SAFETY: both pieces lie inside the mapping we just made and are unused.
    unsafe {
        if aligned > start {
            libc::munmap(raw.as_ptr().cast(), aligned - start);
        }
        let tail = aligned + EXTENT_SIZE as usize;
        if start + len > tail {
            libc::munmap(tail as *mut libc::c_void, start + len - tail);
        }
    }
    let page = HugePage::new(
        NonNull::new(aligned as *mut u8).expect("inside a mapping"),
        PageKind::Thp,
    );
    madvise(&page, libc::MADV_HUGEPAGE).map_err(exhausted)?;
    touch(&page);
    if !is_mapped_huge(&page) {
        // One more try: ask the kernel to collapse it in place.
        let _ = madvise(&page, libc::MADV_COLLAPSE);
        if !is_mapped_huge(&page) {
            return Err(AllocError::NotHuge);
        }
    }
    Ok(page)
}

fn is_mapped_huge(page: &HugePage) -> bool {
    host_view::is_mapped_huge(page.addr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thp_pages_are_verified_huge_and_zeroed() {
        let mut page = match alloc_thp() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIP: no THP here: {e}");
                return;
            }
        };
        assert!(page.addr().is_aligned(EXTENT_SIZE));
        assert!(is_mapped_huge(&page));
        assert!(page.bytes_mut().iter().all(|&b| b == 0));
    }
}
