//! The collapse thread's tunables: khugepaged's, with defaults a VM can use (the kernel's own,
//! 10 s between scans and 60 s after a failed allocation, would not finish within a test run).
//! Each default is written once, here; the command line takes its defaults from these.

use std::time::Duration;

/// When, relative to the memory map lock, the huge page is allocated and charged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CollapseOrder {
    /// Under the read lock, before the write lock (the seed commit's order).
    #[default]
    Prealloc,
    /// Under the write lock (the order before the seed commit), a baseline.
    Legacy,
    /// With no lock held (Linux since 2015), a baseline.
    Unlocked,
}

crate::choice::choices!(CollapseOrder {
    Prealloc = "prealloc": "Under the read lock, before the write lock (the seed commit's order)",
    Legacy = "legacy": "Under the write lock (the order before the seed commit), a baseline",
    Unlocked = "unlocked": "With no lock held (Linux since 2015), a baseline",
});

/// The collapse thread's tunables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollapseConfig {
    /// Lock order.
    pub order: CollapseOrder,
    /// 4 KiB pages to scan per round (512 per extent).
    pub pages_to_scan: u64,
    /// Sleep between rounds.
    pub scan_sleep: Duration,
    /// Back-off after a failed collapse (no page, no charge, a failed ioctl).
    pub alloc_sleep: Duration,
    /// Most unpopulated pages an extent may have and still be collapsed; they become zeroes
    /// (or the page source's contents).
    pub max_ptes_none: u32,
}

impl CollapseConfig {
    /// khugepaged's `pages_to_scan` default: 8 extents per round.
    pub const PAGES_TO_SCAN: u64 = 4096;
    /// khugepaged's `scan_sleep_millisecs`, ours.
    pub const SCAN_SLEEP_MS: u64 = 10;
    /// khugepaged's `alloc_sleep_millisecs`, ours.
    pub const ALLOC_SLEEP_MS: u64 = 200;
    /// khugepaged's `max_ptes_none` default, and its largest value: an extent with one page
    /// populated may collapse.
    pub const MAX_PTES_NONE: u32 = 511;
}

impl Default for CollapseConfig {
    fn default() -> Self {
        CollapseConfig {
            order: CollapseOrder::default(),
            pages_to_scan: Self::PAGES_TO_SCAN,
            scan_sleep: Duration::from_millis(Self::SCAN_SLEEP_MS),
            alloc_sleep: Duration::from_millis(Self::ALLOC_SLEEP_MS),
            max_ptes_none: Self::MAX_PTES_NONE,
        }
    }
}
