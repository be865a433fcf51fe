//! Guest memory: the host mapping of guest RAM, the extent table behind the memory map lock,
//! how pages get populated (the host kernel, or our userfaultfd handler serving a page
//! source), memory images, and the kernel's view of it all.
//!
//! [`Memory`] owns every piece and their order of teardown: the fault handler stops before the
//! uffd closes, and RAM is unmapped last (after the VM fd, which its owner drops first).

pub mod backing;
pub mod extent;
pub mod fault;
pub mod image;
pub mod kernel;
mod ram;
pub mod source;
pub mod uffd;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use guest_abi::layout::EXTENT_SIZE;
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress};

pub use backing::{Backing, SourceKind};
pub use extent::{ExtentCounts, ExtentIndex, ExtentState, ExtentTable, MemoryMap};
use fault::{FaultHandler, FaultStats, HandlerContext};
use image::{ImageFile, ImageFileError, SaveStats};
use kernel::SmapsTotals;
pub use ram::{GuestRam, HostAddr, RamError};
use source::{ImageSource, PageSource, ZeroSource};
use uffd::Uffd;

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
    /// userfaultfd could not be set up.
    #[error(
        "cannot set up userfaultfd for --page-source {source_name} (needs root, \
         vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)"
    )]
    Uffd {
        /// The page source that needs it.
        source_name: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's view of guest RAM could not be read.
    #[error("cannot read the kernel's view of guest RAM")]
    KernelView(#[source] std::io::Error),
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
}

/// Guest memory and everything that manages it.
pub struct Memory {
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
        if config.backing.prepopulated() {
            ram.populate().map_err(|source| MemoryError::Populate {
                backing: config.backing,
                source,
            })?;
            if let Some(image) = &image {
                copy_image_into(&ram, image)?;
            }
            mark_huge_extents(&ram, &mut table, config.backing)?;
        }
        Ok(Memory {
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
    /// and, for the zero and image sources on 4 KiB backing, registers RAM with a userfaultfd
    /// and starts the fault handler. `on_fatal` is called if the handler fails.
    pub fn start(&mut self, on_fatal: Box<dyn Fn(String) + Send>) -> Result<(), MemoryError> {
        if self.config.backing.prepopulated() {
            return Ok(());
        }
        self.sync_from_kernel()?;
        if !self.config.source.uses_uffd() {
            return Ok(());
        }
        let uffd_err = |source| MemoryError::Uffd {
            source_name: self.config.source.name(),
            source,
        };
        let uffd = Arc::new(Uffd::new(uffd::FEATURE_THREAD_ID).map_err(uffd_err)?);
        let base = self.ram.host_base().0 as u64;
        uffd.register(base, self.config.size, uffd::REGISTER_MODE_MISSING)
            .map_err(uffd_err)?;
        let source: Arc<dyn PageSource> = match &self.image {
            Some(image) => Arc::new(ImageSource::new(image.clone())),
            None => Arc::new(ZeroSource),
        };
        let handler = FaultHandler::start(HandlerContext {
            uffd: uffd.clone(),
            map: self.map.clone(),
            host_base: base,
            ram_size: self.config.size,
            source,
            granularity: self.config.fault_granularity,
            stats: self.fault_stats.clone(),
            on_fatal,
        })
        .map_err(uffd_err)?;
        self.uffd = Some(uffd);
        self.handler = Some(handler);
        Ok(())
    }

    /// Brings the extent table up to date with the pages the host kernel has populated
    /// (4 KiB backing only: where the VMM serves faults it records them itself, and its
    /// records are what the kernel has too).
    pub fn sync_from_kernel(&self) -> Result<(), MemoryError> {
        if self.config.backing.prepopulated() {
            return Ok(());
        }
        let present = kernel::present_pages(self.ram.host_base().0 as u64, self.config.size)
            .map_err(MemoryError::KernelView)?;
        let table = self.map.read().unwrap_or_else(|p| p.into_inner());
        for (index, extent) in table.iter() {
            if extent.state() == ExtentState::Huge {
                continue;
            }
            let first = index.0 * extent::PAGES_PER_EXTENT;
            extent.sync_pages(|p| present[first + p]);
        }
        Ok(())
    }

    /// Stops the fault handler (vCPUs must be stopped first: none may be waiting on a fault).
    pub fn stop(&mut self) {
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

    /// Saves guest RAM to an image at `path`, atomically and sparsely: pages the VMM knows
    /// were never populated are not even read.
    pub fn save(&self, path: &Path) -> Result<SaveStats, MemoryError> {
        let counts_known = self.counts()?;
        log::debug!("saving memory image with extents {counts_known:?}");
        let table = self.map.read().unwrap_or_else(|p| p.into_inner());
        let view = self.ram.view();
        let stats = image::save(path, self.config.size, |gpa, buf| {
            if !table.is_populated(gpa) {
                return false;
            }
            view.read_slice(buf, GuestAddress(gpa)).is_ok()
        })?;
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
                "served": s.served.load(Ordering::Relaxed),
                "already_present": s.already_present.load(Ordering::Relaxed),
                "retried": s.retried.load(Ordering::Relaxed),
                "wp": s.wp_faults.load(Ordering::Relaxed),
                "granularity_bytes": self.config.fault_granularity,
                "service_ns": service,
            },
            "kernel": {
                "anon_huge_kb": smaps.anon_huge_kb,
                "hugetlb_kb": smaps.hugetlb_kb,
                "rss_kb": smaps.rss_kb,
            },
        }))
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
            extent.sync_pages(|_| true);
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
