//! The kernel ABI the manager declares itself: structs, flags and ioctl numbers of
//! userfaultfd, pagemap and KVM's statistics that neither the `libc` crate nor the system's
//! headers (older than the kernel) have. Declarations only, no calls: the wrappers that make
//! the calls own the invariants ([`crate::uffd`], [`crate::host_view`]). A VMM's seccomp filters
//! for the manager's threads name the same numbers.

pub mod pagemap;
pub mod uffd;

/// `KVM_GET_STATS_FD` on a VM fd (`include/uapi/linux/kvm.h`), which `kvm-ioctls` does not
/// wrap.
#[allow(missing_docs)]
mod kvm {
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}
pub use kvm::KVM_GET_STATS_FD;
