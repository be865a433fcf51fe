//! The kernel ABI the VMM declares itself: structs, flags and ioctl numbers of userfaultfd,
//! pagemap and KVM that neither the `libc` crate nor the system's headers (older than the
//! kernel) have. Declarations only, no calls: the wrappers that make the calls own the
//! invariants (`memory::uffd`, `memory::host_view`), and the seccomp filters name the
//! same numbers.

pub mod kvm;
pub mod pagemap;
pub mod uffd;
