//! `PAGEMAP_SCAN` (`include/uapi/linux/fs.h`, Linux 6.7+): which pages of a range are
//! present, or mapped huge, in one ioctl on `/proc/self/pagemap`.

/// A present page (mapped in the page tables).
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// A present entry that maps the kernel's shared zero page (4 KiB or huge): it reads zeroes
/// and holds no memory of its own, so `Rss` leaves it out.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// A page mapped by a huge (PMD-level) entry: THP or hugetlb.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`: one range of pages with the same categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// The ioctl number.
#[allow(missing_docs)]
mod nr {
    use super::*;
    vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, b'f' as u32, 16, PmScanArg);
}
pub use nr::*;
