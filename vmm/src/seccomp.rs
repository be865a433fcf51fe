//! seccomp filters, one per kind of thread, as Firecracker has: each thread may make only the
//! system calls its work needs, and only the `ioctl`s it issues. A call outside its list
//! raises `SIGSYS`, whose handler names the thread and the call and ends the VMM with exit 204
//! (a thread asking for something it never needs is a bug or an exploit, never a reason to go
//! on). `--seccomp off` turns all of it off.
//!
//! The background threads (fault handler, collapse thread, pool refill) install their filters
//! first thing when they start; the main thread installs its own just before it starts the
//! vCPUs, which inherit it and add theirs. The lists were taken from `strace` of every path
//! the tests take (each page source, granularity, backing, collapse order, save, metrics,
//! signals, every injected failure) and are documented in the README.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::sys::{kvm, pagemap, uffd};

/// Whether threads get filters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Seccomp {
    /// Every thread gets the filter of its kind.
    #[default]
    On,
    /// No filters (debugging, benchmarks).
    Off,
}

/// The kinds of thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The controller: builds the VM, waits for it, saves, writes metrics, tears down.
    Main,
    /// A vCPU: `KVM_RUN` and the devices its exits reach.
    Vcpu,
    /// The userfaultfd fault handler.
    FaultHandler,
    /// The collapse thread.
    Collapser,
    /// The huge page pool's refill thread.
    PoolRefill,
    /// A restore prefetch thread.
    Prefetcher,
    /// `vmm uffd-serve` once it has a VMM's handshake: serving faults, then reporting.
    PageServer,
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the seccomp filter of the {kind:?} thread")]
pub struct SeccompError {
    /// The thread's kind.
    pub kind: ThreadKind,
    /// What seccompiler said.
    #[source]
    pub source: seccompiler::Error,
}

/// Every thread: memory management by the allocator and the thread library, locks, signals,
/// the clock, logging to stderr, ending itself, and what the `SIGSYS` handler calls.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_prctl,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
];

/// The vCPU threads, besides `KVM_RUN` and the register reads: nothing.
const VCPU: &[i64] = &[];
/// The fault handler: waits on the uffd, reads its messages and the image.
const FAULT_HANDLER: &[i64] = &[
    libc::SYS_fstat,
    libc::SYS_mincore,
    libc::SYS_newfstatat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_read,
    libc::SYS_statx,
];
/// The collapse thread: the kernel's view (`/proc` through open descriptors), the image.
const COLLAPSER: &[i64] = &[
    libc::SYS_fstat,
    libc::SYS_mincore,
    libc::SYS_newfstatat,
    libc::SYS_pread64,
    libc::SYS_statx,
];
/// The refill thread: allocates and checks pages.
const POOL_REFILL: &[i64] = &[libc::SYS_mincore, libc::SYS_pread64];
/// `vmm uffd-serve`: waits on the uffd and the socket, reads both and the memory file, kills
/// its peer on a fatal error, and writes its metrics at the end.
const PAGE_SERVER: &[i64] = &[
    libc::SYS_fstat,
    libc::SYS_getpid,
    libc::SYS_kill,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_statx,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];
