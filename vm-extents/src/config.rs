//! [`MemoryConfig`]: how guest memory is set up, and what the host must allow for it (the
//! mappings kept in reserve, whether the collapse thread can run here).

use crate::PAGE_SIZE;

use super::backing::{Backing, PageSourceKind};
use super::collapse::CollapseConfig;
use super::huge::install::InstallMethod;
use super::huge::pool::PoolKind;
use super::uffd::{self, Uffd};
use crate::worker::ThreadHook;

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

/// How to set up guest memory.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// RAM size (a multiple of 2 MiB).
    pub size: u64,
    /// What backs RAM from the start.
    pub backing: Backing,
    /// Where first-touch contents come from.
    pub source: PageSourceKind,
    /// Bytes the fault handler resolves per fault (4 KiB, or up to 2 MiB to fault around).
    pub fault_granularity: u64,
    /// The collapse thread, if on (4 KiB backing only).
    pub collapse: Option<CollapseConfig>,
    /// Where huge pages come from.
    pub huge_source: PoolKind,
    /// Most huge-page memory that may be charged.
    pub huge_limit: u64,
    /// Huge pages the pool keeps ready ahead of demand, at least (0: none, every page is
    /// allocated when it is taken); demand raises the depth from there.
    pub pool_ahead: usize,
    /// Threads allocating the pool's pages ahead of demand (at least one).
    pub pool_refill_threads: usize,
    /// Populate all of RAM when it is mapped (the huge backings do unless told not to; the
    /// fault benchmark measures them faulting on demand).
    pub populate: bool,
    /// Memory mappings kept free for the rest of the VMM (its threads, large allocations):
    /// huge pages stop being moved into guest RAM before they would eat into them.
    pub map_reserve: u64,
    /// Run first on every thread the manager starts (a VMM installs its filters there).
    pub thread_hook: ThreadHook,
    /// Fault handler threads, each with a uffd over its share of RAM.
    pub fault_threads: usize,
    /// How huge pages go in.
    pub install: InstallMethod,
    /// Added to every huge page allocation (benchmarks).
    pub alloc_latency: std::time::Duration,
    /// How long a fault handler looks for the next fault before it sleeps.
    pub fault_spin: std::time::Duration,
    /// How an image source is restored.
    pub restore: Restore,
    /// Prefetch threads filling RAM from the image behind the guest (0: none).
    pub prefetch_threads: usize,
    /// Added to every read of the image (benchmarks).
    pub image_read_latency: std::time::Duration,
}

impl MemoryConfig {
    /// 4 KiB pages populated by the host kernel, no collapse: the simplest memory.
    pub fn small(size: u64) -> Self {
        MemoryConfig {
            size,
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
            alloc_latency: std::time::Duration::ZERO,
            fault_spin: std::time::Duration::ZERO,
            restore: Restore::Lazy,
            prefetch_threads: 0,
            image_read_latency: std::time::Duration::ZERO,
        }
    }

    /// Whether this VMM's fault handlers serve guest RAM's first touches (the zero source, or
    /// an image restored lazily); else the kernel does.
    pub fn serves_faults(&self) -> bool {
        self.source.uses_uffd() && self.restore == Restore::Lazy
    }
}
