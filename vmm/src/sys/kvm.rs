//! KVM ioctl numbers that `kvm-ioctls` issues but does not export, for the seccomp filters
//! (`include/uapi/linux/kvm.h`); `KVM_GET_STATS_FD` is `vm_extents::sys`'.

use kvm_bindings::{KVMIO, kvm_regs, kvm_sregs};

/// The ioctl numbers.
#[allow(missing_docs)]
mod nr {
    use super::*;
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
}
pub use nr::*;
pub use vm_extents::sys::KVM_GET_STATS_FD;
