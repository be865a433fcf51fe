//! A KVM virtual machine monitor whose guest memory is managed in 2 MiB extents.
//!
//! The parts follow `DESIGN.md`: [`vm`] builds and runs a VM from a [`config::VmConfig`],
//! [`vcpu`] runs each vCPU, [`devices`] are the serial console and the ucall and exit ports,
//! [`ucall`] decodes guest requests, [`memory`] owns guest RAM (extents, the memory map lock,
//! the fault handler, the huge page pool and ledger, the collapse thread), [`arch`] the x86_64
//! boot state, [`loader`] the guest programs, [`metrics`] what a run measured, [`bench`] the
//! benchmarks.

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
pub mod memory;
pub mod metrics;
pub mod ratelimit;
pub mod seccomp;
pub mod sys;
pub mod ucall;
pub mod units;
pub mod vcpu;
pub mod vm;
pub mod worker;
