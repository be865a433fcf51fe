//! [`MemoryConfig`]: how guest memory is set up, and what the host must allow for it (the
//! mappings kept in reserve, whether the collapse thread can run here).

use std::sync::Arc;
use std::time::Duration;

use vm_memory::GuestAddress;

use crate::units::ByteSize;
use crate::{EXTENT_SIZE, PAGE_SIZE};

use super::backing::{Backing, PageSourceKind};
use super::collapse::{CollapseConfig, CollapseGate};
use super::fault::source::PageSource;
use super::huge::install::InstallMethod;
use super::huge::page::HugePageAllocator;
use super::huge::pool::PoolKind;
use super::uffd::{self, Uffd};
use crate::worker::ThreadHook;
use crate::working_set::WorkingSet;

/// Mappings kept free for the VMM itself, besides its vCPU threads.
pub const MAP_RESERVE: u64 = 128;
/// Mappings a thread costs (its stack and guard, its signal stack and guard).
pub const MAPS_PER_THREAD: u64 = 4;

/// Why the collapse thread cannot run on this host for this user, if it cannot: it needs a
/// userfaultfd with write-protection of unpopulated pages.
pub fn collapse_unavailable() -> Option<String> {
    let features = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;
    match Uffd::new(features) {
        Err(e) => Some(format!(
            "this user may not open a userfaultfd ({e}; it needs root, \
             vm.unprivileged_userfaultfd=1, or read and write access to /dev/userfaultfd)"
        )),
        Ok(u) if u.features() & features != features => Some(
            "the kernel lacks userfaultfd write-protection of unpopulated pages (Linux 6.4+)"
                .into(),
        ),
        Ok(_) => None,
    }
}

/// How a memory image is restored (`--restore`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Restore {
    /// The guest starts at once; its pages come from the image as it touches them (and from
    /// the prefetcher, behind it).
    #[default]
    Lazy,
    /// The whole image is read into RAM before the guest starts.
    Eager,
}

crate::choice::choices!(Restore {
    Lazy = "lazy": "The guest starts at once; its pages come from the image as it touches them (and from the prefetcher, behind it)",
    Eager = "eager": "The whole image is read into RAM before the guest starts",
});

/// How guest memory is set up: made by [`MemoryConfig::builder`], which checks every rule
/// once, so a `MemoryConfig` is always one [`Memory::new`](crate::Memory::new) can build.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// RAM size (a multiple of 2 MiB): the regions' sizes added up.
    pub(crate) size: u64,
    /// Guest RAM's regions: `(guest address, size)`, ascending, each 2 MiB aligned.
    pub(crate) regions: Vec<(GuestAddress, u64)>,
    /// What backs RAM from the start.
    pub(crate) backing: Backing,
    /// Where first-touch contents come from.
    pub(crate) source: PageSourceKind,
    /// Bytes the fault handler resolves per fault (4 KiB, or up to 2 MiB to fault around).
    pub(crate) fault_granularity: u64,
    /// The collapse thread, if on (4 KiB backing only).
    pub(crate) collapse: Option<CollapseConfig>,
    /// Where huge pages come from.
    pub(crate) huge_source: PoolKind,
    /// Most huge-page memory that may be charged.
    pub(crate) huge_limit: u64,
    /// Huge pages the pool keeps ready ahead of demand, at least (0: none, every page is
    /// allocated when it is taken); demand raises the depth from there.
    pub(crate) pool_ahead: usize,
    /// Threads allocating the pool's pages ahead of demand (at least one).
    pub(crate) pool_refill_threads: usize,
    /// Populate all of RAM when it is mapped (the huge backings do unless told not to; the
    /// fault benchmark measures them faulting on demand).
    pub(crate) populate: bool,
    /// Memory mappings kept free for the rest of the VMM (its threads, large allocations):
    /// huge pages stop being moved into guest RAM before they would eat into them.
    pub(crate) map_reserve: u64,
    /// Run first on every thread the manager starts (a VMM installs its filters there).
    pub(crate) thread_hook: ThreadHook,
    /// Fault handler threads, each with a uffd over its share of RAM.
    pub(crate) fault_threads: usize,
    /// How huge pages go in.
    pub(crate) install: InstallMethod,
    /// Holds the collapse thread before its first scan until opened.
    pub(crate) collapse_gate: Option<CollapseGate>,
    /// Where the pool's pages come from, if not from `huge_source`.
    pub(crate) huge_allocator: Plugged<dyn HugePageAllocator>,
    /// How long a fault handler looks for the next fault before it sleeps.
    pub(crate) fault_spin: Duration,
    /// How an image source is restored.
    pub(crate) restore: Restore,
    /// Prefetch threads filling RAM from the image behind the guest (0: none).
    pub(crate) prefetch_threads: usize,
    /// Wraps the image's page source, if the VMM asked to.
    pub(crate) source_layer: Plugged<Layer>,
    /// Guest reports of free memory are honoured, huge extents split from this many freed
    /// pages ([`crate::reclaim`]); `None`: reports are refused.
    pub(crate) reclaim_split: Option<u32>,
    /// How a huge extent freed from that threshold gives its freed pages back.
    pub(crate) reclaim_partial: crate::reclaim::PartialFree,
    /// The zero-page shrinker reads this many bytes of guest RAM a second; `None`: it does
    /// not run ([`crate::reclaim::shrinker`]).
    pub(crate) zero_shrinker: Option<u64>,
    /// The fault handlers record the guest's working set ([`crate::working_set`]).
    pub(crate) record_working_set: bool,
    /// The prefetcher fills this working set first, in its order.
    pub(crate) replay: Plugged<WorkingSet>,
}

