//! Reclaim: guest memory the guest reports free is given back to the host, per 2 MiB extent,
//! without giving up the huge pages of what it still uses.
//!
//! A report is a batch of guest-physical ranges (4 KiB aligned), the analogue of
//! virtio-balloon's free page reporting. Once [`Reclaimer::report`] returns, the guest owns the
//! ranges again but their contents are gone: the next touch reads zeroes whatever the page
//! source (an image-backed page must not come back with the image's data). What happens to an
//! extent depends on its state:
//!
//! - **huge, wholly freed**: the 2 MiB page is discarded (`MADV_DONTNEED` for a THP; a hugetlb
//!   page is replaced by fresh 4 KiB memory, which frees it to the pool), its charge is
//!   uncharged, and the extent is unpopulated again;
//! - **huge, freed at or above the split threshold** (THP): the freed 4 KiB pages are
//!   discarded, the kernel splits the page's mapping, and the extent is one of 4 KiB pages,
//!   the kept ones populated; its charge is uncharged;
//! - **huge, freed below the threshold** (or hugetlb, partly): the huge page is kept and the
//!   freed pages are zeroed in place; the bytes kept are counted;
//! - **small or unpopulated**: the freed pages are discarded.
//!
//! Every page given back is marked in the extent table until the guest touches it again: the
//! fault handlers, the collapse and the prefetcher read it as zeroes, and the collapse does not
//! re-inflate an extent that still has [`CollapseConfig`](crate::CollapseConfig)'s threshold
//! or more such pages (no creep: the guest has to touch the memory back first).
//!
//! The protocol: an extent's claim is taken with the memory map's write side held (briefly:
//! only the claim flags are set; no fault handler is inside a claimed extent after that, and a
//! collapse's commit finds the extent claimed or its generation moved), then the discards run
//! with the read side and the claim, as a 2 MiB fault's install does. Faults in a claimed
//! extent wait for the claimant, who wakes them when it lets go.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::GuestAddress;

use crate::backing::Backing;
use crate::extent::{Extent, ExtentClaim, ExtentIndex, PAGES_PER_EXTENT, PageMask, mask_has};
use crate::fault::source::{Fill, PageSource};
use crate::huge::ledger::Ledger;
use crate::huge::page::PageKind;
use crate::map::MemoryMap;
use crate::ram_image::RamImageError;
use crate::stats::{Counter, Latencies};
use crate::uffd::UffdSet;
use crate::{EXTENT_SIZE, HostAddr, PAGE_SIZE};

/// The default split threshold: a huge extent with this many 4 KiB pages freed (a quarter of
/// it, 512 KiB) is split and the freed pages given back; with fewer, the huge page is kept.
/// Below a quarter, what a split returns is worth less than the TLB reach it costs the kept
/// three quarters; the same number bounds how much a collapse may re-inflate (none: an extent
/// is collapsed again only with fewer than this many pages still given back).
pub const SPLIT_PAGES: u32 = 128;

/// How a huge extent freed from the split threshold gives its freed pages back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartialFree {
    /// Demote it: write-protect it, copy the kept pages into fresh 4 KiB memory, put that in
    /// place of the huge page with one `mremap`. The whole huge page goes back to the host at
    /// once. Needs guest RAM watched for write-protect faults (the collapse thread on); where
    /// it is not, a THP is split as with `Discard`.
    #[default]
    Copy,
    /// `MADV_DONTNEED` the freed pages, as a 4 KiB balloon does: no copy, but the kernel
    /// splits the THP's mapping and returns the freed part only when its deferred-split
    /// shrinker runs (under memory pressure), though `Rss` drops at once. Hugetlb pages are
    /// demoted all the same (they cannot be discarded in part).
    Discard,
}

crate::choice::choices!(PartialFree {
    Copy = "copy": "copy the kept pages into 4 KiB pages and free the whole huge page at once",
    Discard = "discard": "discard the freed pages (MADV_DONTNEED); the kernel frees a THP's part lazily",
});

/// The most ranges one report may carry.
pub const MAX_RANGES: usize = 1024;

