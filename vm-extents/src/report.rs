//! What guest memory reports: the `memory`, `faults`, `kernel`, `collapse`, `ledger` and
//! `reclaim` sections of the metrics, as typed values (the JSON keys are the field names). The live
//! counters are shared by `Arc`, so a report taken at the end still reads them after the
//! threads that wrote them are gone.

use std::sync::Arc;

use serde::Serialize;

use super::backing::Backing;
use super::collapse::{CollapseOrder, CollapseStats};
use super::config::{MemoryConfig, Restore};
use super::extent::ExtentCounts;
use super::fault::FaultStats;
use super::host_view::SmapsTotals;
use super::huge::pool::{PoolKind, PoolStats};
use super::prefetch::PrefetchStats;
use super::reclaim::ReclaimStats;

/// Every memory section of the metrics.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// Guest RAM and its extents.
    pub memory: MemorySection,
    /// The fault handler.
    pub faults: FaultsSection,
    /// The host kernel's view.
    pub kernel: KernelSection,
    /// The collapse thread and the pool.
    pub collapse: CollapseSection,
    /// Huge-page charges.
    pub ledger: LedgerSection,
    /// Restoring from a memory image (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSection>,
    /// Memory the guest gave back.
    pub reclaim: ReclaimSection,
}

/// The `reclaim` section: whether reports are honoured, the split threshold, the counters.
#[derive(Debug, Serialize)]
pub struct ReclaimSection {
    /// Whether the guest's reports of free memory are honoured.
    pub enabled: bool,
    /// Freed pages of a huge extent from which it is split (absent when off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_pages: Option<u32>,
    /// How such an extent gives its freed pages back (`copy` or `discard`).
    pub partial: crate::reclaim::PartialFree,
    /// Bytes given back to the host, all causes.
    pub reclaimed_bytes: u64,
    /// Of those, given back because the guest reported them free.
    pub reported_given_back_bytes: u64,
    /// The zero-page shrinker's rate in bytes a second (absent when it does not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shrinker_rate: Option<u64>,
    /// The counters.
    #[serde(flatten)]
    pub stats: Arc<ReclaimStats>,
}

/// The `restore` section: how an image was restored and what that read.
#[derive(Debug, Serialize)]
pub struct RestoreSection {
    /// `lazy` or `eager`.
    pub mode: Restore,
    /// How long an eager restore took to copy the image in, in ns (0 when lazy).
    pub copy_ns: u64,
    /// Bytes read from the image so far, by every reader (faults, prefetch, collapse, copy).
    pub image_bytes_read: u64,
    /// The prefetcher's counters, if it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<Arc<PrefetchStats>>,
}

/// The `memory` section.
#[derive(Debug, Serialize)]
pub struct MemorySection {
    /// Guest RAM in bytes.
    pub size_bytes: u64,
    /// What backs it.
    pub backing: Backing,
    /// Who fills first touches (`kernel`, `zero`, `image`).
    pub page_source: &'static str,
    /// Extents by state.
    pub extents: ExtentsSection,
}

impl MemorySection {
    /// The section for memory set up as `config`, with `counts` extents by state.
    pub fn new(config: &MemoryConfig, counts: ExtentCounts) -> Self {
        MemorySection {
            size_bytes: config.size,
            backing: config.backing,
            page_source: config.source.name(),
            extents: ExtentsSection {
                total: counts.unpopulated + counts.small + counts.huge,
                counts,
            },
        }
    }
}

/// `memory.extents`: the total, and each state's count.
#[derive(Debug, Serialize)]
pub struct ExtentsSection {
    /// Every extent.
    pub total: u64,
    /// By state.
    #[serde(flatten)]
    pub counts: ExtentCounts,
}

/// The `faults` section: the handler's counters and its granularity.
#[derive(Debug, Serialize)]
pub struct FaultsSection {
    /// The counters.
    #[serde(flatten)]
    pub stats: Arc<FaultStats>,
    /// Bytes resolved per fault.
    pub granularity_bytes: u64,
}

/// The `kernel` section: smaps totals for guest RAM, and (filled in by the VM) KVM's 2 MiB
/// mappings and the hugetlb pool around the run.
#[derive(Debug, Default, Serialize)]
pub struct KernelSection {
    /// `AnonHugePages`, `*_Hugetlb`, `Rss`.
    #[serde(flatten)]
    pub smaps: SmapsTotals,
    /// Guest RAM mapped to the kernel's shared zero page, in kB: populated in the extent
    /// table, but left out of `Rss` (`null` without `PAGEMAP_SCAN`). The table's populated
    /// pages are `Rss` (less other mappings' pages) plus these.
    pub zero_pfn_kb: Option<u64>,
    /// KVM's `pages_2m` statistic (`null` where KVM has none).
    pub kvm_pages_2m: Option<u64>,
    /// Mappings that covered guest RAM when it was registered: one per userfaultfd shard
    /// (the kernel keeps one mapping per uffd context).
    pub ram_mappings_at_start: u64,
    /// Mappings that cover guest RAM now: as at the start, plus two for each extent moved in
    /// by `mremap` (installs by `UFFDIO_MOVE` split none).
    pub ram_mappings: u64,
    /// Free hugetlb pages before the VM was built (summary only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_free_before: Option<u64>,
    /// Free hugetlb pages after teardown (summary only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_free_after_teardown: Option<u64>,
}

impl KernelSection {
    /// The section with the smaps totals and the mapping counts of guest RAM.
    pub fn new(
        smaps: SmapsTotals,
        zero_pfn_bytes: Option<u64>,
        ram_mappings_at_start: u64,
        ram_mappings: u64,
    ) -> Self {
        KernelSection {
            smaps,
            zero_pfn_kb: zero_pfn_bytes.map(|b| b >> 10),
            ram_mappings_at_start,
            ram_mappings,
            ..KernelSection::default()
        }
    }
}

/// The `collapse` section: the thread's counters, how it was set up, and the pool's counters.
#[derive(Debug, Serialize)]
pub struct CollapseSection {
    /// The counters.
    #[serde(flatten)]
    pub stats: Arc<CollapseStats>,
    /// Whether the thread ran.
    pub enabled: bool,
    /// Its lock order.
    pub order: Option<CollapseOrder>,
    /// Where huge pages came from.
    pub huge_source: PoolKind,
    /// The pool's counters (when there was a pool).
    pub pool: Option<PoolSection>,
    /// Whether installs stopped for want of mappings (`vm.max_map_count`).
    pub stopped_for_mappings: bool,
}

/// The `ledger` section.
#[derive(Debug, Serialize)]
pub struct LedgerSection {
    /// Charged when the report was taken.
    pub charged_bytes: u64,
    /// The most charged at once.
    pub peak_charged_bytes: u64,
    /// The limit.
    pub limit_bytes: u64,
    /// Still charged after teardown, which must be 0 (summary only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_teardown_bytes: Option<u64>,
}

/// The `collapse.pool` section: the pool's counters and the share of takes that found a page
/// ready.
#[derive(Debug, Serialize)]
pub struct PoolSection {
    /// The counters.
    #[serde(flatten)]
    pub stats: Arc<PoolStats>,
    /// Pages taken ready, of all pages taken (1.0: no taker waited for an allocation).
    pub hit_rate: f64,
}

impl PoolSection {
    /// The section for a pool's counters, read now.
    pub fn of(stats: &Arc<PoolStats>) -> Self {
        PoolSection {
            stats: stats.clone(),
            hit_rate: stats.hit_rate(),
        }
    }
}