/// What wraps the image's page source ([`MemoryBuilder::image_source_layer`]).
type Layer = dyn Fn(Arc<dyn PageSource>) -> Arc<dyn PageSource> + Send + Sync;

/// Something a VMM plugged in (an allocator, a layer), which `Debug` can only say is there.
pub(crate) struct Plugged<T: ?Sized>(pub(crate) Option<Arc<T>>);

impl<T: ?Sized> Clone for Plugged<T> {
    fn clone(&self) -> Self {
        Plugged(self.0.clone())
    }
}

impl<T: ?Sized> Default for Plugged<T> {
    fn default() -> Self {
        Plugged(None)
    }
}

impl<T: ?Sized> std::fmt::Debug for Plugged<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// A rule of [`MemoryConfig`] that a [`MemoryBuilder`]'s values break. Each names the setting
/// (the builder's method) and the value, and says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The RAM size is not a whole number of extents.
    #[error("size {} is not a multiple of 2 MiB", ByteSize(*.0))]
    SizeNotAligned(u64),
    /// A region that does not start and end on a 2 MiB boundary, or is empty.
    #[error("region of {} at {:#x} is not allowed: a region starts at a multiple of 2 MiB and is a non-zero multiple of 2 MiB", ByteSize(*size), start.0)]
    RegionNotAligned {
        /// Its guest address.
        start: GuestAddress,
        /// Its size.
        size: u64,
    },
    /// Regions out of ascending order, overlapping, or ending past the 64-bit address space.
    #[error("region at {:#x} overlaps or comes before the one ending at {:#x}: regions ascend and do not overlap", start.0, previous_end)]
    RegionsOverlap {
        /// The region's guest address.
        start: GuestAddress,
        /// Where the region before it ends.
        previous_end: u64,
    },
    /// No region.
    #[error("guest RAM needs at least one region")]
    NoRegions,
    /// A reclaim split threshold outside one extent's pages.
    #[error("reclaim_split_pages {0} is out of range: allowed 1 to 512")]
    ReclaimSplitPages(u32),
    /// A zero-page shrinker rate outside what it can be paced at.
    #[error("zero_shrinker rate {}/s is out of range: allowed {}/s to {}/s", ByteSize(*.0), ByteSize(crate::reclaim::shrinker::MIN_RATE), ByteSize(crate::reclaim::shrinker::MAX_RATE))]
    ZeroShrinkerRate(u64),
    /// The zero-page shrinker where it cannot run.
    #[error("the zero-page shrinker {0}")]
    ZeroShrinker(&'static str),
    /// A fault granularity that is not a power of two from 4 KiB to 2 MiB.
    #[error("fault_granularity {} is not a power of two from 4K to 2M", ByteSize(*.0))]
    FaultGranularity(u64),
    /// A fault granularity above 4 KiB where this manager's handlers serve no faults.
    #[error(
        "fault_granularity above 4K needs 4 KiB backing and a page source the manager's handlers serve (zero or image)"
    )]
    GranularityNeedsUffd,
    /// The collapse thread with huge backing.
    #[error("collapse needs Backing::Small (with {0} backing all RAM is huge already)")]
    CollapseNeedsSmall(Backing),
    /// The collapse thread with an external page server.
    #[error(
        "collapse cannot run with an external page server: its write-protect faults would reach a server that does not answer them, and a page it moves away would be refilled from that server's file"
    )]
    CollapseWithExternal,
    /// An external page server with huge backing.
    #[error("an external page server needs Backing::Small (it fills 4 KiB pages), not {0}")]
    ExternalNeedsSmall(Backing),
    /// A `max_ptes_none` outside 0 to 511.
    #[error("collapse max_ptes_none {0} is out of range: allowed 0 to 511")]
    MaxPtesNone(u32),
    /// A zero `pages_to_scan`.
    #[error("collapse pages_to_scan must be at least 1")]
    PagesToScan,
    /// A huge-page limit that is not a whole number of huge pages, or exceeds RAM.
    #[error("huge_limit {} is not a multiple of 2 MiB from 2M to the RAM size, {}", ByteSize(*value), ByteSize(*ram))]
    HugeLimit {
        /// The value given.
        value: u64,
        /// The RAM size.
        ram: u64,
    },
    /// A huge-page limit where nothing charges huge pages.
    #[error(
        "huge_limit applies only where huge pages are charged: the collapse thread, 2 MiB fault granularity, or the restore prefetcher"
    )]
    HugeLimitUnused,
    /// A fault handler count out of range.
    #[error("fault_threads {0} is out of range: allowed 1 to {max}", max = MemoryConfig::MAX_FAULT_THREADS)]
    FaultThreads(usize),
    /// Fault handler threads where the manager serves no faults.
    #[error(
        "fault_threads applies to 4 KiB backing with a page source the manager's handlers serve (zero or image)"
    )]
    FaultThreadsNeedUffd,
    /// An eager restore without an image.
    #[error("Restore::Eager applies to an image page source")]
    RestoreNeedsImage,
    /// The prefetcher where it cannot run.
    #[error("prefetch applies to an image restored lazily into 4 KiB backing")]
    PrefetchNeedsLazyImage,
    /// Fault handler settings where an eager restore leaves no fault to serve.
    #[error(
        "fault_granularity and fault_threads do not apply to Restore::Eager (after the copy the kernel serves every fault)"
    )]
    EagerServesNoFaults,
    /// Recording a working set where the manager does not see every first touch.
    #[error("record_working_set {0}")]
    RecordWorkingSet(&'static str),
    /// Replaying a working set where it cannot be.
    #[error("replay_working_set {0}")]
    ReplayWorkingSet(String),
    /// A prefetch thread count out of range.
    #[error("prefetch_threads {0} is out of range: allowed 1 to {max}", max = MemoryConfig::MAX_PREFETCH_THREADS)]
    PrefetchThreads(usize),
    /// More huge pages kept ready than could be used.
    #[error(
        "pool_ahead {value} is out of range: allowed 0 to {max} (one per extent, at most {})",
        MemoryConfig::MAX_POOL_AHEAD
    )]
    PoolAhead {
        /// The value given.
        value: usize,
        /// Largest allowed for this RAM size.
        max: usize,
    },
}