/// What reclaim has done (the `reclaim` section of the metrics).
#[derive(Debug, Default, Serialize)]
pub struct ReclaimStats {
    /// Reports received.
    pub reports: Counter,
    /// Bytes the guest reported free.
    pub reported_bytes: Counter,
    /// Bytes given back by discarding whole huge pages.
    pub discarded_huge_bytes: Counter,
    /// Bytes given back by splitting huge pages (the freed part).
    pub split_bytes: Counter,
    /// Bytes of 4 KiB pages given back.
    pub small_bytes: Counter,
    /// Huge extents discarded whole.
    pub extents_discarded: Counter,
    /// Huge extents split (THP: the freed pages discarded, the kept ones left mapped).
    pub extents_split: Counter,
    /// Hugetlb extents demoted: the kept pages copied into 4 KiB pages put in place of the
    /// hugetlb page, which goes back to the pool.
    pub extents_demoted: Counter,
    /// Huge extents kept (freed below the threshold, or hugetlb freed in part), their freed
    /// pages zeroed in place.
    pub huge_kept: Counter,
    /// Bytes reported free but kept in those huge pages.
    pub kept_bytes: Counter,
    /// Faults on pages given back: the guest touched them again (each reads zeroes).
    pub refaults: Counter,
    /// Bytes given back that a huge page brought back without the guest touching them (a
    /// collapse of an extent with fewer than the split threshold of such pages left).
    pub reinflated_bytes: Counter,
    /// How long one report took, claims and discards included.
    pub report_ns: Latencies,
    /// Passes the zero-page shrinker finished over all of RAM.
    pub shrinker_passes: Counter,
    /// Bytes of present pages the shrinker read.
    pub shrinker_scanned_bytes: Counter,
    /// Bytes the shrinker gave back (the rest of what reclaim gave back was reported).
    pub shrinker_bytes: Counter,
    /// Extents the shrinker left for its next pass: someone else held them, or the collapse
    /// thread was copying them.
    pub shrinker_busy: Counter,
}

impl ReclaimStats {
    /// Bytes given back to the host, all causes.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.discarded_huge_bytes.get() + self.split_bytes.get() + self.small_bytes.get()
    }
}

/// Why a report was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// Too many ranges in one report.
    #[error("a report of {0} ranges (at most {MAX_RANGES})")]
    TooManyRanges(usize),
    /// A range that is not whole 4 KiB pages.
    #[error("the range at {:#x} (+{len:#x}) is not whole 4 KiB pages", addr.0)]
    Unaligned {
        /// Its start.
        addr: GuestAddress,
        /// Its length.
        len: u64,
    },
    /// A range outside guest RAM (or across a gap between regions).
    #[error("the range at {:#x} (+{len:#x}) is not guest RAM", addr.0)]
    NotRam {
        /// Its start.
        addr: GuestAddress,
        /// Its length.
        len: u64,
    },
    /// The host refused to discard memory.
    #[error("giving back extent {extent} failed while {what}")]
    Discard {
        /// Which extent.
        extent: usize,
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// What one report did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Bytes reported.
    pub reported: u64,
    /// Bytes given back to the host.
    pub given_back: u64,
    /// Bytes kept in huge pages (zeroed).
    pub kept: u64,
}

/// Gives back what the guest reports free. Cheap to clone; callable from any thread (a vCPU's
/// exit handler, a balloon device), one report at a time or several at once.
#[derive(Clone)]
pub struct Reclaimer {
    inner: Arc<Inner>,
}

struct Inner {
    map: Arc<MemoryMap>,
    uffds: Option<Arc<UffdSet>>,
    ledger: Arc<Ledger>,
    /// How all of RAM is backed. With 4 KiB pages, a huge extent holds a charged pool page
    /// (discarding it uncharges it); with hugetlb for all of RAM, the pages are the VM's
    /// reservation, reserved up front, and a report only zeroes them (giving one back to the
    /// pool would return nothing to the host).
    backing: Backing,
    split_pages: u32,
    partial: PartialFree,
    stats: Arc<ReclaimStats>,
}

