//! How collapses end and what the collapse thread has done, named after khugepaged's result
//! codes and counters. [`CollapseStats`] is shared with whoever reports metrics and
//! serializes as the `collapse` section.

use serde::Serialize;

use crate::stats::{Counter, Latencies};

/// How one collapse attempt ended; named after khugepaged's `SCAN_*` result codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanResult {
    /// `SCAN_SUCCEED`: the extent is a huge page now.
    Succeed,
    /// `SCAN_EXCEED_NONE_PTE`: too many unpopulated pages.
    ExceedNonePte,
    /// `SCAN_PMD_MAPPED`: the extent was already huge.
    PmdMapped,
    /// `SCAN_ALLOC_HUGE_PAGE_FAIL`: no huge page could be had.
    AllocHugePageFail,
    /// `SCAN_CGROUP_CHARGE_FAIL`: the ledger's limit was reached.
    CgroupChargeFail,
    /// `SCAN_VMA_CHECK`: the VM is stopping (the region is going away).
    VmaCheck,
    /// Revalidation failed: the extent changed while no lock was held (its generation moved).
    Changed,
    /// `SCAN_FAIL`: write-protecting, copying or moving the page in failed.
    Fail,
    /// No mapping left to spare for another install (`vm.max_map_count`): collapsing stops.
    MapLimit,
    /// The extent gave back at least the reclaim split threshold of pages that the guest has
    /// not touched again: collapsing it would re-inflate them (creep).
    Reclaimed,
}

/// What the collapse thread has done.
#[derive(Debug, Default, Serialize)]
pub struct CollapseStats {
    /// Extents collapsed (khugepaged's `pages_collapsed`, in 2 MiB units).
    pub pages_collapsed: Counter,
    /// Complete passes over all extents.
    pub full_scans: Counter,
    /// Huge pages allocated.
    pub collapse_alloc: Counter,
    /// Allocations that failed.
    pub collapse_alloc_failed: Counter,
    /// Charges the ledger refused.
    pub charge_failed: Counter,
    /// Revalidations that failed: the extent changed, was already huge, or the VM stopped.
    pub revalidate_failed: Counter,
    /// Revalidations that failed because the generation moved.
    pub revalidate_changed: Counter,
    /// Extents skipped for too many unpopulated pages.
    pub exceed_none_pte: Counter,
    /// Extents skipped because they gave back pages the guest has not touched again.
    pub skipped_reclaimed: Counter,
    /// Write-protect, copy or move failures.
    pub failed: Counter,
    /// Moves that landed as 4 KiB pages (an access between the zap and the move made a page
    /// table there): the extent is whole, not huge, and is tried again later. Also in `failed`.
    pub split_moves: Counter,
    /// How long the write side was held per attempt that took it.
    pub write_lock_ns: Latencies,
    /// How long the extent was held exclusively per commit: the write side, then (for a
    /// commit by `UFFDIO_MOVE`) the extent's claim. Accesses to the extent wait this long.
    pub commit_ns: Latencies,
    /// How long the part before the write side took per attempt (allocate, charge, pre-copy).
    pub read_phase_ns: Latencies,
    /// How long getting one page took (allocate and charge), wherever the order puts it.
    pub alloc_ns: Latencies,
    /// When a full scan first found every extent huge, in ns since scanning started (0: not
    /// yet).
    pub all_huge_ns: Counter,
}