/// Checks guest RAM's regions: at least one, each 2 MiB aligned and non-empty, ascending and
/// not overlapping.
pub(crate) fn check_regions(regions: &[(GuestAddress, u64)]) -> Result<(), ConfigError> {
    if regions.is_empty() {
        return Err(ConfigError::NoRegions);
    }
    let mut previous_end = 0;
    for (i, &(start, size)) in regions.iter().enumerate() {
        if size == 0 || !size.is_multiple_of(EXTENT_SIZE) || !start.0.is_multiple_of(EXTENT_SIZE) {
            return Err(ConfigError::RegionNotAligned { start, size });
        }
        let end = start.0.checked_add(size);
        if (i > 0 && start.0 < previous_end) || end.is_none() {
            return Err(ConfigError::RegionsOverlap {
                start,
                previous_end,
            });
        }
        previous_end = end.expect("checked");
    }
    Ok(())
}

/// Builds a [`MemoryConfig`]: every setting has a default (4 KiB pages populated by the host
/// kernel, no collapse thread, one vCPU), and [`MemoryBuilder::build`] checks them all at once.
#[derive(Clone, Debug)]
pub struct MemoryBuilder {
    config: MemoryConfig,
    huge_limit: Option<u64>,
    fault_threads: Option<usize>,
    fault_spin: Option<Duration>,
    pool_refill_threads: Option<usize>,
    prefetch: Option<bool>,
    vcpus: usize,
}

/// A builder setter for a plain field.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),+ $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.config.$name = value;
                self
            }
        )+
    };
}

impl MemoryBuilder {
    setters! {
        /// What backs RAM from the start (default: 4 KiB pages on demand).
        backing: Backing,
        /// Where a page's contents come from when first touched (default: the host kernel).
        source: PageSourceKind,
        /// Bytes a fault handler resolves per fault: a power of two from 4 KiB to 2 MiB
        /// (default 4 KiB; above it needs 4 KiB backing and a zero or image source).
        fault_granularity: u64,
        /// The collapse thread and its tunables (default: none; 4 KiB backing only).
        collapse: Option<CollapseConfig>,
        /// Where huge pages come from (default: hugetlb while its pool lasts, else THP).
        huge_source: PoolKind,
        /// Huge pages kept ready ahead of demand, at least: 0 to one per extent, at most
        /// [`MemoryConfig::MAX_POOL_AHEAD`] (default [`MemoryConfig::POOL_AHEAD`]).
        pool_ahead: usize,
        /// Whether huge backings are populated when mapped (default: yes).
        populate: bool,
        /// Run first on every thread the manager starts (default: nothing).
        thread_hook: ThreadHook,
        /// How huge pages go into guest RAM (default: `UFFDIO_MOVE` where it can).
        install: InstallMethod,
        /// How an image source is restored (default: lazily).
        restore: Restore,
        /// Prefetch threads, 1 to [`MemoryConfig::MAX_PREFETCH_THREADS`] (default
        /// [`MemoryConfig::PREFETCH_THREADS`]), where the prefetcher runs.
        prefetch_threads: usize,
    }

