//! A KVM virtual machine monitor whose guest memory is managed in 2 MiB extents.
//!
//! `ARCHITECTURE.md` at the repository root maps the modules, draws the threads and the
//! locks, and follows a fault and a collapse step by step. In short: [`cli`] turns the command
//! line into a [`config::VmConfig`], [`vm`] builds and runs the VM, [`vcpu`] runs each vCPU,
//! [`devices`] and [`ucall`] are what its exits reach, the `vm-extents` crate owns guest RAM
//! and everything that manages it (used through its public API), [`bench`] measures it.

#![deny(missing_docs)]

pub mod arch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod devices;
pub mod error;
pub mod files;
pub mod fuzz;
pub mod inject;
pub mod loader;
pub mod metrics;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod stalls;
pub mod storage;
pub mod sync;
pub mod sys;
pub mod ucall;
pub mod uffd_serve;
pub mod units;
pub mod vcpu;
pub mod vm;

// The guest's layout and the memory manager agree on the page and extent sizes and on the
// largest RAM an image may hold.
const _: () = assert!(
    guest_abi::layout::PAGE_SIZE == vm_extents::PAGE_SIZE
        && guest_abi::layout::EXTENT_SIZE == vm_extents::EXTENT_SIZE
        && guest_abi::layout::MAX_RAM == vm_extents::MAX_RAM
);