impl std::fmt::Debug for Reclaimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reclaimer")
            .field("split_pages", &self.inner.split_pages)
            .finish_non_exhaustive()
    }
}

impl Reclaimer {
    pub(crate) fn new(
        map: Arc<MemoryMap>,
        uffds: Option<Arc<UffdSet>>,
        ledger: Arc<Ledger>,
        backing: Backing,
        split_pages: u32,
        partial: PartialFree,
        stats: Arc<ReclaimStats>,
    ) -> Self {
        Reclaimer {
            inner: Arc::new(Inner {
                map,
                uffds,
                ledger,
                backing,
                split_pages,
                partial,
                stats,
            }),
        }
    }

    /// Reclaim's counters.
    pub fn stats(&self) -> &Arc<ReclaimStats> {
        &self.inner.stats
    }

    /// Starts the zero-page shrinker over this reclaimer's memory.
    pub(crate) fn start_shrinker(
        &self,
        rate: u64,
        hook: &crate::ThreadHook,
        on_fatal: crate::OnFailure,
    ) -> io::Result<shrinker::Shrinker> {
        shrinker::Shrinker::start(self.inner.clone(), rate, hook, on_fatal)
    }

    /// Gives back the guest-physical `ranges` (each whole 4 KiB pages of guest RAM). When it
    /// returns, every page in them reads as zeroes. A bad range refuses the whole report
    /// before anything is discarded.
    pub fn report(&self, ranges: &[(GuestAddress, u64)]) -> Result<Reclaimed, ReclaimError> {
        let started = Instant::now();
        let freed = self.inner.freed_by_extent(ranges)?;
        let reported: u64 = ranges.iter().map(|r| r.1).sum();
        let stats = &self.inner.stats;
        stats.reports.inc();
        stats.reported_bytes.add(reported);
        let mut done = Reclaimed {
            reported,
            ..Reclaimed::default()
        };
        let result = self.inner.give_back_all(freed, &mut done);
        stats.report_ns.record(started.elapsed());
        result.map(|()| done)
    }
}

/// Fills `buf` with the contents of RAM at `offset` (pages of `extent`) as the guest must see
/// them: the page source's, but zeroes for every page given back and not touched since.
pub(crate) fn fill(
    source: &dyn PageSource,
    extent: &Extent,
    offset: u64,
    buf: &mut [u8],
) -> Result<Fill, RamImageError> {
    let first = ((offset % EXTENT_SIZE) / PAGE_SIZE) as usize;
    let pages = buf.len() / PAGE_SIZE as usize;
    if !extent.any_reclaimed(first, pages) {
        return source.fill(offset, buf);
    }
    if (first..first + pages).all(|p| extent.is_reclaimed(p)) {
        buf.fill(0);
        return Ok(Fill::Zero);
    }
    if source.fill(offset, buf)? == Fill::Zero {
        buf.fill(0);
    }
    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
        if extent.is_reclaimed(first + i) {
            page.fill(0);
        }
    }
    Ok(Fill::Data)
}

/// How long a report waits before asking again for a claim someone else holds (a 2 MiB fault
/// or the prefetcher filling the extent: they let go within one install).
const CLAIM_RETRY: Duration = Duration::from_micros(50);

