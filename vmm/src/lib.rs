//! A KVM virtual machine monitor whose guest memory is managed in 2 MiB extents.
//!
//! `ARCHITECTURE.md` at the repository root maps the modules, draws the threads and the
//! locks, and follows a fault and a collapse step by step. In short: [`cli`] turns the command
//! line into a [`config::VmConfig`], [`vm`] builds and runs the VM, [`vcpu`] runs each vCPU,
//! [`devices`] and [`ucall`] are what its exits reach, [`memory`] owns guest RAM and everything
//! that manages it, [`bench`] measures it.

#![deny(missing_docs)]

pub mod arch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod devices;
pub mod error;
pub mod files;
pub mod fuzz;
pub mod handoff;
pub mod inject;
pub mod loader;
pub mod memory;
pub mod metrics;
pub mod ratelimit;
pub mod seccomp;
pub mod signals;
pub mod stalls;
pub mod sync;
pub mod sys;
pub mod ucall;
pub mod uffd_serve;
pub mod units;
pub mod vcpu;
pub mod vm;
pub mod worker;
