//! userfaultfd (`include/uapi/linux/userfaultfd.h`). The `userfaultfd` crate generates these
//! with bindgen at build time, which needs libclang on every machine that builds the VMM; the
//! handful used here are stable kernel ABI.

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;

/// Raise write-protect faults (`UFFDIO_REGISTER_MODE_WP`).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Report the faulting thread's id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFDIO_MOVE` (Linux 6.8+).
pub const FEATURE_MOVE: u64 = 1 << 10;
/// Write-protect unpopulated pages too.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFDIO_POISON` (Linux 6.6+).
pub const FEATURE_POISON: u64 = 1 << 14;
/// Report `MADV_DONTNEED`/`MADV_REMOVE` of registered memory (`UFFD_FEATURE_EVENT_REMOVE`).
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;

/// Register for faults on missing pages.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Register for write-protect faults.
pub const REGISTER_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (otherwise unprotect).
pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = 0x15;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Default)]
#[allow(missing_docs)]
pub struct UffdioMove {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub moved: i64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)]
pub struct UffdioPoison {
    pub range: UffdioRange,
    pub mode: u64,
    pub updated: i64,
}

/// `UFFDIO_MOVE_MODE_DONTWAKE`.
pub const MOVE_MODE_DONTWAKE: u64 = 1 << 0;

/// `struct uffd_msg`'s page-fault arm: `flags`, `address`, and the thread id.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)]
pub struct PagefaultArg {
    pub flags: u64,
    pub address: u64,
    pub ptid: u32,
    pub pad: u32,
}

/// `struct uffd_msg`: 32 bytes, an event and its argument.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(missing_docs)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: UffdMsgArg,
}

/// The argument of a `uffd_msg`, by event.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(missing_docs)]
pub union UffdMsgArg {
    pub pagefault: PagefaultArg,
    pub remove: RemoveArg,
    pub reserved: [u64; 3],
}

/// The `remove` arm of `uffd_msg`: the range the process discarded.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct RemoveArg {
    pub start: u64,
    pub end: u64,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

impl Default for UffdMsg {
    fn default() -> Self {
        UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: UffdMsgArg { reserved: [0; 3] },
        }
    }
}

/// The ioctl numbers.
#[allow(missing_docs)]
mod nr {
    use super::*;
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, UffdioApi);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    vmm_sys_util::ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_MOVE, UFFDIO, 0x05, UffdioMove);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_POISON, UFFDIO, 0x08, UffdioPoison);
    vmm_sys_util::ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
}
pub use nr::*;

/// The requests that resolve or protect faults, or (re)register ranges: those of the threads
/// that serve faults and collapse extents (their seccomp filters allow these only).
pub fn resolve_ioctls() -> [u64; 7] {
    [
        UFFDIO_COPY(),
        UFFDIO_ZEROPAGE(),
        UFFDIO_MOVE(),
        UFFDIO_WAKE(),
        UFFDIO_WRITEPROTECT(),
        UFFDIO_REGISTER(),
        UFFDIO_UNREGISTER(),
    ]
}
