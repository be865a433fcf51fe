//! The restore prefetcher: with a memory image as the page source, background threads fill
//! the extents the guest has not touched yet, a whole extent at a time, behind the guest, so a
//! restore has no tail of faults: the guest starts at once and finds its memory resident.
//!
//! Each extent goes the seed's way. With no lock held, a page is taken from the pool, charged,
//! and the extent's 2 MiB read from the image into it (the slow part: I/O). Then the memory
//! map's write side, held only to check that the extent is still unpopulated and to claim it
//! (no fault handler is inside it then, and each one after leaves its faults to us); then,
//! with the read side and the claim, the page is put in as a 2 MiB fault's is (moved where the
//! kernel has `UFFDIO_MOVE`) and the extent's waiters are woken. A vCPU that faults in an
//! extent being filled waits for that extent only. Where no page or no charge is to be had
//! (`--huge-limit`), the extent is copied in as 4 KiB pages instead: resident, not huge.
//!
//! Order: with a working-set record to replay ([`crate::working_set`]), its extents first, in
//! the order the guest first touched them when it was recorded; then the extents after the
//! most recent fault first (a guest touching memory tends to go
//! on where it is), then the rest in address order. Extents that are holes in the image (never
//! written when it was saved) are left unpopulated: reading them costs nothing, and filling
//! them would spend memory and zeroing on RAM the guest may never touch; a guest that touches
//! one gets zeroes through the ordinary fault path.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::EXTENT_SIZE;
use serde::Serialize;

use super::extent::{ExtentIndex, ExtentState};
use super::fault::source::PageSource;
use super::huge::install::{Contents, Exclusive, InstallError, Installed, Installer, Prepared};
use super::map::MemoryMap;
use super::ram_image::RamImage;
use super::uffd::UffdSet;
use super::working_set::WorkingSet;
use crate::stats::Counter;
use crate::worker::{Failure, OnFailure, Stop, ThreadHook, ThreadRole, Worker};

/// Prefetch threads by default: on a 2-CPU host two reached the bandwidth of a plain
/// sequential read of a cold 1 GiB image (587 against 574 MiB/s), one about half of it
/// (`vmm bench restore --memory 1G --drop-caches --modes prefetch --prefetch-threads N`).
pub const PREFETCH_THREADS: usize = 2;

/// Most prefetch threads.
pub const MAX_PREFETCH_THREADS: usize = 16;

/// No fault seen since the prefetcher last looked.
const NO_HINT: usize = usize::MAX;

/// Where the guest faulted last, for the prefetcher to go on from there.
#[derive(Debug)]
pub struct FaultHint(AtomicUsize);

impl Default for FaultHint {
    fn default() -> Self {
        FaultHint(AtomicUsize::new(NO_HINT))
    }
}

impl FaultHint {
    /// Records a fault in extent `index`.
    pub fn faulted(&self, index: ExtentIndex) {
        self.0.store(index.0, Ordering::Relaxed);
    }

    fn take(&self) -> Option<usize> {
        match self.0.swap(NO_HINT, Ordering::Relaxed) {
            NO_HINT => None,
            i => Some(i),
        }
    }
}

/// What the prefetcher did (the `prefetch` section of the metrics).
#[derive(Debug, Default, Serialize)]
pub struct PrefetchStats {
    /// Extents filled with one 2 MiB page.
    pub extents_huge: Counter,
    /// Extents filled with 4 KiB pages (no huge page or no charge to be had).
    pub extents_small: Counter,
    /// Extents read but found populated by the guest's faults by then (the read is wasted).
    pub extents_raced: Counter,
    /// Extents filled in the order of a working-set record (a replay), before the rest.
    pub extents_replayed: Counter,
    /// Extents left alone because they are holes in the image.
    pub holes: Counter,
    /// Bytes read from the image.
    pub bytes_read: Counter,
    /// When the last thread found nothing left to fill, in ns since the prefetcher started
    /// (0: not yet).
    pub done_ns: Counter,
}

