//! The collapse thread: this VMM's khugepaged. It scans guest RAM's extents and promotes
//! populated ones to single 2 MiB host pages, following the seed commit's order ("thp:
//! allocate memory in khugepaged outside of mmap_sem write mode"): [`protocol`] is one
//! collapse in each lock order, [`config`] the tunables, [`stats`] what it reports; this
//! module is the thread and its scan loop.

pub mod config;
pub mod protocol;
pub mod stats;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use config::{CollapseConfig, CollapseOrder};
pub use protocol::{CollapseError, Collapser};
pub use stats::{CollapseStats, ScanResult};

use super::extent::{ExtentIndex, ExtentState, PAGES_PER_EXTENT};
use crate::worker::{OnFailure, Stop, ThreadHook, ThreadRole, Worker};

/// Holds the collapse thread before its first scan until it is opened
/// ([`MemoryBuilder::collapse_gate`](crate::MemoryBuilder::collapse_gate)): a VMM may keep
/// extents small while it boots or restores, and a benchmark starts every collapser at the
/// same moment. While held, the thread still tells the pool which extents it will collapse
/// first, so the pages are allocated by the time it opens.
#[derive(Clone, Debug, Default)]
pub struct CollapseGate(Arc<AtomicBool>);

impl CollapseGate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets the collapse thread start (for good).
    pub fn open(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether it was opened.
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::Acquire)
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
    /// `--page-source kernel`). If `gate` is given, the thread waits until it is open before
    /// its first scan. `on_fatal` is
    /// called if the thread cannot go on.
    pub fn start(
        collapser: Collapser,
        sync: Box<dyn Fn(ExtentIndex) + Send>,
        gate: Option<CollapseGate>,
        hook: &ThreadHook,
        on_fatal: OnFailure,
    ) -> std::io::Result<CollapseThread> {
        let stopping = collapser.stopping.clone();
        let worker = Worker::spawn(
            "collapser",
            ThreadRole::Collapser,
            hook,
            move |stop| {
                scan_loop(&collapser, &*sync, gate.as_ref(), stop).map_err(|e| {
                    format!("the collapse thread stopped: {}", crate::error::chain(&e)).into()
                })
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

/// How many of the `batch` extents from `cursor` on would be collapsed now: small, with few
/// enough holes. (For the kernel page source the table may lag what the kernel populated; the
/// estimate is a hint to the pool, never a decision.)
fn candidates(c: &Collapser, cursor: usize, batch: usize, extents: usize) -> usize {
    let map = c.map.read();
    (0..batch.min(extents))
        .filter(|i| {
            let index = ExtentIndex((cursor + i) % extents);
            match map.get(index).map(|e| e.state()) {
                Some(ExtentState::Small { populated }) => {
                    PAGES_PER_EXTENT as u32 - populated <= c.config.max_ptes_none
                }
                _ => false,
            }
        })
        .count()
}

/// khugepaged's loop: scan a batch of extents, sleep, back off after a failure.
fn scan_loop(
    c: &Collapser,
    sync: &dyn Fn(ExtentIndex),
    gate: Option<&CollapseGate>,
    stop: &Stop,
) -> Result<(), CollapseError> {
    let extents = c.map.read().len();
    let batch = (c.config.pages_to_scan / PAGES_PER_EXTENT as u64).max(1) as usize;
    let mut cursor = 0;
    if let Some(gate) = gate {
        while !gate.is_open() {
            // Held back from collapsing, the scan still sees what it will collapse first, and
            // says so: the pool allocates while the guest populates.
            c.installer
                .pool
                .expect(candidates(c, cursor, batch, extents));
            if stop.sleep(Duration::from_millis(1)) {
                return Ok(());
            }
        }
    }
    let started = Instant::now();
    loop {
        // The batch ahead is known: the pool may allocate its pages while this thread is busy
        // with the first ones (allocation pipelined ahead of the collapses).
        c.installer
            .pool
            .expect(candidates(c, cursor, batch, extents));
        let mut back_off = false;
        for _ in 0..batch {
            if stop.is_set() {
                return Ok(());
            }
            let index = ExtentIndex(cursor);
            cursor = (cursor + 1) % extents;
            if cursor == 0 {
                c.stats.full_scans.inc();
                if c.map.read().counts().huge == extents as u64 && c.stats.all_huge_ns.get() == 0 {
                    c.stats
                        .all_huge_ns
                        .set((started.elapsed().as_nanos() as u64).max(1));
                }
            }
            sync(index);
            let guard = c.map.read();
            match guard.get(index).map(|e| e.state()) {
                Some(ExtentState::Small { .. }) => {}
                _ => continue,
            }
            fail::fail_point!("collapse-scan");
            match c.collapse(guard, index)? {
                // Whatever failed (no page, no charge, an ioctl or the kernel's view out of
                // reach, such as EMFILE) is unlikely to succeed again at once.
                ScanResult::AllocHugePageFail | ScanResult::CgroupChargeFail | ScanResult::Fail => {
                    back_off = true;
                    break;
                }
                ScanResult::ExceedNonePte => c.stats.exceed_none_pte.inc(),
                ScanResult::Reclaimed => c.stats.skipped_reclaimed.inc(),
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
