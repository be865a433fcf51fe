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
//!
//! What the libraries under us may do is decided up front where we can: the logger's
//! terminal check is made once, in the main thread, before any filter exists
//! (`main::init_logging`). What cannot be decided up front is a [benign probe](PROBES): a
//! question whose "no" is harmless, asked by code we do not own at a moment we do not choose
//! (glibc's allocator reads `/proc/sys/vm/overcommit_memory` the first time any thread's
//! arena shrinks). The `SIGSYS` handler recognises exactly those calls by their arguments and
//! answers them with the error a "no" gives, so the thread goes on; every other call outside
//! a list still ends the VMM.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::sys::kvm;
use vm_extents::sys::{pagemap, uffd};
use vm_extents::{ThreadHook, ThreadRole};

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
    /// The zero-page shrinker.
    Shrinker,
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

/// The vCPU threads, besides `KVM_RUN` and the register reads: what a free report's
/// discards need beyond the base (`madvise`, `mmap` are there): `mincore` where there is no
/// `PAGEMAP_SCAN`.
const VCPU: &[i64] = &[libc::SYS_mincore];
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
/// The refill threads: allocate and check pages; each lowers its own priority first.
const POOL_REFILL: &[i64] = &[libc::SYS_mincore, libc::SYS_pread64, libc::SYS_setpriority];
/// `vmm uffd-serve`: waits on the uffd, the socket and its peer's pidfd, reads the uffd, the
/// socket and the memory file, kills its peer (through the pidfd) on a fatal error, and writes
/// its metrics at the end.
const PAGE_SERVER: &[i64] = &[
    libc::SYS_fstat,
    libc::SYS_getpid,
    libc::SYS_pidfd_send_signal,
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
/// The main thread, from the start of the run on: waiting, kicking vCPUs, starting them,
/// taking snapshots (a directory made, filled and swapped in), and saving, writing metrics
/// and tearing down at the end.
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
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
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
        // A free report is given back on the vCPU's thread: it wakes the extents' waiters,
        // registers an extent whose huge page went with the uffd again, write-protects a
        // hugetlb extent it demotes, and reads what is present.
        ThreadKind::Vcpu => vec![
            kvm::KVM_RUN(),
            kvm::KVM_GET_REGS(),
            kvm::KVM_GET_SREGS(),
            // Saving its state for a snapshot.
            kvm::KVM_GET_MSRS(),
            kvm::KVM_GET_MP_STATE(),
            kvm::KVM_GET_VCPU_EVENTS(),
            kvm::KVM_GET_DEBUGREGS(),
            kvm::KVM_GET_XSAVE(),
            kvm::KVM_GET_XCRS(),
            uffd::UFFDIO_WAKE(),
            uffd::UFFDIO_REGISTER(),
            uffd::UFFDIO_WRITEPROTECT(),
            pagemap::PAGEMAP_SCAN(),
        ],
        // Both may allocate a huge page on the spot (the pool had none ready), which is
        // checked to be mapped huge with PAGEMAP_SCAN.
        ThreadKind::FaultHandler
        | ThreadKind::Collapser
        | ThreadKind::Prefetcher
        | ThreadKind::Shrinker => {
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
        // Reads the kernel's view, write-protects, discards and demotes, as the collapse
        // thread does.
        ThreadKind::Shrinker => COLLAPSER.to_vec(),
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
/// Either way the thread then logs (at `debug`) its name, tid and filter: the first thing
/// every thread logs runs under its filter.
pub fn install(kind: ThreadKind, mode: Seccomp) -> Result<(), SeccompError> {
    if mode == Seccomp::On {
        install_sigsys_handler();
        let err = |source| SeccompError { kind, source };
        let program = filter(kind).map_err(err)?;
        seccompiler::apply_filter(&program).map_err(err)?;
        ACTIVE.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    log::debug!(
        "thread {} is tid {}, {}",
        std::thread::current().name().unwrap_or("?"),
        // SAFETY: gettid cannot fail and touches no memory.
        unsafe { libc::gettid() },
        match mode {
            Seccomp::On => format!("under the {kind:?} seccomp filter"),
            Seccomp::Off => "with no seccomp filter".into(),
        }
    );
    Ok(())
}

/// The hook the memory manager runs first on each thread it starts: the filter of the
/// thread's kind (when `mode` is on), then the fault injection point that tests it. A role
/// this VMM has no filter for does not run.
pub fn memory_thread_hook(mode: Seccomp) -> ThreadHook {
    ThreadHook::new(move |role| {
        let (kind, point) = match role {
            ThreadRole::FaultHandler => (ThreadKind::FaultHandler, "seccomp-fault-handler"),
            ThreadRole::Collapser => (ThreadKind::Collapser, "seccomp-collapser"),
            ThreadRole::PoolRefill => (ThreadKind::PoolRefill, "seccomp-pool-refill"),
            ThreadRole::Prefetcher => (ThreadKind::Prefetcher, "seccomp-prefetcher"),
            ThreadRole::Shrinker => (ThreadKind::Shrinker, "seccomp-shrinker"),
            other => return Err(format!("no seccomp filter for a {other:?} thread").into()),
        };
        install(kind, mode)?;
        forbidden_call_point(point);
        Ok(())
    })
}

/// Fault injection points: when `point` fires, the calling thread makes a system call that
/// no filter allows (`getppid`), so a test can show the filter is there and what it does; when
/// `seccomp-probes` fires, it makes every [benign probe](PROBES) and panics unless each was
/// refused with its errno or allowed outright.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub fn forbidden_call_point(point: &str) {
    if crate::fires!("seccomp-probes") {
        make_probes();
    }
    if crate::fires!(point) {
        // SAFETY: getppid takes no arguments and changes nothing.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

/// Makes each probe as the library that asks it would.
fn make_probes() {
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: TCGETS writes one termios into our buffer, or fails.
    let r = unsafe { libc::ioctl(2, libc::TCGETS, termios.as_mut_ptr()) };
    let e = std::io::Error::last_os_error().raw_os_error();
    assert!(
        r == 0 || e == Some(libc::ENOTTY),
        "TCGETS probe: {r}, {e:?}"
    );
    // SAFETY: a NUL-terminated path; the descriptor, if any, is closed at once.
    let fd = unsafe {
        libc::open(
            OVERCOMMIT_PATH.as_ptr().cast(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    let e = std::io::Error::last_os_error().raw_os_error();
    assert!(
        fd >= 0 || e == Some(libc::EACCES),
        "open probe: {fd}, {e:?}"
    );
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
    }
}

/// A benign probe: a call that code under us (std, glibc, the logger) may make on any thread
/// to ask a question whose "no" is harmless, and the error that says "no".
#[derive(Debug)]
pub struct Probe {
    /// What asks, and why the answer "no" is harmless.
    pub what: &'static str,
    /// The system call.
    pub nr: i64,
    /// The error it is answered with.
    pub errno: i32,
}

/// The benign probes, answered with their errno instead of ending the VMM. Each is matched on
/// its arguments, not only its number: any other `ioctl` or `openat` outside a list still ends
/// the VMM.
pub const PROBES: &[Probe] = &[
    Probe {
        what: "ioctl(fd, TCGETS): is this a terminal? (std's IsTerminal, a logger choosing \
               colours); \"no\" means plain text",
        nr: libc::SYS_ioctl,
        errno: libc::ENOTTY,
    },
    Probe {
        what: "openat(\"/proc/sys/vm/overcommit_memory\"): glibc's malloc, the first time a \
               thread's arena shrinks; unreadable means it frees with MADV_DONTNEED",
        nr: libc::SYS_openat,
        errno: libc::EACCES,
    },
];

/// The path glibc's allocator probes.
const OVERCOMMIT_PATH: &[u8] = b"/proc/sys/vm/overcommit_memory\0";

/// How many benign probes the filters have answered with their errno, process-wide.
pub fn probes_refused() -> u64 {
    PROBES_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

static PROBES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The errno that answers system call `nr` with arguments `args` (x86_64's `rdi`, `rsi`, ...),
/// if it is a [benign probe](PROBES). Async-signal-safe: it reads the path argument in place.
fn probe_errno(nr: i64, args: [u64; 3]) -> Option<i32> {
    match nr {
        libc::SYS_ioctl if args[1] as u32 == libc::TCGETS as u32 => Some(libc::ENOTTY),
        libc::SYS_openat if args[1] != 0 => {
            let path = args[1] as *const u8;
            // The comparison stops at the first byte that differs: a shorter string differs
            // at its NUL at the latest, so no byte past it is read.
            let same = OVERCOMMIT_PATH.iter().enumerate().all(|(i, &want)| {
                // SAFETY: the path argument of a trapped `openat` points at a NUL-terminated
                // string in the caller's memory, and byte `i` is at or before its NUL.
                unsafe { path.add(i).read() == want }
            });
            same.then_some(libc::EACCES)
        }
        _ => None,
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

/// Answers a [benign probe](PROBES) with its errno; for any other call, says which thread made
/// which call, then ends the process. Async-signal-safe throughout.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // `si_syscall` follows `si_call_addr` at the start of the union (offset 16 on x86_64).
    // SAFETY: the kernel passes a valid siginfo for SIGSYS with SA_SIGINFO.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext, ours to
    // read and change until the handler returns.
    let gregs = unsafe { &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let args = [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX].map(|r| gregs[r as usize] as u64);
    if let Some(errno) = probe_errno(i64::from(nr), args) {
        // The trapped call did not run; returning resumes the thread after it with this
        // result, as the kernel would have returned it.
        gregs[libc::REG_RAX as usize] = -i64::from(errno);
        PROBES_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
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
            ThreadKind::Shrinker,
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
