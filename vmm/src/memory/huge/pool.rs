//! The huge page pool: 2 MiB host pages for the collapse thread, zeroed and populated before
//! they are handed out.
//!
//! Pages come from the hugetlb pool when it has pages (`--huge-source auto|hugetlb`), else
//! from THP: 2 MiB-aligned anonymous memory with `MADV_HUGEPAGE`, populated, then *verified*
//! to be mapped huge (`PAGEMAP_SCAN`), since the kernel may silently fall back to 4 KiB pages;
//! such a page is never handed out. A refill thread keeps a few pages ready ahead of demand so
//! that taking one costs nothing; when none is ready, `alloc` allocates on the spot (that is
//! the slow path the seed commit moved out of the write lock).

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::page::{AllocError, HugePage, HugePageAllocator, PageKind, alloc_hugetlb, alloc_thp};
use crate::metrics::Counter;
use crate::seccomp::{Seccomp, ThreadKind};
use crate::sync::{lock, wait, wait_timeout};
use crate::worker::{Stop, Worker};

/// Huge pages kept ready by default: enough that a 2 MiB fault or a collapse rarely waits for
/// an allocation, few enough to cost little memory the ledger does not charge.
pub const POOL_AHEAD: usize = 2;

/// Where huge pages come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// hugetlb while the pool has free pages, else THP.
    #[default]
    Auto,
    /// hugetlb only.
    Hugetlb,
    /// THP only.
    Thp,
}

/// Counters of the pool (the `collapse.pool` section of the metrics).
#[derive(Debug, Default, serde::Serialize)]
pub struct PoolStats {
    /// hugetlb pages allocated.
    pub hugetlb: Counter,
    /// THPs allocated (verified huge).
    pub thp: Counter,
    /// THP allocations refused because the kernel gave 4 KiB pages.
    pub thp_not_huge: Counter,
    /// Allocations that failed.
    pub failed: Counter,
    /// Pages handed out from the ready queue.
    pub from_ready: Counter,
    /// Pages allocated on the spot because none was ready.
    pub on_demand: Counter,
}

struct PoolInner {
    source: PoolKind,
    ahead: usize,
    ready: Mutex<VecDeque<HugePage>>,
    wanted: Condvar,
    stop: Arc<Stop>,
    stats: Arc<PoolStats>,
    /// Nanoseconds added to every allocation (benchmarks).
    latency_ns: AtomicU64,
}

impl PoolInner {
    fn allocate(&self) -> Result<HugePage, AllocError> {
        let latency = self.latency_ns.load(Ordering::Relaxed);
        if latency > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(latency));
        }
        fail::fail_point!("pool-alloc", |_| Err(AllocError::GaveUp(
            "injected allocation failure".into()
        )));
        let result = match self.source {
            PoolKind::Hugetlb => alloc_hugetlb(),
            PoolKind::Thp => alloc_thp(),
            PoolKind::Auto => alloc_hugetlb().or_else(|_| alloc_thp()),
        };
        match &result {
            Ok(p) if p.kind() == PageKind::Hugetlb => self.stats.hugetlb.inc(),
            Ok(_) => self.stats.thp.inc(),
            Err(AllocError::NotHuge) => {
                self.stats.thp_not_huge.inc();
                self.stats.failed.inc()
            }
            Err(_) => self.stats.failed.inc(),
        };
        result
    }

    /// The refill thread: keeps `ahead` pages ready. The stop flag is checked under the
    /// `ready` lock and set (with the notify) under it too, so a stop is never missed.
    fn refill(&self) -> Result<(), String> {
        let mut ready = lock(&self.ready);
        loop {
            fail::fail_point!("pool-refill");
            crate::seccomp::forbidden_call_point("seccomp-pool-refill");
            if self.stop.is_set() {
                return Ok(());
            }
            if ready.len() >= self.ahead {
                fail::fail_point!("pool-refill-wait");
                ready = wait(&self.wanted, ready);
                continue;
            }
            drop(ready);
            let page = self.allocate();
            ready = lock(&self.ready);
            match page {
                Ok(page) => ready.push_back(page),
                // Nothing to be had now: wait for the next request instead of spinning.
                Err(_) => {
                    let (guard, _) =
                        wait_timeout(&self.wanted, ready, std::time::Duration::from_millis(100));
                    ready = guard;
                }
            }
        }
    }
}

/// The huge page pool with its refill thread.
pub struct HugePagePool {
    inner: Arc<PoolInner>,
    refill: Option<Worker>,
}

