//! The fault handler: a named thread that serves guest page faults raised through userfaultfd.
//!
//! For each missing-page fault it takes the memory map's **read** lock, asks the page source to
//! fill the page, resolves the fault with `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE` for a read of a
//! zero page), records the page in the extent table and lets the lock go. Because it only ever
//! needs the read side, it runs concurrently with every other reader, and it is exactly the
//! "userland backend" that a collapse holding the write lock while allocating would block.
//!
//! Write-protect faults (raised while a collapse has write-protected an extent) are answered by
//! taking the read lock, which waits for the collapse to commit, then waking the writer.
//!
//! A failure (an unreadable image, an ioctl error, a panic) is reported through `on_fatal`, and
//! the handler unregisters guest RAM from the uffd before it exits, which wakes every blocked
//! vCPU so the VM can be stopped instead of hanging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use guest_abi::layout::{EXTENT_SIZE, PAGE_SIZE};
use hdrhistogram::Histogram;

use std::sync::RwLockReadGuard;

use super::extent::{ExtentIndex, ExtentState, ExtentTable, MemoryMap};
use super::kernel::MapBudget;
use super::ledger::Ledger;
use super::pool::{HugePage, HugePageAllocator};
use super::ram::GuestRam;
use super::source::{Fill, PageSource};
use super::uffd::{Fault, Resolved, Uffd};
use crate::metrics::latency_histogram;
use crate::seccomp::{Seccomp, ThreadKind};
use crate::worker::{Stop, Worker, lock};

/// What the fault handler has done so far; shared with whoever reports metrics.
#[derive(Debug)]
pub struct FaultStats {
    /// Missing-page faults resolved by this handler (pages it filled).
    pub served: AtomicU64,
    /// Faults that found the page already filled (a race between two faults on one page).
    pub already_present: AtomicU64,
    /// Faults whose mapping changed under the handler (the thread faults again).
    pub retried: AtomicU64,
    /// Write-protect faults answered.
    pub wp_faults: AtomicU64,
    /// Faults resolved by mapping a whole extent with one huge page.
    pub extents_mapped: AtomicU64,
    /// Time to serve one missing-page fault, from reading it to resolving it, in ns.
    pub service_ns: Mutex<Histogram<u64>>,
    /// Time a write-protected writer waited, from reading its fault to waking it, in ns:
    /// the vCPU stall a collapse causes.
    pub wp_stall_ns: Mutex<Histogram<u64>>,
}

impl Default for FaultStats {
    fn default() -> Self {
        FaultStats {
            served: AtomicU64::new(0),
            already_present: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            wp_faults: AtomicU64::new(0),
            extents_mapped: AtomicU64::new(0),
            service_ns: Mutex::new(latency_histogram()),
            wp_stall_ns: Mutex::new(latency_histogram()),
        }
    }
}

/// Everything the handler thread needs.
pub struct HandlerContext {
    /// The userfaultfd guest RAM is registered with.
    pub uffd: Arc<Uffd>,
    /// The memory map lock and extent table.
    pub map: Arc<MemoryMap>,
    /// Guest RAM (held so it stays mapped while the thread lives).
    pub ram: Arc<GuestRam>,
    /// Where page contents come from.
    pub source: Arc<dyn PageSource>,
    /// Bytes resolved per missing fault: 4 KiB, or more (aligned) to fault around.
    pub granularity: u64,
    /// Counters.
    pub stats: Arc<FaultStats>,
    /// With 2 MiB granularity: resolve a fault in a wholly unpopulated extent by moving a
    /// pre-zeroed huge page, filled from the source, over the whole extent.
    pub huge: Option<HugeFill>,
}

impl HandlerContext {
    fn host_base(&self) -> u64 {
        self.ram.host_base().0 as u64
    }
}

/// Where extent-granular fault resolution gets its huge pages.
pub struct HugeFill {
    /// Pre-zeroed huge pages.
    pub allocator: Arc<dyn HugePageAllocator>,
    /// Their charge.
    pub ledger: Arc<Ledger>,
    /// Mappings each install may cost.
    pub maps: Arc<MapBudget>,
}

/// The running handler thread; stops and joins on drop.
pub struct FaultHandler {
    worker: Worker,
}

