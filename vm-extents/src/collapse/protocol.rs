//! One collapse, in each of the three lock orders.
//!
//! `prealloc`, the seed commit's order: with only the read side of the memory map held, the
//! page is allocated and charged, the extent is write-protected and copied into it while the
//! guest keeps running (writes to it are recorded as dirty by the fault handler, which lets
//! them through), and the pages the page source would have given are filled in. Then the write
//! side is taken briefly: revalidate, protect again the pages the guest wrote meanwhile, copy
//! those, move the page in ([`Installer::install`]). Writers of this extent, and only this
//! extent, wait for that window; the fault handler, whose read lock waited for exactly that,
//! then wakes them onto the new page.
//!
//! `unlocked` (today's kernel) allocates with no lock held, then does the same. `legacy` (the
//! order before the seed commit) does everything, the allocation included, under the write
//! side: a baseline for the benchmark and for the seed's deadlock test.
//!
//! [`Collapser::collapse`] takes the read guard by value, so "it returns with the lock
//! released" is a fact the compiler checks. Every failure leaves the extent unprotected and
//! untracked; the page gives itself back ([`Prepared`] uncharges and unmaps on drop).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::{EXTENT_SIZE, HostAddr, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::{CollapseConfig, CollapseOrder};
use super::stats::{CollapseStats, ScanResult};
use crate::extent::{Extent, ExtentIndex, ExtentState, PAGES_PER_EXTENT};
use crate::fault::source::{Fill, PageSource};
use crate::host_view;
use crate::huge::install::{
    Contents, Exclusive, InstallError, Installed, Installer, PrepareFailed, Prepared,
};
use crate::map::{MapRead, MapWrite, MemoryMap};
use crate::uffd::{Uffd, UffdSet};

/// Everything a collapse touches.
pub struct Collapser {
    /// The memory map lock (and through it guest RAM).
    pub map: Arc<MemoryMap>,
    /// The userfaultfds guest RAM is registered with in write-protect mode.
    pub uffds: Arc<UffdSet>,
    /// Where the contents of never-populated pages come from (`None`: zeroes).
    pub source: Option<Arc<dyn PageSource>>,
    /// Where pages come from and how they go in.
    pub installer: Installer,
    /// khugepaged's tunables.
    pub config: CollapseConfig,
    /// Counters, shared with the metrics.
    pub stats: Arc<CollapseStats>,
    /// Set when the VM is stopping; revalidation fails from then on.
    pub stopping: Arc<AtomicBool>,
    /// The host kernel populates pages (`--page-source kernel`): the table learns of them
    /// from the kernel.
    pub kernel_populates: bool,
    /// Called between the phases, with no lock held (tests: change the extent while the
    /// collapse is not looking).
    pub before_commit: Option<Arc<dyn Fn(ExtentIndex) + Send + Sync>>,
    /// An extent with this many pages given back and not touched since is not collapsed.
    pub reclaim_split: u32,
}

/// A failure that must end the collapse thread: an extent may be left protected, or gone.
#[derive(Debug, thiserror::Error)]
#[error("collapse of extent {extent} failed while {what}")]
pub struct CollapseError {
    /// The extent.
    pub extent: usize,
    /// What it was doing.
    pub what: &'static str,
    /// The failure beneath.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl Collapser {
    fn host(&self, index: ExtentIndex) -> HostAddr {
        self.map.ram().host_at(index.gpa())
    }

    /// The uffd extent `index` is registered with.
    fn uffd(&self, index: ExtentIndex) -> &Uffd {
        self.uffds.for_extent(index.0)
    }

    fn error(
        index: ExtentIndex,
        what: &'static str,
    ) -> impl FnOnce(std::io::Error) -> CollapseError {
        move |source| CollapseError {
            extent: index.0,
            what,
            source: Box::new(source),
        }
    }

    fn check_threshold(&self, extent: &Extent) -> Result<(), ScanResult> {
        if extent.is_claimed() {
            // Reclaim (or an install) holds it; its generation moves when it lets go.
            return Err(ScanResult::Changed);
        }
        if extent.reclaimed() >= self.reclaim_split {
            // No creep: the guest gave these pages back and has not touched them again.
            return Err(ScanResult::Reclaimed);
        }
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

    /// A page from the pool, charged, with the time it took and the outcome counted.
    fn prepare(&self) -> Result<Prepared<'_>, ScanResult> {
        let start = Instant::now();
        let page = self.installer.prepare(Contents::Copy);
        self.stats.alloc_ns.record(start.elapsed());
        match page {
            Ok(page) => {
                self.stats.collapse_alloc.inc();
                Ok(page)
            }
            Err(PrepareFailed::NoMapping) => Err(ScanResult::MapLimit),
            Err(PrepareFailed::Alloc(e)) => {
                log::debug!("huge page allocation failed: {e}");
                self.stats.collapse_alloc_failed.inc();
                Err(ScanResult::AllocHugePageFail)
            }
            Err(PrepareFailed::Charge(e)) => {
                log::debug!("{e}");
                self.stats.collapse_alloc.inc();
                self.stats.charge_failed.inc();
                Err(ScanResult::CgroupChargeFail)
            }
        }
    }

