//! The one way a huge page becomes part of guest RAM, for the fault path's 2 MiB faults and
//! every collapse order alike, in the order of the seed commit:
//!
//! 1. [`Installer::prepare`] takes a page from the pool and charges it to the ledger. It needs
//!    no lock: the caller holds the memory map's read side (or nothing), so a slow allocation
//!    stalls no fault and no I/O.
//! 2. The caller fills the page (a copy of the extent, or the page source's contents).
//! 3. [`Installer::install`] puts the page in place of the extent's backing, with the extent
//!    held exclusively ([`Exclusive`]): by the memory map's write side (a collapse commit,
//!    whose readers the handler's write-protect answers must not interleave with), or by the
//!    extent's claim with only the read side held (a 2 MiB fault into an unpopulated extent,
//!    whose faulting vCPUs all wait). This is the only place guest RAM's pages are replaced.
//!
//! Two ways to put a page in ([`InstallMethod`]): `UFFDIO_MOVE` (Linux 6.8+), which moves a
//! THP's page-table entry into the extent in microseconds, takes the kernel's `mmap_lock` only
//! for reading and splits no mapping; and `mremap`, which hugetlb pages need (the move is for
//! anonymous memory only), which takes `mmap_lock` for writing and costs a mapping per extent.
//! A move needs the extent's entries empty: a collapse first zaps the old 4 KiB pages, and an
//! access in the gap must then fault to our handler (guest RAM registered for missing faults)
//! so it waits for the move; where RAM is registered for write-protection only (the kernel
//! page source), a read in the gap would get the kernel's zero page, so those installs keep
//! `mremap`.
//!
//! A page that is not installed gives itself back when dropped: uncharged, then unmapped (or
//! returned to the hugetlb pool), so no failure path can leak a page or a charge.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{EXTENT_SIZE, HostAddr};

use super::ledger::{ChargeError, Ledger};
use super::page::{AllocError, HugePage, HugePageAllocator, PageKind};
use crate::extent::{ExtentClaim, ExtentIndex, ExtentTable};
use crate::host_view;
use crate::ram::GuestRam;
use crate::reclaim::ReclaimStats;
use crate::uffd::{REGISTER_MODE_MISSING, Resolved, UffdSet};

/// Everything an install needs.
pub struct Installer {
    /// Where pages come from.
    pub pool: Arc<dyn HugePageAllocator>,
    /// What they are charged to.
    pub ledger: Arc<Ledger>,
    /// The mappings installs may still cost.
    pub maps: Arc<MapBudget>,
    /// Guest RAM, the mapping pages are moved into.
    pub ram: Arc<GuestRam>,
    /// The userfaultfds guest RAM is registered with (moves go through the extent's, and an
    /// extent mapped again after a failed `mremap` must be registered again).
    pub uffds: Arc<UffdSet>,
    /// How pages go in where both ways are open (see [`InstallMethod`]).
    pub method: InstallMethod,
    /// Where pages given back that a huge page brings back are counted.
    pub reclaim: Arc<ReclaimStats>,
}

/// How a huge page is put in place of an extent's backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstallMethod {
    /// `UFFDIO_MOVE` for THPs where every access to a zapped extent reaches our handler;
    /// `mremap` otherwise (hugetlb pages, write-protect-only registration).
    #[default]
    Move,
    /// `mremap` always.
    Mremap,
}

crate::choice::choices!(InstallMethod {
    Move = "move": "UFFDIO_MOVE for THPs where every access to a zapped extent reaches our handler; mremap otherwise (hugetlb pages, write-protect-only registration)",
    Mremap = "mremap": "mremap always",
});