    /// vCPUs that will fault on this memory (default 1): sets the default number of fault
    /// handlers and refill threads, whether handlers spin, and the mappings kept in reserve
    /// (each vCPU thread costs [`MAPS_PER_THREAD`]).
    pub fn vcpus(mut self, vcpus: usize) -> Self {
        self.vcpus = vcpus.max(1);
        self
    }

    /// Wraps the image's page source in `layer`: every read of the image (the fault
    /// handlers', the collapse's, the prefetcher's, an eager copy's) goes through what it
    /// returns (a cache, tracing, a model of slower storage in a benchmark).
    pub fn image_source_layer(
        mut self,
        layer: impl Fn(Arc<dyn PageSource>) -> Arc<dyn PageSource> + Send + Sync + 'static,
    ) -> Self {
        self.config.source_layer = Plugged(Some(Arc::new(layer)));
        self
    }

    /// Holds the collapse thread before its first scan until `gate` is opened (default: it
    /// starts scanning at once).
    pub fn collapse_gate(mut self, gate: CollapseGate) -> Self {
        self.config.collapse_gate = Some(gate);
        self
    }

    /// Where huge pages come from instead of [`huge_source`](Self::huge_source): a VMM's
    /// own reserve, or a benchmark's allocator that wraps a [`PoolKind`] to model slow
    /// allocation. The pool still allocates from it ahead of demand, on its refill threads.
    pub fn huge_allocator(mut self, allocator: Arc<dyn HugePageAllocator>) -> Self {
        self.config.huge_allocator = Plugged(Some(allocator));
        self
    }

    /// Most huge-page memory that may be charged: a multiple of 2 MiB up to the RAM size
    /// (default: the RAM size).
    pub fn huge_limit(mut self, bytes: u64) -> Self {
        self.huge_limit = Some(bytes);
        self
    }

    /// Fault handler threads, 1 to [`MemoryConfig::MAX_FAULT_THREADS`], each with its own
    /// userfaultfd (default: one per vCPU, up to the host's CPUs and one per extent).
    pub fn fault_threads(mut self, n: usize) -> Self {
        self.fault_threads = Some(n);
        self
    }

    /// How long a fault handler keeps looking for the next fault before it sleeps (default:
    /// [`MemoryConfig::FAULT_SPIN`] where the handlers and the vCPUs each have a CPU, else 0).
    pub fn fault_spin(mut self, d: Duration) -> Self {
        self.fault_spin = Some(d);
        self
    }

    /// Threads allocating huge pages ahead of demand, at least one (default: the CPUs the
    /// vCPUs leave spare, from [`MemoryConfig::REFILL_THREADS`] to
    /// [`MemoryConfig::MAX_REFILL_THREADS`]).
    pub fn pool_refill_threads(mut self, n: usize) -> Self {
        self.pool_refill_threads = Some(n.max(1));
        self
    }

    /// Whether the guest's reports of free memory are honoured ([`crate::reclaim`]; default:
    /// yes). Off, [`Memory::reclaimer`](crate::Memory::reclaimer) is `None`.
    pub fn reclaim(mut self, on: bool) -> Self {
        self.config.reclaim_split = on.then_some(
            self.config
                .reclaim_split
                .unwrap_or(crate::reclaim::SPLIT_PAGES),
        );
        self
    }

    /// How many 4 KiB pages of a huge extent must be freed for reclaim to split it, 1 to 512
    /// (default [`SPLIT_PAGES`](crate::reclaim::SPLIT_PAGES)); below, the huge page is kept and
    /// the freed pages zeroed. Turns reclaim on.
    pub fn reclaim_split_pages(mut self, pages: u32) -> Self {
        self.config.reclaim_split = Some(pages);
        self
    }

    /// How a huge extent freed from the split threshold gives its freed pages back (default
    /// [`PartialFree::Copy`](crate::reclaim::PartialFree::Copy): the whole huge page goes back
    /// at once).
    pub fn reclaim_partial(mut self, how: crate::reclaim::PartialFree) -> Self {
        self.config.reclaim_partial = how;
        self
    }

