//! The zero-page shrinker: memory given back from guests that do not report what they free.
//!
//! A background thread walks guest RAM extent by extent, at a bounded rate, and looks for
//! 4 KiB pages that are present and all zeroes. A page found zero at two passes in a row is
//! given back by reclaim's own rules ([`super`]): in a 4 KiB extent it is discarded; a huge
//! extent with [`SPLIT_PAGES`](super::SPLIT_PAGES) or more such pages is demoted (or
//! discarded whole when all of it is zero), and one with fewer keeps its huge page. This is the
//! kernel's THP-shrinker rule (`thp_underused`), done exactly and without waiting for memory
//! pressure; the split threshold plays the part of `max_ptes_none`.
//!
//! Deciding from a read of guest memory is only safe while the guest cannot write it: the
//! shrinker inspects an extent under its claim first (with the memory map's read side, as a
//! hint that costs the guest nothing), then, where there is something to give back, claims it
//! as a report does (with the write side, briefly), write-protects it, reads the candidate
//! pages again and gives back only those still zero. A guest write meanwhile waits on the
//! claim and lands after, in a page that is either still there or reads zeroes again. An extent
//! someone else holds (a report, a fault filling it) or that the collapse thread is copying (it
//! write-protects it itself) is left for the next pass: the shrinker never lifts a protection
//! it did not set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Inner, Reclaimed};
use crate::extent::{ExtentClaim, ExtentIndex, PAGES_PER_EXTENT, PageMask, mask_has};
use crate::host_view;
use crate::worker::{Failure, OnFailure, Stop, ThreadHook, ThreadRole, Worker};
use crate::{EXTENT_SIZE, HostAddr, PAGE_SIZE};

/// The slowest rate: one extent every two seconds.
pub const MIN_RATE: u64 = 1 << 20;
/// The fastest rate (what one core reads of memory, roughly).
pub const MAX_RATE: u64 = 64 << 30;
/// The rate a VMM offers by default: a pass over 1 GiB every 4 seconds, a few percent of a
/// core.
pub const DEFAULT_RATE: u64 = 256 << 20;

/// What an extent costs the rate when it has nothing present: the page-table walk.
const EMPTY_COST: u64 = PAGE_SIZE;
/// How long the pacing lets the shrinker run ahead before it sleeps.
const SLICE: Duration = Duration::from_millis(2);

/// The running shrinker thread; stopped on drop.
pub(crate) struct Shrinker {
    worker: Worker,
}

impl Shrinker {
    /// Starts the thread over the memory `inner` gives back, reading `rate` bytes a second.
    pub(super) fn start(
        inner: Arc<Inner>,
        rate: u64,
        hook: &ThreadHook,
        on_fatal: OnFailure,
    ) -> std::io::Result<Shrinker> {
        let worker = Worker::spawn(
            "zero-shrinker",
            ThreadRole::Shrinker,
            hook,
            move |stop| {
                Scan::new(&inner, rate).run(stop).map_err(|e| {
                    let e: Failure = format!(
                        "the zero-page shrinker stopped: {}",
                        crate::error::chain(&e)
                    )
                    .into();
                    e
                })
            },
            move |what| on_fatal(what),
        )?;
        Ok(Shrinker { worker })
    }

    /// Stops the thread and waits for it (an extent being given back is finished first).
    pub(crate) fn stop(&mut self) {
        self.worker.stop();
    }
}

/// One shrinker's walk: where it is, what it saw zero last time, and its pace.
struct Scan<'a> {
    inner: &'a Inner,
    rate: u64,
    /// Per extent, the pages found present and zero at the last pass.
    seen_zero: Vec<PageMask>,
    /// When the pacing allows the next extent.
    next: Instant,
}

impl<'a> Scan<'a> {
    fn new(inner: &'a Inner, rate: u64) -> Self {
        let extents = (inner.map.ram().size() / EXTENT_SIZE) as usize;
        Scan {
            inner,
            rate,
            seen_zero: vec![PageMask::default(); extents],
            next: Instant::now(),
        }
    }

    fn run(mut self, stop: &Stop) -> Result<(), super::ReclaimError> {
        let stats = self.inner.stats.clone();
        loop {
            for e in 0..self.seen_zero.len() {
                if stop.is_set() {
                    return Ok(());
                }
                let inspected = self.extent(ExtentIndex(e))?;
                stats.shrinker_scanned_bytes.add(inspected);
                if self.pace(inspected.max(EMPTY_COST), stop) {
                    return Ok(());
                }
            }
            stats.shrinker_passes.inc();
        }
    }

    /// Sleeps as long as `cost` bytes take at the rate; true if a stop was asked for.
    fn pace(&mut self, cost: u64, stop: &Stop) -> bool {
        let now = Instant::now();
        // A shrinker that fell behind (a slow extent) does not burst to catch up.
        self.next = self.next.max(now) + Duration::from_nanos(cost * 1_000_000_000 / self.rate);
        let ahead = self.next.saturating_duration_since(now);
        ahead > SLICE && stop.sleep(ahead)
    }