/// What keeps everyone else off the extent while its backing is replaced.
pub enum Exclusive<'a, 'b> {
    /// The memory map's write side (its table).
    Table(&'a mut ExtentTable),
    /// The extent's claim, the read side held.
    Claim(&'a ExtentClaim<'b>),
}

impl Exclusive<'_, '_> {
    fn set_huge(&mut self, index: ExtentIndex, kind: PageKind) -> u32 {
        match self {
            Exclusive::Table(t) => t
                .get_mut(index)
                .expect("index inside the table")
                .set_huge(kind),
            Exclusive::Claim(c) => c.set_huge(kind),
        }
    }

    fn all_present(&self, index: ExtentIndex) {
        let extent = match self {
            Exclusive::Table(t) => t.get(index).expect("index inside the table"),
            Exclusive::Claim(c) => c.extent(),
        };
        extent.add_present(|_| true);
    }
}

/// Why no page could be prepared. Nothing is left allocated or charged.
#[derive(Debug, thiserror::Error)]
pub enum PrepareFailed {
    /// No mapping is left to spare for another install (`vm.max_map_count`).
    #[error("no memory mapping left to spare")]
    NoMapping,
    /// The pool had no page.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The ledger refused the charge.
    #[error(transparent)]
    Charge(#[from] ChargeError),
}

/// A huge page taken from the pool and charged, not yet in guest RAM. Dropped, it is
/// uncharged and given back.
pub struct Prepared<'a> {
    page: Option<HugePage>,
    ledger: &'a Ledger,
}

impl Prepared<'_> {
    /// The page's bytes, to fill before it is installed. The page is this value's alone until
    /// then, so a slice over it is sound; guest RAM is copied in with raw copies, never
    /// through a slice (a vCPU may be writing it).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.page.as_mut().expect("a prepared page").bytes_mut()
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        if let Some(page) = self.page.take() {
            self.ledger.uncharge(EXTENT_SIZE);
            drop(page);
        }
    }
}

/// What the page holds, which is what the extent must hold again if a failed move unmapped it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// A complete copy of the extent (a collapse: the extent is write-protected and copied).
    Copy,
    /// Nothing of the extent's: it was unpopulated (a 2 MiB fault).
    Unpopulated,
}

/// Why an install did not happen.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The extent is as it was; the page went back to the pool.
    #[error(transparent)]
    Failed(InstallFailed),
    /// The extent was left with a hole in guest RAM.
    #[error(transparent)]
    Lost(ExtentLost),
}

/// A move that did not happen; the page went back to the pool.
#[derive(Debug, thiserror::Error)]
#[error("moving a huge page over extent {extent} failed{}", if *.refilled { " (it unmapped the extent, which was mapped again)" } else { "" })]
pub struct InstallFailed {
    /// The extent.
    pub extent: usize,
    /// Whether the failed move had unmapped the extent, which was mapped again with what it
    /// held.
    pub refilled: bool,
    /// What the system said.
    #[source]
    pub source: std::io::Error,
}

/// The extent was unmapped by a failed move and could not be put back: guest RAM has a hole.
#[derive(Debug, thiserror::Error)]
#[error("extent {extent} was unmapped by a failed mremap and could not be mapped again")]
pub struct ExtentLost {
    /// The extent.
    pub extent: usize,
    /// What the system said.
    #[source]
    pub source: std::io::Error,
}

/// How an install went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// The extent is one huge page now.
    Huge(PageKind),
    /// The page's contents are in the extent, as 4 KiB pages: the move came part-way (the
    /// kernel split the page) or put the page under an existing page table. The extent is
    /// fully populated and may be collapsed again later; nothing is charged for it.
    Small,
}

impl Installer {
    /// The way a page of `kind` holding `contents` goes in.
    fn method_for(&self, kind: PageKind, contents: Contents) -> InstallMethod {
        let move_open = self.method == InstallMethod::Move
            && kind == PageKind::Thp
            && self.uffds.features() & crate::uffd::FEATURE_MOVE != 0;
        // A zapped extent's accesses must reach the handler (registered for missing faults).
        let gap_held = contents == Contents::Unpopulated
            || self.uffds.for_extent(0).registered_mode() & REGISTER_MODE_MISSING != 0;
        if move_open && gap_held {
            InstallMethod::Move
        } else {
            InstallMethod::Mremap
        }
    }