    /// Runs the zero-page shrinker ([`crate::reclaim::shrinker`]), reading at most
    /// `bytes_per_sec` of guest RAM a second (at least
    /// [`MIN_RATE`](crate::reclaim::shrinker::MIN_RATE)); `None` (the default) does not. It
    /// needs reclaim on, 4 KiB backing and a page source other than an external server (it
    /// write-protects what it inspects, with the manager's own userfaultfd).
    pub fn zero_shrinker(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.config.zero_shrinker = bytes_per_sec;
        self
    }

    /// Records the guest's working set as the fault handlers serve its first touches
    /// ([`crate::working_set`]; read it with [`Memory::working_set`](crate::Memory::working_set)).
    /// It needs the manager to serve faults (a zero or image source, restored lazily into
    /// 4 KiB backing) and no prefetcher, which it turns off by default: a prefetched extent is
    /// touched without a fault.
    pub fn record_working_set(mut self, on: bool) -> Self {
        self.config.record_working_set = on;
        self
    }

    /// The prefetcher fills the extents of `working_set` first, in its order, then the rest
    /// (a guest fault is served at once all the same). Needs the prefetcher.
    pub fn replay_working_set(mut self, working_set: Arc<WorkingSet>) -> Self {
        self.config.replay = Plugged(Some(working_set));
        self
    }

    /// Whether the restore prefetcher runs (default: wherever it applies, an image restored
    /// lazily into 4 KiB backing, unless the working set is recorded).
    pub fn prefetch(mut self, on: bool) -> Self {
        self.prefetch = Some(on);
        self
    }

    /// Checks every setting and fills in the defaults that depend on others.
    pub fn build(self) -> Result<MemoryConfig, ConfigError> {
        let MemoryBuilder {
            mut config,
            huge_limit,
            fault_threads,
            fault_spin,
            pool_refill_threads,
            prefetch,
            vcpus,
        } = self;
        if let Some(pages) = config.reclaim_split
            && !(1..=crate::extent::PAGES_PER_EXTENT as u32).contains(&pages)
        {
            return Err(ConfigError::ReclaimSplitPages(pages));
        }
        if let Some(rate) = config.zero_shrinker {
            use crate::reclaim::shrinker::{MAX_RATE, MIN_RATE};
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(ConfigError::ZeroShrinkerRate(rate));
            }
            if config.reclaim_split.is_none() {
                return Err(ConfigError::ZeroShrinker(
                    "gives memory back by reclaim's rules: it needs reclaim on",
                ));
            }
            if config.backing != Backing::Small {
                return Err(ConfigError::ZeroShrinker(
                    "needs 4 KiB backing (with huge backing all of RAM is the VM's reservation)",
                ));
            }
            if matches!(config.source, PageSourceKind::External(_)) {
                return Err(ConfigError::ZeroShrinker(
                    "cannot run with an external page server: it write-protects the pages it inspects, and the server's userfaultfd does not watch for that",
                ));
            }
        }
        let size = config.size;
        if size == 0 || !size.is_multiple_of(EXTENT_SIZE) {
            return Err(ConfigError::SizeNotAligned(size));
        }
        check_regions(&config.regions)?;
        let small = config.backing == Backing::Small;
        let external = matches!(config.source, PageSourceKind::External(_));
        if config.collapse.is_some() && !small {
            return Err(ConfigError::CollapseNeedsSmall(config.backing));
        }
        if external {
            if !small {
                return Err(ConfigError::ExternalNeedsSmall(config.backing));
            }
            if config.collapse.is_some() {
                return Err(ConfigError::CollapseWithExternal);
            }
        }
        if let Some(c) = &config.collapse {
            if c.max_ptes_none > CollapseConfig::MAX_PTES_NONE {
                return Err(ConfigError::MaxPtesNone(c.max_ptes_none));
            }
            if c.pages_to_scan == 0 {
                return Err(ConfigError::PagesToScan);
            }
        }
        let g = config.fault_granularity;
        if !g.is_power_of_two() || !(PAGE_SIZE..=EXTENT_SIZE).contains(&g) {
            return Err(ConfigError::FaultGranularity(g));
        }
        let served = small && config.source.uses_uffd();
        if g != PAGE_SIZE && !served {
            return Err(ConfigError::GranularityNeedsUffd);
        }
        let image = matches!(config.source, PageSourceKind::Image(_));
        let prefetch_applies = image && config.restore == Restore::Lazy && small;
        if let Some(limit) = huge_limit {
            if limit == 0 || !limit.is_multiple_of(EXTENT_SIZE) || limit > size {
                return Err(ConfigError::HugeLimit {
                    value: limit,
                    ram: size,
                });
            }
            if config.collapse.is_none()
                && g != EXTENT_SIZE
                && !prefetch.unwrap_or(prefetch_applies)
            {
                return Err(ConfigError::HugeLimitUnused);
            }
        }
        if let Some(n) = fault_threads {
            if n == 0 || n > MemoryConfig::MAX_FAULT_THREADS {
                return Err(ConfigError::FaultThreads(n));
            }
            if !served {
                return Err(ConfigError::FaultThreadsNeedUffd);
            }
        }
        if config.restore == Restore::Eager && !image {
            return Err(ConfigError::RestoreNeedsImage);
        }
        if prefetch == Some(true) && !prefetch_applies {
            return Err(ConfigError::PrefetchNeedsLazyImage);
        }
        let prefetching = prefetch.unwrap_or(prefetch_applies && !config.record_working_set);
        if config.record_working_set {
            if !(served && config.restore == Restore::Lazy) {
                return Err(ConfigError::RecordWorkingSet(
                    "needs the manager to serve every first touch: a zero or image source, restored lazily into 4 KiB backing",
                ));
            }
            if prefetching {
                return Err(ConfigError::RecordWorkingSet(
                    "cannot run with the prefetcher: an extent it fills is touched without a fault, and would be missing from the record",
                ));
            }
        }
        if let Some(ws) = &config.replay.0 {
            if !prefetching {
                return Err(ConfigError::ReplayWorkingSet(
                    "needs the prefetcher (an image restored lazily into 4 KiB backing, prefetch on)".into(),
                ));
            }
            ws.check(size).map_err(ConfigError::ReplayWorkingSet)?;
        }
        let threads = config.prefetch_threads;
        if threads == 0 || threads > MemoryConfig::MAX_PREFETCH_THREADS {
            return Err(ConfigError::PrefetchThreads(threads));
        }
        if config.restore == Restore::Eager && (g != PAGE_SIZE || fault_threads.is_some()) {
            return Err(ConfigError::EagerServesNoFaults);
        }
        let extents = (size / EXTENT_SIZE) as usize;
        let max = MemoryConfig::MAX_POOL_AHEAD.min(extents);
        if config.pool_ahead > max {
            return Err(ConfigError::PoolAhead {
                value: config.pool_ahead,
                max,
            });
        }

        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        config.huge_limit = huge_limit.unwrap_or(size);
        config.fault_threads = fault_threads.unwrap_or(vcpus.min(cpus)).clamp(1, extents);
        config.fault_spin = fault_spin.unwrap_or(if vcpus + config.fault_threads <= cpus {
            MemoryConfig::FAULT_SPIN
        } else {
            Duration::ZERO
        });
        config.pool_refill_threads = pool_refill_threads.unwrap_or_else(|| {
            cpus.saturating_sub(vcpus).clamp(
                MemoryConfig::REFILL_THREADS,
                MemoryConfig::MAX_REFILL_THREADS,
            )
        });
        config.map_reserve = MAP_RESERVE + MAPS_PER_THREAD * vcpus as u64;
        if !prefetching {
            config.prefetch_threads = 0;
        }
        Ok(config)
    }
}

