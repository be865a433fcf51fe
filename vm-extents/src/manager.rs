//! [`Memory`]: guest memory and everything that manages it, owned in one place, started and
//! stopped in order. At start it registers guest RAM with a userfaultfd (where the VMM serves
//! faults, or the collapse thread write-protects extents), starts the fault handler, the huge
//! page pool and the collapse thread; at teardown it stops them in the reverse order, gives
//! back every huge page's charge, and unmaps RAM last (after the VM fd, which its owner drops
//! first).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::{EXTENT_SIZE, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use super::backing::{Backing, PageSourceKind};
use super::collapse::{CollapseStats, CollapseThread, Collapser};
use super::config::{MemoryConfig, Restore};
use super::extent::{ExtentCounts, ExtentIndex, ExtentState, ExtentTable, PAGES_PER_EXTENT};
use super::external::PageServer;
use super::fault::source::{PageSource, RamImageSource, ZeroSource};
use super::fault::{FaultHandler, FaultStats, Resolver};
use super::host_view::{self, SmapsTotals};
use super::huge::install::{InstallMethod, Installer, MapBudget};
use super::huge::ledger::Ledger;
use super::huge::pool::HugePagePool;
use super::map::MemoryMap;
use super::populate::{copy_image_into, mark_huge_extents, sync_extent};
use super::prefetch::{FaultHint, PrefetchStats, Prefetcher};
use super::ram::GuestRam;
use super::ram_image::{Page, RamImage, SaveStats};
use super::reclaim::{ReclaimStats, Reclaimer};
use super::report::{
    CollapseSection, FaultsSection, KernelSection, LedgerSection, MemoryReport, MemorySection,
    ReclaimSection, RestoreSection,
};
use super::uffd::{self, Uffd, UffdSet};
use super::worker::OnFailure;
use super::working_set::{Recorder, WorkingSet};
use super::{MemoryError, UffdUser, ram_image};

/// What teardown left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Teardown {
    /// Bytes still charged to the ledger after every page was given back (should be 0).
    pub ledger_charged_bytes: u64,
    /// Free hugetlb pages after guest RAM and the pool were unmapped.
    pub hugetlb_free_pages: u64,
}

/// Guest memory and everything that manages it.
pub struct Memory {
    // Stopped in this order: the shrinker, the collapse thread, the fault handler, the pool.
    shrinker: Option<crate::reclaim::shrinker::Shrinker>,
    collapser: Option<CollapseThread>,
    handlers: Vec<FaultHandler>,
    pool: Option<Arc<HugePagePool>>,
    uffds: Option<Arc<UffdSet>>,
    maps: Arc<MapBudget>,
    collapse_stats: Arc<CollapseStats>,
    fault_stats: Arc<FaultStats>,
    ledger: Arc<Ledger>,
    image: Option<Arc<RamImage>>,
    /// Where the image's pages are read through (the image's own source, perhaps wrapped by
    /// the VMM): by the fault handlers, the collapse, the prefetcher and an eager copy alike.
    image_source: Option<Arc<dyn PageSource>>,
    config: MemoryConfig,
    /// Mappings covering guest RAM once it was registered (one per uffd shard).
    ram_mappings_at_start: u64,
    /// How long an eager restore took to copy the image in (ns; 0 if none).
    restore_copy_ns: u64,
    /// The guest's first touches, where the working set is recorded.
    recorder: Option<Arc<Recorder>>,
    /// The prefetch threads, while they run.
    prefetcher: Option<Prefetcher>,
    prefetch_stats: Option<Arc<PrefetchStats>>,
    reclaim_stats: Arc<ReclaimStats>,
    /// The external page server guest RAM was handed to, and our end of its socket.
    page_server: Option<PageServer>,
    // Unmapped when the last reference (this one, once the threads are gone) drops.
    map: Arc<MemoryMap>,
}

