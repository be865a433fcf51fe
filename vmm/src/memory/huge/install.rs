//! The one way a huge page becomes part of guest RAM, for the fault path's 2 MiB faults and
//! every collapse order alike, in the order of the seed commit:
//!
//! 1. [`Installer::prepare`] takes a page from the pool and charges it to the ledger. It needs
//!    no lock: the caller holds the memory map's read side (or nothing), so a slow allocation
//!    stalls no fault and no I/O.
//! 2. The caller fills the page (a copy of the extent, or the page source's contents).
//! 3. [`Installer::install`] moves the page over its extent. It takes `&mut ExtentTable`, which
//!    only the write side of the memory map hands out, so no reader of extent state can see
//!    the switch half done; this is the only place guest RAM's pages are replaced.
//!
//! A page that is not installed gives itself back when dropped: uncharged, then unmapped (or
//! returned to the hugetlb pool), so no failure path can leak a page or a charge.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use guest_abi::layout::EXTENT_SIZE;

use super::ledger::{ChargeError, Ledger};
use super::page::{AllocError, HugePage, HugePageAllocator, PageKind};
use crate::memory::extent::{ExtentIndex, ExtentTable};
use crate::memory::host_view;
use crate::memory::ram::GuestRam;
use crate::memory::uffd::Uffd;

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
    /// The userfaultfd guest RAM is registered with (an extent mapped again after a failed
    /// move must be registered again).
    pub uffd: Arc<Uffd>,
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

    /// The page's host address.
    pub fn addr(&self) -> u64 {
        self.page.as_ref().expect("a prepared page").addr()
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

impl Installer {
    /// Step 1: a page from the pool, charged. Holds no lock of its own.
    pub fn prepare(&self) -> Result<Prepared<'_>, PrepareFailed> {
        if !self.maps.allows_install() {
            return Err(PrepareFailed::NoMapping);
        }
        let page = self.pool.alloc()?;
        self.ledger.charge(EXTENT_SIZE)?;
        Ok(Prepared {
            page: Some(page),
            ledger: &self.ledger,
        })
    }

    /// Step 3: moves the page over extent `index` and marks it huge. `table` is the extent
    /// table under the memory map's write lock. On failure the page is given back and the
    /// extent is as it was (if the move had unmapped it, it is mapped again with `contents`);
    /// `Err(Err(..))` only when even that failed.
    pub fn install(
        &self,
        table: &mut ExtentTable,
        index: ExtentIndex,
        mut page: Prepared<'_>,
        contents: Contents,
    ) -> Result<PageKind, Result<InstallFailed, ExtentLost>> {
        let huge = page.page.take().expect("a prepared page");
        let dst = self.ram.host_base().0 as u64 + index.gpa();
        // SAFETY: `dst` is a 2 MiB-aligned extent of guest RAM, which stays mapped for the VM's
        // life (the page becomes part of that mapping, and is unmapped with it) and whose
        // memslot KVM keeps in sync through its MMU notifier. `&mut ExtentTable` is the write
        // side of the memory map lock, so no reader of extent state sees the switch half done,
        // and every caller made the old pages redundant first: a collapse copied the extent
        // while it was write-protected (no guest write can land in the old pages and be lost),
        // and a 2 MiB fault found the extent unpopulated (there is nothing to lose).
        match unsafe { huge.move_to(dst) } {
            Ok(kind) => {
                // The extent owns the charge now: it is uncharged at teardown.
                std::mem::forget(page);
                table
                    .get_mut(index)
                    .expect("index inside the table")
                    .set_huge();
                self.maps.installed();
                Ok(kind)
            }
            Err(failed) => {
                let refilled = failed.hole;
                if refilled {
                    let copy = (contents == Contents::Copy).then_some(&failed.page);
                    if let Err(source) = self.refill_hole(index, copy) {
                        page.page = Some(failed.page);
                        return Err(Err(ExtentLost {
                            extent: index.0,
                            source,
                        }));
                    }
                    if contents == Contents::Copy {
                        table
                            .get(index)
                            .expect("index inside the table")
                            .add_present(|_| true);
                    }
                }
                page.page = Some(failed.page);
                Err(Ok(InstallFailed {
                    extent: index.0,
                    refilled,
                    source: failed.source,
                }))
            }
        }
    }

    /// Maps the extent again after a failed move unmapped it: fresh memory, `copy`'s contents
    /// (a complete copy of the extent) or none, registered with the uffd as all of RAM is.
    fn refill_hole(&self, index: ExtentIndex, copy: Option<&HugePage>) -> std::io::Result<()> {
        self.ram.refill_hole(index.gpa(), EXTENT_SIZE)?;
        let dst = self.ram.host_base().0 as u64 + index.gpa();
        if let Some(page) = copy {
            // SAFETY: `dst` is the extent just mapped again (2 MiB, writable, owned by `ram`)
            // and `page` our own 2 MiB mapping; the two never overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    page.addr() as *const u8,
                    dst as *mut u8,
                    EXTENT_SIZE as usize,
                )
            };
        }
        // Registered after the copy: the copy's own writes must not fault to the handler.
        self.uffd
            .register(dst, EXTENT_SIZE, self.uffd.registered_mode())?;
        log::warn!(
            "a failed mremap unmapped extent {}; it was mapped again",
            index.0
        );
        Ok(())
    }
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

    /// `vm.max_map_count`.
    pub fn max(&self) -> u64 {
        self.max
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