impl HugePagePool {
    /// A pool of pages from `source` that keeps `ahead` pages ready (0: allocate on demand).
    /// If the refill thread fails (it panics), `on_fatal` is told.
    pub fn new(
        source: PoolKind,
        ahead: usize,
        seccomp: Seccomp,
        on_fatal: impl FnOnce(String) + Send + 'static,
    ) -> io::Result<Self> {
        let stop = Arc::new(Stop::new()?);
        let inner = Arc::new(PoolInner {
            source,
            ahead,
            ready: Mutex::new(VecDeque::new()),
            wanted: Condvar::new(),
            stop,
            stats: Arc::default(),
            latency_ns: AtomicU64::new(0),
        });
        let refill = if ahead > 0 {
            let pool = inner.clone();
            Some(Worker::spawn(
                "huge-refill",
                ThreadKind::PoolRefill,
                seccomp,
                move |_| pool.refill(),
                on_fatal,
            )?)
        } else {
            None
        };
        Ok(HugePagePool { inner, refill })
    }

    /// Makes every allocation from now on take `latency` longer (benchmarks: the cost of
    /// reclaim, compaction, or a userland backend, as a variable).
    pub fn with_latency(self, latency: std::time::Duration) -> Self {
        self.inner
            .latency_ns
            .store(latency.as_nanos() as u64, Ordering::Relaxed);
        self
    }

    /// An allocator from the same source that never takes a ready page: for a bulk user (the
    /// restore prefetcher) that must not leave the guest's 2 MiB faults an empty pool.
    pub fn direct(&self) -> Arc<dyn HugePageAllocator> {
        Arc::new(Direct(self.inner.clone()))
    }

    /// The pool's counters.
    pub fn stats(&self) -> &Arc<PoolStats> {
        &self.inner.stats
    }

    /// Waits until `n` pages are ready (or `timeout` passes): the pool is filled before the
    /// guest starts, so its first faults do not allocate on the spot.
    /// Gives up early once an allocation fails: there is nothing to wait for then.
    pub fn wait_ready(&self, n: usize, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let failed = || self.inner.stats.failed.get() > 0;
        while self.ready() < n.min(self.inner.ahead)
            && !failed()
            && self.refill.is_some()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Pages ready right now.
    pub fn ready(&self) -> usize {
        lock(&self.inner.ready).len()
    }

    /// Stops the refill thread and unmaps every ready page.
    pub fn shutdown(&mut self) {
        self.inner
            .stop
            .set_and_notify(&self.inner.ready, &self.inner.wanted);
        if let Some(mut refill) = self.refill.take() {
            refill.stop();
        }
        lock(&self.inner.ready).clear();
    }
}

impl HugePageAllocator for HugePagePool {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        let ready = lock(&self.inner.ready).pop_front();
        self.inner.wanted.notify_one();
        match ready {
            Some(page) => {
                self.inner.stats.from_ready.inc();
                Ok(page)
            }
            None => {
                self.inner.stats.on_demand.inc();
                self.inner.allocate()
            }
        }
    }
}

/// See [`HugePagePool::direct`].
struct Direct(Arc<PoolInner>);

impl HugePageAllocator for Direct {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        self.0.stats.on_demand.inc();
        self.0.allocate()
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_keeps_pages_ready_and_frees_them() {
        let mut pool =
            HugePagePool::new(PoolKind::Thp, 2, Seccomp::Off, |what| panic!("{what}")).unwrap();
        for _ in 0..200 {
            if pool.ready() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let Ok(page) = pool.alloc() else { return };
        assert_eq!(page.kind(), PageKind::Thp);
        assert!(pool.stats().from_ready.get() + pool.stats().on_demand.get() == 1);
        pool.shutdown();
        assert_eq!(pool.ready(), 0);
    }

    /// The refill thread checks its stop flag, then waits: a stop (and its wake-up) landing
    /// between the two must still be seen. The fault point holds the thread right there.
    #[test]
    #[cfg(feature = "failpoints")]
    fn a_stop_between_the_check_and_the_wait_is_not_missed() {
        let scenario = fail::FailScenario::setup();
        fail::cfg("pool-refill-wait", "sleep(300)").unwrap();
        let mut pool =
            HugePagePool::new(PoolKind::Thp, 1, Seccomp::Off, |what| panic!("{what}")).unwrap();
        // Watched through the counters: `ready()` would take the lock the thread holds.
        let start = std::time::Instant::now();
        while pool.stats().thp.get() < 1 {
            if start.elapsed() > std::time::Duration::from_secs(10) {
                eprintln!("SKIP: no THP could be allocated here");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The thread has filled the pool and now sleeps in the fault point, between its check
        // of the stop flag and its wait.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let start = std::time::Instant::now();
        pool.shutdown();
        let took = start.elapsed();
        assert!(
            took < crate::worker::JOIN_LIMIT,
            "shutdown took {took:?}: the refill thread missed its stop"
        );
        scenario.teardown();
    }
}
