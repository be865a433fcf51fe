//! The huge page pool: 2 MiB host pages for the collapse thread and for 2 MiB faults, zeroed
//! and populated before they are handed out.
//!
//! Pages come from the hugetlb pool when it has pages (`--huge-source auto|hugetlb`), else
//! from THP: 2 MiB-aligned anonymous memory with `MADV_HUGEPAGE`, populated, then *verified*
//! to be mapped huge (`PAGEMAP_SCAN`), since the kernel may silently fall back to 4 KiB pages;
//! such a page is never handed out.
//!
//! Allocation is a pipeline ahead of demand. Refill threads (one, or more where the host has
//! CPUs to spare) keep pages ready, as many as demand says: the collapse thread tells the pool
//! how many extents its next batch will collapse ([`HugePageAllocator::expect`]), and the
//! pool counts how fast pages are taken (a burst of 2 MiB faults). The depth follows both,
//! from the configured minimum up to [`MAX_DEPTH`], and never past what could still be used
//! (the ledger's headroom under `--huge-limit` and the extents not yet huge, the pool's
//! [budget](HugePagePool::with_budget)): pages kept ready are memory nobody is charged for.
//! Taking a page costs nothing when one is ready; when none is but a refill is under way, the
//! taker waits for that one rather than starting another; only a pool that has nothing ready
//! and nothing coming allocates on the spot (that is the slow path the seed commit moved out
//! of the write lock, and the one a vCPU waiting on a 2 MiB fault would feel).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::page::{AllocError, HugePage, HugePageAllocator, PageKind, alloc_hugetlb, alloc_thp};
use crate::stats::{Counter, Latencies};
use crate::sync::{lock, wait_timeout};
use crate::worker::{Failure, Stop, ThreadFailure, ThreadHook, ThreadRole, Worker};

/// The least number of huge pages kept ready by default: enough that a 2 MiB fault or a
/// collapse rarely waits for an allocation before demand is known, few enough to cost little
/// memory the ledger does not charge.
pub const POOL_AHEAD: usize = 2;

/// The most pages the pool keeps ready however high demand goes: 128 MiB nobody is charged
/// for, the documented cap.
pub const MAX_DEPTH: usize = 64;

/// How long taken pages count towards the demand the depth follows.
const DEMAND_WINDOW: Duration = Duration::from_millis(100);

/// The refill threads' nice value.
const REFILL_NICE: libc::c_int = 10;

/// How long a taker waits for a refill under way before allocating on the spot.
const REFILL_WAIT: Duration = Duration::from_millis(100);

/// Where huge pages come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
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

crate::choice::choices!(PoolKind {
    Auto = "auto": "hugetlb while the pool has free pages, else THP",
    Hugetlb = "hugetlb": "hugetlb only",
    Thp = "thp": "THP only",
});

/// Each kind is an allocator of its own: the pool's default source of pages.
impl HugePageAllocator for PoolKind {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        match self {
            PoolKind::Hugetlb => alloc_hugetlb(),
            PoolKind::Thp => alloc_thp(),
            PoolKind::Auto => alloc_hugetlb().or_else(|_| alloc_thp()),
        }
    }
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
    /// Pages a taker waited for because a refill was under way and none was ready.
    pub waited_for_refill: Counter,
    /// Pages allocated on the spot because none was ready and none was coming.
    pub on_demand: Counter,
    /// How long one allocation took (zeroing and populating included), wherever it ran: the
    /// cost the pipeline hides, as this host gives it today.
    pub alloc_ns: Latencies,
    /// The most pages ever ready at once.
    pub ready_peak: Counter,
    /// The depth the refill aimed at, at its highest.
    pub depth_peak: Counter,
    /// Refill threads.
    pub refill_threads: Counter,
}

impl PoolStats {
    /// The share of pages taken that were ready (1.0: no taker ever waited).
    pub fn hit_rate(&self) -> f64 {
        let ready = self.from_ready.get() as f64;
        let taken = ready + self.waited_for_refill.get() as f64 + self.on_demand.get() as f64;
        if taken == 0.0 { 1.0 } else { ready / taken }
    }
}