/// The main thread, from the start of the run on: waiting, kicking vCPUs, starting them, and
/// saving, writing metrics and tearing down at the end.
const MAIN: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_getdents64,
    libc::SYS_getpid,
    libc::SYS_ioctl,
    libc::SYS_kill,
    libc::SYS_lseek,
    libc::SYS_mincore,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_read,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_seccomp,
    libc::SYS_set_robust_list,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_tkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The `ioctl` requests each kind issues (`None`: any, for the main thread, which talks to
/// KVM, the uffd, pagemap and the terminal).
fn ioctls(kind: ThreadKind) -> Option<Vec<u64>> {
    Some(match kind {
        ThreadKind::Main => return None,
        ThreadKind::Vcpu => vec![kvm::KVM_RUN(), kvm::KVM_GET_REGS(), kvm::KVM_GET_SREGS()],
        // Both may allocate a huge page on the spot (the pool had none ready), which is
        // checked to be mapped huge with PAGEMAP_SCAN.
        ThreadKind::FaultHandler | ThreadKind::Collapser | ThreadKind::Prefetcher => {
            let mut v = uffd::resolve_ioctls().to_vec();
            v.push(pagemap::PAGEMAP_SCAN());
            v
        }
        ThreadKind::PoolRefill => vec![pagemap::PAGEMAP_SCAN()],
        ThreadKind::PageServer => vec![
            uffd::UFFDIO_COPY(),
            uffd::UFFDIO_ZEROPAGE(),
            uffd::UFFDIO_WAKE(),
        ],
    })
}

/// The system calls a kind of thread may make (numbers), `ioctl` aside.
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let extra = match kind {
        ThreadKind::Main => {
            // The main thread starts the vCPUs, which inherit its filter: it allows theirs.
            let mut all = MAIN.to_vec();
            for k in [
                ThreadKind::Vcpu,
                ThreadKind::FaultHandler,
                ThreadKind::Collapser,
            ] {
                all.extend(allowed(k));
            }
            all
        }
        ThreadKind::Vcpu => VCPU.to_vec(),
        ThreadKind::FaultHandler => FAULT_HANDLER.to_vec(),
        ThreadKind::Collapser => COLLAPSER.to_vec(),
        ThreadKind::PoolRefill => POOL_REFILL.to_vec(),
        // Reads the image and installs pages, as the collapse thread does.
        ThreadKind::Prefetcher => COLLAPSER.to_vec(),
        ThreadKind::PageServer => PAGE_SERVER.to_vec(),
    };
    let mut all: Vec<i64> = BASE.iter().copied().chain(extra).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The compiled filter for `kind`.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    // `fcntl` only to ask whether a descriptor is open (std checks before it closes one).
    if kind != ThreadKind::Main {
        let getfd = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )?;
        rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd])?]);
    }
    rules.insert(
        libc::SYS_ioctl,
        match ioctls(kind) {
            None => Vec::new(),
            Some(requests) => requests
                .into_iter()
                .map(|req| {
                    let c =
                        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)?;
                    SeccompRule::new(vec![c])
                })
                .collect::<Result<_, _>>()?,
        },
    );
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        std::env::consts::ARCH.try_into()?,
    )?
    .try_into()
    .map_err(seccompiler::Error::Backend)
}

/// Installs the filter of `kind` on the calling thread, if `mode` is on. The first filter
/// installed in the process also installs the `SIGSYS` handler.
pub fn install(kind: ThreadKind, mode: Seccomp) -> Result<(), SeccompError> {
    if mode == Seccomp::Off {
        return Ok(());
    }
    install_sigsys_handler();
    let err = |source| SeccompError { kind, source };
    let program = filter(kind).map_err(err)?;
    seccompiler::apply_filter(&program).map_err(err)?;
    ACTIVE.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

/// A fault injection point: when `point` fires, the calling thread makes a system call that
/// no filter allows (`getppid`), so a test can show the filter is there and what it does.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn forbidden_call_point(point: &str) {
    if crate::fires!(point) {
        // SAFETY: getppid takes no arguments and changes nothing.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

/// Whether any thread of this process has a filter (then a panic prints no backtrace, which
/// would open files no filter allows).
pub fn active() -> bool {
    ACTIVE.load(std::sync::atomic::Ordering::SeqCst)
}

static ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The exit code of a VMM stopped by its seccomp filter.
pub const EXIT_CODE: i32 = crate::error::exit_code::VMM_FAILED as i32;

fn install_sigsys_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handler only makes async-signal-safe calls (prctl, write, _exit) on
        // its own stack buffers.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler for SIGSYS with a zeroed (empty) mask.
        unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    });
}

/// Says which thread made which call, then ends the process: async-signal-safe throughout.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `si_syscall` follows `si_call_addr` at the start of the union (offset 16 on x86_64).
    // SAFETY: the kernel passes a valid siginfo for SIGSYS with SA_SIGINFO.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let mut msg = [0u8; 160];
    let mut len = 0;
    for part in [
        &b"vmm: seccomp: thread '"[..],
        &name[..name_len],
        b"' made system call ",
        digits(nr as u64, &mut [0u8; 20]),
        b", which its filter does not allow; stopping the VMM (exit 204; --seccomp off \
          disables the filters)\n",
    ] {
        let n = part.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: writes our own buffer to stderr, then ends the process at once.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(EXIT_CODE);
    }
}

/// `n` in decimal, in `buf`, without allocating.
fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_the_main_one_allows_what_vcpus_need() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::FaultHandler,
            ThreadKind::Collapser,
            ThreadKind::PoolRefill,
            ThreadKind::Prefetcher,
            ThreadKind::PageServer,
        ] {
            assert!(!filter(kind).unwrap().is_empty(), "{kind:?}");
        }
        let main = allowed(ThreadKind::Main);
        assert!(allowed(ThreadKind::Vcpu).iter().all(|nr| main.contains(nr)));
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_ptrace,
            libc::SYS_fork,
        ] {
            assert!(!main.contains(&forbidden), "{forbidden}");
        }
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_openat));
    }

    #[test]
    fn digits_without_allocation() {
        assert_eq!(digits(0, &mut [0; 20]), b"0");
        assert_eq!(digits(110, &mut [0; 20]), b"110");
        assert_eq!(digits(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }
}
