//! Guest memory: the host mapping of guest RAM, the extent table behind the memory map lock,
//! how pages get populated (the host kernel, or our userfaultfd handler serving a page
//! source), memory images, and the kernel's view of it all.
//!
//! [`Memory`] owns every piece and their order of teardown: the fault handler stops before the
//! uffd closes, and RAM is unmapped last (after the VM fd, which its owner drops first).

pub mod backing;
pub mod collapse;
pub mod extent;
pub mod fault;
pub mod image;
pub mod kernel;
pub mod ledger;
pub mod pool;
mod ram;
pub mod source;
pub mod uffd;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::sync::atomic::AtomicBool;

use guest_abi::layout::{EXTENT_SIZE, PAGE_SIZE};
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress};

pub use backing::{Backing, SourceKind};
use collapse::{CollapseConfig, CollapseStats, CollapseThread, Collapser};
pub use extent::{ExtentCounts, ExtentIndex, ExtentState, ExtentTable, MemoryMap};
use fault::{FaultHandler, FaultStats, HandlerContext, HugeFill};
use image::{ImageFile, ImageFileError, Page, SaveStats};
use kernel::{MapBudget, SmapsTotals};
use ledger::Ledger;
use pool::{HugePagePool, HugeSource};
pub use ram::{GuestRam, HostAddr, RamError};
use source::{ImageSource, PageSource, ZeroSource};
use uffd::Uffd;

use crate::seccomp::Seccomp;

/// Errors from setting up or saving guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping RAM failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The hugetlb pool is too small.
    #[error(
        "--backing hugetlb needs {need} free 2 MiB huge pages for {ram_mib} MiB of guest RAM, \
         but the pool has {free} free ({total} in total); reserve them as root with: \
         echo {suggest} > /proc/sys/vm/nr_hugepages"
    )]
    HugetlbPool {
        /// Pages needed.
        need: u64,
        /// Guest RAM in MiB.
        ram_mib: u64,
        /// Free pages.
        free: u64,
        /// Pages in the pool.
        total: u64,
        /// The pool size that would leave enough free.
        suggest: u64,
    },
    /// Populating huge-page-backed RAM up front failed.
    #[error("could not populate {backing:?}-backed guest RAM up front")]
    Populate {
        /// The backing.
        backing: Backing,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A memory image is unusable.
    #[error(transparent)]
    Image(#[from] ImageFileError),
    /// This user may not open a userfaultfd.
    #[error(
        "{needed_by} needs a userfaultfd, which this user may not open: run as root, set \
         vm.unprivileged_userfaultfd=1, or give this user read and write access to \
         /dev/userfaultfd{alternative}"
    )]
    UffdUnavailable {
        /// What needs it.
        needed_by: String,
        /// How to do without, if there is a way.
        alternative: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// userfaultfd could not be set up.
    #[error("cannot set up userfaultfd for {needed_by}: {what}")]
    Uffd {
        /// What needs it.
        needed_by: String,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's view of guest RAM could not be read.
    #[error("cannot read the kernel's view of guest RAM")]
    KernelView(#[source] std::io::Error),
    /// A memory thread could not be started.
    #[error("cannot start a memory thread")]
    Thread(#[source] std::io::Error),
}

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

/// What teardown left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Teardown {
    /// Bytes still charged to the ledger after every page was given back (should be 0).
    pub ledger_charged_bytes: u64,
    /// Free hugetlb pages after guest RAM and the pool were unmapped.
    pub hugetlb_free_pages: u64,
}

/// Puts an extent of guest RAM back after a failed move unmapped it: fresh memory, the old
/// contents copied back from `page` (which holds a complete copy) or none (the extent was
/// unpopulated), registered with the uffd again as all of RAM is. The write lock is held.
pub(crate) fn restore_hole(
    ram: &GuestRam,
    uffd: &Uffd,
    index: ExtentIndex,
    page: Option<&pool::HugePage>,
) -> std::io::Result<()> {
    ram.refill_hole(index.gpa(), EXTENT_SIZE)?;
    let dst = ram.host_base().0 as u64 + index.gpa();
    if let Some(page) = page {
        // SAFETY: `dst` is the extent just mapped again (2 MiB, writable, owned by `ram`),
        // `page` is our own 2 MiB mapping; the two never overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                page.addr() as *const u8,
                dst as *mut u8,
                EXTENT_SIZE as usize,
            )
        };
    }
    // Registered after the copy: the copy's own writes must not fault to the handler.
    uffd.register(dst, EXTENT_SIZE, uffd.registered_mode())?;
    log::warn!(
        "a failed mremap unmapped extent {}; it was mapped again",
        index.0
    );
    Ok(())
}