impl MemoryConfig {
    /// Huge pages the pool keeps ready by default.
    pub const POOL_AHEAD: usize = crate::huge::pool::POOL_AHEAD;
    /// Most huge pages the pool keeps ready (128 MiB): pages kept ready are memory the ledger
    /// does not charge.
    pub const MAX_POOL_AHEAD: usize = crate::huge::pool::MAX_DEPTH;
    /// Threads allocating huge pages ahead of demand, at least, by default. More than the
    /// CPUs spare: an allocation is mostly waiting (on a nested host, for the outer hypervisor
    /// to back memory touched for the first time), and the waits overlap. Measured on a
    /// 2-CPU nested host, fresh 2 MiB pages touched in a loop: one process 6.2 ms a page,
    /// four at once 9.4 ms each (2.6x the pages per second).
    pub const REFILL_THREADS: usize = 4;
    /// Most refill threads by default.
    pub const MAX_REFILL_THREADS: usize = 8;
    /// Most fault handler threads: one per CPU of a large host, and a uffd each.
    pub const MAX_FAULT_THREADS: usize = 256;
    /// Prefetch threads by default (two reach a plain sequential read's bandwidth here).
    pub const PREFETCH_THREADS: usize = crate::prefetch::PREFETCH_THREADS;
    /// Most prefetch threads.
    pub const MAX_PREFETCH_THREADS: usize = crate::prefetch::MAX_PREFETCH_THREADS;
    /// How long a fault handler with a CPU of its own looks for the next fault.
    pub const FAULT_SPIN: Duration = crate::fault::SPIN_AFTER_FAULT;

    /// A builder for `size` bytes of guest RAM (a multiple of 2 MiB) in one region at guest
    /// address 0, with every default.
    pub fn builder(size: u64) -> MemoryBuilder {
        Self::builder_for_regions(&[(GuestAddress(0), size)])
    }