/// The queue and what the refill aims at, under one lock.
#[derive(Default)]
struct Queue {
    pages: VecDeque<HugePage>,
    /// Allocations the refill threads have under way.
    in_flight: usize,
    /// Pages the collapse thread said it will take soon.
    expected: usize,
    /// When recent pages were taken, for the demand of the last [`DEMAND_WINDOW`].
    taken: VecDeque<Instant>,
}

/// How many more pages could ever be used (the ledger's headroom, the extents not yet huge).
pub type Budget = Arc<dyn Fn() -> usize + Send + Sync>;

struct PoolInner {
    source: Arc<dyn HugePageAllocator>,
    /// The least depth kept; 0: no refill at all, every page allocated when taken.
    ahead: usize,
    queue: Mutex<Queue>,
    /// A page was taken or demand announced: the refill may have more to do.
    wanted: Condvar,
    /// A page was made ready: a taker waiting for a refill may take it.
    filled: Condvar,
    stop: Arc<Stop>,
    stats: Arc<PoolStats>,
    budget: Mutex<Option<Budget>>,
}

impl PoolInner {
    fn allocate(&self) -> Result<HugePage, AllocError> {
        let started = Instant::now();
        let result = if crate::fires!("pool-alloc") {
            Err(AllocError::GaveUp("injected allocation failure".into()))
        } else {
            self.source.alloc()
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
        if result.is_ok() {
            self.stats.alloc_ns.record(started.elapsed());
        }
        result
    }

    /// The depth to keep: the least configured, plus the collapses announced, plus what was
    /// taken in the last window; at most [`MAX_DEPTH`] and what could still be used.
    fn depth(&self, q: &mut Queue) -> usize {
        if self.ahead == 0 {
            return 0;
        }
        let now = Instant::now();
        while q.taken.front().is_some_and(|t| now - *t > DEMAND_WINDOW) {
            q.taken.pop_front();
        }
        let want = (self.ahead + q.expected + q.taken.len()).min(MAX_DEPTH);
        let depth = match &*lock(&self.budget) {
            Some(budget) => want.min(budget().max(self.ahead.min(1))),
            None => want,
        };
        self.stats.depth_peak.max(depth as u64);
        depth
    }

    /// A refill thread: keeps the queue as deep as [`PoolInner::depth`] says, counting the
    /// allocations other refill threads have under way. The stop flag is checked under the
    /// queue's lock and set (with the notify) under it too, so a stop is never missed.
    fn refill(&self) -> Result<(), Failure> {
        // Below the vCPUs and the fault handlers: a refill uses CPU they leave, and yields to
        // them at once (at nice 0 four refill threads on two CPUs stretched a 2 MiB fault's
        // service from 37 us to 100-200 us at the median), yet still gets its share when the
        // host is busy, so a pool that runs dry is refilled.
        // SAFETY: setpriority on the calling thread (who 0) changes only its own nice value.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, REFILL_NICE) };
        let mut q = lock(&self.queue);
        loop {
            fail::fail_point!("pool-refill");
            if self.stop.is_set() {
                return Ok(());
            }
            if q.pages.len() + q.in_flight >= self.depth(&mut q) {
                fail::fail_point!("pool-refill-wait");
                // Woken by a take or an announcement; the timeout lets old demand age out.
                q = wait_timeout(&self.wanted, q, DEMAND_WINDOW).0;
                continue;
            }
            q.in_flight += 1;
            drop(q);
            let page = self.allocate();
            q = lock(&self.queue);
            q.in_flight -= 1;
            match page {
                Ok(page) => {
                    q.pages.push_back(page);
                    self.stats.ready_peak.max(q.pages.len() as u64);
                    self.filled.notify_one();
                }
                // Nothing to be had now: wait for the next request instead of spinning.
                Err(_) => {
                    self.filled.notify_all();
                    q = wait_timeout(&self.wanted, q, DEMAND_WINDOW).0;
                }
            }
        }
    }

    /// Takes a ready page, or waits for one a refill has under way.
    fn take(&self) -> Option<HugePage> {
        let mut q = lock(&self.queue);
        q.taken.push_back(Instant::now());
        q.expected = q.expected.saturating_sub(1);
        self.wanted.notify_all();
        if let Some(page) = q.pages.pop_front() {
            self.stats.from_ready.inc();
            return Some(page);
        }
        let deadline = Instant::now() + REFILL_WAIT;
        while q.pages.is_empty() && q.in_flight > 0 && !self.stop.is_set() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = wait_timeout(&self.filled, q, left).0;
        }
        let page = q.pages.pop_front();
        if page.is_some() {
            self.stats.waited_for_refill.inc();
        }
        page
    }
}

