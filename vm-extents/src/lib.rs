//! Guest memory for a KVM VMM, managed in 2 MiB extents: guest RAM populated 4 KiB at a time
//! (by the host kernel, or by userfaultfd handlers serving zeroes or a memory image), and a
//! collapse thread, a VMM's own khugepaged, that promotes populated extents to 2 MiB host huge
//! pages. It allocates and charges each huge page holding only the read side of the memory
//! map lock, and takes the write side only briefly to revalidate and remap: the order Linux's
//! khugepaged took in "mm, thp: do not hold mmap_sem while allocating", so a fault handler
//! that needs the read side to make progress is never stuck behind an allocation.
//!
//! # Walk-through
//!
//! A VM from `kvm-ioctls`, its RAM from this crate: two regions (4 MiB at 0 and 4 MiB at
//! 1 GiB, each its own memslot, nothing between them), served by the crate's userfaultfd
//! handlers (zero page source), with the collapse thread on. A few real-mode instructions
//! write a byte and halt; the memory report then says what the manager did.
//!
//! ```
//! use std::sync::Arc;
//! use kvm_ioctls::{Kvm, VcpuExit};
//! use vm_extents::{CollapseConfig, Memory, MemoryConfig, PageSourceKind};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # if !std::path::Path::new("/dev/kvm").exists() && std::env::var_os("VMM_REQUIRE_KVM").is_none() {
//! #     return Ok(()); // No KVM here: nothing to show.
//! # }
//! // Two regions of two extents each. Every rule is checked here, once.
//! let high = GuestAddress(1 << 30);
//! let config = MemoryConfig::builder_for_regions(&[(GuestAddress(0), 4 << 20), (high, 4 << 20)])
//!     .source(PageSourceKind::Zero)
//!     .collapse(Some(CollapseConfig::default()))
//!     .build()?;
//! let mut memory = Memory::new(config)?;
//!
//! let kvm = Kvm::new()?;
//! // Made after the memory, so that it (and its memslot) is dropped first.
//! let vm = kvm.create_vm()?;
//! // SAFETY: `vm` is dropped before `memory` (locals drop in reverse order).
//! unsafe { memory.ram().register(&vm, 0)? };
//!
//! // mov byte [0x2000], 0x42; hlt (16-bit real mode, at 0x1000).
//! let code = [0xc6, 0x06, 0x00, 0x20, 0x42, 0xf4];
//! memory.ram().view().write_slice(&code, GuestAddress(0x1000))?;
//! // Boot data written: register RAM with the userfaultfd and start the threads.
//! memory.start(Arc::new(|what| eprintln!("memory failed: {what}")))?;
//!
//! let mut vcpu = vm.create_vcpu(0)?;
//! let mut sregs = vcpu.get_sregs()?;
//! (sregs.cs.base, sregs.cs.selector) = (0, 0);
//! vcpu.set_sregs(&sregs)?;
//! let mut regs = vcpu.get_regs()?;
//! (regs.rip, regs.rflags) = (0x1000, 2);
//! vcpu.set_regs(&regs)?;
//! loop {
//!     match vcpu.run()? {
//!         VcpuExit::Hlt => break,
//!         exit => return Err(format!("unexpected exit {exit:?}").into()),
//!     }
//! }
//! assert_eq!(memory.ram().view().read_obj::<u8>(GuestAddress(0x2000))?, 0x42);
//! // The high region is RAM too (its first touch is served like the guest's), the gap is not.
//! memory.ram().view().write_obj(7u64, high)?;
//! assert_eq!(memory.ram().view().read_obj::<u64>(high)?, 7);
//! assert!(memory.ram().view().read_obj::<u8>(GuestAddress(4 << 20)).is_err());
//!
//! // The collapse thread promotes the populated extent (one page is enough by default).
//! let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
//! while memory.counts()?.huge == 0 && std::time::Instant::now() < deadline {
//!     std::thread::sleep(std::time::Duration::from_millis(10));
//! }
//! let report = memory.report()?;
//! assert!(report.memory.extents.counts.huge >= 1, "{}", serde_json::to_string(&report)?);
//! println!("{}", serde_json::to_string_pretty(&report)?);
//! drop(vcpu);
//! drop(vm);
//! memory.teardown();
//! # Ok(())
//! # }
//! ```
//!
//! The example `examples/minimal_vmm.rs` is the same as a program: a whole (if small) VMM on
//! this crate's public API and the rust-vmm crates.
//!
//! # What is here
//!
//! - [`MemoryConfig`], built and checked by a [`MemoryBuilder`] ([`ConfigError`]), and
//!   [`Memory`], which owns guest RAM and every thread that manages it, starts them in order
//!   and tears them down ([`Teardown`]); [`MemoryReport`] is what it reports;
//! - [`GuestRam`], the host mapping (with a `vm-memory` view), and its [`Backing`]; where a
//!   page's first contents come from ([`PageSourceKind`], [`PageSource`]);
//! - [`ExtentTable`] and [`MemoryMap`], the table of extents and the lock over it, with its
//!   guards ([`MapRead`], [`MapWrite`]) and per-extent claims ([`ExtentClaim`]);
//! - [`HugePage`]s and where they come from ([`HugePageAllocator`], [`PoolKind`]), and how
//!   they go in ([`InstallMethod`]); the collapse thread's tunables ([`CollapseConfig`]);
//! - [`ThreadHook`]: run first on every thread the manager starts, with its [`ThreadRole`]
//!   (a VMM installs its seccomp filters there; [`sys`] has the numbers they name);
//! - modules: [`uffd`] (a userfaultfd), [`handoff`] (guest RAM handed to a page server over a
//!   Unix socket, Firecracker's protocol), [`ram_image`] (memory images), [`host_view`] (what
//!   the host kernel says), [`files`] (checked reads, atomic writes), [`stats`], [`report`],
//!   [`ratelimit`].
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