/// Brings one extent's populated pages up to date with the host kernel.
fn sync_extent(map: &MemoryMap, ram: &GuestRam, index: ExtentIndex) -> std::io::Result<()> {
    let table = map.read().unwrap_or_else(|p| p.into_inner());
    let Some(extent) = table.get(index) else {
        return Ok(());
    };
    if extent.state() == ExtentState::Huge {
        return Ok(());
    }
    let present = kernel::present_pages(ram.host_base().0 as u64 + index.gpa(), EXTENT_SIZE)?;
    extent.add_present(|p| present[p]);
    Ok(())
}

/// How to set up guest memory.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// RAM size (a multiple of 2 MiB).
    pub size: u64,
    /// What backs RAM from the start.
    pub backing: Backing,
    /// Where first-touch contents come from.
    pub source: SourceKind,
    /// Bytes the fault handler resolves per fault (4 KiB, or up to 2 MiB to fault around).
    pub fault_granularity: u64,
    /// The collapse thread, if on (4 KiB backing only).
    pub collapse: Option<CollapseConfig>,
    /// Where the collapse thread's huge pages come from.
    pub huge_source: HugeSource,
    /// Most huge-page memory the collapse thread may charge.
    pub huge_limit: u64,
    /// Huge pages the pool keeps ready ahead of demand.
    pub pool_ahead: usize,
    /// Populate all of RAM when it is mapped (the huge backings do unless told not to; the
    /// fault benchmark measures them faulting on demand).
    pub populate: bool,
    /// Memory mappings kept free for the rest of the VMM (its threads, large allocations):
    /// huge pages stop being moved into guest RAM before they would eat into them.
    pub map_reserve: u64,
    /// seccomp filters for the memory threads.
    pub seccomp: Seccomp,
}

impl MemoryConfig {
    /// 4 KiB pages populated by the host kernel, no collapse: the simplest memory.
    pub fn small(size: u64) -> Self {
        MemoryConfig {
            size,
            backing: Backing::Small,
            source: SourceKind::Kernel,
            fault_granularity: PAGE_SIZE,
            collapse: None,
            huge_source: HugeSource::Auto,
            huge_limit: size,
            pool_ahead: 2,
            populate: false,
            map_reserve: MAP_RESERVE,
            seccomp: Seccomp::Off,
        }
    }
}

/// Guest memory and everything that manages it.
pub struct Memory {
    maps: Arc<MapBudget>,
    collapser: Option<CollapseThread>,
    collapse_stats: Arc<CollapseStats>,
    pool: Option<Arc<HugePagePool>>,
    ledger: Arc<Ledger>,
    handler: Option<FaultHandler>,
    uffd: Option<Arc<Uffd>>,
    map: Arc<MemoryMap>,
    fault_stats: Arc<FaultStats>,
    image: Option<Arc<ImageFile>>,
    config: MemoryConfig,
    ram: Arc<GuestRam>,
}

