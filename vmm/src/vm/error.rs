//! Why a VM could not be built or run, and which of those are the user's input (exit 203).

use super::stop::STOP_LIMIT;
use crate::config::ConfigError;
use crate::files::FileError;
use crate::loader::ProgramError;
use crate::seccomp;
use vm_extents::MemoryError;

/// Errors that keep a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open {path}: check that KVM is enabled (the kvm_intel or kvm_amd module is \
         loaded and virtualization is on in the firmware) and that this user may read and \
         write {path}"
    )]
    OpenKvm {
        /// The device path.
        path: String,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM device is not one.
    #[error("{path} is not a KVM device: {why}; name the KVM device node (normally /dev/kvm)")]
    NotKvm {
        /// The device path.
        path: String,
        /// What it is instead.
        why: String,
    },
    /// A KVM ioctl failed.
    #[error("KVM call failed: {what}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host's RAM size could not be read.
    #[error("cannot read the host's memory size")]
    HostMemory(#[source] std::io::Error),
    /// A configuration value is not allowed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An output path cannot be used.
    #[error(transparent)]
    Output(#[from] FileError),
    /// The guest program is not usable.
    #[error(transparent)]
    Image(#[from] ProgramError),
    /// Guest memory could not be set up or saved.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Writing boot data into guest RAM failed.
    #[error("cannot write boot data into guest RAM")]
    BootData(#[source] vm_memory::GuestMemoryError),
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Thread {
        /// The thread.
        name: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Too few memory mappings are left for the VMM's threads.
    #[error(
        "vm.max_map_count is {max} and this process already uses {used} mappings; the VMM needs \
         {need} more for its threads and buffers (raise it as root: sysctl -w \
         vm.max_map_count=65530)"
    )]
    Mappings {
        /// `vm.max_map_count`.
        max: u64,
        /// Mappings in use.
        used: u64,
        /// Mappings needed.
        need: u64,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install a signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// A vCPU thread panicked.
    #[error("vcpu{0} thread panicked")]
    VcpuPanicked(u32),
    /// A vCPU thread did not stop.
    #[error(
        "vcpu{0} did not stop within {STOP_LIMIT:?}, even with its faults released; exiting \
         without tearing down the memory it may still use"
    )]
    VcpuStuck(u32),
    /// The metrics file could not be written.
    #[error("cannot write metrics to {path}")]
    Metrics {
        /// The path named.
        path: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Whether the error is about the user's input or host set-up (nothing ran), as opposed
    /// to a failure of the VMM while running.
    pub fn is_bad_input(&self) -> bool {
        match self {
            VmError::Config(_)
            | VmError::Mappings { .. }
            | VmError::Output(_)
            | VmError::Image(_)
            | VmError::OpenKvm { .. }
            | VmError::NotKvm { .. } => true,
            VmError::Memory(MemoryError::HugetlbPool { .. })
            | VmError::Memory(MemoryError::UffdUnavailable { .. })
            | VmError::Memory(MemoryError::Handoff(vm_extents::handoff::HandoffError::Connect {
                ..
            })) => true,
            // An unusable image is bad input; an I/O error while saving one is not.
            VmError::Memory(MemoryError::Image(e)) => e.is_bad_input(),
            _ => false,
        }
    }

    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::Kvm { what, source }
    }
}
