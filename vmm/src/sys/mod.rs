//! KVM ioctl numbers the VMM's seccomp filters name; the memory manager's own kernel ABI
//! (userfaultfd, pagemap) is `vm_extents::sys`.

pub mod kvm;