impl Memory {
    /// Maps guest RAM as configured. Huge backings are populated here (and filled from the
    /// image, if there is one), so a short pool or an unusable image fails before the guest
    /// starts.
    pub fn new(config: MemoryConfig) -> Result<Memory, MemoryError> {
        let image = match &config.source {
            SourceKind::Image(path) => Some(Arc::new(ImageFile::open(path, config.size)?)),
            _ => None,
        };
        if config.backing == Backing::Hugetlb {
            let need = config.size / EXTENT_SIZE;
            let pool = kernel::hugetlb_pool();
            if pool.free < need {
                return Err(MemoryError::HugetlbPool {
                    need,
                    ram_mib: config.size >> 20,
                    free: pool.free,
                    total: pool.total,
                    suggest: pool.total + need - pool.free,
                });
            }
        }
        let ram = GuestRam::new(config.size, config.backing)?;
        let mut table = ExtentTable::new(config.size);
        if config.backing.prepopulated() && config.populate {
            ram.populate().map_err(|source| MemoryError::Populate {
                backing: config.backing,
                source,
            })?;
            if let Some(image) = &image {
                copy_image_into(&ram, image)?;
            }
            mark_huge_extents(&ram, &mut table, config.backing)?;
        }
        let maps = kernel::MapBudget::new(config.map_reserve).map_err(MemoryError::KernelView)?;
        Ok(Memory {
            maps: Arc::new(maps),
            collapser: None,
            collapse_stats: Arc::new(CollapseStats::default()),
            pool: None,
            ledger: Arc::new(Ledger::new(config.huge_limit)),
            handler: None,
            uffd: None,
            map: Arc::new(MemoryMap::new(table)),
            fault_stats: Arc::new(FaultStats::default()),
            image,
            config,
            ram: Arc::new(ram),
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The memory map lock and extent table.
    pub fn map(&self) -> &Arc<MemoryMap> {
        &self.map
    }

    /// The configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// Fault handler counters.
    pub fn fault_stats(&self) -> &Arc<FaultStats> {
        &self.fault_stats
    }

    /// The userfaultfd guest RAM is registered with, when the VMM serves faults.
    pub fn uffd(&self) -> Option<&Arc<Uffd>> {
        self.uffd.as_ref()
    }

    /// Call once the VMM has written its boot data: records what the kernel populated so far
    /// and, on 4 KiB backing, registers RAM with a userfaultfd where the VMM serves faults (the
    /// zero and image sources) or write-protects extents (the collapse thread), then starts
    /// the fault handler and the collapse thread. `on_fatal` is called if either fails.
    pub fn start(
        &mut self,
        on_fatal: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Result<(), MemoryError> {
        if self.config.backing.prepopulated() {
            return Ok(());
        }
        self.sync_from_kernel()?;
        let collapse = self.config.collapse.clone();
        let missing = self.config.source.uses_uffd();
        if !missing && collapse.is_none() {
            return Ok(());
        }
        let needed_by = if missing {
            format!("--page-source {}", self.config.source.name())
        } else {
            "the collapse thread".to_string()
        };
        let uffd_err = |what| {
            let needed_by = needed_by.clone();
            move |source| MemoryError::Uffd {
                needed_by,
                what,
                source,
            }
        };
        let mut features = uffd::FEATURE_THREAD_ID;
        let mut mode = 0;
        if missing {
            mode |= uffd::REGISTER_MODE_MISSING;
        }
        if collapse.is_some() {
            features |= uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;
            mode |= uffd::REGISTER_MODE_WP;
        }
        let uffd =
            Arc::new(
                Uffd::new(features).map_err(|source| MemoryError::UffdUnavailable {
                    needed_by: needed_by.clone(),
                    alternative: if missing {
                        ""
                    } else {
                        ", or run with --collapse off"
                    },
                    source,
                })?,
            );
        if uffd.features() & features != features {
            return Err(uffd_err("checking its features")(std::io::Error::other(
                "the kernel lacks userfaultfd write-protection of unpopulated pages (Linux \
                 6.4+), which the collapse thread needs; run with --collapse off",
            )));
        }
        let base = self.ram.host_base().0 as u64;
        uffd.register(base, self.config.size, mode)
            .map_err(uffd_err("registering guest RAM"))?;
        let source: Option<Arc<dyn PageSource>> = match &self.image {
            Some(image) => Some(Arc::new(ImageSource::new(image.clone()))),
            None => None,
        };
        // Huge pages for the collapse thread and for extent-granular fault resolution.
        let extent_faults = missing && self.config.fault_granularity == EXTENT_SIZE;
        if collapse.is_some() || extent_faults {
            let fatal = on_fatal.clone();
            let pool = HugePagePool::new(
                self.config.huge_source,
                self.config.pool_ahead,
                self.config.seccomp,
                move |what| fatal(what),
            )
            .map_err(MemoryError::Thread)?;
            pool.wait_ready(self.config.pool_ahead, std::time::Duration::from_secs(2));
            self.pool = Some(Arc::new(pool));
        }
        let huge = self
            .pool
            .clone()
            .filter(|_| extent_faults)
            .map(|pool| HugeFill {
                allocator: pool,
                ledger: self.ledger.clone(),
                maps: self.maps.clone(),
            });
        let fatal = on_fatal.clone();
        let handler = FaultHandler::start(
            HandlerContext {
                uffd: uffd.clone(),
                map: self.map.clone(),
                ram: self.ram.clone(),
                source: source.clone().unwrap_or_else(|| Arc::new(ZeroSource)),
                granularity: self.config.fault_granularity,
                stats: self.fault_stats.clone(),
                huge,
            },
            self.config.seccomp,
            move |what| fatal(what),
        )
        .map_err(uffd_err("starting the fault handler"))?;
        self.uffd = Some(uffd.clone());
        self.handler = Some(handler);
        if let Some(config) = collapse {
            let pool = self
                .pool
                .clone()
                .expect("created above for the collapse thread");
            let collapser = Collapser {
                map: self.map.clone(),
                ram: self.ram.clone(),
                uffd,
                source,
                allocator: pool,
                ledger: self.ledger.clone(),
                config,
                stats: self.collapse_stats.clone(),
                stopping: Arc::new(AtomicBool::new(false)),
                maps: self.maps.clone(),
                kernel_populates: !missing,
                before_commit: None,
            };
            let sync: Box<dyn Fn(ExtentIndex) + Send> = if missing {
                Box::new(|_| {})
            } else {
                let (map, ram) = (self.map.clone(), self.ram.clone());
                Box::new(move |index| {
                    if let Err(e) = sync_extent(&map, &ram, index) {
                        log::warn!("reading the kernel's view of extent {}: {e}", index.0);
                    }
                })
            };
            self.collapser = Some(
                CollapseThread::start(collapser, sync, self.config.seccomp, on_fatal)
                    .map_err(MemoryError::Thread)?,
            );
        }
        Ok(())
    }

    /// Unregisters guest RAM from the userfaultfd, which wakes every thread waiting on a fault
    /// in it; the kernel resolves later faults itself (with zeroes). Only for a VM that is
    /// stopping and whose vCPUs would not stop: its guest never runs again.
    pub fn release_faults(&self) {
        if let Some(uffd) = &self.uffd {
            let base = self.ram.host_base().0 as u64;
            if let Err(e) = uffd.unregister(base, self.config.size) {
                log::warn!("unregistering guest RAM from userfaultfd: {e}");
            }
        }
    }

    /// Stops the collapse thread (a collapse in progress completes or fails cleanly first).
    pub fn stop_collapse(&mut self) {
        if let Some(mut c) = self.collapser.take() {
            c.stop();
        }
    }

    /// Collapse counters.
    pub fn collapse_stats(&self) -> &Arc<CollapseStats> {
        &self.collapse_stats
    }

    /// The huge-page ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Tears everything down in order (collapse thread, fault handler, pool, the charges of
    /// collapsed extents, guest RAM) and returns what is left charged: zero unless bookkeeping
    /// is wrong. The VM fd (its memslot) must be gone already, and no vCPU may run.
    pub fn teardown(mut self) -> Teardown {
        self.stop_collapse();
        self.stop();
        if let Some(pool) = self.pool.take() {
            drop(pool);
        }
        let huge = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .counts()
            .huge;
        // With 4 KiB backing, every huge extent holds a pool page that was charged (by the
        // collapse thread or by extent-granular fault resolution).
        if self.config.backing == Backing::Small {
            self.ledger.uncharge(huge * EXTENT_SIZE);
        }
        let ledger = self.ledger.clone();
        let ram_refs = Arc::strong_count(&self.ram);
        drop(self);
        if ram_refs > 1 {
            log::warn!("guest RAM is still referenced at teardown ({ram_refs} references)");
        }
        Teardown {
            ledger_charged_bytes: ledger.charged(),
            hugetlb_free_pages: kernel::hugetlb_pool().free,
        }
    }

    /// Brings the extent table up to date with the pages the host kernel has populated
    /// (4 KiB backing only: where the VMM serves faults it records them itself, and its
    /// records are what the kernel has too).
    pub fn sync_from_kernel(&self) -> Result<(), MemoryError> {
        if self.config.backing.prepopulated() {
            return Ok(());
        }
        // The report is taken under the lock, so no extent changes state (becomes huge)
        // between the kernel's report and its use.
        let table = self.map.read().unwrap_or_else(|p| p.into_inner());
        let present = kernel::present_pages(self.ram.host_base().0 as u64, self.config.size)
            .map_err(MemoryError::KernelView)?;
        fail::fail_point!("kernel-sync-snapshot");
        for (index, extent) in table.iter() {
            if extent.state() == ExtentState::Huge {
                continue;
            }
            let first = index.0 * extent::PAGES_PER_EXTENT;
            extent.add_present(|p| present[first + p]);
        }
        Ok(())
    }

    /// Everything the metrics say about the collapse thread and the ledger.
    fn collapse_json(&self) -> Value {
        let pool = self.pool.as_ref().map(|p| {
            let s = p.stats();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            json!({
                "hugetlb": load(&s.hugetlb), "thp": load(&s.thp), "thp_not_huge": load(&s.thp_not_huge),
                "failed": load(&s.failed), "from_ready": load(&s.from_ready), "on_demand": load(&s.on_demand),
            })
        });
        let mut collapse = self.collapse_stats.to_json();
        collapse["enabled"] = json!(self.config.collapse.is_some());
        collapse["stopped_for_mappings"] = json!(self.maps.exhausted());
        collapse["order"] = json!(self.config.collapse.as_ref().map(|c| c.order));
        collapse["huge_source"] = json!(self.config.huge_source);
        collapse["pool"] = json!(pool);
        json!({
            "collapse": collapse,
            "ledger": {
                "charged_bytes": self.ledger.charged(),
                "peak_charged_bytes": self.ledger.peak(),
                "limit_bytes": self.ledger.limit(),
            },
        })
    }

    /// Stops the fault handler (vCPUs must be stopped first: none may be waiting on a fault).
    pub fn stop(&mut self) {
        self.stop_collapse();
        if let Some(mut handler) = self.handler.take() {
            handler.stop();
        }
    }

    /// Extent counts, brought up to date with the kernel first where the kernel populates.
    pub fn counts(&self) -> Result<ExtentCounts, MemoryError> {
        if !self.config.source.uses_uffd() {
            self.sync_from_kernel()?;
        }
        Ok(self.map.read().unwrap_or_else(|p| p.into_inner()).counts())
    }

    /// The kernel's totals for guest RAM.
    pub fn smaps(&self) -> Result<SmapsTotals, MemoryError> {
        let base = self.ram.host_base().0 as u64;
        kernel::smaps_totals(base, base + self.config.size).map_err(MemoryError::KernelView)
    }

    /// Saves guest RAM to an image at `path`, atomically and sparsely. A page the guest never
    /// populated holds what its page source would have given it: nothing is read for it with
    /// the zero and kernel sources, and with an image source it is copied from that image
    /// (unless it is a hole there), so a restore followed by a save never loses a byte, even
    /// when the save replaces the image it restored from. `interrupted()` stops the save early.
    pub fn save(
        &self,
        path: &Path,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<SaveStats, MemoryError> {
        let counts_known = self.counts()?;
        log::debug!("saving memory image with extents {counts_known:?}");
        let table = self.map.read().unwrap_or_else(|p| p.into_inner());
        let view = self.ram.view();
        let image = self.image.as_deref();
        if let Some(image) = image {
            image.check_unchanged()?;
        }
        let stats = image::save(
            path,
            self.config.size,
            |gpa, buf| {
                if table.is_populated(gpa) {
                    view.read_slice(buf, GuestAddress(gpa))
                        .expect("a populated page lies inside guest RAM");
                    return Ok(Page::Read);
                }
                match image {
                    Some(image) if !image.is_hole(gpa, PAGE_SIZE) => {
                        image.read_at(buf, gpa)?;
                        Ok(Page::Read)
                    }
                    _ => Ok(Page::Hole),
                }
            },
            interrupted,
        )?;
        Ok(stats)
    }

    /// The `memory`, `faults` and `kernel.{anon_huge_kb,hugetlb_kb}` sections of the metrics.
    pub fn metrics_json(&self) -> Result<Value, MemoryError> {
        let counts = self.counts()?;
        let smaps = self.smaps()?;
        let s = &self.fault_stats;
        let service = {
            let h = s.service_ns.lock().unwrap_or_else(|p| p.into_inner());
            crate::metrics::percentiles(&h)
        };
        Ok(json!({
            "memory": {
                "size_bytes": self.config.size,
                "backing": self.config.backing,
                "page_source": self.config.source.name(),
                "extents": {
                    "total": counts.unpopulated + counts.small + counts.huge,
                    "unpopulated": counts.unpopulated,
                    "small": counts.small,
                    "huge": counts.huge,
                    "small_pages": counts.small_pages,
                },
            },
            "faults": {
                "wp_stall_ns": crate::metrics::percentiles(&s.wp_stall_ns.lock().unwrap_or_else(|p| p.into_inner())),
                "served": s.served.load(Ordering::Relaxed),
                "already_present": s.already_present.load(Ordering::Relaxed),
                "retried": s.retried.load(Ordering::Relaxed),
                "wp": s.wp_faults.load(Ordering::Relaxed),
                "extents_mapped": s.extents_mapped.load(Ordering::Relaxed),
                "granularity_bytes": self.config.fault_granularity,
                "service_ns": service,
            },
            "kernel": {
                "anon_huge_kb": smaps.anon_huge_kb,
                "hugetlb_kb": smaps.hugetlb_kb,
                "rss_kb": smaps.rss_kb,
            },
        }))
        .map(|mut v| {
            crate::metrics::merge(&mut v, &self.collapse_json());
            v
        })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fills prepopulated RAM from an image, 2 MiB at a time.
fn copy_image_into(ram: &GuestRam, image: &ImageFile) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; EXTENT_SIZE as usize];
    for gpa in (0..ram.size()).step_by(EXTENT_SIZE as usize) {
        image.read_at(&mut buf, gpa)?;
        if buf.iter().any(|&b| b != 0) {
            ram.view()
                .write_slice(&buf, GuestAddress(gpa))
                .expect("the extent lies inside guest RAM");
        }
    }
    Ok(())
}

/// Marks every extent of prepopulated RAM: huge where the kernel maps it with one 2 MiB entry,
/// small (fully populated) where THP fell back to 4 KiB pages.
fn mark_huge_extents(
    ram: &GuestRam,
    table: &mut ExtentTable,
    backing: Backing,
) -> Result<(), MemoryError> {
    let base = ram.host_base().0 as u64;
    let huge = match backing {
        Backing::Hugetlb => None,
        _ => kernel::scan(base, base + ram.size(), kernel::PAGE_IS_HUGE)
            .map_err(MemoryError::KernelView)?,
    };
    let indices: Vec<ExtentIndex> = table.iter().map(|(i, _)| i).collect();
    for index in indices {
        let start = base + index.gpa();
        let is_huge = match &huge {
            None => true,
            Some(ranges) => ranges
                .iter()
                .any(|r| r.start <= start && start + EXTENT_SIZE <= r.end),
        };
        let extent = table.get_mut(index).expect("index from the table");
        if is_huge {
            extent.set_huge();
        } else {
            extent.add_present(|_| true);
        }
    }
    if let Some(ranges) = huge {
        let huge_bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        if huge_bytes < ram.size() {
            log::warn!(
                "THP backing: the kernel gave {} of {} MiB as huge pages; the rest is 4 KiB",
                huge_bytes >> 20,
                ram.size() >> 20
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool::HugeSource;
    use std::time::{Duration, Instant};

    /// Runs the collapse thread over 8 MiB of written memory (no VM) until every extent is
    /// huge, then tears down. Returns (teardown, hugetlb free before).
    fn collapse_everything(huge_source: HugeSource) -> Option<(Teardown, u64, u64)> {
        let free_before = kernel::hugetlb_pool().free;
        let mut config = MemoryConfig::small(8 << 20);
        config.collapse = Some(CollapseConfig::default());
        config.huge_source = huge_source;
        let mut memory = Memory::new(config).unwrap();
        for gpa in (0..8u64 << 20).step_by(PAGE_SIZE as usize) {
            memory
                .ram()
                .view()
                .write_obj(gpa ^ 0x5a5a, GuestAddress(gpa))
                .unwrap();
        }
        if let Err(e) = memory.start(Arc::new(|what| panic!("{what}"))) {
            eprintln!("SKIP: {e}");
            return None;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while memory.counts().unwrap().huge < 4 {
            assert!(
                Instant::now() < deadline,
                "the collapse thread did not finish"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        memory.stop_collapse();
        for gpa in (0..8u64 << 20).step_by(PAGE_SIZE as usize) {
            assert_eq!(
                memory
                    .ram()
                    .view()
                    .read_obj::<u64>(GuestAddress(gpa))
                    .unwrap(),
                gpa ^ 0x5a5a
            );
        }
        let charged = memory.ledger().charged();
        assert_eq!(charged, 8 << 20);
        Some((memory.teardown(), free_before, charged))
    }

    /// Two reports of the kernel's view applied out of order (an old one last) must not roll
    /// the table back: pages are only ever added.
    #[test]
    #[cfg(feature = "failpoints")]
    fn an_old_kernel_report_never_rolls_the_table_back() {
        let scenario = fail::FailScenario::setup();
        let memory = Memory::new(MemoryConfig::small(8 << 20)).unwrap();
        let gpa = 3 * PAGE_SIZE;
        fail::cfg("kernel-sync-snapshot", "1*pause").unwrap();
        std::thread::scope(|s| {
            // Takes its report (the page absent), then waits in the fault point.
            let old = s.spawn(|| memory.sync_from_kernel().unwrap());
            std::thread::sleep(Duration::from_millis(200));
            memory
                .ram()
                .view()
                .write_obj(1u64, GuestAddress(gpa))
                .unwrap();
            memory.sync_from_kernel().unwrap();
            let table = memory.map().read().unwrap();
            assert!(table.is_populated(gpa));
            let generation = table.get(ExtentIndex(0)).unwrap().generation();
            drop(table);
            fail::remove("kernel-sync-snapshot");
            old.join().unwrap();
            let table = memory.map().read().unwrap();
            assert!(
                table.is_populated(gpa),
                "the old report rolled the page back"
            );
            assert_eq!(table.get(ExtentIndex(0)).unwrap().generation(), generation);
        });
        scenario.teardown();
    }

    #[test]
    fn teardown_uncharges_everything_and_returns_hugetlb_pages() {
        if let Some((t, _, _)) = collapse_everything(HugeSource::Thp) {
            assert_eq!(t.ledger_charged_bytes, 0);
        }
        if kernel::hugetlb_pool().free < 8 {
            eprintln!("SKIP: the hugetlb half needs 8 free 2 MiB pages");
            return;
        }
        if let Some((t, free_before, _)) = collapse_everything(HugeSource::Hugetlb) {
            assert_eq!(t.ledger_charged_bytes, 0);
            assert_eq!(
                t.hugetlb_free_pages, free_before,
                "every hugetlb page went back"
            );
        }
    }
}