    /// Whether `page` would go in by `UFFDIO_MOVE` (else `mremap`).
    pub fn moves(&self, page: &Prepared<'_>, contents: Contents) -> bool {
        let kind = page.page.as_ref().expect("a prepared page").kind();
        self.method_for(kind, contents) == InstallMethod::Move
    }

    /// Step 1: a page from the pool, charged, for an install of `contents`. Holds no lock of
    /// its own. A page that would go in by `mremap` needs a mapping to spare.
    pub fn prepare(&self, contents: Contents) -> Result<Prepared<'_>, PrepareFailed> {
        let by_mremap = |kind| self.method_for(kind, contents) == InstallMethod::Mremap;
        if by_mremap(PageKind::Hugetlb) && by_mremap(PageKind::Thp) && !self.maps.allows_install() {
            return Err(PrepareFailed::NoMapping);
        }
        let page = self.pool.alloc()?;
        if by_mremap(page.kind()) && !self.maps.allows_install() {
            return Err(PrepareFailed::NoMapping);
        }
        self.ledger.charge(EXTENT_SIZE)?;
        Ok(Prepared {
            page: Some(page),
            ledger: &self.ledger,
        })
    }

    /// Step 3: puts the page in place of extent `index`'s backing and marks the extent huge,
    /// with the extent held exclusively (`excl`). `contents` says what the page holds: for a
    /// [`Contents::Copy`] the extent's old pages are redundant (the copy was made while the
    /// extent was write-protected) and are dropped. On failure the page is given back and the
    /// extent holds what it held (if an `mremap` unmapped it, it is mapped again);
    /// [`InstallError::Lost`] only when even that failed.
    pub fn install(
        &self,
        mut excl: Exclusive<'_, '_>,
        index: ExtentIndex,
        mut page: Prepared<'_>,
        contents: Contents,
    ) -> Result<Installed, InstallError> {
        let huge = page.page.take().expect("a prepared page");
        let dst = self.ram.host_at(index.gpa());
        let uffd = self.uffds.for_extent(index.0);
        let method = self.method_for(huge.kind(), contents);
        // What every step below relies on: `dst` is a 2 MiB-aligned extent of guest RAM,
        // which stays mapped for the VM's life (the page becomes part of that mapping, and is
        // unmapped with it) and whose memslot KVM keeps in sync through its MMU notifier;
        // `excl` keeps every other thread of ours off the extent; and every caller made the
        // old pages redundant first: a collapse copied the extent while it was write-protected
        // (no guest write can land in the old pages and be lost), a 2 MiB fault found the
        // extent unpopulated (there is nothing to lose).
        let result = match method {
            InstallMethod::Mremap => {
                // SAFETY: `move_to`'s contract is the above.
                unsafe { huge.move_to(dst) }.map_err(|f| (f.page, f.source, f.hole))
            }
            InstallMethod::Move => {
                // Empty the extent's entries: the old 4 KiB pages of a collapse, and the page
                // table a fault into an unpopulated extent leaves (the kernel frees an empty
                // one on the zap), without which the page could not move whole. Then once more:
                // guest RAM is not THP-eligible (the kernel must not make huge pages itself),
                // so an access in the gap allocates a page table before it reaches the handler,
                // and blocks there until we wake it; the second zap frees that table (it finds
                // no pages, and costs a few µs). Only an access between the second zap and the
                // move can still split the page; then it lands as 4 KiB pages, whole and
                // correct, and counts as a split move.
                for _ in 0..2 {
                    // SAFETY: discards the extent's old pages, redundant (above); an access in
                    // the gap is a missing fault the handler holds for us (the extent is
                    // claimed or write-locked) until we wake it below.
                    unsafe {
                        libc::madvise(dst.as_ptr(), EXTENT_SIZE as usize, libc::MADV_DONTNEED)
                    };
                }
                // SAFETY: moves our page into the now empty extent; the page's source range
                // is ours and left empty, `dst` is guest RAM held exclusively (above).
                match unsafe { uffd.move_pages(dst, huge.addr(), EXTENT_SIZE) } {
                    Ok(moved) if moved == EXTENT_SIZE => {
                        // The page lives at `dst` now; what is left here is an empty mapping,
                        // unmapped by the drop.
                        let kind = huge.kind();
                        drop(huge);
                        Ok(kind)
                    }
                    Ok(moved) => Err((huge, moved_part(moved), false)),
                    Err(e) => Err((huge, e, false)),
                }
            }
        };
        match result {
            Ok(kind) => {
                if method == InstallMethod::Move && !host_view::is_mapped_huge(dst) {
                    // Moved whole, but under a page table that was still there: 4 KiB entries.
                    excl.all_present(index);
                    self.ledger.uncharge(EXTENT_SIZE);
                    return Ok(Installed::Small);
                }
                // The extent owns the charge now: it is uncharged at teardown.
                std::mem::forget(page);
                let reinflated = excl.set_huge(index, kind);
                self.reclaim
                    .reinflated_bytes
                    .add(u64::from(reinflated) * crate::PAGE_SIZE);
                if method == InstallMethod::Mremap {
                    self.maps.installed();
                }
                Ok(Installed::Huge(kind))
            }
            Err((huge, source, hole)) if method == InstallMethod::Move => {
                // The page moved part of the way, or not at all: what did not move is copied in
                // (the entries there are empty), so the extent holds the whole page either way.
                match self.copy_rest(uffd, dst, &huge) {
                    Ok(()) => {
                        log::debug!(
                            "extent {}: the move came part-way ({source}); copied the rest",
                            index.0
                        );
                        excl.all_present(index);
                        page.page = Some(huge);
                        Ok(Installed::Small)
                    }
                    Err(e) => {
                        page.page = Some(huge);
                        let _ = hole;
                        Err(InstallError::Lost(ExtentLost {
                            extent: index.0,
                            source: e,
                        }))
                    }
                }
            }
            Err((huge, source, hole)) => {
                if hole {
                    let copy = (contents == Contents::Copy).then_some(&huge);
                    if let Err(source) = self.refill_hole(index, copy) {
                        page.page = Some(huge);
                        return Err(InstallError::Lost(ExtentLost {
                            extent: index.0,
                            source,
                        }));
                    }
                    if contents == Contents::Copy {
                        excl.all_present(index);
                    }
                }
                page.page = Some(huge);
                Err(InstallError::Failed(InstallFailed {
                    extent: index.0,
                    refilled: hole,
                    source,
                }))
            }
        }
    }

    /// After a move that came part-way: copies every page of `huge` whose destination entry is
    /// still empty into `dst` (`UFFDIO_COPY` says so for the ones that moved).
    fn copy_rest(
        &self,
        uffd: &crate::uffd::Uffd,
        dst: HostAddr,
        huge: &HugePage,
    ) -> std::io::Result<()> {
        use crate::PAGE_SIZE;
        for off in (0..EXTENT_SIZE).step_by(PAGE_SIZE as usize) {
            // SAFETY: `dst + off` is a page of the extent held exclusively by the caller, whose
            // entry is empty or holds a page that moved (then the copy fails with EEXIST and
            // changes nothing); the source is our own page, readable where it did not move.
            // Pages that moved are holes at the source, which read as zeroes but are not
            // copied (their destination is present).
            match unsafe { uffd.copy(dst + off, (huge.addr() + off).as_ptr(), PAGE_SIZE) }? {
                Resolved::Filled | Resolved::AlreadyPresent => {}
                Resolved::Retry => return Err(std::io::Error::from_raw_os_error(libc::EAGAIN)),
            }
        }
        Ok(())
    }

    /// Maps the extent again after a failed move unmapped it: fresh memory, or `copy`'s
    /// contents (a complete copy of the extent) put in whole, registered with the uffd as all
    /// of RAM is.
    fn refill_hole(&self, index: ExtentIndex, copy: Option<&HugePage>) -> std::io::Result<()> {
        let contents = copy.map(|page| {
            // SAFETY: `page` is our own 2 MiB mapping, not written while this borrow lives.
            unsafe { std::slice::from_raw_parts(page.addr().as_ptr(), EXTENT_SIZE as usize) }
        });
        self.ram.refill_hole(index.gpa(), EXTENT_SIZE, contents)?;
        let dst = self.ram.host_at(index.gpa());
        // Registered after the copy (the copy's own writes must not fault to the handler), and
        // fresh memory before any thread may touch it.
        let uffd = self.uffds.for_extent(index.0);
        uffd.register(dst, EXTENT_SIZE, uffd.registered_mode())?;
        if copy.is_none() {
            self.ram.open_refilled(index.gpa(), EXTENT_SIZE)?;
        }
        log::warn!(
            "a failed mremap unmapped extent {}; it was mapped again",
            index.0
        );
        Ok(())
    }
}