    /// Inspects one extent and gives back what was zero at this pass and the last; returns
    /// the bytes it read.
    fn extent(&mut self, index: ExtentIndex) -> Result<u64, super::ReclaimError> {
        let inner = self.inner;
        let inspected = {
            let guard = inner.map.read();
            let Some(claim) = guard.claim(index) else {
                inner.stats.shrinker_busy.inc();
                return Ok(0);
            };
            let inspected = if claim.extent().is_tracking() {
                inner.stats.shrinker_busy.inc();
                None
            } else {
                Some(zero_pages(inner.host(index), None))
            };
            drop(claim);
            // A fault that found the extent claimed meanwhile waits to be woken.
            inner.wake(index);
            inspected
        };
        let Some(inspected) = inspected else {
            return Ok(0);
        };
        let (zero, inspected) = inspected.map_err(failed(index, "reading present pages"))?;
        let candidates = and(&zero, &self.seen_zero[index.0]);
        self.seen_zero[index.0] = zero;
        if count(&candidates) == 0 {
            return Ok(inspected);
        }
        let given = inner.shrink(index, &candidates)?;
        inner.stats.shrinker_bytes.add(given.given_back);
        Ok(inspected)
    }
}

fn failed(
    index: ExtentIndex,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> super::ReclaimError {
    move |source| super::ReclaimError::Discard {
        extent: index.0,
        what,
        source,
    }
}

fn and(a: &PageMask, b: &PageMask) -> PageMask {
    let mut out = *a;
    for (o, b) in out.iter_mut().zip(b) {
        *o &= b;
    }
    out
}

fn count(mask: &PageMask) -> u32 {
    mask.iter().map(|w| w.count_ones()).sum()
}

/// The pages of the extent at `at` that are present and read all zeroes (only those in `only`,
/// if given), and the bytes read to find out. The caller holds the extent's claim (and the
/// memory map's read side), so no present page goes away meanwhile.
fn zero_pages(at: HostAddr, only: Option<&PageMask>) -> std::io::Result<(PageMask, u64)> {
    let present = host_view::present_pages(at, EXTENT_SIZE)?;
    let mut zero = PageMask::default();
    let mut read = 0;
    for p in (0..PAGES_PER_EXTENT).filter(|&p| present[p] && only.is_none_or(|m| mask_has(m, p))) {
        read += PAGE_SIZE;
        if page_is_zero(at + p as u64 * PAGE_SIZE) {
            zero[p / 64] |= 1 << (p % 64);
        }
    }
    Ok((zero, read))
}

/// Whether the 4 KiB page at `at` reads all zeroes. Volatile reads: the guest may be writing
/// it (the answer is then a hint, taken again under write protection before it counts).
fn page_is_zero(at: HostAddr) -> bool {
    let words = at.as_ptr::<u64>();
    (0..PAGE_SIZE as usize / 8).all(|i| {
        // SAFETY: a present page of guest RAM, mapped while the claim is held; read only.
        unsafe { std::ptr::read_volatile(words.add(i)) == 0 }
    })
}

impl Inner {
    /// Gives back the `candidates` of extent `index` that are still zero once it is
    /// write-protected: claimed as a report claims, protected, read again, given back by the
    /// extent's state, unprotected, let go and woken.
    fn shrink(
        &self,
        index: ExtentIndex,
        candidates: &PageMask,
    ) -> Result<Reclaimed, super::ReclaimError> {
        let Some(ticket) = self.map.write().claim_for_later(index) else {
            self.stats.shrinker_busy.inc();
            return Ok(Reclaimed::default());
        };
        let guard = self.map.read();
        let claim = guard.redeem(ticket);
        let result = self.shrink_claimed(&claim, index, candidates);
        drop(claim);
        self.wake(index);
        result
    }

    fn shrink_claimed(
        &self,
        claim: &ExtentClaim<'_>,
        index: ExtentIndex,
        candidates: &PageMask,
    ) -> Result<Reclaimed, super::ReclaimError> {
        let mut done = Reclaimed::default();
        let extent = claim.extent();
        // Checked again under the claim: the collapse may have started copying it meanwhile.
        if extent.is_tracking() {
            self.stats.shrinker_busy.inc();
            return Ok(done);
        }
        // What the extent's state would do with this many pages: a huge page below the split
        // threshold is kept, and zeroing zeroes gives nothing back.
        let worth = |n: u32| {
            n > 0
                && (extent.huge_kind().is_none()
                    || n as usize == PAGES_PER_EXTENT
                    || n >= self.split_pages)
        };
        if !worth(count(candidates)) {
            return Ok(done);
        }
        let uffd = self
            .uffds
            .as_ref()
            .expect("the shrinker runs only where RAM is registered with a userfaultfd")
            .for_extent(index.0);
        let at = self.host(index);
        // A huge page put in by `mremap` is a mapping the uffd does not watch yet.
        uffd.register(at, EXTENT_SIZE, uffd.registered_mode())
            .map_err(failed(index, "registering the extent"))?;
        uffd.write_protect(at, EXTENT_SIZE, true, false)
            .map_err(failed(index, "write-protecting the extent"))?;
        let rechecked =
            zero_pages(at, Some(candidates)).map_err(failed(index, "reading present pages"));
        let result = rechecked.and_then(|(zero, _)| {
            if worth(count(&zero)) {
                self.give_back(claim, index, &zero, &mut done)?;
            }
            Ok(())
        });
        // Lifted whatever happened (the protection is the shrinker's own: the collapse is not
        // copying this extent, it was checked above under the claim).
        let lifted = uffd
            .write_protect(at, EXTENT_SIZE, false, false)
            .map_err(failed(index, "lifting write protection"));
        result.and(lifted).map(|()| done)
    }
}
