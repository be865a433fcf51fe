//! Why a VM could not be built or run, and which of those are the user's input (exit 203).

use super::stop::STOP_LIMIT;
use crate::config::ConfigError;
use crate::files::FileError;
use crate::loader::ProgramError;
use crate::seccomp;
use crate::snapshot::RESUME_FLAG;
use vm_extents::ram_image::RamImageError;
use vm_extents::{MemoryError, UffdUser};

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
    /// A snapshot's state could not be put back (KVM refused it, or it does not fit this
    /// host).
    #[error("{RESUME_FLAG} {path}: cannot resume it: {why}")]
    Resume {
        /// The snapshot.
        path: String,
        /// What was refused.
        why: String,
    },
    /// The snapshot target cannot be used.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
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
    /// Guest memory could not be set up or saved. Told in this CLI's options (the memory
    /// manager's own messages name its settings), with every cause on the same line.
    #[error("{}", memory_message(.0))]
    Memory(MemoryError),
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
            | VmError::Resume { .. }
            | VmError::Snapshot(_)
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

impl From<MemoryError> for VmError {
    fn from(e: MemoryError) -> Self {
        VmError::Memory(e)
    }
}

/// The option that asked for what needs a userfaultfd.
fn uffd_user(user: &UffdUser) -> String {
    match user {
        UffdUser::PageSource(name) => format!("--page-source {name}"),
        UffdUser::ExternalServer => "--page-source external".into(),
        UffdUser::ZeroShrinker => "--reclaim-shrinker on".into(),
        other => other.to_string(),
    }
}

/// A memory error in this CLI's terms: the options that set what failed, and what to run
/// instead; everything else as the memory manager says it.
fn memory_message(e: &MemoryError) -> String {
    let chain = |e: &dyn std::error::Error| crate::error::chain(e);
    let collapse = |user: &UffdUser| *user == UffdUser::CollapseThread;
    match e {
        MemoryError::HugetlbPool {
            need,
            ram_mib,
            free,
            total,
            suggest,
        } => format!(
            "--backing hugetlb needs {need} free 2 MiB huge pages for {ram_mib} MiB of guest RAM, \
             but the pool has {free} free ({total} in total); reserve them as root with: \
             echo {suggest} > /proc/sys/vm/nr_hugepages"
        ),
        MemoryError::UffdUnavailable { needed_by, source } => format!(
            "{} needs a userfaultfd, which this user may not open: run as root, set \
             vm.unprivileged_userfaultfd=1, or give this user read and write access to \
             /dev/userfaultfd{}: {}",
            uffd_user(needed_by),
            if collapse(needed_by) {
                ", or run with --collapse off"
            } else {
                ""
            },
            chain(source)
        ),
        MemoryError::Uffd {
            needed_by,
            what,
            source,
        } => format!(
            "cannot set up userfaultfd for {}: {what}: {}{}",
            uffd_user(needed_by),
            chain(source),
            if collapse(needed_by) {
                "; run with --collapse off"
            } else {
                ""
            }
        ),
        MemoryError::Image(image) => image_message(image),
        other => chain(other),
    }
}

/// A memory image error in this CLI's terms.
pub fn image_message(e: &RamImageError) -> String {
    use crate::units::ByteSize;
    match e {
        RamImageError::NotAnImage { path } => format!(
            "{} is not a vmm memory image (no VMMIMAGE header); images are written by \
             --save-memory",
            path.display()
        ),
        RamImageError::SizeMismatch {
            path,
            image_ram,
            ram,
        } => format!(
            "memory image {} holds {} of guest RAM but --memory is {}; run with --memory {}",
            path.display(),
            ByteSize(*image_ram),
            ByteSize(*ram),
            ByteSize(*image_ram)
        ),
        other => crate::error::chain(other),
    }
}