    /// A builder for guest RAM in `regions`: `(guest address, size)` pairs, ascending and not
    /// overlapping, each starting on a 2 MiB boundary and a non-zero multiple of 2 MiB. Each
    /// region becomes a memslot ([`GuestRam::register`](crate::GuestRam::register)); the
    /// gaps between them are left unbacked.
    pub fn builder_for_regions(regions: &[(GuestAddress, u64)]) -> MemoryBuilder {
        let size = regions
            .iter()
            .fold(0u64, |total, &(_, size)| total.saturating_add(size));
        MemoryBuilder {
            config: MemoryConfig {
                regions: regions.to_vec(),
                populate: true,
                prefetch_threads: Self::PREFETCH_THREADS,
                ..MemoryConfig::small(size)
            },
            huge_limit: None,
            fault_threads: None,
            fault_spin: None,
            pool_refill_threads: None,
            prefetch: None,
            vcpus: 1,
        }
    }

    /// The same memory without the collapse thread (where the host cannot run it).
    pub fn without_collapse(mut self) -> Self {
        self.collapse = None;
        self
    }

    /// RAM size in bytes (all regions).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Guest RAM's regions, `(guest address, size)`.
    pub fn regions(&self) -> &[(GuestAddress, u64)] {
        &self.regions
    }

    /// What backs RAM from the start.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Where first-touch contents come from.
    pub fn source(&self) -> &PageSourceKind {
        &self.source
    }

    /// The collapse thread's tunables, if it runs.
    pub fn collapse(&self) -> Option<&CollapseConfig> {
        self.collapse.as_ref()
    }

    /// The reclaim split threshold in pages, if reclaim is on.
    pub fn reclaim_split_pages(&self) -> Option<u32> {
        self.reclaim_split
    }

    /// The zero-page shrinker's rate in bytes a second, if it runs.
    pub fn zero_shrinker(&self) -> Option<u64> {
        self.zero_shrinker
    }

    /// Fault handler threads.
    pub fn fault_threads(&self) -> usize {
        self.fault_threads
    }

    /// Memory mappings kept free for the rest of the VMM.
    pub fn map_reserve(&self) -> u64 {
        self.map_reserve
    }

    /// Prefetch threads (0: the prefetcher does not run).
    pub fn prefetch_threads(&self) -> usize {
        self.prefetch_threads
    }

    /// 4 KiB pages populated by the host kernel, no collapse: the simplest memory, unchecked
    /// (the builder's start, and the crate's tests').
    pub(crate) fn small(size: u64) -> Self {
        MemoryConfig {
            size,
            regions: vec![(GuestAddress(0), size)],
            backing: Backing::Small,
            source: PageSourceKind::Kernel,
            fault_granularity: PAGE_SIZE,
            collapse: None,
            huge_source: PoolKind::Auto,
            huge_limit: size,
            pool_ahead: super::huge::pool::POOL_AHEAD,
            pool_refill_threads: 1,
            populate: false,
            map_reserve: MAP_RESERVE,
            thread_hook: ThreadHook::default(),
            fault_threads: 1,
            install: InstallMethod::default(),
            huge_allocator: Plugged::default(),
            collapse_gate: None,
            fault_spin: Duration::ZERO,
            restore: Restore::Lazy,
            prefetch_threads: 0,
            source_layer: Plugged::default(),
            reclaim_split: Some(crate::reclaim::SPLIT_PAGES),
            reclaim_partial: crate::reclaim::PartialFree::default(),
            zero_shrinker: None,
            record_working_set: false,
            replay: Plugged::default(),
        }
    }