/// The huge page pool with its refill threads.
pub struct HugePagePool {
    inner: Arc<PoolInner>,
    refills: Vec<Worker>,
}

impl HugePagePool {
    /// A pool of pages from `source` (a [`PoolKind`], or any allocator) that keeps at least `ahead` pages ready (0: allocate on
    /// demand, no refill), with `refill_threads` threads allocating (at least one). If a refill
    /// thread fails (it panics), `on_fatal` is told.
    pub fn new(
        source: Arc<dyn HugePageAllocator>,
        ahead: usize,
        refill_threads: usize,
        hook: &ThreadHook,
        on_fatal: impl Fn(ThreadFailure) + Send + Sync + 'static,
    ) -> io::Result<Self> {
        let stop = Arc::new(Stop::new()?);
        let inner = Arc::new(PoolInner {
            source,
            ahead,
            queue: Mutex::new(Queue::default()),
            wanted: Condvar::new(),
            filled: Condvar::new(),
            stop,
            stats: Arc::default(),
            budget: Mutex::new(None),
        });
        let on_fatal = Arc::new(on_fatal);
        let mut refills = Vec::new();
        if ahead > 0 {
            for i in 0..refill_threads.max(1) {
                let (pool, fatal) = (inner.clone(), on_fatal.clone());
                refills.push(Worker::spawn(
                    &if i == 0 {
                        "huge-refill".to_string()
                    } else {
                        format!("huge-refill{i}")
                    },
                    ThreadRole::PoolRefill,
                    hook,
                    move |_| pool.refill(),
                    move |what| fatal(what),
                )?);
                inner.stats.refill_threads.inc();
            }
        }
        Ok(HugePagePool { inner, refills })
    }