    /// Write-protects the extent and starts recording the guest's writes to it.
    fn protect_and_track(&self, index: ExtentIndex, extent: &Extent) -> std::io::Result<()> {
        extent.start_tracking();
        self.uffd(index)
            .write_protect(self.host(index), EXTENT_SIZE, true, false)
            .inspect_err(|_| extent.stop_tracking())
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
            self.uffd(index)
                .write_protect(start, (j - i) as u64 * PAGE_SIZE, true, false)?;
            i = j;
        }
        Ok(())
    }

    /// Stops tracking and lifts the protection, waking any writer.
    fn unprotect(&self, index: ExtentIndex, extent: &Extent) -> Result<(), CollapseError> {
        extent.stop_tracking();
        self.uffd(index)
            .write_protect(self.host(index), EXTENT_SIZE, false, true)
            .map_err(Self::error(index, "lifting write protection"))
    }

    /// Copies `pages` of the extent from guest memory into `page`. The copies are vm-memory's
    /// (raw, no reference over guest RAM is formed): a page let through to a writer may be
    /// changing while it is read, and is then dirty and copied again under the write lock.
    fn copy_pages(
        view: &GuestMemoryMmap,
        index: ExtentIndex,
        page: &mut Prepared<'_>,
        pages: impl Iterator<Item = usize>,
    ) {
        let dst = page.bytes_mut();
        for p in pages {
            let off = p * PAGE_SIZE as usize;
            view.read_slice(
                &mut dst[off..off + PAGE_SIZE as usize],
                GuestAddress(index.gpa() + off as u64),
            )
            .expect("the extent lies inside guest RAM");
        }
    }

    /// Fills the never-populated pages from the page source (they are zero already when there
    /// is none). Runs outside the write lock: the source may do I/O and allocate.
    fn fill_unpopulated(
        &self,
        index: ExtentIndex,
        extent: &Extent,
        page: &mut Prepared<'_>,
    ) -> Result<(), ScanResult> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let dst = page.bytes_mut();
        for p in (0..PAGES_PER_EXTENT).filter(|&p| !extent.is_populated(p)) {
            let off = p * PAGE_SIZE as usize;
            let gpa = index.gpa() + off as u64;
            match crate::reclaim::fill(
                &**source,
                extent,
                gpa,
                &mut dst[off..off + PAGE_SIZE as usize],
            ) {
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
        host_view::present_pages(self.host(index), EXTENT_SIZE)
    }

    /// Protects the extent, then copies every page the kernel has present. Asking the kernel
    /// (not the table) after protecting is what makes the copy complete: a page that becomes
    /// present later can only do so through a fault the handler records as dirty, while the
    /// table may lag behind the kernel (with `--page-source kernel` the kernel populates
    /// pages without telling anyone).
    fn protect_and_copy(
        &self,
        view: &GuestMemoryMmap,
        index: ExtentIndex,
        extent: &Extent,
        page: &mut Prepared<'_>,
    ) -> Result<(), ScanResult> {
        if let Err(e) = self.protect_and_track(index, extent) {
            self.stats.failed.inc();
            crate::log_ratelimited!(
                log::Level::Warn,
                "collapse: write-protecting extent {}: {e}",
                index.0
            );
            return Err(ScanResult::Fail);
        }
        let present = match self.present_pages(index) {
            Ok(p) => p,
            Err(e) => {
                self.stats.failed.inc();
                crate::log_ratelimited!(log::Level::Warn, "collapse: reading present pages: {e}");
                return Err(ScanResult::Fail);
            }
        };
        if self.kernel_populates {
            extent.add_present(|p| present[p]);
        }
        Self::copy_pages(
            view,
            index,
            page,
            (0..PAGES_PER_EXTENT).filter(|&p| present[p]),
        );
        self.fill_unpopulated(index, extent, page)
    }

    /// Collapses extent `index`. Takes the read guard by value and returns with every lock
    /// released, whatever happens.
    pub fn collapse(
        &self,
        guard: MapRead<'_>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        // Before anything is allocated: the mapping an install may cost must be there.
        if !self.installer.maps.allows_install() {
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
        guard: MapRead<'_>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        let start = Instant::now();
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.check_threshold(extent) {
            return Ok(r);
        }
        // [read] allocate and charge: a slow allocation stalls no fault and no I/O.
        let page = match self.prepare() {
            Ok(p) => p,
            Err(r) => return Ok(r),
        };
        self.copy_then_commit(guard, index, page, start)
    }

    fn collapse_unlocked(
        &self,
        guard: MapRead<'_>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        let start = Instant::now();
        if let Err(r) = self.check_threshold(guard.get(index).expect("index inside the table")) {
            return Ok(r);
        }
        drop(guard);
        // [no lock] allocate and charge.
        let page = match self.prepare() {
            Ok(p) => p,
            Err(r) => return Ok(r),
        };
        // [read] revalidate what was checked unlocked, then copy as `prealloc` does.
        let guard = self.map.read();
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.check_threshold(extent) {
            return Ok(self.revalidation_failed(r));
        }
        self.copy_then_commit(guard, index, page, start)
    }

    /// The rest of `prealloc` and `unlocked` from the pre-copy on: copy under the read guard
    /// (taken by value), release it, then the write phase.
    fn copy_then_commit(
        &self,
        guard: MapRead<'_>,
        index: ExtentIndex,
        mut page: Prepared<'_>,
        start: Instant,
    ) -> Result<ScanResult, CollapseError> {
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.protect_and_copy(guard.view(), index, extent, &mut page) {
            self.unprotect(index, extent)?;
            return Ok(r);
        }
        let generation = extent.generation();
        drop(guard);
        self.stats.read_phase_ns.record(start.elapsed());
        self.unlocked_hook(index);
        self.commit(index, page, generation)
    }

    fn collapse_legacy(
        &self,
        guard: MapRead<'_>,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        let start = Instant::now();
        let extent = guard.get(index).expect("index inside the table");
        if let Err(r) = self.check_threshold(extent) {
            return Ok(r);
        }
        let generation = extent.generation();
        drop(guard);
        self.stats.read_phase_ns.record(start.elapsed());
        self.unlocked_hook(index);

        // [write] everything from here on, allocation included: the order before the seed.
        let mut table = self.map.write();
        let locked = Instant::now();
        let result = (|| {
            let extent = table.get(index).expect("index inside the table");
            if let Err(r) = self.revalidate(extent, generation) {
                return Ok(r);
            }
            let mut page = match self.prepare() {
                Ok(p) => p,
                Err(r) => return Ok(r),
            };
            if let Err(r) = self.protect_and_copy(table.view(), index, extent, &mut page) {
                self.unprotect(index, extent)?;
                return Ok(r);
            }
            self.install(&mut table, index, page)
        })();
        drop(table);
        self.stats.write_lock_ns.record(locked.elapsed());
        self.stats.commit_ns.record(locked.elapsed());
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
            self.stats.revalidate_changed.inc();
            return Err(self.revalidation_failed(ScanResult::Changed));
        }
        self.check_threshold(extent)
            .map_err(|r| self.revalidation_failed(r))
    }

    fn revalidation_failed(&self, r: ScanResult) -> ScanResult {
        self.stats.revalidate_failed.inc();
        r
    }

    /// The write phase of `prealloc` and `unlocked`: revalidate, protect again, copy what the
    /// guest wrote since the pre-copy, put the page in.
    fn commit(
        &self,
        index: ExtentIndex,
        page: Prepared<'_>,
        generation: u64,
    ) -> Result<ScanResult, CollapseError> {
        if self.installer.moves(&page, Contents::Copy) {
            self.commit_by_move(index, page, generation)
        } else {
            self.commit_by_mremap(index, page, generation)
        }
    }

    /// A commit whose page goes in by `UFFDIO_MOVE`. The memory map's write side is held only
    /// for what needs it: revalidating the extent and claiming it. Holding the write side is
    /// what makes the claim exclusive: no fault handler is inside the extent then (each holds
    /// the read side while it acts on one), and every one after finds the claim and holds its
    /// fault for us. The rest (protect the dirty pages again, copy them, zap the old pages,
    /// move the page in) runs under the claim with the read side: faults on other extents,
    /// and kernel-served ones, go on meanwhile; accesses to this extent wait, as they must.
    fn commit_by_move(
        &self,
        index: ExtentIndex,
        mut page: Prepared<'_>,
        generation: u64,
    ) -> Result<ScanResult, CollapseError> {
        let mut table = self.map.write();
        let locked = Instant::now();
        let extent = table.get(index).expect("index inside the table");
        if let Err(r) = self.revalidate(extent, generation) {
            let result = self.unprotect(index, extent).map(|()| r);
            drop(table);
            self.stats.write_lock_ns.record(locked.elapsed());
            self.stats.commit_ns.record(locked.elapsed());
            self.wake(index);
            return result;
        }
        // Only 2 MiB faults claim extents, and only unpopulated ones; this one is populated.
        let ticket = table
            .claim_for_later(index)
            .expect("nobody else claims a populated extent");
        drop(table);
        self.stats.write_lock_ns.record(locked.elapsed());

        let guard = self.map.read();
        let claim = guard.redeem(ticket);
        let extent = claim.extent();
        let dirty: Vec<usize> = extent.dirty_pages().collect();
        let result = match self.protect_pages(index, &dirty) {
            Err(source) => {
                self.unprotect(index, extent)?;
                Err(Self::error(index, "protecting it again")(source))
            }
            Ok(()) => {
                Self::copy_pages(guard.view(), index, &mut page, dirty.into_iter());
                let installed =
                    self.installer
                        .install(Exclusive::Claim(&claim), index, page, Contents::Copy);
                self.settle(installed, extent, index)
            }
        };
        drop(claim);
        drop(guard);
        self.stats.commit_ns.record(locked.elapsed());
        self.wake(index);
        result
    }

    /// A commit whose page goes in by `mremap`, all of it under the write side: the `mremap`
    /// takes the kernel's `mmap_lock` for write and splits guest RAM's mapping, and if it
    /// fails part-way the hole it leaves must be refilled before anyone touches the extent.
    fn commit_by_mremap(
        &self,
        index: ExtentIndex,
        mut page: Prepared<'_>,
        generation: u64,
    ) -> Result<ScanResult, CollapseError> {
        let mut table = self.map.write();
        let locked = Instant::now();
        let extent = table.get(index).expect("index inside the table");
        let result = match self.revalidate(extent, generation) {
            Err(r) => self.unprotect(index, extent).map(|()| r),
            Ok(()) => {
                // Only the pages the handler let through since the pre-copy (the dirty ones)
                // lost their protection: protect those again, and the copy below is final.
                // The rest of the extent stayed protected all along, so the write window
                // changes no more page-table entries than the guest actually wrote.
                let dirty: Vec<usize> = extent.dirty_pages().collect();
                match self.protect_pages(index, &dirty) {
                    Err(source) => {
                        self.unprotect(index, extent)?;
                        Err(Self::error(index, "protecting it again")(source))
                    }
                    Ok(()) => {
                        Self::copy_pages(table.view(), index, &mut page, dirty.into_iter());
                        self.install(&mut table, index, page)
                    }
                }
            }
        };
        drop(table);
        self.stats.write_lock_ns.record(locked.elapsed());
        self.stats.commit_ns.record(locked.elapsed());
        self.wake(index);
        result
    }

    /// Moves the page over the extent (write lock held, extent protected and copied).
    fn install(
        &self,
        table: &mut MapWrite<'_>,
        index: ExtentIndex,
        page: Prepared<'_>,
    ) -> Result<ScanResult, CollapseError> {
        let installed =
            self.installer
                .install(Exclusive::Table(table), index, page, Contents::Copy);
        self.settle(
            installed,
            table.get(index).expect("index inside the table"),
            index,
        )
    }

    /// Counts how an install ended, and puts the extent back in service where it stayed small.
    fn settle(
        &self,
        installed: Result<Installed, InstallError>,
        extent: &Extent,
        index: ExtentIndex,
    ) -> Result<ScanResult, CollapseError> {
        match installed {
            Ok(Installed::Huge(_)) => {
                self.stats.pages_collapsed.inc();
                Ok(ScanResult::Succeed)
            }
            Ok(Installed::Small) => {
                // The copy is in, as 4 KiB pages: the extent is whole, just not huge.
                self.unprotect(index, extent)?;
                self.stats.failed.inc();
                self.stats.split_moves.inc();
                Ok(ScanResult::Fail)
            }
            Err(InstallError::Failed(failed)) => {
                self.unprotect(index, extent)?;
                log::warn!("collapse: {failed}: {}", failed.source);
                self.stats.failed.inc();
                Ok(ScanResult::Fail)
            }
            Err(InstallError::Lost(lost)) => Err(CollapseError {
                extent: index.0,
                what: "moving the huge page in",
                source: Box::new(lost),
            }),
        }
    }

    /// Wakes writers that faulted on the extent's old mapping; they retry on the new one.
    fn wake(&self, index: ExtentIndex) {
        let _ = self.uffd(index).wake(self.host(index), EXTENT_SIZE);
    }
}
