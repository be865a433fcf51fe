//! The collapse thread: this VMM's khugepaged. It promotes populated 2 MiB extents of guest
//! RAM to single 2 MiB host pages.
//!
//! One collapse follows the seed commit ("thp: allocate memory in khugepaged outside of
//! mmap_sem write mode"): the huge page is **allocated and charged while only the read side**
//! of the memory map lock is held, and the extent is copied there too, while the guest keeps
//! running. The **write side** is taken only briefly, after all of that succeeded, to
//! revalidate, copy what the guest changed meanwhile, and `mremap` the huge page over the
//! extent. [`Collapser::collapse`] takes the read guard by value, so "it returns with the lock
//! released" is something the compiler checks.
//!
//! No guest write is ever lost. Before copying, the extent is write-protected with
//! userfaultfd and marked as *tracking*: a guest write to it faults to the fault handler,
//! which records the page dirty and lets the write through. Under the write lock the extent
//! is protected again (writers of this extent, and only this extent, now wait), the dirty
//! pages are copied again, the huge page is moved in, and the lock is released; the handler,
//! whose read lock was waiting for exactly that, then wakes the writers onto the new page.
//!
//! Every failure path gives the page back to the pool and uncharges it, and leaves the extent
//! unprotected and untracked, before any lock is released.
//!
//! The old order (`legacy`: allocate and charge after taking the write lock) and today's
//! kernel's (`unlocked`: no lock at all while allocating) are kept as selectable baselines.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard};
use std::time::{Duration, Instant};

use guest_abi::layout::{EXTENT_SIZE, PAGE_SIZE};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::extent::{Extent, ExtentIndex, ExtentState, ExtentTable, MemoryMap, PAGES_PER_EXTENT};
use super::kernel::{self, MapBudget};
use super::ledger::Ledger;
use super::pool::{HugePage, HugePageAllocator};
use super::ram::GuestRam;
use super::source::{Fill, PageSource};
use super::uffd::Uffd;
use crate::metrics::{latency_histogram, percentiles};
use crate::seccomp::{Seccomp, ThreadKind};
use crate::worker::{Stop, Worker};

/// When, relative to the memory map lock, the huge page is allocated and charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CollapseOrder {
    /// Under the read lock, before the write lock (the seed commit's order).
    Prealloc,
    /// Under the write lock (the order before the seed commit).
    Legacy,
    /// With no lock held (Linux since 2015).
    Unlocked,
}

impl FromStr for CollapseOrder {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prealloc" => Ok(CollapseOrder::Prealloc),
            "legacy" => Ok(CollapseOrder::Legacy),
            "unlocked" => Ok(CollapseOrder::Unlocked),
            _ => Err(format!(
                "invalid collapse order {s:?}: expected prealloc, legacy or unlocked"
            )),
        }
    }
}

/// The collapse thread's tunables (khugepaged's, with VMM-friendly defaults).
#[derive(Clone, Debug)]
pub struct CollapseConfig {
    /// Lock order.
    pub order: CollapseOrder,
    /// 4 KiB pages to scan per round (khugepaged's `pages_to_scan`; 512 per extent).
    pub pages_to_scan: u64,
    /// Sleep between rounds (khugepaged's `scan_sleep_millisecs`).
    pub scan_sleep: Duration,
    /// Back-off after an allocation failure (khugepaged's `alloc_sleep_millisecs`).
    pub alloc_sleep: Duration,
    /// Most unpopulated pages an extent may have and still be collapsed (khugepaged's
    /// `max_ptes_none`); they become zeroes (or the page source's contents).
    pub max_ptes_none: u32,
    /// If set, the thread waits until it turns true before its first scan (benchmarks start
    /// every collapser at the same moment).
    pub gate: Option<Arc<AtomicBool>>,
}

impl Default for CollapseConfig {
    fn default() -> Self {
        CollapseConfig {
            order: CollapseOrder::Prealloc,
            pages_to_scan: 4096,
            scan_sleep: Duration::from_millis(10),
            alloc_sleep: Duration::from_millis(200),
            max_ptes_none: 511,
            gate: None,
        }
    }
}

/// How one collapse attempt ended; named after khugepaged's `SCAN_*` result codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanResult {
    /// `SCAN_SUCCEED`: the extent is a huge page now.
    Succeed,
    /// `SCAN_EXCEED_NONE_PTE`: too many unpopulated pages.
    ExceedNonePte,
    /// `SCAN_PMD_MAPPED`: the extent was already huge.
    PmdMapped,
    /// `SCAN_ALLOC_HUGE_PAGE_FAIL`: no huge page could be had.
    AllocHugePageFail,
    /// `SCAN_CGROUP_CHARGE_FAIL`: the ledger's limit was reached.
    CgroupChargeFail,
    /// `SCAN_VMA_CHECK`: the VM is stopping (the region is going away).
    VmaCheck,
    /// Revalidation failed: the extent changed while no lock was held (its generation moved).
    Changed,
    /// `SCAN_FAIL`: write-protecting, copying or remapping failed.
    Fail,
    /// No mapping left to spare for another install (`vm.max_map_count`): collapsing stops.
    MapLimit,
}

/// What the collapse thread has done; shared with whoever reports metrics.
#[derive(Debug)]
pub struct CollapseStats {
    /// Extents collapsed (khugepaged's `pages_collapsed`, in 2 MiB units).
    pub pages_collapsed: AtomicU64,
    /// Complete passes over all extents.
    pub full_scans: AtomicU64,
    /// Huge pages allocated.
    pub collapse_alloc: AtomicU64,
    /// Allocations that failed.
    pub collapse_alloc_failed: AtomicU64,
    /// Charges the ledger refused.
    pub charge_failed: AtomicU64,
    /// Revalidations that failed: the extent changed, was already huge, or the VM stopped.
    pub revalidate_failed: AtomicU64,
    /// ... of which because the generation moved.
    pub revalidate_changed: AtomicU64,
    /// Extents skipped for too many unpopulated pages.
    pub exceed_none_pte: AtomicU64,
    /// Write-protect, copy or remap failures.
    pub failed: AtomicU64,
    /// Time the write lock was held per collapse attempt that took it, in ns.
    pub write_lock_ns: Mutex<Histogram<u64>>,
    /// Time spent in the read phase (allocate, charge, pre-copy) per attempt, in ns.
    pub read_phase_ns: Mutex<Histogram<u64>>,
    /// Time spent allocating one huge page, in ns (wherever the order puts it).
    pub alloc_ns: Mutex<Histogram<u64>>,
    /// When a full scan first found every extent huge, in ns since the thread started
    /// scanning (0: not yet).
    pub all_huge_ns: AtomicU64,
}