impl Inner {
    /// The freed pages of each extent the ranges touch.
    fn freed_by_extent(
        &self,
        ranges: &[(GuestAddress, u64)],
    ) -> Result<BTreeMap<ExtentIndex, PageMask>, ReclaimError> {
        if ranges.len() > MAX_RANGES {
            return Err(ReclaimError::TooManyRanges(ranges.len()));
        }
        let ram = self.map.ram();
        let mut freed: BTreeMap<ExtentIndex, PageMask> = BTreeMap::new();
        for &(addr, len) in ranges {
            if !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
                return Err(ReclaimError::Unaligned { addr, len });
            }
            if len == 0 {
                continue;
            }
            let offset = ram.offset_of(addr);
            let last = addr
                .0
                .checked_add(len - 1)
                .and_then(|l| ram.offset_of(GuestAddress(l)));
            let (Some(offset), Some(last)) = (offset, last) else {
                return Err(ReclaimError::NotRam { addr, len });
            };
            if last - offset != len - 1 {
                return Err(ReclaimError::NotRam { addr, len });
            }
            for page in (offset..offset + len).step_by(PAGE_SIZE as usize) {
                let p = ((page % EXTENT_SIZE) / PAGE_SIZE) as usize;
                freed.entry(ExtentIndex::of(page)).or_default()[p / 64] |= 1 << (p % 64);
            }
        }
        Ok(freed)
    }

    /// Claims every extent (under the write side), gives each back (under the read side and
    /// its claim), and wakes its waiters; extents someone else has claimed are asked for again.
    fn give_back_all(
        &self,
        mut pending: BTreeMap<ExtentIndex, PageMask>,
        done: &mut Reclaimed,
    ) -> Result<(), ReclaimError> {
        let mut first_error = None;
        while !pending.is_empty() {
            let mut tickets = Vec::new();
            {
                let mut table = self.map.write();
                pending.retain(|&index, freed| match table.claim_for_later(index) {
                    Some(ticket) => {
                        tickets.push((index, ticket, *freed));
                        false
                    }
                    None => true,
                });
            }
            let guard = self.map.read();
            for (index, ticket, freed) in tickets {
                let claim = guard.redeem(ticket);
                // Every claim is redeemed and let go, whatever fails.
                if let Err(e) = self.give_back(&claim, index, &freed, done) {
                    first_error.get_or_insert(e);
                }
                drop(claim);
                self.wake(index);
            }
            drop(guard);
            if !pending.is_empty() {
                std::thread::sleep(CLAIM_RETRY);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Wakes every thread waiting on a fault in extent `index`: a claimant's last step, once it
    /// let go (a fault that found the extent claimed left its thread to the claimant).
    fn wake(&self, index: ExtentIndex) {
        if let Some(uffds) = &self.uffds {
            let _ = uffds
                .for_extent(index.0)
                .wake(self.host(index), EXTENT_SIZE);
        }
    }

    fn host(&self, index: ExtentIndex) -> HostAddr {
        self.map.ram().host_at(index.gpa())
    }

    /// Gives back the `freed` pages of one claimed extent, by its state.
    fn give_back(
        &self,
        claim: &ExtentClaim<'_>,
        index: ExtentIndex,
        freed: &PageMask,
        done: &mut Reclaimed,
    ) -> Result<(), ReclaimError> {
        fail::fail_point!("reclaim-extent", |_| Err(ReclaimError::Discard {
            extent: index.0,
            what: "discarding (injected)",
            source: io::Error::from_raw_os_error(libc::EIO),
        }));
        let extent = claim.extent();
        let count: u32 = freed.iter().map(|w| w.count_ones()).sum();
        let bytes = u64::from(count) * PAGE_SIZE;
        let failed = |what| {
            move |source| ReclaimError::Discard {
                extent: index.0,
                what,
                source,
            }
        };
        let stats = &self.stats;
        // What became of a huge extent: kept (its freed pages zeroed), or its page gone, counted
        // under `extents` and `bytes_counter`.
        enum Huge<'s> {
            Kept,
            Gone {
                extents: &'s Counter,
                bytes_counter: &'s Counter,
                bytes: u64,
            },
        }
        let all_freed = count as usize == PAGES_PER_EXTENT;
        let outcome = match extent.huge_kind() {
            None => {
                // What the host holds there, whoever populated it (the kernel, a page server,
                // our handlers): the table knows only its own.
                let present = crate::host_view::present_pages(self.host(index), EXTENT_SIZE)
                    .map_err(failed("reading which pages are present"))?;
                let populated = (0..PAGES_PER_EXTENT)
                    .filter(|&p| mask_has(freed, p) && present[p])
                    .count() as u64;
                self.discard_pages(index, freed)
                    .map_err(failed("discarding 4 KiB pages"))?;
                claim.give_back(freed);
                stats.small_bytes.add(populated * PAGE_SIZE);
                done.given_back += populated * PAGE_SIZE;
                return Ok(());
            }
            // All of RAM is the VM's hugetlb reservation: zero, keep.
            Some(_) if self.backing == Backing::Hugetlb => Huge::Kept,
            Some(kind) if all_freed => {
                match kind {
                    PageKind::Thp => self.discard(self.host(index), EXTENT_SIZE),
                    // Fresh memory in one mmap over it frees the hugetlb page; no access
                    // ever finds a hole.
                    PageKind::Hugetlb => {
                        self.map_ram().replace_with_fresh(index.gpa(), EXTENT_SIZE)
                    }
                }
                .map_err(failed("discarding the huge page"))?;
                Huge::Gone {
                    extents: &stats.extents_discarded,
                    bytes_counter: &stats.discarded_huge_bytes,
                    bytes: EXTENT_SIZE,
                }
            }
            Some(kind)
                if count >= self.split_pages
                    && (kind == PageKind::Hugetlb || self.partial == PartialFree::Copy)
                    && self
                        .demote(index, freed)
                        .map_err(failed("demoting the huge page"))? =>
            {
                Huge::Gone {
                    extents: &stats.extents_demoted,
                    bytes_counter: &stats.split_bytes,
                    bytes,
                }
            }
            // A THP that cannot be demoted (nothing write-protects guest RAM), or by choice:
            // the freed pages discarded, the mapping split.
            Some(PageKind::Thp) if count >= self.split_pages => {
                self.discard_pages(index, freed)
                    .map_err(failed("splitting the huge page"))?;
                Huge::Gone {
                    extents: &stats.extents_split,
                    bytes_counter: &stats.split_bytes,
                    bytes,
                }
            }
            Some(_) => Huge::Kept,
        };
        match outcome {
            Huge::Kept => {
                self.zero_pages(index, freed);
                stats.huge_kept.inc();
                stats.kept_bytes.add(bytes);
                done.kept += bytes;
            }
            Huge::Gone {
                extents,
                bytes_counter,
                bytes,
            } => {
                self.watch_again(claim, index, freed)
                    .map_err(failed("registering the extent again"))?;
                self.uncharge();
                extents.inc();
                bytes_counter.add(bytes);
                done.given_back += bytes;
            }
        }
        Ok(())
    }

    fn uncharge(&self) {
        if self.backing == Backing::Small {
            self.ledger.uncharge(EXTENT_SIZE);
        }
    }

    /// The runs of `freed` pages in extent `index`, as host ranges.
    fn runs(&self, index: ExtentIndex, freed: &PageMask) -> Vec<(HostAddr, u64)> {
        let base = self.host(index);
        let mut runs = Vec::new();
        let mut p = 0;
        while p < PAGES_PER_EXTENT {
            if !mask_has(freed, p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < PAGES_PER_EXTENT && mask_has(freed, p) {
                p += 1;
            }
            runs.push((
                base + start as u64 * PAGE_SIZE,
                (p - start) as u64 * PAGE_SIZE,
            ));
        }
        runs
    }

    fn discard_pages(&self, index: ExtentIndex, freed: &PageMask) -> io::Result<()> {
        for (at, len) in self.runs(index, freed) {
            self.discard(at, len)?;
        }
        Ok(())
    }

    /// `MADV_DONTNEED`: the pages are gone; the next touch faults (to our handler, which
    /// fills zeroes for a page given back, or to the kernel's zero fill, or to the page
    /// server as a remove event first).
    fn discard(&self, at: HostAddr, len: u64) -> io::Result<()> {
        // SAFETY: `at..at+len` is guest RAM inside an extent we hold the claim of; the guest
        // gave its contents up.
        if unsafe { libc::madvise(at.as_ptr(), len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Zeroes the freed pages of a huge extent that stays huge.
    fn zero_pages(&self, index: ExtentIndex, freed: &PageMask) {
        for (at, len) in self.runs(index, freed) {
            // SAFETY: guest RAM inside a claimed huge extent, mapped (a huge page never
            // faults); the guest gave these pages up, and a vCPU writing them meanwhile
            // writes its own free memory.
            unsafe { std::ptr::write_bytes(at.as_ptr::<u8>(), 0, len as usize) };
        }
    }

    /// Demotes a hugetlb extent to 4 KiB pages holding what was not `freed`, freeing the
    /// hugetlb page; false (nothing changed) where the extent cannot be write-protected (no
    /// userfaultfd watches guest RAM for write-protect faults). The extent is write-protected
    /// first, so a guest write to a kept page waits (its fault finds the extent claimed) while
    /// the kept pages are copied into fresh memory off to the side, which one `mremap` then
    /// puts in place of the hugetlb page: the waiting writers retry on their page there.
    fn demote(&self, index: ExtentIndex, freed: &PageMask) -> io::Result<bool> {
        use crate::uffd::REGISTER_MODE_WP;
        let Some(uffd) = self.uffds.as_ref().map(|u| u.for_extent(index.0)) else {
            return Ok(false);
        };
        let mode = uffd.registered_mode();
        if mode & REGISTER_MODE_WP == 0 {
            return Ok(false);
        }
        let at = self.host(index);
        // The page came in by `mremap`: a mapping the uffd does not watch yet.
        uffd.register(at, EXTENT_SIZE, mode)?;
        uffd.write_protect(at, EXTENT_SIZE, true, false)?;
        let staging = match self.map_ram().map_staging(EXTENT_SIZE) {
            Ok(s) => s,
            Err(e) => {
                let _ = uffd.write_protect(at, EXTENT_SIZE, false, true);
                return Err(e);
            }
        };
        for p in (0..PAGES_PER_EXTENT).filter(|&p| !mask_has(freed, p)) {
            let off = p as u64 * PAGE_SIZE;
            // SAFETY: both are 2 MiB mappings of ours (the claimed extent, readable; the
            // staging area, fresh); no guest write lands in the extent while it is
            // write-protected and claimed.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (at + off).as_ptr::<u8>(),
                    (staging + off).as_ptr::<u8>(),
                    PAGE_SIZE as usize,
                )
            };
        }
        // SAFETY: moves our staging mapping over the claimed extent, replacing the hugetlb
        // page (whose kept contents the staging holds); the extent stays mapped throughout.
        let moved = unsafe {
            libc::mremap(
                staging.as_ptr(),
                EXTENT_SIZE as usize,
                EXTENT_SIZE as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                at.as_ptr::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: the staging mapping is ours and unused.
            unsafe { libc::munmap(staging.as_ptr(), EXTENT_SIZE as usize) };
            let _ = uffd.write_protect(at, EXTENT_SIZE, false, true);
            return Err(e);
        }
        Ok(true)
    }

    fn map_ram(&self) -> &crate::GuestRam {
        self.map.ram()
    }

    /// After a huge extent's pages were discarded: gives it RAM's advice again (no THP faulted
    /// in by the kernel, which would bring back what was given back), registers it with its userfaultfd
    /// as all of RAM is (a page moved in by `mremap`, or the fresh memory that replaced a
    /// hugetlb page, is a mapping the uffd does not watch yet; re-registering a watched one
    /// changes nothing), records the pages given back, and then the pages the kernel filled
    /// (with zeroes, as a page given back must read) for an access before the registration.
    fn watch_again(
        &self,
        claim: &ExtentClaim<'_>,
        index: ExtentIndex,
        freed: &PageMask,
    ) -> io::Result<()> {
        self.map_ram().advise(index.gpa(), EXTENT_SIZE)?;
        if let Some(uffds) = &self.uffds {
            let uffd = uffds.for_extent(index.0);
            uffd.register(self.host(index), EXTENT_SIZE, uffd.registered_mode())?;
        }
        claim.give_back(freed);
        let present = crate::host_view::present_pages(self.host(index), EXTENT_SIZE)?;
        claim.add_present(|p| present[p] && mask_has(freed, p));
        Ok(())
    }
}

pub mod shrinker;

#[cfg(test)]
mod tests;