mod backing;
mod choice;
mod collapse;
mod config;
mod error;
mod extent;
mod external;
mod fault;
pub mod files;
pub mod handoff;
pub mod host_view;
mod huge;
mod manager;
mod map;
mod populate;
mod prefetch;
mod ram;
pub mod ram_image;
pub mod ratelimit;
pub mod reclaim;
pub mod report;
pub mod stats;
mod sync;
pub mod sys;
pub mod uffd;
mod units;
mod worker;
pub mod working_set;

pub use backing::{Backing, PageSourceKind, UnknownPageSource};
pub use choice::{Choice, UnknownChoice};
pub use collapse::{CollapseConfig, CollapseGate, CollapseOrder, CollapseStats};
pub use config::{
    ConfigError, MAP_RESERVE, MAPS_PER_THREAD, MemoryBuilder, MemoryConfig, Restore,
    collapse_unavailable,
};
pub use extent::{
    ClaimTicket, Extent, ExtentClaim, ExtentCounts, ExtentIndex, ExtentState, ExtentTable,
};
pub use fault::FaultStats;
pub use fault::source::{Fill, PageSource, RamImageSource, ZeroSource};
pub use huge::install::InstallMethod;
pub use huge::ledger::Ledger;
pub use huge::page::{
    AllocError, HugePage, HugePageAllocator, MoveFailed, PageKind, alloc_hugetlb, alloc_thp,
};
pub use huge::pool::{PoolKind, PoolStats};
pub use manager::{Memory, Teardown};
pub use map::{Held, MapRead, MapWrite, MemoryMap};
pub use prefetch::PrefetchStats;
pub use ram::{GuestRam, HostAddr, RamError, RamRegion};
pub use reclaim::{PartialFree, ReclaimError, ReclaimStats, Reclaimed, Reclaimer};
pub use report::MemoryReport;
pub use worker::{
    Failure, FailureCause, HookError, OnFailure, ThreadFailure, ThreadHook, ThreadRole,
};
pub use working_set::WorkingSet;

use ram_image::RamImageError;

/// Which part of the manager needs a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UffdUser {
    /// The manager's fault handlers, serving first touches from this page source (`zero` or
    /// `image`).
    PageSource(&'static str),
    /// The collapse thread (write-protect faults).
    CollapseThread,
    /// The zero-page shrinker (write-protect faults).
    ZeroShrinker,
    /// An external page server, handed guest RAM.
    ExternalServer,
}

impl std::fmt::Display for UffdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UffdUser::PageSource(name) => write!(f, "the {name} page source"),
            UffdUser::CollapseThread => f.write_str("the collapse thread"),
            UffdUser::ZeroShrinker => f.write_str("the zero-page shrinker"),
            UffdUser::ExternalServer => f.write_str("an external page server"),
        }
    }
}

/// Errors from setting up or saving guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping RAM failed.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// The hugetlb pool is too small.
    #[error(
        "hugetlb backing needs {need} free 2 MiB huge pages for {ram_mib} MiB of guest RAM, \
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
         /dev/userfaultfd{}", if *needed_by == UffdUser::CollapseThread { ", or run without the collapse thread" } else { "" }
    )]
    UffdUnavailable {
        /// What needs it.
        needed_by: UffdUser,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// userfaultfd could not be set up.
    #[error("cannot set up userfaultfd for {needed_by}: {what}")]
    Uffd {
        /// What needs it.
        needed_by: UffdUser,
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