    /// Bounds the depth by `budget`: how many more pages could ever be used.
    pub fn with_budget(self, budget: Budget) -> Self {
        *lock(&self.inner.budget) = Some(budget);
        self.inner.wanted.notify_all();
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
    pub fn wait_ready(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let failed = || self.inner.stats.failed.get() > 0;
        while self.ready() < n.min(self.inner.ahead)
            && !failed()
            && !self.refills.is_empty()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pages ready right now.
    pub fn ready(&self) -> usize {
        lock(&self.inner.queue).pages.len()
    }

    /// Stops the refill threads and unmaps every ready page.
    pub fn shutdown(&mut self) {
        self.inner
            .stop
            .set_and_notify(&self.inner.queue, &self.inner.wanted);
        self.inner.filled.notify_all();
        for mut refill in self.refills.drain(..) {
            refill.stop();
        }
        lock(&self.inner.queue).pages.clear();
    }
}

impl HugePageAllocator for HugePagePool {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        match self.inner.take() {
            Some(page) => Ok(page),
            None => {
                self.inner.stats.on_demand.inc();
                self.inner.allocate()
            }
        }
    }

    fn expect(&self, pages: usize) {
        let mut q = lock(&self.inner.queue);
        if q.expected != pages {
            q.expected = pages;
            self.inner.wanted.notify_all();
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
    use std::sync::atomic::Ordering;

    #[test]
    fn pool_keeps_pages_ready_and_frees_them() {
        #[cfg(feature = "failpoints")]
        let _alone = fail::FailScenario::setup();
        let mut pool = HugePagePool::new(
            Arc::new(PoolKind::Thp),
            2,
            1,
            &ThreadHook::default(),
            |what| panic!("{what}"),
        )
        .unwrap();
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

    /// Waits up to 10 s for `f`; false if it never held (no THP to be had here).
    fn eventually(f: impl Fn() -> bool) -> bool {
        let start = std::time::Instant::now();
        while !f() {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Demand raises the depth (announced collapses), but never past the budget (what the
    /// ledger can still charge) however much is announced.
    #[test]
    fn the_depth_follows_demand_within_the_budget() {
        // Injected failures elsewhere in this binary must not reach this pool.
        #[cfg(feature = "failpoints")]
        let _alone = fail::FailScenario::setup();
        let budget = Arc::new(std::sync::atomic::AtomicUsize::new(5));
        let b = budget.clone();
        let pool = HugePagePool::new(Arc::new(PoolKind::Thp), 1, 2, &ThreadHook::default(), |w| {
            panic!("{w}")
        })
        .unwrap()
        .with_budget(Arc::new(move || b.load(Ordering::Relaxed)));
        if !eventually(|| pool.ready() == 1) {
            eprintln!("SKIP: no THP could be allocated here");
            return;
        }
        // Nothing announced: the least depth, one page.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.ready(), 1);
        pool.expect(40);
        assert!(eventually(|| pool.ready() == 5), "ready {}", pool.ready());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.ready(), 5, "past the budget");
        assert_eq!(pool.stats().depth_peak.get(), 5);
        // A budget used up (the ledger full) stops the refill: the page taken below is not
        // replaced. (The budget is spent before the take: a refill the take wakes while the
        // budget still allowed one may rightly allocate it.)
        budget.store(0, Ordering::Relaxed);
        let made = pool.stats().thp.get();
        // Taking a ready page costs no allocation on the spot.
        let page = pool.alloc().unwrap();
        assert_eq!(page.kind(), PageKind::Thp);
        assert_eq!(pool.stats().from_ready.get(), 1);
        assert_eq!(pool.stats().on_demand.get(), 0);
        assert_eq!(pool.stats().hit_rate(), 1.0);
        drop(page);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            pool.stats().thp.get(),
            made,
            "allocated past a spent budget"
        );
    }

    /// A taker that finds nothing ready while a refill is under way waits for that refill's
    /// page instead of allocating another on the spot.
    #[test]
    #[cfg(feature = "failpoints")]
    fn a_taker_waits_for_the_refill_under_way() {
        let scenario = fail::FailScenario::setup();
        let pool = HugePagePool::new(Arc::new(PoolKind::Thp), 1, 1, &ThreadHook::default(), |w| {
            panic!("{w}")
        })
        .unwrap();
        if !eventually(|| pool.ready() == 1) {
            eprintln!("SKIP: no THP could be allocated here");
            return;
        }
        // Every allocation from now on takes 50 ms: the refill of the page taken below is
        // under way when the second take comes.
        fail::cfg("pool-alloc", "sleep(50)").unwrap();
        let first = pool.alloc().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let second = pool.alloc().unwrap();
        assert_eq!(pool.stats().from_ready.get(), 1);
        assert_eq!(pool.stats().waited_for_refill.get(), 1);
        assert_eq!(pool.stats().on_demand.get(), 0);
        drop((first, second));
        scenario.teardown();
    }

    /// Allocations that fail leave nothing behind: the pool ends empty, the taker gets the
    /// error, and shutdown finds no page to free.
    #[test]
    #[cfg(feature = "failpoints")]
    fn failing_allocations_leave_nothing_behind() {
        let scenario = fail::FailScenario::setup();
        fail::cfg("pool-alloc", "return").unwrap();
        let mut pool =
            HugePagePool::new(Arc::new(PoolKind::Thp), 2, 2, &ThreadHook::default(), |w| {
                panic!("{w}")
            })
            .unwrap();
        assert!(eventually(|| pool.stats().failed.get() >= 2));
        assert!(pool.alloc().is_err());
        assert_eq!(pool.ready(), 0);
        pool.shutdown();
        assert_eq!(pool.stats().thp.get(), 0);
        scenario.teardown();
    }

    /// The refill thread checks its stop flag, then waits: a stop (and its wake-up) landing
    /// between the two must still be seen. The fault point holds the thread right there.
    #[test]
    #[cfg(feature = "failpoints")]
    fn a_stop_between_the_check_and_the_wait_is_not_missed() {
        let scenario = fail::FailScenario::setup();
        fail::cfg("pool-refill-wait", "sleep(300)").unwrap();
        let mut pool = HugePagePool::new(
            Arc::new(PoolKind::Thp),
            1,
            1,
            &ThreadHook::default(),
            |what| panic!("{what}"),
        )
        .unwrap();
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