impl Default for CollapseStats {
    fn default() -> Self {
        CollapseStats {
            pages_collapsed: AtomicU64::new(0),
            full_scans: AtomicU64::new(0),
            collapse_alloc: AtomicU64::new(0),
            collapse_alloc_failed: AtomicU64::new(0),
            charge_failed: AtomicU64::new(0),
            revalidate_failed: AtomicU64::new(0),
            revalidate_changed: AtomicU64::new(0),
            exceed_none_pte: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            write_lock_ns: Mutex::new(latency_histogram()),
            read_phase_ns: Mutex::new(latency_histogram()),
            alloc_ns: Mutex::new(latency_histogram()),
            all_huge_ns: AtomicU64::new(0),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
    if let Ok(mut h) = h.lock() {
        h.saturating_record((d.as_nanos() as u64).max(1));
    }
}

impl CollapseStats {
    /// The `collapse` section of the metrics.
    pub fn to_json(&self) -> Value {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let hist =
            |h: &Mutex<Histogram<u64>>| percentiles(&h.lock().unwrap_or_else(|p| p.into_inner()));
        json!({
            "pages_collapsed": load(&self.pages_collapsed),
            "full_scans": load(&self.full_scans),
            "collapse_alloc": load(&self.collapse_alloc),
            "collapse_alloc_failed": load(&self.collapse_alloc_failed),
            "charge_failed": load(&self.charge_failed),
            "revalidate_failed": load(&self.revalidate_failed),
            "revalidate_changed": load(&self.revalidate_changed),
            "exceed_none_pte": load(&self.exceed_none_pte),
            "failed": load(&self.failed),
            "write_lock_ns": hist(&self.write_lock_ns),
            "read_phase_ns": hist(&self.read_phase_ns),
            "alloc_ns": hist(&self.alloc_ns),
            "all_huge_ns": load(&self.all_huge_ns),
        })
    }
}

/// Everything a collapse touches.
pub struct Collapser {
    /// The memory map lock.
    pub map: Arc<MemoryMap>,
    /// Guest RAM (the mapping extents are replaced in).
    pub ram: Arc<GuestRam>,
    /// The userfaultfd guest RAM is registered with in write-protect mode.
    pub uffd: Arc<Uffd>,
    /// Where contents of never-populated pages come from (`None`: zeroes).
    pub source: Option<Arc<dyn PageSource>>,
    /// Huge pages.
    pub allocator: Arc<dyn HugePageAllocator>,
    /// The charge for them.
    pub ledger: Arc<Ledger>,
    /// Tunables.
    pub config: CollapseConfig,
    /// Counters.
    pub stats: Arc<CollapseStats>,
    /// Set when the VM is stopping; revalidation fails from then on.
    pub stopping: Arc<AtomicBool>,
    /// Mappings each install may cost: collapsing stops before it eats the reserve.
    pub maps: Arc<MapBudget>,
    /// The host kernel populates pages (`--page-source kernel`): the table learns of them
    /// from the kernel.
    pub kernel_populates: bool,
    /// Called between the read phase and the write phase, with no lock held (fault
    /// injection for tests: change the extent while the collapse is not looking).
    pub before_commit: Option<Arc<dyn Fn(ExtentIndex) + Send + Sync>>,
}

/// A failure inside the commit that must not be retried: the extent may be left protected.
#[derive(Debug, thiserror::Error)]
#[error("collapse of extent {extent} failed while {what}")]
pub struct CollapseError {
    /// The extent.
    pub extent: usize,
    /// What it was doing.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl Collapser {
    fn host(&self, index: ExtentIndex) -> u64 {
        self.ram.host_base().0 as u64 + index.gpa()
    }

    fn check_threshold(&self, extent: &Extent) -> Result<(), ScanResult> {
        match extent.state() {
            ExtentState::Huge => Err(ScanResult::PmdMapped),
            ExtentState::Unpopulated => Err(ScanResult::ExceedNonePte),
            ExtentState::Small { populated } => {
                if PAGES_PER_EXTENT as u32 - populated > self.config.max_ptes_none {
                    Err(ScanResult::ExceedNonePte)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Allocates and charges one huge page, timing the allocation.
    fn alloc_and_charge(&self) -> Result<HugePage, ScanResult> {
        let start = Instant::now();
        let page = self.allocator.alloc();
        record(&self.stats.alloc_ns, start.elapsed());
        let page = page.map_err(|e| {
            log::debug!("huge page allocation failed: {e}");
            self.stats
                .collapse_alloc_failed
                .fetch_add(1, Ordering::Relaxed);
            ScanResult::AllocHugePageFail
        })?;
        self.stats.collapse_alloc.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.ledger.charge(EXTENT_SIZE) {
            log::debug!("{e}");
            self.stats.charge_failed.fetch_add(1, Ordering::Relaxed);
            return Err(ScanResult::CgroupChargeFail);
        }
        Ok(page)
    }

    /// Gives a page back: uncharge, then drop (unmap, or return to the hugetlb pool).
    fn give_back(&self, page: HugePage) {
        self.ledger.uncharge(EXTENT_SIZE);
        drop(page);
    }

    /// Write-protects the extent and starts recording the guest's writes to it.
    fn protect_and_track(&self, index: ExtentIndex, extent: &Extent) -> Result<(), CollapseError> {
        extent.start_tracking();
        self.uffd
            .write_protect(self.host(index), EXTENT_SIZE, true, false)
            .map_err(|source| {
                extent.stop_tracking();
                CollapseError {
                    extent: index.0,
                    what: "write-protecting it",
                    source,
                }
            })
    }

    /// Write-protects `pages` (sorted page indices) of the extent, one call per contiguous run.
    fn protect_pages(&self, index: ExtentIndex, pages: &[usize]) -> std::io::Result<()> {
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            let start = self.host(index) + pages[i] as u64 * PAGE_SIZE;
            self.uffd
                .write_protect(start, (j - i) as u64 * PAGE_SIZE, true, false)?;
            i = j;
        }
        Ok(())
    }

    /// Stops tracking and lifts the protection, waking any writer.
    fn unprotect(&self, index: ExtentIndex, extent: &Extent) -> Result<(), CollapseError> {
        extent.stop_tracking();
        self.uffd
            .write_protect(self.host(index), EXTENT_SIZE, false, true)
            .map_err(|source| CollapseError {
                extent: index.0,
                what: "lifting write protection",
                source,
            })
    }

    /// Copies `pages` of the extent from guest RAM into `page`.
    fn copy_pages(
        &self,
        index: ExtentIndex,
        page: &mut HugePage,
        pages: impl Iterator<Item = usize>,
    ) {
        let src = self.host(index) as *const u8;
        let dst = page.bytes_mut();
        for p in pages {
            let off = p * PAGE_SIZE as usize;
            // SAFETY: `src + off` is a populated page of this extent of guest RAM, which is
            // mapped for the VM's whole life; the guest cannot write it (write-protected).
            let from = unsafe { std::slice::from_raw_parts(src.add(off), PAGE_SIZE as usize) };
            dst[off..off + PAGE_SIZE as usize].copy_from_slice(from);
        }
    }

    /// Fills the never-populated pages from the page source (they are zero already when there
    /// is none). Runs outside the write lock: the source may do I/O and allocate.
    fn fill_unpopulated(
        &self,
        index: ExtentIndex,
        extent: &Extent,
        page: &mut HugePage,
    ) -> Result<(), ScanResult> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let dst = page.bytes_mut();
        for p in (0..PAGES_PER_EXTENT).filter(|&p| !extent.is_populated(p)) {
            let off = p * PAGE_SIZE as usize;
            let gpa = index.gpa() + off as u64;
            match source.fill(gpa, &mut dst[off..off + PAGE_SIZE as usize]) {
                Ok(Fill::Data) => {}
                Ok(Fill::Zero) => dst[off..off + PAGE_SIZE as usize].fill(0),
                Err(e) => {
                    log::warn!("collapse: the page source failed at {gpa:#x}: {e}");
                    return Err(ScanResult::Fail);
                }
            }
        }
        Ok(())
    }

    /// Which pages of the extent the kernel has present.
    fn present_pages(&self, index: ExtentIndex) -> std::io::Result<Vec<bool>> {
        fail::fail_point!("collapse-present-pages", |_| Err(
            std::io::Error::from_raw_os_error(libc::EMFILE)
        ));
        kernel::present_pages(self.host(index), EXTENT_SIZE)
    }

    /// Protects the extent, then copies every page the kernel has present. Asking the kernel
    /// (not the table) after protecting is what makes the copy complete: a page that becomes
    /// present later can only do so through a fault the handler records as dirty, while the
    /// table may lag behind the kernel (with `--page-source kernel` the kernel populates
    /// pages without telling anyone).
    fn protect_and_copy(
        &self,
        index: ExtentIndex,
        extent: &Extent,
        page: &mut HugePage,
    ) -> Result<(), ScanResult> {
        if let Err(e) = self.protect_and_track(index, extent) {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            crate::log_ratelimited!(log::Level::Warn, "{e}: {}", e.source);
            return Err(ScanResult::Fail);
        }
        let present = self.present_pages(index);
        let present = match present {
            Ok(p) => p,
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                crate::log_ratelimited!(log::Level::Warn, "collapse: reading present pages: {e}");
                return Err(ScanResult::Fail);
            }
        };
        if self.kernel_populates {
            extent.add_present(|p| present[p]);
        }
        self.copy_pages(index, page, (0..PAGES_PER_EXTENT).filter(|&p| present[p]));
        self.fill_unpopulated(index, extent, page)
    }

    /// The read phase shared by `prealloc` and `unlocked`: protect, track, copy, fill the rest.
    /// Returns the generation to revalidate against.
    fn precopy(
        &self,
        index: ExtentIndex,
        extent: &Extent,
        page: &mut HugePage,
    ) -> Result<u64, ScanResult> {
        self.protect_and_copy(index, extent, page)?;
        Ok(extent.generation())
    }

    /// Collapses extent `index`. Takes the read guard by value and returns with every lock
    /// released, whatever happens.
    pub fn collapse(
        &self,
        guard: RwLockReadGuard<'_, ExtentTable>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        // Before anything is allocated: the mapping an install may cost must be there.
        if !self.maps.allows_install() {
            return Ok(ScanResult::MapLimit);
        }
        match self.config.order {
            CollapseOrder::Prealloc => self.collapse_prealloc(guard, index),
            CollapseOrder::Unlocked => self.collapse_unlocked(guard, index),
            CollapseOrder::Legacy => self.collapse_legacy(guard, index),
        }
    }

    fn collapse_prealloc(
        &self,
        guard: RwLockReadGuard<'_, ExtentTable>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        let start = Instant::now();
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.check_threshold(extent) {
            return Ok(r);
        }
        // [read] allocate and charge: a slow allocation stalls no fault and no I/O.
        let page = match self.alloc_and_charge() {
            Ok(p) => p,
            Err(r) => return Ok(r),
        };
        // [read] copy while the guest runs, recording what it writes meanwhile; then commit.
        self.copy_then_commit(guard, index, page, start)
    }

    fn collapse_unlocked(
        &self,
        guard: RwLockReadGuard<'_, ExtentTable>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        let start = Instant::now();
        if let Err(r) = self.check_threshold(guard.get(index).expect("index inside the table")) {
            return Ok(r);
        }
        drop(guard);
        // [no lock] allocate and charge.
        let page = match self.alloc_and_charge() {
            Ok(p) => p,
            Err(r) => return Ok(r),
        };
        // [read] revalidate what was checked unlocked, then copy as `prealloc` does.
        let guard = self.map.read().unwrap_or_else(|p| p.into_inner());
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.check_threshold(extent) {
            drop(guard);
            self.give_back(page);
            return Ok(self.revalidation_failed(r));
        }
        self.copy_then_commit(guard, index, page, start)
    }

    /// The rest of `prealloc` and `unlocked` from the read phase on: pre-copy under the read
    /// guard (taken by value), release it, then the write phase.
    fn copy_then_commit(
        &self,
        guard: RwLockReadGuard<'_, ExtentTable>,
        index: ExtentIndex,
        mut page: HugePage,
        start: Instant,
    ) -> Result<ScanResult, CollapseError> {
        let extent = guard.get(index).expect("index inside the table");
        let generation = match self.precopy(index, extent, &mut page) {
            Ok(g) => g,
            Err(r) => {
                let unprotected = self.unprotect(index, extent);
                drop(guard);
                self.give_back(page);
                unprotected?;
                return Ok(r);
            }
        };
        drop(guard);
        record(&self.stats.read_phase_ns, start.elapsed());
        self.unlocked_hook(index);
        self.commit(index, page, generation)
    }

    fn collapse_legacy(
        &self,
        guard: RwLockReadGuard<'_, ExtentTable>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        let start = Instant::now();
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.check_threshold(extent) {
            return Ok(r);
        }
        let generation = extent.generation();
        drop(guard);
        record(&self.stats.read_phase_ns, start.elapsed());
        self.unlocked_hook(index);

        // [write] everything from here on, allocation included: the order before the seed.
        let mut table = self.map.write().unwrap_or_else(|p| p.into_inner());
        let locked = Instant::now();
        let result = (|| {
            let extent = table.get(index).expect("index inside the table");
            if let Err(r) = self.revalidate(extent, generation) {
                return Ok(r);
            }
            let mut page = match self.alloc_and_charge() {
                Ok(p) => p,
                Err(r) => return Ok(r),
            };
            if let Err(r) = self.protect_and_copy(index, extent, &mut page) {
                let unprotected = self.unprotect(index, extent);
                self.give_back(page);
                unprotected?;
                return Ok(r);
            }
            self.remap(&mut table, index, page)
        })();
        drop(table);
        record(&self.stats.write_lock_ns, locked.elapsed());
        self.wake(index);
        result
    }

    fn unlocked_hook(&self, index: ExtentIndex) {
        if let Some(hook) = &self.before_commit {
            hook(index);
        }
    }

    /// Revalidates an extent under the write lock.
    fn revalidate(&self, extent: &Extent, generation: u64) -> Result<(), ScanResult> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(self.revalidation_failed(ScanResult::VmaCheck));
        }
        if extent.generation() != generation {
            self.stats
                .revalidate_changed
                .fetch_add(1, Ordering::Relaxed);
            return Err(self.revalidation_failed(ScanResult::Changed));
        }
        self.check_threshold(extent)
            .map_err(|r| self.revalidation_failed(r))
    }

    fn revalidation_failed(&self, r: ScanResult) -> ScanResult {
        self.stats.revalidate_failed.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// The write phase of `prealloc` and `unlocked`: revalidate, protect again, copy what the
    /// guest wrote since the pre-copy, move the huge page in.
    fn commit(
        &self,
        index: ExtentIndex,
        mut page: HugePage,
        generation: u64,
    ) -> Result<ScanResult, CollapseError> {
        let mut table = self.map.write().unwrap_or_else(|p| p.into_inner());
        let locked = Instant::now();
        let extent = table.get(index).expect("index inside the table");
        let result = match self.revalidate(extent, generation) {
            Err(r) => {
                let unprotected = self.unprotect(index, extent);
                self.give_back(page);
                unprotected.map(|()| r)
            }
            Ok(()) => {
                // Only the pages the handler let through since the pre-copy (the dirty ones)
                // lost their protection: protect those again, and the copy below is final.
                // The rest of the extent has stayed protected all along, so the write window
                // changes no more page-table entries than the guest actually wrote.
                let dirty: Vec<usize> = extent.dirty_pages().collect();
                match self.protect_pages(index, &dirty) {
                    Err(source) => {
                        let unprotected = self.unprotect(index, extent);
                        self.give_back(page);
                        unprotected?;
                        Err(CollapseError {
                            extent: index.0,
                            what: "protecting it again",
                            source,
                        })
                    }
                    Ok(()) => {
                        self.copy_pages(index, &mut page, dirty.into_iter());
                        self.remap(&mut table, index, page)
                    }
                }
            }
        };
        drop(table);
        record(&self.stats.write_lock_ns, locked.elapsed());
        self.wake(index);
        result
    }

    /// Moves the huge page over the extent (write lock held, extent protected and copied).
    fn remap(
        &self,
        table: &mut ExtentTable,
        index: ExtentIndex,
        page: HugePage,
    ) -> Result<ScanResult, CollapseError> {
        let dst = self.host(index);
        // SAFETY: `dst` is a 2 MiB-aligned extent of guest RAM, which stays mapped for the VM's
        // life and whose memslot KVM keeps in sync through its MMU notifier. The write lock is
        // held and the extent is write-protected and copied, so no reader of extent state and
        // no guest write can observe the switch half-done or lose data to it.
        let moved = unsafe { page.move_to(dst) };
        let extent = table.get_mut(index).expect("index inside the table");
        if let Err(failed) = moved {
            if failed.hole {
                // The page holds the whole extent, copied while it was protected.
                super::restore_hole(&self.ram, &self.uffd, index, Some(&failed.page)).map_err(
                    |source| CollapseError {
                        extent: index.0,
                        what: "mapping it again after a failed mremap unmapped it",
                        source,
                    },
                )?;
                extent.add_present(|_| true);
            }
            let unprotected = self.unprotect(index, extent);
            self.give_back(failed.page);
            unprotected?;
            log::warn!(
                "collapse: mremap of extent {} failed: {}",
                index.0,
                failed.source
            );
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return Ok(ScanResult::Fail);
        }
        extent.set_huge();
        self.maps.installed();
        self.stats.pages_collapsed.fetch_add(1, Ordering::Relaxed);
        Ok(ScanResult::Succeed)
    }

    /// Wakes writers that faulted on the extent's old mapping; they retry on the new one.
    fn wake(&self, index: ExtentIndex) {
        let _ = self.uffd.wake(self.host(index), EXTENT_SIZE);
    }
}

/// The collapse thread.
pub struct CollapseThread {
    worker: Worker,
    stopping: Arc<AtomicBool>,
}

impl CollapseThread {
    /// Starts khugepaged's loop over `collapser`'s extents. `sync` brings an extent's
    /// populated pages up to date before it is looked at (the host kernel populates them with
    /// `--page-source kernel`); `on_fatal` is called if the thread cannot go on.
    pub fn start(
        collapser: Collapser,
        sync: Box<dyn Fn(ExtentIndex) + Send>,
        seccomp: Seccomp,
        on_fatal: Arc<dyn Fn(String) + Send + Sync>,
    ) -> std::io::Result<CollapseThread> {
        let stopping = collapser.stopping.clone();
        let worker = Worker::spawn(
            "collapser",
            ThreadKind::Collapser,
            seccomp,
            move |stop| {
                scan_loop(&collapser, &*sync, stop)
                    .map_err(|e| format!("the collapse thread stopped: {e}"))
            },
            move |what| on_fatal(what),
        )?;
        Ok(CollapseThread { worker, stopping })
    }

    /// Stops the thread and waits for it (any collapse in progress completes or fails cleanly).
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.worker.stop();
    }
}

/// khugepaged's loop: scan a batch of extents, sleep, back off after a failure.
fn scan_loop(c: &Collapser, sync: &dyn Fn(ExtentIndex), stop: &Stop) -> Result<(), CollapseError> {
    let extents = c.map.read().unwrap_or_else(|p| p.into_inner()).len();
    let batch = (c.config.pages_to_scan / PAGES_PER_EXTENT as u64).max(1) as usize;
    let mut cursor = 0;
    if let Some(gate) = &c.config.gate {
        while !gate.load(Ordering::Acquire) {
            if stop.sleep(Duration::from_millis(1)) {
                return Ok(());
            }
        }
    }
    let started = Instant::now();
    loop {
        let mut back_off = false;
        for _ in 0..batch {
            if stop.is_set() {
                return Ok(());
            }
            let index = ExtentIndex(cursor);
            cursor = (cursor + 1) % extents;
            if cursor == 0 {
                c.stats.full_scans.fetch_add(1, Ordering::Relaxed);
                let table = c.map.read().unwrap_or_else(|p| p.into_inner());
                if table.counts().huge == extents as u64
                    && c.stats.all_huge_ns.load(Ordering::Relaxed) == 0
                {
                    let ns = (started.elapsed().as_nanos() as u64).max(1);
                    c.stats.all_huge_ns.store(ns, Ordering::Relaxed);
                }
            }
            sync(index);
            let guard = c.map.read().unwrap_or_else(|p| p.into_inner());
            match guard.get(index).map(Extent::state) {
                Some(ExtentState::Small { .. }) => {}
                _ => continue,
            }
            fail::fail_point!("collapse-scan");
            crate::seccomp::forbidden_call_point("seccomp-collapser");
            match c.collapse(guard, index)? {
                // Whatever failed (no page, no charge, an ioctl or the kernel's view out of
                // reach, such as EMFILE) is unlikely to succeed again at once.
                ScanResult::AllocHugePageFail | ScanResult::CgroupChargeFail | ScanResult::Fail => {
                    back_off = true;
                    break;
                }
                ScanResult::ExceedNonePte => {
                    c.stats.exceed_none_pte.fetch_add(1, Ordering::Relaxed);
                }
                // Said once by the budget; nothing more will be collapsed.
                ScanResult::MapLimit => return Ok(()),
                _ => {}
            }
        }
        let sleep = if back_off {
            c.config.alloc_sleep
        } else {
            c.config.scan_sleep
        };
        if stop.sleep(sleep) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    //! Protocol tests on real memory: a real userfaultfd, real THPs and real `mremap`, with
    //! an injected allocator (and ledger observer) that record which locks are held.
    use super::*;
    use crate::memory::backing::Backing;
    use crate::memory::fault::{FaultHandler, FaultStats, HandlerContext};
    use crate::memory::pool::{AllocError, alloc_thp};
    use crate::memory::source::ZeroSource;
    use crate::memory::uffd;
    use std::sync::mpsc;
    use std::sync::{Condvar, TryLockError};

    const EXTENTS: u64 = 4;
    /// Pages written in each extent; the rest stay unpopulated.
    const FILLED: usize = 500;

    struct Rig {
        ram: Arc<GuestRam>,
        map: Arc<MemoryMap>,
        uffd: Arc<Uffd>,
        _handler: FaultHandler,
    }

    fn value(gpa: u64, round: u64) -> u64 {
        gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round
    }

    fn rig() -> Option<Rig> {
        let features = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;
        let uffd = match Uffd::new(features) {
            Ok(u) if u.features() & features == features => Arc::new(u),
            _ => {
                eprintln!("SKIP: userfaultfd write-protection is not available here");
                return None;
            }
        };
        let ram = Arc::new(GuestRam::new(EXTENTS * EXTENT_SIZE, Backing::Small).unwrap());
        for e in 0..EXTENTS {
            for p in 0..FILLED as u64 {
                write(
                    &ram,
                    e * EXTENT_SIZE + p * PAGE_SIZE,
                    value(e * EXTENT_SIZE + p * PAGE_SIZE, 0),
                );
            }
        }
        let table = ExtentTable::new(ram.size());
        let base = ram.host_base().0 as u64;
        let present = kernel::present_pages(base, ram.size()).unwrap();
        for (i, extent) in table.iter() {
            extent.add_present(|p| present[i.0 * PAGES_PER_EXTENT + p]);
        }
        let map = Arc::new(MemoryMap::new(table));
        uffd.register(base, ram.size(), uffd::REGISTER_MODE_WP)
            .unwrap();
        let handler = FaultHandler::start(
            HandlerContext {
                uffd: uffd.clone(),
                map: map.clone(),
                ram: ram.clone(),
                source: Arc::new(ZeroSource),
                granularity: PAGE_SIZE,
                stats: Arc::new(FaultStats::default()),
                huge: None,
            },
            Seccomp::Off,
            |what| panic!("fault handler failed: {what}"),
        )
        .unwrap();
        Some(Rig {
            ram,
            map,
            uffd,
            _handler: handler,
        })
    }

    fn write(ram: &GuestRam, gpa: u64, v: u64) {
        let p = (ram.host_base().0 as u64 + gpa) as *mut u64;
        // SAFETY: `gpa` is inside the rig's RAM mapping, which outlives every test thread.
        unsafe { p.write_volatile(v) };
    }

    fn read(ram: &GuestRam, gpa: u64) -> u64 {
        let p = (ram.host_base().0 as u64 + gpa) as *const u64;
        // SAFETY: as in `write`.
        unsafe { p.read_volatile() }
    }

    /// Which locks the allocator (or the ledger) saw held by the collapsing thread.
    #[derive(Default)]
    struct Seen {
        write_locked: AtomicBool,
        any_locked: AtomicBool,
    }

    impl Seen {
        fn look(&self, map: &MemoryMap) {
            if matches!(map.try_read(), Err(TryLockError::WouldBlock)) {
                self.write_locked.store(true, Ordering::SeqCst);
            }
            match map.try_write() {
                Ok(guard) => drop(guard),
                Err(_) => self.any_locked.store(true, Ordering::SeqCst),
            }
        }
    }

    /// An allocator that records lock state and every page it hands out, and can fail.
    struct Probe {
        map: Arc<MemoryMap>,
        seen: Arc<Seen>,
        fail: bool,
        handed_out: Mutex<Vec<u64>>,
    }

    impl HugePageAllocator for Probe {
        fn alloc(&self) -> Result<HugePage, AllocError> {
            self.seen.look(&self.map);
            if self.fail {
                return Err(AllocError::GaveUp("injected failure".into()));
            }
            let page = alloc_thp()?;
            self.handed_out.lock().unwrap().push(page.addr());
            Ok(page)
        }
    }

    struct Setup {
        collapser: Collapser,
        probe: Arc<Probe>,
        alloc_seen: Arc<Seen>,
        charge_seen: Arc<Seen>,
    }

    fn setup(rig: &Rig, order: CollapseOrder, fail: bool, limit: u64) -> Setup {
        let alloc_seen = Arc::new(Seen::default());
        let charge_seen = Arc::new(Seen::default());
        let probe = Arc::new(Probe {
            map: rig.map.clone(),
            seen: alloc_seen.clone(),
            fail,
            handed_out: Mutex::new(Vec::new()),
        });
        let (map, seen) = (rig.map.clone(), charge_seen.clone());
        let ledger = Ledger::with_observer(limit, Box::new(move || seen.look(&map)));
        let collapser = Collapser {
            map: rig.map.clone(),
            ram: rig.ram.clone(),
            uffd: rig.uffd.clone(),
            source: None,
            allocator: probe.clone(),
            ledger: Arc::new(ledger),
            config: CollapseConfig {
                order,
                ..CollapseConfig::default()
            },
            stats: Arc::new(CollapseStats::default()),
            stopping: Arc::new(AtomicBool::new(false)),
            maps: Arc::new(MapBudget::new(0).unwrap()),
            kernel_populates: true,
            before_commit: None,
        };
        Setup {
            collapser,
            probe,
            alloc_seen,
            charge_seen,
        }
    }

    fn collapse(c: &Collapser, index: usize) -> ScanResult {
        let guard = c.map.read().unwrap();
        c.collapse(guard, ExtentIndex(index))
            .expect("no unrecoverable failure")
    }

    /// A write to `gpa` from another thread completes: the page is not left protected.
    fn assert_writable(ram: &Arc<GuestRam>, gpa: u64) {
        let (tx, rx) = mpsc::channel();
        let ram = ram.clone();
        std::thread::spawn(move || {
            let old = read(&ram, gpa);
            write(&ram, gpa, old);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
            panic!("a write to {gpa:#x} is still blocked: the extent was left write-protected")
        });
    }

    /// After a failed collapse: nothing charged, every page handed out unmapped again, the
    /// extent small, untracked and writable, its data intact.
    fn assert_left_as_before(rig: &Rig, s: &Setup, index: usize) {
        assert_eq!(s.collapser.ledger.charged(), 0);
        for &addr in s.probe.handed_out.lock().unwrap().iter() {
            let mut v = [0u8; 1];
            // SAFETY: mincore only reports on the range; ENOMEM means it is not mapped.
            let r = unsafe {
                libc::mincore(
                    addr as *mut libc::c_void,
                    PAGE_SIZE as usize,
                    v.as_mut_ptr(),
                )
            };
            assert_eq!(r, -1, "huge page {addr:#x} was not given back");
        }
        let table = rig.map.read().unwrap();
        let extent = table.get(ExtentIndex(index)).unwrap();
        assert!(matches!(extent.state(), ExtentState::Small { .. }));
        assert!(!extent.is_tracking());
        drop(table);
        let gpa = index as u64 * EXTENT_SIZE;
        assert_writable(&rig.ram, gpa);
        assert_writable(&rig.ram, gpa + (FILLED as u64 + 3) * PAGE_SIZE);
        assert_eq!(read(&rig.ram, gpa + PAGE_SIZE), value(gpa + PAGE_SIZE, 0));
    }

    #[test]
    fn prealloc_allocates_and_charges_outside_the_write_lock() {
        let Some(rig) = rig() else { return };
        for (index, order) in [
            (1, CollapseOrder::Prealloc),
            (2, CollapseOrder::Unlocked),
            (3, CollapseOrder::Legacy),
        ] {
            let s = setup(&rig, order, false, EXTENT_SIZE);
            assert_eq!(
                collapse(&s.collapser, index),
                ScanResult::Succeed,
                "{order:?}"
            );
            let (alloc_w, charge_w) = (
                s.alloc_seen.write_locked.load(Ordering::SeqCst),
                s.charge_seen.write_locked.load(Ordering::SeqCst),
            );
            let (alloc_any, charge_any) = (
                s.alloc_seen.any_locked.load(Ordering::SeqCst),
                s.charge_seen.any_locked.load(Ordering::SeqCst),
            );
            match order {
                CollapseOrder::Prealloc => {
                    assert!(
                        !alloc_w && !charge_w,
                        "prealloc allocated or charged under the write lock"
                    );
                    assert!(
                        alloc_any && charge_any,
                        "prealloc holds the read lock while allocating"
                    );
                }
                CollapseOrder::Unlocked => {
                    assert!(!alloc_any && !charge_any, "unlocked holds no lock")
                }
                // The positive control: the probe does see a write lock when one is held.
                CollapseOrder::Legacy => {
                    assert!(alloc_w && charge_w, "legacy allocates under the write lock")
                }
            }
            assert_eq!(s.collapser.ledger.charged(), EXTENT_SIZE);
            let stats = &s.collapser.stats;
            assert_eq!(stats.pages_collapsed.load(Ordering::SeqCst), 1);
            assert_eq!(stats.write_lock_ns.lock().unwrap().len(), 1);
        }
    }

    #[test]
    fn collapse_keeps_the_data_and_maps_the_extent_huge() {
        let Some(rig) = rig() else { return };
        let s = setup(&rig, CollapseOrder::Prealloc, false, EXTENT_SIZE);
        assert_eq!(collapse(&s.collapser, 2), ScanResult::Succeed);
        let gpa = 2 * EXTENT_SIZE;
        for p in 0..PAGES_PER_EXTENT as u64 {
            let expected = if p < FILLED as u64 {
                value(gpa + p * PAGE_SIZE, 0)
            } else {
                0
            };
            assert_eq!(read(&rig.ram, gpa + p * PAGE_SIZE), expected, "page {p}");
        }
        assert_eq!(
            rig.map.read().unwrap().get(ExtentIndex(2)).unwrap().state(),
            ExtentState::Huge
        );
        let host = rig.ram.host_base().0 as u64 + gpa;
        let smaps = kernel::smaps_totals(host, host + EXTENT_SIZE).unwrap();
        assert_eq!(
            smaps.anon_huge_kb, 2048,
            "the kernel maps the extent with one THP"
        );
        assert_writable(&rig.ram, gpa + 5 * PAGE_SIZE);
        // A second attempt finds it huge already.
        assert_eq!(collapse(&s.collapser, 2), ScanResult::PmdMapped);
    }

    #[test]
    fn revalidation_catches_an_extent_that_changed_while_unlocked() {
        let Some(rig) = rig() else { return };
        for order in [
            CollapseOrder::Prealloc,
            CollapseOrder::Unlocked,
            CollapseOrder::Legacy,
        ] {
            let mut s = setup(&rig, order, false, EXTENT_SIZE);
            let map = rig.map.clone();
            // As if the fault handler populated a page while no lock was held.
            s.collapser.before_commit = Some(Arc::new(move |index: ExtentIndex| {
                let page = index.gpa() + (FILLED as u64 + 1) * PAGE_SIZE;
                assert!(map.read().unwrap().mark_populated(page));
            }));
            assert_eq!(collapse(&s.collapser, 1), ScanResult::Changed, "{order:?}");
            assert_eq!(
                s.collapser.stats.revalidate_changed.load(Ordering::SeqCst),
                1
            );
            assert_left_as_before(&rig, &s, 1);
            // Forget the injected page again for the next order.
            let table = rig.map.read().unwrap();
            let present =
                kernel::present_pages(rig.ram.host_base().0 as u64 + EXTENT_SIZE, EXTENT_SIZE)
                    .unwrap();
            let extent = table.get(ExtentIndex(1)).unwrap();
            extent.clear_pages();
            extent.add_present(|p| present[p]);
        }
    }

    /// A move that unmaps the extent and then fails (as the kernel may, late in `mremap`):
    /// the extent is mapped again with its data, registered again, and collapses later.
    #[test]
    #[cfg(feature = "failpoints")]
    fn a_failed_move_that_left_a_hole_puts_the_extent_back() {
        let Some(rig) = rig() else { return };
        let scenario = fail::FailScenario::setup();
        fail::cfg("mremap-hole", "1*return").unwrap();
        let s = setup(&rig, CollapseOrder::Prealloc, false, EXTENT_SIZE);
        assert_eq!(collapse(&s.collapser, 3), ScanResult::Fail);
        assert_eq!(s.collapser.ledger.charged(), 0);
        let gpa = 3 * EXTENT_SIZE;
        for p in 0..FILLED as u64 {
            let at = gpa + p * PAGE_SIZE;
            assert_eq!(read(&rig.ram, at), value(at, 0), "page {p}");
        }
        assert_writable(&rig.ram, gpa + 7 * PAGE_SIZE);
        // Registered again for write-protection: the next collapse protects and succeeds.
        assert_eq!(collapse(&s.collapser, 3), ScanResult::Succeed);
        scenario.teardown();
    }

    #[test]
    fn stopping_fails_revalidation_cleanly() {
        let Some(rig) = rig() else { return };
        let mut s = setup(&rig, CollapseOrder::Prealloc, false, EXTENT_SIZE);
        let stopping = s.collapser.stopping.clone();
        s.collapser.before_commit = Some(Arc::new(move |_| stopping.store(true, Ordering::SeqCst)));
        assert_eq!(collapse(&s.collapser, 3), ScanResult::VmaCheck);
        assert_left_as_before(&rig, &s, 3);
    }

    #[test]
    fn allocation_and_charge_failures_leave_nothing_behind() {
        let Some(rig) = rig() else { return };
        for order in [
            CollapseOrder::Prealloc,
            CollapseOrder::Unlocked,
            CollapseOrder::Legacy,
        ] {
            let s = setup(&rig, order, true, EXTENT_SIZE);
            assert_eq!(
                collapse(&s.collapser, 0),
                ScanResult::AllocHugePageFail,
                "{order:?}"
            );
            assert_eq!(
                s.collapser
                    .stats
                    .collapse_alloc_failed
                    .load(Ordering::SeqCst),
                1
            );
            assert_left_as_before(&rig, &s, 0);

            let s = setup(&rig, order, false, EXTENT_SIZE - 1);
            assert_eq!(
                collapse(&s.collapser, 0),
                ScanResult::CgroupChargeFail,
                "{order:?}"
            );
            assert_eq!(s.probe.handed_out.lock().unwrap().len(), 1);
            assert_eq!(s.collapser.ledger.failures(), 1);
            assert_left_as_before(&rig, &s, 0);
        }
    }

    #[test]
    fn writes_during_a_collapse_are_never_lost() {
        let Some(rig) = rig() else { return };
        for (index, order) in [
            (1, CollapseOrder::Prealloc),
            (2, CollapseOrder::Unlocked),
            (3, CollapseOrder::Legacy),
        ] {
            let base = index as u64 * EXTENT_SIZE;
            let stop = Arc::new(AtomicBool::new(false));
            let rounds = Arc::new(AtomicU64::new(0));
            // A writer that keeps rewriting every page of the extent (populated or not).
            let writer = {
                let (ram, stop, rounds) = (rig.ram.clone(), stop.clone(), rounds.clone());
                std::thread::spawn(move || {
                    let mut round = 1;
                    while !stop.load(Ordering::SeqCst) {
                        for p in 0..PAGES_PER_EXTENT as u64 {
                            write(
                                &ram,
                                base + p * PAGE_SIZE,
                                value(base + p * PAGE_SIZE, round),
                            );
                        }
                        rounds.store(round, Ordering::SeqCst);
                        round += 1;
                    }
                    round - 1
                })
            };
            while rounds.load(Ordering::SeqCst) < 2 {
                std::thread::yield_now();
            }
            let mut s = setup(&rig, order, false, EXTENT_SIZE);
            // Give the writer time to write between the copy and the commit.
            s.collapser.before_commit =
                Some(Arc::new(|_| std::thread::sleep(Duration::from_millis(30))));
            assert_eq!(
                collapse(&s.collapser, index),
                ScanResult::Succeed,
                "{order:?}"
            );
            let after = rounds.load(Ordering::SeqCst);
            while rounds.load(Ordering::SeqCst) < after + 2 {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::SeqCst);
            let last = writer.join().unwrap();
            for p in 0..PAGES_PER_EXTENT as u64 {
                let gpa = base + p * PAGE_SIZE;
                assert_eq!(
                    read(&rig.ram, gpa),
                    value(gpa, last),
                    "{order:?}: page {p} lost a write"
                );
            }
        }
    }

    /// The seed commit's deadlock (DESIGN.md section 4): the pool is empty and is refilled only
    /// when an I/O backend finishes a request, which needs the memory map's read lock.
    struct Backend {
        requests: Mutex<mpsc::Sender<()>>,
        refilled: Arc<(Mutex<bool>, Condvar)>,
        gave_up: AtomicBool,
    }

    impl HugePageAllocator for Backend {
        fn alloc(&self) -> Result<HugePage, AllocError> {
            self.requests.lock().unwrap().send(()).unwrap();
            let (lock, cond) = &*self.refilled;
            let (refilled, timeout) = cond
                .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(2), |r| !*r)
                .unwrap();
            if timeout.timed_out() && !*refilled {
                self.gave_up.store(true, Ordering::SeqCst);
                return Err(AllocError::GaveUp(
                    "the I/O backend never finished: deadlock".into(),
                ));
            }
            alloc_thp()
        }
    }

    fn run_backend_scenario(rig: &Rig, order: CollapseOrder, index: usize) -> (ScanResult, bool) {
        let (tx, rx) = mpsc::channel::<()>();
        let refilled = Arc::new((Mutex::new(false), Condvar::new()));
        let backend = Arc::new(Backend {
            requests: Mutex::new(tx),
            refilled: refilled.clone(),
            gave_up: AtomicBool::new(false),
        });
        let io_thread = {
            let map = rig.map.clone();
            std::thread::spawn(move || {
                for () in rx {
                    // Completing the I/O needs the read side, like a userland backend
                    // that takes a page fault in its I/O path.
                    let _guard = map.read().unwrap();
                    *refilled.0.lock().unwrap() = true;
                    refilled.1.notify_all();
                }
            })
        };
        let mut s = setup(rig, order, false, EXTENT_SIZE);
        s.collapser.allocator = backend.clone();
        let result = collapse(&s.collapser, index);
        let deadlocked = backend.gave_up.load(Ordering::SeqCst);
        drop(s);
        drop(backend);
        io_thread.join().unwrap();
        (result, deadlocked)
    }

    #[test]
    fn the_seed_deadlock_happens_with_legacy_and_not_with_prealloc() {
        let Some(rig) = rig() else { return };
        let (result, deadlocked) = run_backend_scenario(&rig, CollapseOrder::Legacy, 1);
        assert!(
            deadlocked,
            "legacy order: the allocation should wait forever on the backend"
        );
        assert_eq!(result, ScanResult::AllocHugePageFail);
        let (result, deadlocked) = run_backend_scenario(&rig, CollapseOrder::Prealloc, 2);
        assert!(
            !deadlocked,
            "prealloc order: the backend shares the read lock and finishes"
        );
        assert_eq!(result, ScanResult::Succeed);
    }

    #[test]
    fn orders_parse() {
        assert_eq!("legacy".parse(), Ok(CollapseOrder::Legacy));
        assert!(
            "eager"
                .parse::<CollapseOrder>()
                .unwrap_err()
                .contains("prealloc, legacy or unlocked")
        );
    }
}