/// The error for a move that came part of the way.
fn moved_part(moved: u64) -> std::io::Error {
    std::io::Error::other(format!("UFFDIO_MOVE moved {moved} of {EXTENT_SIZE} bytes"))
}

/// The process's budget of memory mappings (`vm.max_map_count`). Every huge page moved into
/// guest RAM with `mremap` may split its mapping, costing up to two more; running out aborts
/// the process (a thread's stack, a large allocation), so installs stop while `reserve`
/// mappings are still free for the rest of the VMM. Counting `/proc/self/maps` is slow, so
/// installs are counted as they happen and the real count is read again only near the limit.
#[derive(Debug)]
pub struct MapBudget {
    max: u64,
    reserve: u64,
    /// Mappings in use, as last counted plus what installs have added since (an upper bound).
    estimate: AtomicU64,
    exhausted: AtomicBool,
}

/// Mappings one `mremap` install may add (the split of the mapping it lands in).
pub const MAPS_PER_INSTALL: u64 = 2;

impl MapBudget {
    /// A budget that keeps `reserve` mappings free.
    pub fn new(reserve: u64) -> io::Result<Self> {
        Ok(MapBudget {
            max: host_view::max_map_count()?,
            reserve,
            estimate: AtomicU64::new(host_view::mappings()?),
            exhausted: AtomicBool::new(false),
        })
    }

    /// Whether one more install fits, keeping the reserve free. The first time it does not,
    /// says so (once) with the figures.
    pub fn allows_install(&self) -> bool {
        use Ordering;
        if self.exhausted.load(Ordering::Relaxed) {
            return false;
        }
        let fits = |used: u64| used + MAPS_PER_INSTALL + self.reserve <= self.max;
        if fits(self.estimate.load(Ordering::Relaxed)) {
            return true;
        }
        // Near the limit: count for real (installs next to each other often merge).
        let Ok(used) = host_view::mappings() else {
            return false;
        };
        self.estimate.store(used, Ordering::Relaxed);
        if fits(used) {
            return true;
        }
        if !self.exhausted.swap(true, Ordering::Relaxed) {
            log::warn!(
                "no more 2 MiB pages will be moved into guest RAM: the process uses {used} of \
                 vm.max_map_count {} mappings and keeps {} for the rest of the VMM (raise \
                 vm.max_map_count to go on)",
                self.max,
                self.reserve
            );
        }
        false
    }

    /// Records an install that happened.
    pub fn installed(&self) {
        self.estimate.fetch_add(MAPS_PER_INSTALL, Ordering::Relaxed);
    }

    /// Whether installs were stopped for want of mappings.
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }
}