    /// Whether this VMM's fault handlers serve guest RAM's first touches (the zero source, or
    /// an image restored lazily); else the kernel does.
    pub fn serves_faults(&self) -> bool {
        self.source.uses_uffd() && self.restore == Restore::Lazy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;

    fn image() -> PageSourceKind {
        PageSourceKind::Image(PathBuf::from("/nonexistent"))
    }

    #[test]
    fn the_defaults_are_the_simplest_memory() {
        let c = MemoryConfig::builder(64 * MIB).build().unwrap();
        assert_eq!((c.size(), c.backing()), (64 * MIB, Backing::Small));
        assert_eq!(c.source(), &PageSourceKind::Kernel);
        assert!(c.collapse().is_none() && !c.serves_faults());
        assert_eq!((c.huge_limit, c.fault_granularity), (64 * MIB, PAGE_SIZE));
        assert_eq!(c.map_reserve(), MAP_RESERVE + MAPS_PER_THREAD);
        assert!(c.populate);
        // No image, so no prefetcher, whatever its thread count.
        assert_eq!(c.prefetch_threads(), 0);
    }

    #[test]
    fn defaults_that_depend_on_others_are_filled_in() {
        let lazy = MemoryConfig::builder(64 * MIB)
            .source(image())
            .build()
            .unwrap();
        assert_eq!(lazy.prefetch_threads(), MemoryConfig::PREFETCH_THREADS);
        let off = MemoryConfig::builder(64 * MIB)
            .source(image())
            .prefetch(false)
            .build()
            .unwrap();
        assert_eq!(off.prefetch_threads(), 0);
        // Never more fault handlers than extents.
        let two = MemoryConfig::builder(4 * MIB)
            .source(PageSourceKind::Zero)
            .vcpus(8)
            .build()
            .unwrap();
        assert!(two.fault_threads() <= 2, "{}", two.fault_threads());
        let c = MemoryConfig::builder(64 * MIB).vcpus(4).build().unwrap();
        assert_eq!(c.map_reserve(), MAP_RESERVE + 4 * MAPS_PER_THREAD);
        assert!(
            (MemoryConfig::REFILL_THREADS..=MemoryConfig::MAX_REFILL_THREADS)
                .contains(&c.pool_refill_threads)
        );
    }

    #[test]
    fn every_rule_names_its_setting_and_value() {
        let b = || MemoryConfig::builder(64 * MIB);
        let zero = || b().source(PageSourceKind::Zero);
        let collapse = Some(CollapseConfig::default());
        let cases: Vec<(MemoryBuilder, ConfigError, &str)> = vec![
            (
                MemoryConfig::builder(3 * MIB),
                ConfigError::SizeNotAligned(3 * MIB),
                "size 3M",
            ),
            (
                b().backing(Backing::Thp).collapse(collapse.clone()),
                ConfigError::CollapseNeedsSmall(Backing::Thp),
                "collapse needs Backing::Small (with thp",
            ),
            (
                b().source(PageSourceKind::External("/s".into()))
                    .collapse(collapse),
                ConfigError::CollapseWithExternal,
                "collapse cannot run with an external page server",
            ),
            (
                zero().fault_granularity(8192 + 4096),
                ConfigError::FaultGranularity(12288),
                "fault_granularity 12K",
            ),
            (
                b().fault_granularity(2 * MIB),
                ConfigError::GranularityNeedsUffd,
                "fault_granularity above 4K",
            ),
            (
                b().huge_limit(3 * MIB),
                ConfigError::HugeLimit {
                    value: 3 * MIB,
                    ram: 64 * MIB,
                },
                "huge_limit 3M",
            ),
            (
                b().huge_limit(2 * MIB),
                ConfigError::HugeLimitUnused,
                "huge_limit applies",
            ),
            (
                zero().fault_threads(0),
                ConfigError::FaultThreads(0),
                "fault_threads 0",
            ),
            (
                b().fault_threads(2),
                ConfigError::FaultThreadsNeedUffd,
                "fault_threads applies",
            ),
            (
                b().restore(Restore::Eager),
                ConfigError::RestoreNeedsImage,
                "Restore::Eager",
            ),
            (
                b().prefetch(true),
                ConfigError::PrefetchNeedsLazyImage,
                "prefetch applies",
            ),
            (
                b().source(image()).prefetch_threads(17),
                ConfigError::PrefetchThreads(17),
                "prefetch_threads 17",
            ),
            (
                b().source(image()).restore(Restore::Eager).fault_threads(2),
                ConfigError::EagerServesNoFaults,
                "fault_granularity and fault_threads do not apply to Restore::Eager",
            ),
            (
                MemoryConfig::builder(8 * MIB).pool_ahead(5),
                ConfigError::PoolAhead { value: 5, max: 4 },
                "pool_ahead 5",
            ),
        ];
        for (builder, want, says) in cases {
            let got = builder.build().unwrap_err();
            assert_eq!(got, want);
            assert!(got.to_string().starts_with(says), "{got}");
        }
        let regions = |r: &[(u64, u64)]| {
            let r: Vec<_> = r
                .iter()
                .map(|&(at, size)| (GuestAddress(at), size))
                .collect();
            MemoryConfig::builder_for_regions(&r).build()
        };
        assert_eq!(regions(&[]).unwrap_err(), ConfigError::SizeNotAligned(0));
        assert_eq!(
            regions(&[(MIB, 2 * MIB)]).unwrap_err(),
            ConfigError::RegionNotAligned {
                start: GuestAddress(MIB),
                size: 2 * MIB
            }
        );
        assert_eq!(
            regions(&[(0, 4 * MIB), (2 * MIB, 2 * MIB)]).unwrap_err(),
            ConfigError::RegionsOverlap {
                start: GuestAddress(2 * MIB),
                previous_end: 4 * MIB
            }
        );
        let two = regions(&[(0, 4 * MIB), (4 << 30, 2 * MIB)]).unwrap();
        assert_eq!((two.size(), two.regions().len()), (6 * MIB, 2));
        let c = CollapseConfig {
            max_ptes_none: 512,
            ..CollapseConfig::default()
        };
        let got = b().collapse(Some(c)).build().unwrap_err();
        assert_eq!(got, ConfigError::MaxPtesNone(512));
    }
}