impl Memory {
    /// Maps guest RAM as configured. Huge backings are populated here (and filled from the
    /// image, if there is one), so a short pool or an unusable image fails before the guest
    /// starts.
    pub fn new(config: MemoryConfig) -> Result<Memory, MemoryError> {
        let image = match &config.source {
            PageSourceKind::Image(path) => Some(Arc::new(RamImage::open(path, config.size)?)),
            _ => None,
        };
        let image_source = image.as_ref().map(|image| {
            let source: Arc<dyn PageSource> = Arc::new(RamImageSource::new(image.clone()));
            match &config.source_layer.0 {
                Some(layer) => layer(source),
                None => source,
            }
        });
        if config.backing == Backing::Hugetlb {
            let need = config.size / EXTENT_SIZE;
            let pool = host_view::hugetlb_pool();
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
        let ram = GuestRam::with_regions(&config.regions, config.backing)?;
        let mut table = ExtentTable::new(config.size);
        if config.backing.prepopulated() && config.populate {
            ram.populate().map_err(|source| MemoryError::Populate {
                backing: config.backing,
                source,
            })?;
            if let Some(source) = &image_source {
                copy_image_into(&ram, &**source)?;
            }
            mark_huge_extents(&ram, &mut table, config.backing)?;
        }
        // An eager restore into 4 KiB pages: the kernel populates them as the image is copied
        // in (the table learns of them at start, from the kernel).
        let mut restore_copy_ns = 0;
        if let Some(source) = &image_source
            && config.restore == Restore::Eager
            && config.backing == Backing::Small
        {
            let started = std::time::Instant::now();
            copy_image_into(&ram, &**source)?;
            restore_copy_ns = started.elapsed().as_nanos() as u64;
        }
        let maps = MapBudget::new(config.map_reserve).map_err(MemoryError::KernelView)?;
        let base = ram.host_base();
        let ram_mappings_at_start =
            host_view::mappings_in(base, base + config.size).map_err(MemoryError::KernelView)?;
        Ok(Memory {
            shrinker: None,
            collapser: None,
            handlers: Vec::new(),
            pool: None,
            uffds: None,
            maps: Arc::new(maps),
            collapse_stats: Arc::new(CollapseStats::default()),
            fault_stats: Arc::new(FaultStats::default()),
            ledger: Arc::new(Ledger::new(config.huge_limit)),
            image,
            image_source,
            config,
            ram_mappings_at_start,
            restore_copy_ns,
            prefetcher: None,
            prefetch_stats: None,
            recorder: None,
            reclaim_stats: Arc::default(),
            page_server: None,
            map: Arc::new(MemoryMap::new(table, Arc::new(ram))),
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.map.ram()
    }

    /// What gives back the memory the guest reports free ([`crate::reclaim`]), once the manager
    /// has [started](Self::start); `None` where reclaim is off. Each one shares the counters
    /// of [`Self::reclaim_stats`].
    pub fn reclaimer(&self) -> Option<Reclaimer> {
        let split = self.config.reclaim_split?;
        Some(Reclaimer::new(
            self.map.clone(),
            self.uffds.clone(),
            self.ledger.clone(),
            self.config.backing,
            split,
            self.config.reclaim_partial,
            self.reclaim_stats.clone(),
        ))
    }

    /// The working set recorded so far ([`MemoryBuilder::record_working_set`](crate::MemoryBuilder::record_working_set)): the extents
    /// and pages the guest has touched, in the order it first touched them. `None` where it
    /// is not recorded.
    pub fn working_set(&self) -> Option<WorkingSet> {
        self.recorder.as_ref().map(|r| r.recorded())
    }

    /// Reclaim's counters.
    pub fn reclaim_stats(&self) -> &Arc<ReclaimStats> {
        &self.reclaim_stats
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

    /// Collapse counters.
    pub fn collapse_stats(&self) -> &Arc<CollapseStats> {
        &self.collapse_stats
    }

    /// The huge-page ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The userfaultfds guest RAM is registered with, when the VMM serves faults.
    pub fn uffds(&self) -> Option<&Arc<UffdSet>> {
        self.uffds.as_ref()
    }

    /// Call once the VMM has written its boot data: records what the kernel populated so far
    /// and, on 4 KiB backing, registers RAM with a userfaultfd where the VMM serves faults (the
    /// zero and image sources) or write-protects extents (the collapse thread), then starts
    /// the fault handler, the pool and the collapse thread (which waits for its
    /// [gate](crate::CollapseGate), if it has one, before its first scan). `on_fatal` is called if any of them fails.
    pub fn start(&mut self, on_fatal: OnFailure) -> Result<(), MemoryError> {
        if self.config.backing.prepopulated() {
            return Ok(());
        }
        self.sync_from_kernel()?;
        if let PageSourceKind::External(socket) = &self.config.source {
            return self.hand_over(socket.clone());
        }
        let collapse = self.config.collapse.clone();
        let missing = self.config.serves_faults();
        let shrinker = self.config.zero_shrinker;
        if !missing && collapse.is_none() && shrinker.is_none() {
            return Ok(());
        }
        let write_protect = collapse.is_some() || shrinker.is_some();
        if self.config.record_working_set {
            self.recorder = Some(Arc::new(Recorder::new(self.config.size)));
        }
        let uffds = Arc::new(self.register(missing, write_protect)?);
        self.ram_mappings_at_start = self.ram_mappings()?;
        let source = self.image_source.clone();
        // Huge pages for the collapse thread and for 2 MiB faults.
        let extent_faults = missing && self.config.fault_granularity == EXTENT_SIZE;
        let prefetch = match &self.image {
            Some(image) if missing && self.config.prefetch_threads > 0 => Some(image.clone()),
            _ => None,
        };
        let hint = prefetch.as_ref().map(|_| Arc::new(FaultHint::default()));
        if collapse.is_some() || extent_faults || prefetch.is_some() {
            let fatal = on_fatal.clone();
            // Pages ready beyond what the ledger can still charge would never be used.
            let ledger = self.ledger.clone();
            let budget = Arc::new(move || {
                (ledger.limit().saturating_sub(ledger.charged()) / EXTENT_SIZE) as usize
            });
            let source = match &self.config.huge_allocator.0 {
                Some(allocator) => allocator.clone(),
                None => Arc::new(self.config.huge_source),
            };
            let pool = HugePagePool::new(
                source,
                self.config.pool_ahead,
                self.config.pool_refill_threads,
                &self.config.thread_hook,
                move |what| fatal(what),
            )
            .map_err(MemoryError::Thread)?
            .with_budget(budget);
            pool.wait_ready(self.config.pool_ahead, std::time::Duration::from_secs(2));
            self.pool = Some(Arc::new(pool));
        }
        // One handler thread per shard of RAM, each on its own uffd.
        let source = source.clone().unwrap_or_else(|| Arc::new(ZeroSource));
        for (uffd, _) in uffds.shards() {
            let fatal = on_fatal.clone();
            let handler = FaultHandler::start(
                uffds.clone(),
                Resolver {
                    uffd: uffd.clone(),
                    map: self.map.clone(),
                    source: source.clone(),
                    granularity: self.config.fault_granularity,
                    stats: self.fault_stats.clone(),
                    huge: extent_faults.then(|| self.installer(&uffds)),
                    spin: self.config.fault_spin,
                    hint: hint.clone(),
                    record: self.recorder.clone(),
                    reclaim: self.reclaim_stats.clone(),
                },
                &self.config.thread_hook,
                move |what| fatal(what),
            )
            .map_err(MemoryError::Thread)?;
            self.handlers.push(handler);
        }
        self.uffds = Some(uffds.clone());
        if let (Some(image), Some(hint)) = (prefetch, hint) {
            let stats = Arc::new(PrefetchStats::default());
            self.prefetcher = Some(
                Prefetcher::start(
                    self.config.prefetch_threads,
                    self.map.clone(),
                    image,
                    self.image_source.clone().expect("an image has its source"),
                    Installer {
                        pool: self.pool.as_ref().expect("made above").direct(),
                        ..self.installer(&uffds)
                    },
                    uffds.clone(),
                    hint,
                    self.config.replay.0.clone(),
                    stats.clone(),
                    &self.config.thread_hook,
                    on_fatal.clone(),
                )
                .map_err(MemoryError::Thread)?,
            );
            self.prefetch_stats = Some(stats);
        }
        if let (Some(rate), Some(reclaimer)) = (shrinker, self.reclaimer()) {
            self.shrinker = Some(
                reclaimer
                    .start_shrinker(rate, &self.config.thread_hook, on_fatal.clone())
                    .map_err(MemoryError::Thread)?,
            );
        }
        if let Some(config) = collapse {
            let collapser = Collapser {
                map: self.map.clone(),
                uffds: uffds.clone(),
                source: self.image_source.clone(),
                installer: self.installer(&uffds),
                config,
                stats: self.collapse_stats.clone(),
                stopping: Arc::new(AtomicBool::new(false)),
                kernel_populates: !missing,
                before_commit: None,
                reclaim_split: self.config.reclaim_split.unwrap_or(PAGES_PER_EXTENT as u32),
            };
            let sync: Box<dyn Fn(ExtentIndex) + Send> = if missing {
                Box::new(|_| {})
            } else {
                let map = self.map.clone();
                Box::new(move |index| {
                    if let Err(e) = sync_extent(&map, index) {
                        log::warn!("reading the kernel's view of extent {}: {e}", index.0);
                    }
                })
            };
            self.collapser = Some(
                CollapseThread::start(
                    collapser,
                    sync,
                    self.config.collapse_gate.clone(),
                    &self.config.thread_hook,
                    on_fatal,
                )
                .map_err(MemoryError::Thread)?,
            );
        }
        Ok(())
    }

    /// Opens the userfaultfds (one per shard, `fault_threads` of them where the VMM serves
    /// missing faults) and registers all of guest RAM with them: for missing faults where the
    /// VMM serves them, for write-protect faults where the collapse thread runs.
    fn register(&self, missing: bool, write_protect: bool) -> Result<UffdSet, MemoryError> {
        let needed_by = if missing {
            UffdUser::PageSource(self.config.source.name())
        } else if self.config.collapse.is_some() {
            UffdUser::CollapseThread
        } else {
            UffdUser::ZeroShrinker
        };
        let mut features = uffd::FEATURE_THREAD_ID | uffd::FEATURE_MOVE;
        let mut mode = 0;
        if missing {
            mode |= uffd::REGISTER_MODE_MISSING;
        }
        if write_protect {
            features |= uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;
            mode |= uffd::REGISTER_MODE_WP;
        }
        let extents = (self.config.size / EXTENT_SIZE) as usize;
        let shards = if missing {
            self.config.fault_threads
        } else {
            1
        };
        let uffds = UffdSet::new(extents, shards, || Uffd::new(features))
            .map_err(|source| MemoryError::UffdUnavailable { needed_by, source })?;
        let failed = |what, source| MemoryError::Uffd {
            needed_by,
            what,
            source,
        };
        let required = features & !uffd::FEATURE_MOVE;
        if uffds.features() & required != required {
            return Err(failed(
                "checking its features",
                std::io::Error::other(
                    "the kernel lacks userfaultfd write-protection of unpopulated pages (Linux \
                     6.4+), which the collapse thread and the zero-page shrinker need",
                ),
            ));
        }
        if self.config.install == InstallMethod::Move && uffds.features() & uffd::FEATURE_MOVE == 0
        {
            log::info!("the kernel has no UFFDIO_MOVE (Linux 6.8+): huge pages go in by mremap");
        }
        let base = self.ram().host_base();
        for (uffd, range) in uffds.shards() {
            let end = range.end.min(extents) as u64 * EXTENT_SIZE;
            let start = range.start as u64 * EXTENT_SIZE;
            uffd.register(base + start, end - start, mode)
                .map_err(|e| failed("registering guest RAM", e))?;
        }
        Ok(uffds)
    }

    /// Hands guest RAM to the page server at `socket` ([`PageServer::hand_over`]).
    fn hand_over(&mut self, socket: std::path::PathBuf) -> Result<(), MemoryError> {
        let (server, uffd) = PageServer::hand_over(self.ram(), socket)?;
        let extents = (self.config.size / EXTENT_SIZE) as usize;
        self.uffds = Some(Arc::new(UffdSet::single(Arc::new(uffd), extents)));
        self.ram_mappings_at_start = self.ram_mappings()?;
        self.page_server = Some(server);
        Ok(())
    }

    /// Why the external page server is gone, if it is (it hung up): its faults will never be
    /// answered.
    pub fn page_server_gone(&self) -> Option<String> {
        self.page_server.as_ref()?.gone()
    }

    /// The install path over this memory's pool, ledger and mapping budget.
    fn installer(&self, uffds: &Arc<UffdSet>) -> Installer {
        Installer {
            pool: self
                .pool
                .clone()
                .expect("the pool is made before anything that installs"),
            ledger: self.ledger.clone(),
            maps: self.maps.clone(),
            ram: self.ram().clone(),
            uffds: uffds.clone(),
            method: self.config.install,
            reclaim: self.reclaim_stats.clone(),
        }
    }

    /// Unregisters guest RAM from the userfaultfd, which wakes every thread waiting on a fault
    /// in it; the kernel resolves later faults itself (with zeroes). With an external page
    /// server, the pages it never served are poisoned instead. Only for a VM that is stopping
    /// and whose vCPUs would not stop: its guest never runs again.
    pub fn release_faults(&self) {
        if let (Some(server), Some(uffds)) = (&self.page_server, &self.uffds)
            && server.release(self.ram(), uffds.for_extent(0))
        {
            return;
        }
        if let Some(uffds) = &self.uffds {
            let base = self.ram().host_base();
            uffds.unregister_all(base, (self.config.size / EXTENT_SIZE) as usize);
        }
    }

    /// Stops the threads that change guest RAM behind the guest, the prefetcher and the
    /// collapse thread (an extent being filled or collapsed is finished or given up cleanly
    /// first), so that a save reads still memory.
    pub fn stop_background(&mut self) {
        if let Some(mut s) = self.shrinker.take() {
            s.stop();
        }
        if let Some(mut p) = self.prefetcher.take() {
            p.stop();
        }
        if let Some(mut c) = self.collapser.take() {
            c.stop();
        }
    }

    /// Stops the collapse thread and the fault handler (vCPUs must be stopped first: none may
    /// be waiting on a fault).
    pub fn stop(&mut self) {
        self.stop_background();
        for mut handler in self.handlers.drain(..) {
            handler.stop();
        }
    }

    /// Tears everything down in order (collapse thread, fault handler, pool, the charges of
    /// huge extents, guest RAM) and returns what is left charged: zero unless bookkeeping is
    /// wrong. The VM fd (its memslot) must be gone already, and no vCPU may run.
    pub fn teardown(mut self) -> Teardown {
        self.stop();
        drop(self.pool.take());
        // With 4 KiB backing, every huge extent holds a pool page that was charged (by the
        // collapse thread or by a 2 MiB fault).
        if self.config.backing == Backing::Small {
            let huge = self.map.read().counts().huge;
            self.ledger.uncharge(huge * EXTENT_SIZE);
        }
        let ledger = self.ledger.clone();
        let ram_refs = Arc::strong_count(self.map.ram());
        drop(self);
        if ram_refs > 1 {
            log::warn!("guest RAM is still referenced at teardown ({ram_refs} references)");
        }
        Teardown {
            ledger_charged_bytes: ledger.charged(),
            hugetlb_free_pages: host_view::hugetlb_pool().free,
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
        let table = self.map.read();
        let present = host_view::present_pages(self.ram().host_base(), self.config.size)
            .map_err(MemoryError::KernelView)?;
        fail::fail_point!("kernel-sync-snapshot");
        for (index, extent) in table.iter() {
            if extent.state() == ExtentState::Huge {
                continue;
            }
            let first = index.0 * PAGES_PER_EXTENT;
            extent.add_present(|p| present[first + p]);
        }
        Ok(())
    }

    /// Extent counts, brought up to date with the kernel first where the kernel populates.
    pub fn counts(&self) -> Result<ExtentCounts, MemoryError> {
        if !self.config.serves_faults() {
            self.sync_from_kernel()?;
        }
        Ok(self.map.read().counts())
    }

    /// The kernel's totals for guest RAM.
    pub fn smaps(&self) -> Result<SmapsTotals, MemoryError> {
        let base = self.ram().host_base();
        host_view::smaps_totals(base, base + self.config.size).map_err(MemoryError::KernelView)
    }

    /// Bytes of guest RAM mapped to the kernel's shared zero page (`None` without
    /// `PAGEMAP_SCAN`): populated in the extent table, but holding no memory (left out of
    /// `Rss`).
    pub fn zero_pfn_bytes(&self) -> Result<Option<u64>, MemoryError> {
        let base = self.ram().host_base();
        host_view::zero_pfn_bytes(base, base + self.config.size).map_err(MemoryError::KernelView)
    }

    /// Saves guest RAM to an image at `path`, atomically and sparsely. A page the guest never
    /// populated holds what its page source would have given it: nothing is read for it with
    /// the zero and kernel sources, and with an image source it is copied from that image
    /// (unless it is a hole there), so a restore followed by a save never loses a byte, even
    /// when the save replaces the image it restored from. `interrupted()` stops the save early.
    pub fn save(
        &self,
        path: &Path,
        label: &'static str,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<SaveStats, MemoryError> {
        let counts_known = self.counts()?;
        log::debug!("saving memory image with extents {counts_known:?}");
        // The write side: no fault, collapse, prefetch or shrinker pass is inside an extent
        // while it is read (each holds the read side while it changes one), so the image is
        // one moment's RAM even with the background threads running.
        let table = self.map.write();
        let image = self.image.as_deref();
        if let Some(image) = image {
            image.check_unchanged()?;
        }
        let stats = ram_image::save(
            path,
            label,
            self.config.size,
            |gpa, buf| {
                if table.is_populated(gpa) {
                    table
                        .view()
                        .read_slice(buf, GuestAddress(gpa))
                        .expect("a populated page lies inside guest RAM");
                    return Ok(Page::Read);
                }
                let given_back = table
                    .get(ExtentIndex::of(gpa))
                    .is_some_and(|e| e.is_reclaimed(((gpa % EXTENT_SIZE) / PAGE_SIZE) as usize));
                match image {
                    Some(image) if !given_back && !image.is_hole(gpa, PAGE_SIZE) => {
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

    /// How many mappings cover guest RAM now.
    fn ram_mappings(&self) -> Result<u64, MemoryError> {
        let base = self.ram().host_base();
        host_view::mappings_in(base, base + self.config.size).map_err(MemoryError::KernelView)
    }

    /// What memory reports now: the `memory`, `faults`, `kernel`, `collapse` and `ledger`
    /// sections of the metrics.
    pub fn report(&self) -> Result<MemoryReport, MemoryError> {
        let counts = self.counts()?;
        Ok(MemoryReport {
            memory: MemorySection::new(&self.config, counts),
            faults: FaultsSection {
                stats: self.fault_stats.clone(),
                granularity_bytes: self.config.fault_granularity,
            },
            kernel: KernelSection::new(
                self.smaps()?,
                self.zero_pfn_bytes()?,
                self.ram_mappings_at_start,
                self.ram_mappings()?,
            ),
            collapse: CollapseSection {
                stats: self.collapse_stats.clone(),
                enabled: self.config.collapse.is_some(),
                order: self.config.collapse.as_ref().map(|c| c.order),
                huge_source: self.config.huge_source,
                pool: self
                    .pool
                    .as_ref()
                    .map(|p| super::report::PoolSection::of(p.stats())),
                stopped_for_mappings: self.maps.exhausted(),
            },
            ledger: LedgerSection {
                charged_bytes: self.ledger.charged(),
                peak_charged_bytes: self.ledger.peak(),
                limit_bytes: self.ledger.limit(),
                after_teardown_bytes: None,
            },
            restore: self.image.as_ref().map(|image| RestoreSection {
                mode: self.config.restore,
                copy_ns: self.restore_copy_ns,
                image_bytes_read: image.bytes_read(),
                prefetch: self.prefetch_stats.clone(),
            }),
            reclaim: ReclaimSection {
                enabled: self.config.reclaim_split.is_some(),
                split_pages: self.config.reclaim_split,
                partial: self.config.reclaim_partial,
                reclaimed_bytes: self.reclaim_stats.reclaimed_bytes(),
                reported_given_back_bytes: self
                    .reclaim_stats
                    .reclaimed_bytes()
                    .saturating_sub(self.reclaim_stats.shrinker_bytes.get()),
                shrinker_rate: self.config.zero_shrinker,
                stats: self.reclaim_stats.clone(),
            },
        })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collapse::CollapseConfig;
    use crate::huge::pool::PoolKind;
    use std::time::{Duration, Instant};

    /// Runs the collapse thread over 8 MiB of written memory (no VM) until every extent is
    /// huge, then tears down. Returns (teardown, hugetlb free before).
    fn collapse_everything(huge_source: PoolKind) -> Option<(Teardown, u64, u64)> {
        let free_before = host_view::hugetlb_pool().free;
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
        memory.stop_background();
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
            let table = memory.map().read();
            assert!(table.is_populated(gpa));
            let generation = table.get(ExtentIndex(0)).unwrap().generation();
            drop(table);
            fail::remove("kernel-sync-snapshot");
            old.join().unwrap();
            let table = memory.map().read();
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
        if let Some((t, _, _)) = collapse_everything(PoolKind::Thp) {
            assert_eq!(t.ledger_charged_bytes, 0);
        }
        if host_view::hugetlb_pool().free < 8 {
            eprintln!("SKIP: the hugetlb half needs 8 free 2 MiB pages");
            return;
        }
        if let Some((t, free_before, _)) = collapse_everything(PoolKind::Hugetlb) {
            assert_eq!(t.ledger_charged_bytes, 0);
            assert_eq!(
                t.hugetlb_free_pages, free_before,
                "every hugetlb page went back"
            );
        }
    }
}
