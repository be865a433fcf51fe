//! A userfaultfd, wrapped (the ABI is declared in [`crate::sys::uffd`]).
//!
//! `Uffd` only issues ioctls on address ranges. Whether a range may be resolved (it must be
//! guest RAM the caller owns, registered with this uffd) is the caller's invariant; the
//! methods that write memory are `unsafe` and say so.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::HostAddr;
use crate::sys::uffd::*;
pub use crate::sys::uffd::{
    FEATURE_EVENT_REMOVE, FEATURE_MOVE, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_POISON,
    FEATURE_THREAD_ID, FEATURE_WP_UNPOPULATED, REGISTER_MODE_MISSING, REGISTER_MODE_WP,
};

/// Bytes in an extent, the unit shards are made of.
const EXTENT: u64 = crate::EXTENT_SIZE;

/// The most messages [`Uffd::read_events`] reads in one call, so that a flood (or a descriptor
/// that is not a uffd at all and never runs dry) cannot keep its caller from everything else.
pub const MAX_EVENTS_PER_READ: usize = 4096;

/// A page fault read from the uffd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting host address (page aligned by the kernel unless exact addresses were asked).
    pub address: u64,
    /// A write access.
    pub write: bool,
    /// A write-protect fault (the page is present but protected).
    pub wp: bool,
}

/// The fault a page-fault message describes.
fn fault_of(msg: &UffdMsg) -> Fault {
    debug_assert_eq!(msg.event, EVENT_PAGEFAULT);
    // SAFETY: the kernel wrote a page-fault message, so `pagefault` is the live arm.
    let f = unsafe { msg.arg.pagefault };
    Fault {
        address: f.address,
        write: f.flags & PAGEFAULT_FLAG_WRITE != 0,
        wp: f.flags & PAGEFAULT_FLAG_WP != 0,
    }
}

/// One message from a userfaultfd that an external page server must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A page fault.
    Fault(Fault),
    /// The process discarded `[start, end)` (`MADV_DONTNEED`): what was there is gone, and
    /// it reads as zeroes from now on.
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

/// The result of resolving a fault by copying or zeroing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The page was filled by this call.
    Filled,
    /// The page was already there (another fault won the race); nothing to do.
    AlreadyPresent,
    /// The mapping changed under us (`EAGAIN`): the faulting thread will fault again.
    Retry,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// The mode of the last registration, to register a range again the same way.
    mode: std::sync::atomic::AtomicU64,
}