/// Everything the prefetch threads share.
struct Shared {
    map: Arc<MemoryMap>,
    image: Arc<RamImage>,
    /// Where the image's pages are read through.
    source: Arc<dyn PageSource>,
    installer: Installer,
    uffds: Arc<UffdSet>,
    hint: Arc<FaultHint>,
    /// The next extent to look at in address order.
    cursor: AtomicUsize,
    /// The working set to fill first, in its order, and the next of it to look at.
    replay: Option<(Arc<WorkingSet>, AtomicUsize)>,
    /// Threads still running.
    running: AtomicUsize,
    stats: Arc<PrefetchStats>,
    started: Instant,
}

/// The running prefetch threads; stopped and joined on drop.
pub struct Prefetcher {
    workers: Vec<Worker>,
}

impl Prefetcher {
    /// Starts `threads` threads filling guest RAM from `image`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        threads: usize,
        map: Arc<MemoryMap>,
        image: Arc<RamImage>,
        source: Arc<dyn PageSource>,
        installer: Installer,
        uffds: Arc<UffdSet>,
        hint: Arc<FaultHint>,
        replay: Option<Arc<WorkingSet>>,
        stats: Arc<PrefetchStats>,
        hook: &ThreadHook,
        on_fatal: OnFailure,
    ) -> std::io::Result<Prefetcher> {
        let holes = {
            let table = map.read();
            (0..table.len())
                .filter(|&i| image.is_hole(ExtentIndex(i).gpa(), EXTENT_SIZE))
                .count()
        };
        stats.holes.set(holes as u64);
        let shared = Arc::new(Shared {
            map,
            image,
            source,
            installer,
            uffds,
            hint,
            cursor: AtomicUsize::new(0),
            replay: replay.map(|ws| (ws, AtomicUsize::new(0))),
            running: AtomicUsize::new(threads),
            stats,
            started: Instant::now(),
        });
        let workers = (0..threads)
            .map(|i| {
                let (shared, fatal) = (shared.clone(), on_fatal.clone());
                Worker::spawn(
                    &format!("prefetch{i}"),
                    ThreadRole::Prefetcher,
                    hook,
                    move |stop| shared.run(stop),
                    move |what| fatal(what),
                )
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Prefetcher { workers })
    }

    /// Stops every thread (an extent being filled is finished or given up cleanly first).
    pub fn stop(&mut self) {
        for w in &self.workers {
            w.stop_signal().set();
        }
        for w in &mut self.workers {
            w.stop();
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn run(&self, stop: &Stop) -> Result<(), Failure> {
        while !stop.is_set() {
            fail::fail_point!("prefetch-extent");
            let (index, replayed) = match self.next_replayed() {
                Some(index) => (index, true),
                None => match self.next() {
                    Some(index) => (index, false),
                    None => break,
                },
            };
            if self.fill(index)? && replayed {
                self.stats.extents_replayed.inc();
            }
        }
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 && !stop.is_set() {
            let ns = self.started.elapsed().as_nanos() as u64;
            self.stats.done_ns.set(ns.max(1));
        }
        Ok(())
    }

    /// The next extent of the working set being replayed that still wants filling.
    fn next_replayed(&self) -> Option<ExtentIndex> {
        let (ws, next) = self.replay.as_ref()?;
        let table = self.map.read();
        loop {
            let i = *ws.extents.get(next.fetch_add(1, Ordering::Relaxed))? as usize;
            let extent = table.get(ExtentIndex(i))?;
            if extent.state() == ExtentState::Unpopulated
                && !extent.is_claimed()
                && extent.reclaimed() == 0
                && !self.image.is_hole(ExtentIndex(i).gpa(), EXTENT_SIZE)
            {
                return Some(ExtentIndex(i));
            }
        }
    }

    /// The next extent to fill: from just after the latest fault if there was one, else
    /// from the cursor, the first one that is unpopulated, unclaimed and holds data.
    fn next(&self) -> Option<ExtentIndex> {
        let table = self.map.read();
        let n = table.len();
        let start = match self.hint.take() {
            Some(i) => i + 1,
            None => self.cursor.load(Ordering::Relaxed),
        };
        for step in 0..n {
            let i = (start + step) % n;
            let extent = table.get(ExtentIndex(i)).expect("index inside the table");
            // An extent the guest gave back (some of) is left for its faults: its image data
            // is no longer what the guest owns there.
            if extent.state() != ExtentState::Unpopulated
                || extent.is_claimed()
                || extent.reclaimed() > 0
            {
                continue;
            }
            if self.image.is_hole(ExtentIndex(i).gpa(), EXTENT_SIZE) {
                continue;
            }
            // Taken: whoever looks next starts after it (another thread may race us to it;
            // the claim decides).
            self.cursor.store(i + 1, Ordering::Relaxed);
            return Some(ExtentIndex(i));
        }
        None
    }

    /// Fills extent `index` from the image, huge if a page and a charge can be had; whether
    /// it was this thread that filled it (not the guest's faults first).
    fn fill(&self, index: ExtentIndex) -> Result<bool, Failure> {
        let gpa = index.gpa();
        // [no lock] the page and the read: allocation and I/O stall nobody.
        let mut page = self.installer.prepare(Contents::Unpopulated).ok();
        let mut small = Vec::new();
        let buf: &mut [u8] = match &mut page {
            Some(p) => p.bytes_mut(),
            None => {
                small.resize(EXTENT_SIZE as usize, 0);
                &mut small
            }
        };
        self.read_extent(buf, gpa)
            .map_err(|e| format!("prefetching guest address {gpa:#x}: {e}"))?;
        self.stats.bytes_read.add(EXTENT_SIZE);
        // [write] still unpopulated? Then claim it: no fault handler is inside it now.
        let mut table = self.map.write();
        let extent = table.get(index).expect("index inside the table");
        let ticket = if extent.state() == ExtentState::Unpopulated && extent.reclaimed() == 0 {
            table.claim_for_later(index)
        } else {
            None
        };
        drop(table);
        let Some(ticket) = ticket else {
            self.stats.extents_raced.inc();
            return Ok(false);
        };
        // [read + claim] put it in; faults in the extent wait for us.
        let guard = self.map.read();
        let claim = guard.redeem(ticket);
        let result = match page {
            Some(page) => self.install(index, page, Exclusive::Claim(&claim)),
            None => self.copy_small(index, &small, &claim),
        };
        drop(claim);
        drop(guard);
        let uffd = self.uffds.for_extent(index.0);
        let _ = uffd.wake(self.map.ram().host_at(gpa), EXTENT_SIZE);
        result.map(|()| true)
    }

    /// Reads the extent at `gpa` from the image, through its page source (which checks the
    /// file first: one cut short under us then says so, not just "short read"). `buf` starts
    /// zeroed, so an all-zero answer leaves it right.
    fn read_extent(&self, buf: &mut [u8], gpa: u64) -> Result<(), Failure> {
        fail::fail_point!("prefetch-read", |_| Err(
            "injected read failure (EIO)".into()
        ));
        self.source.fill(gpa, buf).map(drop).map_err(Failure::from)
    }

    fn install(
        &self,
        index: ExtentIndex,
        page: Prepared<'_>,
        excl: Exclusive<'_, '_>,
    ) -> Result<(), Failure> {
        match self
            .installer
            .install(excl, index, page, Contents::Unpopulated)
        {
            Ok(Installed::Huge(_)) => self.stats.extents_huge.inc(),
            // Moved in as 4 KiB pages: resident all the same.
            Ok(Installed::Small) => self.stats.extents_small.inc(),
            // The extent is as it was (unpopulated): the guest's faults will fill it.
            Err(InstallError::Failed(failed)) => {
                log::warn!("prefetch: {failed}: {}", failed.source)
            }
            Err(InstallError::Lost(lost)) => return Err(lost.into()),
        }
        Ok(())
    }

    /// Copies the extent in as 4 KiB pages (`UFFDIO_COPY` of all of it at once).
    fn copy_small(
        &self,
        index: ExtentIndex,
        data: &[u8],
        claim: &super::extent::ExtentClaim<'_>,
    ) -> Result<(), Failure> {
        let dst = self.map.ram().host_at(index.gpa());
        let uffd = self.uffds.for_extent(index.0);
        // SAFETY: `dst` is the claimed, unpopulated extent of guest RAM (registered with
        // `uffd`); `data` is our own buffer of 2 MiB.
        unsafe { uffd.copy(dst, data.as_ptr(), EXTENT_SIZE) }.map_err(|e| {
            format!(
                "prefetch: copying guest address {:#x} in failed: {e}",
                index.gpa()
            )
        })?;
        claim.extent().add_present(|_| true);
        self.stats.extents_small.inc();
        Ok(())
    }
}
