//! Guest memory for a KVM VMM, managed in 2 MiB extents: guest RAM populated 4 KiB at a time
//! (by the host kernel, or by userfaultfd handlers serving zeroes or a memory image), and a
//! collapse thread that promotes populated extents to 2 MiB host huge pages. It allocates and
//! charges each huge page holding only the read side of the memory map lock, and takes the
//! write side only briefly to revalidate and remap (the order of Linux's khugepaged since
//! "mm, thp: do not hold mmap_sem while allocating").
//!
//! By responsibility:
//!
//! - [`ram`]: the host mapping of guest RAM; [`backing`]: how it is backed and populated;
//! - [`extent`]: the table of 2 MiB extents; [`map`]: the memory map lock over it, this VMM's
//!   `mmap_sem`, and the only way to the table and to the manager's view of guest memory;
//! - [`uffd`]: the userfaultfd guest RAM is registered with; [`fault`]: the fault handler
//!   and the page sources; [`external`]: guest RAM handed to an external page server;
//! - [`huge`]: huge pages (the pool, the ledger), and the one path that installs them;
//! - [`collapse`]: the collapse thread, this VMM's khugepaged;
//! - [`ram_image`]: memory image files (read as a page source, written by a save);
//! - [`host_view`]: what the host kernel says about all of it;
//! - [`manager`]: [`Memory`], which owns every piece, starts and stops the threads in order,
//!   and tears down; [`report`]: what it reports.
//!
//! - [`worker`]: the threads it starts, each told to the VMM's [`ThreadHook`] first;
//! - [`handoff`]: guest RAM handed to a page server over a Unix socket (Firecracker's protocol);
//! - [`files`]: checked reads and atomic writes; [`stats`]: counters and latencies;
//! - [`sys`]: the kernel ABI it declares itself (what a VMM's seccomp filters name).
//!
//! `ARCHITECTURE.md` at the repository root draws the threads and the locks.

#![deny(missing_docs)]

/// The base page: what the fault handlers serve and the extent table counts.
pub const PAGE_SIZE: u64 = 4096;
/// An extent: the size of a huge page, and the unit of the extent table and of a collapse.
pub const EXTENT_SIZE: u64 = 2 << 20;
/// The most guest RAM a memory image may hold.
pub const MAX_RAM: u64 = 64 << 30;

/// `fires!("name")`: whether fault injection point `name` fires now, for points whose effect
/// the caller performs itself. Always false without the `failpoints` feature.
macro_rules! fires {
    ($name:expr) => {{
        #[allow(clippy::redundant_closure_call)]
        let fired = (|| {
            fail::fail_point!($name, |_| true);
            false
        })();
        fired
    }};
}
pub(crate) use fires;

pub mod backing;
pub mod choice;
pub mod collapse;
pub mod config;
mod error;
pub mod extent;
pub mod external;
pub mod fault;
pub mod files;
pub mod handoff;
pub mod host_view;
pub mod huge;
pub mod manager;
pub mod map;
mod populate;
pub mod prefetch;
pub mod ram;
pub mod ram_image;
pub mod ratelimit;
pub mod report;
pub mod stats;
mod sync;
pub mod sys;
pub mod uffd;
mod units;
pub mod worker;

pub use backing::{Backing, PageSourceKind};
pub use choice::{Choice, UnknownChoice};
pub use config::{MAP_RESERVE, MAPS_PER_THREAD, MemoryConfig, Restore, collapse_unavailable};
pub use extent::{ExtentCounts, ExtentIndex, ExtentState, ExtentTable};
pub use manager::{Memory, Teardown};
pub use map::MemoryMap;
pub use ram::{GuestRam, HostAddr, RamError};
pub use worker::{HookError, ThreadHook, ThreadRole};

use ram_image::RamImageError;

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
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A memory image is unusable.
    #[error(transparent)]
    Image(#[from] RamImageError),
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
        /// What the system said.
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
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The kernel's view of guest RAM could not be read.
    #[error("cannot read the kernel's view of guest RAM")]
    KernelView(#[source] std::io::Error),
    /// A memory thread could not be started.
    #[error("cannot start a memory thread")]
    Thread(#[source] std::io::Error),
    /// Guest RAM could not be handed to the external page server.
    #[error("cannot hand guest RAM to the page server")]
    Handoff(#[source] handoff::HandoffError),
}