fn ioctl_result(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a non-blocking userfaultfd that also sees faults raised inside the kernel (KVM's
    /// accesses to guest memory), asking for `features`. Tries the syscall, then
    /// `/dev/userfaultfd`.
    pub fn new(features: u64) -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes only flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
        let fd = if raw >= 0 {
            // SAFETY: `raw` is a fresh fd we own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            let syscall_err = io::Error::last_os_error();
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|_| syscall_err)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd.
            let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW() as _, flags) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh fd we own.
            unsafe { OwnedFd::from_raw_fd(raw) }
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`.
        ioctl_result(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API() as _, &mut api) })?;
        Ok(Uffd {
            fd,
            features: api.features,
            mode: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start + len)` for faults of `mode`.
    pub fn register(&self, start: HostAddr, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start.raw(),
                len,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `UffdioRegister`; registering changes
        // how faults in the range are handled, not memory contents.
        ioctl_result(unsafe {
            libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER() as _, &mut reg)
        })?;
        self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The mode guest RAM was registered with.
    pub fn registered_mode(&self) -> u64 {
        self.mode.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: HostAddr, len: u64) -> io::Result<()> {
        let range = UffdioRange {
            start: start.raw(),
            len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `UffdioRange`.
        ioctl_result(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER() as _, &range) })
    }

    /// Wakes threads waiting on faults in a range.
    pub fn wake(&self, start: HostAddr, len: u64) -> io::Result<()> {
        let range = UffdioRange {
            start: start.raw(),
            len,
        };
        // SAFETY: UFFDIO_WAKE reads one `UffdioRange` and changes no memory.
        ioctl_result(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE() as _, &range) })
    }

    /// Copies `len` bytes from `src` into the missing pages at `dst` and wakes the waiters.
    ///
    /// # Safety
    /// `dst..dst+len` must be memory registered with this uffd that the caller owns (guest
    /// RAM), and `src..src+len` must be readable.
    pub unsafe fn copy(&self, dst: HostAddr, src: *const u8, len: u64) -> io::Result<Resolved> {
        fail::fail_point!("uffd-copy", |_| Err(io::Error::from_raw_os_error(
            libc::EIO
        )));
        let mut copy = UffdioCopy {
            dst: dst.raw(),
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: per the caller's contract; UFFDIO_COPY reads and writes one `UffdioCopy`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY() as _, &mut copy) };
        Self::resolved(ret)
    }

    /// Moves the pages at `src..src+len` (anonymous memory of this process, mapped by nobody
    /// else) to the empty range `dst..dst+len`, without waking waiters; a PMD-mapped THP moves
    /// whole. Returns how many bytes moved, which may be fewer than `len` (the kernel split a
    /// page on the way, or met a populated entry); the rest stays at `src`.
    ///
    /// # Safety
    /// `dst..dst+len` must be memory registered with this uffd that the caller owns and may
    /// replace (guest RAM whose entries there are empty), and `src..src+len` the caller's own
    /// anonymous mapping, whose pages it gives up.
    pub unsafe fn move_pages(&self, dst: HostAddr, src: HostAddr, len: u64) -> io::Result<u64> {
        fail::fail_point!("uffd-move", |_| Err(io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
        let mut mv = UffdioMove {
            dst: dst.raw(),
            src: src.raw(),
            len,
            mode: MOVE_MODE_DONTWAKE,
            moved: 0,
        };
        // SAFETY: per the caller's contract; UFFDIO_MOVE reads and writes one `UffdioMove`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE() as _, &mut mv) };
        if ret >= 0 {
            return Ok(len);
        }
        let err = io::Error::last_os_error();
        match (mv.moved, err.raw_os_error()) {
            (moved, Some(libc::EAGAIN)) if moved > 0 => Ok(moved as u64),
            _ => Err(err),
        }
    }

    /// Maps zeroed pages at `dst..dst+len` and wakes the waiters.
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub unsafe fn zeropage(&self, dst: HostAddr, len: u64) -> io::Result<Resolved> {
        let mut zero = UffdioZeropage {
            range: UffdioRange {
                start: dst.raw(),
                len,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: per the caller's contract; UFFDIO_ZEROPAGE reads and writes one struct.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE() as _, &mut zero) };
        Self::resolved(ret)
    }

    /// Marks the missing pages at `dst..dst+len` poisoned and wakes their waiters: an access
    /// there fails (`SIGBUS`, `EFAULT` inside the kernel) instead of waiting or reading zeroes.
    ///
    /// # Safety
    /// As for [`Uffd::copy`]; the range's contents are lost for good.
    pub unsafe fn poison(&self, dst: HostAddr, len: u64) -> io::Result<Resolved> {
        let mut poison = UffdioPoison {
            range: UffdioRange {
                start: dst.raw(),
                len,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: per the caller's contract; UFFDIO_POISON reads and writes one struct.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON() as _, &mut poison) };
        Self::resolved(ret)
    }

    fn resolved(ret: libc::c_int) -> io::Result<Resolved> {
        if ret >= 0 {
            return Ok(Resolved::Filled);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EEXIST) => Ok(Resolved::AlreadyPresent),
            Some(libc::EAGAIN) => Ok(Resolved::Retry),
            _ => Err(err),
        }
    }

    /// Write-protects (`protect`) or unprotects a range; unprotecting wakes blocked writers
    /// unless `wake` is false (the kernel takes no wake flag with protection).
    pub fn write_protect(
        &self,
        start: HostAddr,
        len: u64,
        protect: bool,
        wake: bool,
    ) -> io::Result<()> {
        fail::fail_point!("uffd-writeprotect", |_| Err(io::Error::from_raw_os_error(
            libc::EIO
        )));
        let mode = match (protect, wake) {
            (true, _) => WRITEPROTECT_MODE_WP,
            (false, true) => 0,
            (false, false) => WRITEPROTECT_MODE_DONTWAKE,
        };
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: start.raw(),
                len,
            },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one struct; it changes page permissions only.
        ioctl_result(unsafe {
            libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT() as _, &mut wp)
        })
    }

    /// A userfaultfd another process created and handed over (Firecracker's handoff), whose
    /// features are `features` (as the handshake implies: the sender asked for them).
    pub fn from_owned(fd: OwnedFd, features: u64) -> Uffd {
        Uffd {
            fd,
            features,
            mode: std::sync::atomic::AtomicU64::new(REGISTER_MODE_MISSING),
        }
    }

    /// Reads up to 64 pending messages into `msgs` without blocking; returns how many (0 when
    /// none is pending).
    fn read_msgs(&self, msgs: &mut [UffdMsg; 64]) -> io::Result<usize> {
        // SAFETY: reads whole messages into the caller's array of `uffd_msg`s, of its size.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(msgs),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) => Ok(0),
                _ => Err(err),
            };
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }

    /// Reads the pending fault and remove messages into `out` without blocking, at most
    /// [`MAX_EVENTS_PER_READ`] of them; returns how many (what is left stays
    /// queued and the uffd readable). While a remove message is queued the kernel fails every
    /// resolving ioctl with `EAGAIN`, so a caller drains the queue before it resolves anything,
    /// and keeps what met `EAGAIN` for after its next read.
    pub fn read_events(&self, out: &mut Vec<Event>) -> io::Result<usize> {
        let mut total = 0;
        let mut msgs = [UffdMsg::default(); 64];
        for _ in 0..MAX_EVENTS_PER_READ / msgs.len() {
            let read = self.read_msgs(&mut msgs)?;
            for msg in &msgs[..read] {
                let event = match msg.event {
                    EVENT_PAGEFAULT => Event::Fault(fault_of(msg)),
                    EVENT_REMOVE => {
                        // SAFETY: the kernel wrote a remove message: `remove` is live.
                        let r = unsafe { msg.arg.remove };
                        Event::Remove {
                            start: r.start,
                            end: r.end,
                        }
                    }
                    _ => continue,
                };
                out.push(event);
                total += 1;
            }
            if read < msgs.len() {
                return Ok(total);
            }
        }
        Ok(total)
    }

    /// Reads pending fault messages into `out` without blocking; returns how many.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        let mut msgs = [UffdMsg::default(); 64];
        let read = self.read_msgs(&mut msgs)?;
        let mut count = 0;
        for msg in msgs[..read].iter().filter(|m| m.event == EVENT_PAGEFAULT) {
            out.push(fault_of(msg));
            count += 1;
        }
        Ok(count)
    }
}

/// Guest RAM's userfaultfds: one per shard of consecutive extents, each served by a handler
/// thread of its own. Several readers on one uffd are slower than one (measured: 151 k pages/s
/// with 16 readers against 304 k with one), while one uffd per shard scales (1.53 M), so RAM
/// is split and every fault, protection and install of an extent goes to its shard's uffd.
#[derive(Debug)]
pub struct UffdSet {
    shards: Vec<Arc<Uffd>>,
    extents_per_shard: usize,
}

impl UffdSet {
    /// `shards` uffds over `extents` extents, split into runs of equal length (the last may be
    /// shorter); `open` makes each uffd.
    pub fn new(
        extents: usize,
        shards: usize,
        mut open: impl FnMut() -> io::Result<Uffd>,
    ) -> io::Result<Self> {
        let shards = shards.clamp(1, extents.max(1));
        let extents_per_shard = extents.div_ceil(shards);
        let count = extents.div_ceil(extents_per_shard);
        Ok(UffdSet {
            shards: (0..count)
                .map(|_| open().map(Arc::new))
                .collect::<io::Result<_>>()?,
            extents_per_shard,
        })
    }

    /// One uffd for all `extents` extents.
    pub fn single(uffd: Arc<Uffd>, extents: usize) -> Self {
        UffdSet {
            shards: vec![uffd],
            extents_per_shard: extents.max(1),
        }
    }

    /// The uffd that extent `index` is registered with.
    pub fn for_extent(&self, index: usize) -> &Arc<Uffd> {
        &self.shards[(index / self.extents_per_shard).min(self.shards.len() - 1)]
    }

    /// Each shard: its uffd and the extents it covers, `first..end` (`end` capped by the
    /// caller at the table's length).
    pub fn shards(&self) -> impl Iterator<Item = (&Arc<Uffd>, std::ops::Range<usize>)> {
        self.shards.iter().enumerate().map(|(i, u)| {
            let first = i * self.extents_per_shard;
            (u, first..first + self.extents_per_shard)
        })
    }

    /// Unregisters guest RAM (`extents` extents from `base`) from every shard's uffd, each
    /// shard through its own (a range registered with one uffd cannot be unregistered through
    /// another), which wakes every thread waiting on a fault there. A failure is logged, and
    /// the other shards are still unregistered; returns how many failed.
    pub fn unregister_all(&self, base: HostAddr, extents: usize) -> usize {
        let mut failed = 0;
        for (uffd, range) in self.shards() {
            let (start, end) = (range.start.min(extents), range.end.min(extents));
            let (at, len) = (base + start as u64 * EXTENT, (end - start) as u64 * EXTENT);
            if len == 0 {
                continue;
            }
            if let Err(e) = uffd.unregister(at, len) {
                log::warn!(
                    "unregistering guest RAM at {at:#x} (+{len:#x}) from its userfaultfd: {e}"
                );
                failed += 1;
            }
        }
        failed
    }

    /// How many shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there is none (never: a set has at least one shard).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The features the kernel granted (every shard asked for the same).
    pub fn features(&self) -> u64 {
        self.shards[0].features()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps `len` bytes of anonymous memory for a test.
    fn anon(len: usize) -> *mut u8 {
        crate::huge::page::map_anonymous(len, 0)
            .expect("mmap")
            .as_ptr()
    }

    #[test]
    fn missing_fault_is_served_by_copy() {
        let Ok(uffd) = Uffd::new(0) else {
            eprintln!("SKIP: userfaultfd unavailable");
            return;
        };
        let len = 4 * 4096;
        let mem = anon(len);
        uffd.register(HostAddr::of(mem), len as u64, REGISTER_MODE_MISSING)
            .unwrap();
        let addr = mem as u64 + 4096;
        let reader = std::thread::spawn(move || {
            // SAFETY: reading our own mapping; the fault blocks until the test serves it.
            unsafe { (addr as *const u64).read_volatile() }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            uffd.read_faults(&mut faults).unwrap();
            std::thread::yield_now();
        }
        assert_eq!(faults[0].address & !4095, addr);
        assert!(!faults[0].write);
        let page = [0x5au8; 4096];
        // SAFETY: `addr` is a page of our registered mapping; `page` is readable.
        let first = unsafe { uffd.copy(HostAddr::new(addr), page.as_ptr(), 4096) };
        assert_eq!(first.unwrap(), Resolved::Filled);
        assert_eq!(reader.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        // SAFETY: as above; the page is now present.
        let again = unsafe { uffd.copy(HostAddr::new(addr), page.as_ptr(), 4096) };
        assert_eq!(again.unwrap(), Resolved::AlreadyPresent);
        // SAFETY: another page of the same mapping.
        let zero = unsafe { uffd.zeropage(HostAddr::of(mem), 4096) };
        assert_eq!(zero.unwrap(), Resolved::Filled);
        uffd.unregister(HostAddr::of(mem), len as u64).unwrap();
        // SAFETY: unmapping the test's own mapping.
        unsafe { libc::munmap(mem.cast(), len) };
    }
}