impl FaultHandler {
    /// Starts the handler thread. If it fails, it unregisters guest RAM from the uffd (which
    /// wakes every thread blocked on a fault it will never serve) and calls `on_fatal` once.
    pub fn start(
        ctx: HandlerContext,
        seccomp: Seccomp,
        on_fatal: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<FaultHandler> {
        let (uffd, ram) = (ctx.uffd.clone(), ctx.ram.clone());
        let worker = Worker::spawn(
            "uffd-handler",
            ThreadKind::FaultHandler,
            seccomp,
            move |stop| serve(&ctx, stop),
            move |what| {
                let _ = uffd.unregister(ram.host_base().0 as u64, ram.size());
                on_fatal(what);
            },
        )?;
        Ok(FaultHandler { worker })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.worker.stop();
    }
}

/// The handler loop: wait for faults or the stop event, serve faults in batches.
fn serve(ctx: &HandlerContext, stop: &Stop) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut buf = vec![0u8; ctx.granularity as usize];
    let zeroes = vec![0u8; ctx.granularity as usize];
    let (host_base, ram_size) = (ctx.host_base(), ctx.ram.size());
    loop {
        let mut fds = [
            libc::pollfd {
                fd: ctx.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(format!("poll on the userfaultfd failed: {err}"));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        faults.clear();
        ctx.uffd
            .read_faults(&mut faults)
            .map_err(|e| format!("reading the userfaultfd failed: {e}"))?;
        for fault in &faults {
            fail::fail_point!("fault-serve");
            crate::seccomp::forbidden_call_point("seccomp-fault-handler");
            let start = Instant::now();
            let gpa = fault.address.wrapping_sub(host_base) & !(PAGE_SIZE - 1);
            if gpa >= ram_size {
                return Err(format!(
                    "fault at host address {:#x}, outside guest RAM",
                    fault.address
                ));
            }
            let histogram = if fault.wp {
                answer_wp(ctx, gpa)?;
                &ctx.stats.wp_stall_ns
            } else {
                serve_missing(ctx, fault, gpa, &mut buf, &zeroes)?;
                &ctx.stats.service_ns
            };
            let ns = start.elapsed().as_nanos() as u64;
            lock(histogram).saturating_record(ns.max(1));
        }
    }
}

/// Resolves a missing-page fault under the read lock.
fn serve_missing(
    ctx: &HandlerContext,
    fault: &Fault,
    gpa: u64,
    buf: &mut [u8],
    zeroes: &[u8],
) -> Result<(), String> {
    let gran = ctx.granularity;
    let first = gpa & !(gran - 1);
    let mut map = ctx.map.read().unwrap_or_else(|p| p.into_inner());
    if let Some(huge) = ctx.huge.as_ref().filter(|_| gran == EXTENT_SIZE) {
        if map_whole_extent(ctx, huge, ExtentIndex::containing(gpa), map)? {
            return Ok(());
        }
        map = ctx.map.read().unwrap_or_else(|p| p.into_inner());
    }
    let extent = map
        .get(ExtentIndex::containing(gpa))
        .expect("gpa is inside RAM");
    if extent.state() == ExtentState::Huge {
        // A collapse committed while this fault waited for the lock: the page is there now,
        // in the huge page that replaced the extent. Let the thread retry its access.
        let _ = ctx.uffd.wake(ctx.host_base() + gpa, PAGE_SIZE);
        return Ok(());
    }
    // Resolve the whole granule when none of it is populated yet; otherwise only the page
    // (a granule with some pages present cannot be filled in one copy).
    let (at, len) = if gran > PAGE_SIZE
        && (first..first + gran)
            .step_by(PAGE_SIZE as usize)
            .all(|p| !map.is_populated(p))
    {
        (first, gran)
    } else {
        (gpa, PAGE_SIZE)
    };
    let fill = ctx
        .source
        .fill(at, &mut buf[..len as usize])
        .map_err(|e| format!("the page source failed for guest address {at:#x}: {e}"))?;
    let dst = ctx.host_base() + at;
    // SAFETY: `dst..dst+len` is guest RAM (checked against ram_size by the caller), registered
    // with this uffd and owned by the VM for the handler's whole life; the sources are our
    // own buffers of at least `len` bytes.
    let resolved = unsafe {
        match fill {
            Fill::Data => ctx.uffd.copy(dst, buf.as_ptr(), len),
            Fill::Zero if fault.write || len > PAGE_SIZE => {
                ctx.uffd.copy(dst, zeroes.as_ptr(), len)
            }
            // A page holding a uffd-wp marker (its extent is being collapsed) is no page:
            // ZEROPAGE refuses it with EEXIST, COPY fills it. A page that really is present
            // makes COPY say so too.
            Fill::Zero => match ctx.uffd.zeropage(dst, len) {
                Ok(Resolved::AlreadyPresent) => ctx.uffd.copy(dst, zeroes.as_ptr(), len),
                other => other,
            },
        }
    }
    .map_err(|e| format!("resolving the fault at guest address {at:#x} failed: {e}"))?;
    match resolved {
        Resolved::Filled => {
            for p in (at..at + len).step_by(PAGE_SIZE as usize) {
                map.mark_populated(p);
                if extent.is_tracking() {
                    extent.mark_dirty(page_in_extent(p));
                }
            }
            ctx.stats.served.fetch_add(1, Ordering::Relaxed);
        }
        Resolved::AlreadyPresent => {
            map.mark_populated(gpa);
            ctx.stats.already_present.fetch_add(1, Ordering::Relaxed);
            // Another resolution filled the page; make sure this waiter is woken too.
            let _ = ctx.uffd.wake(ctx.host_base() + gpa, PAGE_SIZE);
        }
        Resolved::Retry => {
            ctx.stats.retried.fetch_add(1, Ordering::Relaxed);
            let _ = ctx.uffd.wake(ctx.host_base() + gpa, PAGE_SIZE);
        }
    }
    Ok(())
}

/// Resolves a fault in a wholly unpopulated extent with one huge page: allocated, charged and
/// filled from the source under the read lock (the seed's order), moved in under the write
/// lock. Takes the read guard by value and returns with every lock released; `Ok(false)`
/// means "not done, resolve the fault page by page" (the extent is partly populated, no page
/// or charge was to be had, or it changed meanwhile), with nothing left allocated or charged.
fn map_whole_extent(
    ctx: &HandlerContext,
    huge: &HugeFill,
    index: ExtentIndex,
    guard: RwLockReadGuard<'_, ExtentTable>,
) -> Result<bool, String> {
    let extent = guard.get(index).expect("the fault is inside RAM");
    if extent.state() != ExtentState::Unpopulated {
        return Ok(false);
    }
    let generation = extent.generation();
    if !huge.maps.allows_install() {
        return Ok(false);
    }
    let Ok(mut page) = huge.allocator.alloc() else {
        return Ok(false);
    };
    if huge.ledger.charge(EXTENT_SIZE).is_err() {
        return Ok(false);
    }
    let give_back = |page: HugePage| {
        huge.ledger.uncharge(EXTENT_SIZE);
        drop(page);
    };
    if let Err(e) = ctx.source.fill(index.gpa(), page.bytes_mut()) {
        give_back(page);
        return Err(format!(
            "the page source failed for guest address {:#x}: {e}",
            index.gpa()
        ));
    }
    drop(guard);
    let mut table = ctx.map.write().unwrap_or_else(|p| p.into_inner());
    let extent = table.get_mut(index).expect("the fault is inside RAM");
    if extent.generation() != generation || extent.state() != ExtentState::Unpopulated {
        drop(table);
        give_back(page);
        return Ok(false);
    }
    let dst = ctx.host_base() + index.gpa();
    // SAFETY: `dst` is an unpopulated, 2 MiB-aligned extent of guest RAM, mapped for the VM's
    // life, whose memslot KVM keeps in sync through its MMU notifier. The write lock is held,
    // so no reader of extent state sees the switch, and there is no old data to lose.
    if let Err(failed) = unsafe { page.move_to(dst) } {
        if failed.hole {
            // The extent was unpopulated: fresh memory is what it held.
            super::restore_hole(&ctx.ram, &ctx.uffd, index, None).map_err(|e| {
                format!(
                    "extent {} was unmapped by a failed mremap and could not be mapped again: {e}",
                    index.0
                )
            })?;
        }
        drop(table);
        give_back(failed.page);
        return Ok(false);
    }
    extent.set_huge();
    drop(table);
    huge.maps.installed();
    ctx.stats.served.fetch_add(1, Ordering::Relaxed);
    ctx.stats.extents_mapped.fetch_add(1, Ordering::Relaxed);
    // Every thread waiting on a fault in the extent retries on the huge page.
    let _ = ctx.uffd.wake(dst, EXTENT_SIZE);
    Ok(true)
}

/// Answers a write-protect fault. Taking the read lock waits for any collapse commit in
/// progress. Then either a collapse is copying the extent outside the lock (tracking): record
/// the page dirty, so the commit copies it again, and let the write through; or the commit is
/// done and the extent is a huge page now: wake the writer to retry on it.
fn answer_wp(ctx: &HandlerContext, gpa: u64) -> Result<(), String> {
    let map = ctx.map.read().unwrap_or_else(|p| p.into_inner());
    ctx.stats.wp_faults.fetch_add(1, Ordering::Relaxed);
    let extent = map
        .get(ExtentIndex::containing(gpa))
        .expect("gpa is inside RAM");
    let page = ctx.host_base() + gpa;
    let result = if extent.is_tracking() {
        extent.mark_dirty(page_in_extent(gpa));
        ctx.uffd.write_protect(page, PAGE_SIZE, false, true)
    } else {
        ctx.uffd.wake(page, PAGE_SIZE)
    };
    result.map_err(|e| format!("letting a write-protected writer at {gpa:#x} go failed: {e}"))
}

/// The index of the 4 KiB page holding `gpa` within its extent.
fn page_in_extent(gpa: u64) -> usize {
    ((gpa % EXTENT_SIZE) / PAGE_SIZE) as usize
}
