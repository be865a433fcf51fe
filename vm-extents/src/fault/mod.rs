//! Guest page faults raised through userfaultfd: the handler thread and its loop (here), how
//! one fault is resolved ([`resolve`]), and where a page's contents come from ([`source`]).
//!
//! The handler takes only the memory map's **read** side, so it runs beside every other reader,
//! and it is exactly the "userland backend" a collapse holding the write side while allocating
//! would block (the seed commit's deadlock). A failure (an unreadable image, an ioctl error, a
//! panic) is reported through `on_fatal`, and then guest RAM is unregistered from the uffd,
//! which wakes every blocked vCPU so the VM can stop instead of hanging.

pub mod resolve;
pub mod source;

use std::sync::Arc;
use std::time::Instant;

use crate::{HostAddr, PAGE_SIZE};
use serde::Serialize;

use super::huge::install::Installer;
use super::map::MemoryMap;
use super::uffd::{Fault, Uffd, UffdSet};
use crate::stats::{Counter, Latencies};
use crate::worker::{Failure, Stop, ThreadFailure, ThreadHook, ThreadRole, Worker};
use source::PageSource;

/// What the fault handler has done; shared with the metrics (the `faults` section).
#[derive(Debug, Default, Serialize)]
pub struct FaultStats {
    /// Missing-page faults resolved by this handler (pages or granules it filled).
    pub served: Counter,
    /// Faults that found the page already filled (two faults raced for one page).
    pub already_present: Counter,
    /// Faults whose mapping changed under the handler (the thread faults again).
    pub retried: Counter,
    /// Write-protect faults answered.
    #[serde(rename = "wp")]
    pub wp_faults: Counter,
    /// Faults resolved by moving one huge page over the whole extent.
    pub extents_mapped: Counter,
    /// Time to serve one missing-page fault, from reading it to resolving it.
    pub service_ns: Latencies,
    /// Time a write-protected writer waited, from reading its fault to waking it: the vCPU
    /// stall a collapse causes (as far as the handler sees it).
    pub wp_stall_ns: Latencies,
}

/// Everything the handler thread resolves faults with.
pub struct Resolver {
    /// The userfaultfd guest RAM is registered with.
    pub uffd: Arc<Uffd>,
    /// The memory map lock (and through it guest RAM, which stays mapped while this lives).
    pub map: Arc<MemoryMap>,
    /// Where page contents come from.
    pub source: Arc<dyn PageSource>,
    /// Bytes resolved per missing fault: 4 KiB, or more (aligned) to fault around; 2 MiB
    /// resolves a fault in an unpopulated extent with a whole huge page when `huge` is set.
    pub granularity: u64,
    /// Counters, shared with the metrics.
    pub stats: Arc<FaultStats>,
    /// Huge pages for 2 MiB faults.
    pub huge: Option<Installer>,
    /// How long to keep looking for the next fault before sleeping (see [`SPIN_AFTER_FAULT`]);
    /// zero where the handler would take a CPU a vCPU needs.
    pub spin: std::time::Duration,
    /// Where the prefetcher learns of the guest's faults, if one runs.
    pub hint: Option<Arc<crate::prefetch::FaultHint>>,
    /// Records the guest's first touches, where the working set is recorded.
    pub(crate) record: Option<Arc<crate::working_set::Recorder>>,
    /// Where faults on pages given back are counted.
    pub reclaim: Arc<crate::reclaim::ReclaimStats>,
}

/// The running handler thread; stopped and joined on drop.
pub struct FaultHandler {
    worker: Worker,
}

impl FaultHandler {
    /// Starts the handler thread for one shard of `all`. If it fails, it calls `on_fatal`
    /// once and then unregisters all of guest RAM, every shard through its own uffd (which
    /// wakes every thread blocked on a fault nobody will serve now).
    pub fn start(
        all: Arc<UffdSet>,
        resolver: Resolver,
        hook: &ThreadHook,
        on_fatal: impl FnOnce(ThreadFailure) + Send + 'static,
    ) -> std::io::Result<FaultHandler> {
        let ram = resolver.map.ram().clone();
        let worker = Worker::spawn(
            "uffd-handler",
            ThreadRole::FaultHandler,
            hook,
            move |stop| serve(&resolver, stop),
            move |what| {
                // The cause is told first: unregistering makes the other shards' faults in
                // flight fail too (ENOENT), and theirs must not be the failure the VM reports.
                on_fatal(what);
                let extents = (ram.size() / crate::EXTENT_SIZE) as usize;
                all.unregister_all(ram.host_base(), extents);
            },
        )?;
        Ok(FaultHandler { worker })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.worker.stop();
    }
}

/// How long the handler keeps reading its userfaultfd after a fault before it sleeps in
/// `poll` again. A guest that faults once faults again soon (it is touching fresh memory), and
/// a handler found awake saves the wake-up of its thread, which on a nested host (an idle CPU
/// halts, a wake-up is an IPI, both exits to the outer hypervisor) is most of a 4 KiB round
/// trip. Bounded, so an idle guest costs no CPU.
pub const SPIN_AFTER_FAULT: std::time::Duration = std::time::Duration::from_micros(50);

/// The handler loop: wait for faults or the stop event, serve faults in batches; after a
/// batch, look for the next one without sleeping for [`SPIN_AFTER_FAULT`].
fn serve(r: &Resolver, stop: &Stop) -> Result<(), Failure> {
    use std::os::fd::AsRawFd;
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut buffers = resolve::Buffers::new(r.granularity);
    let ram = r.map.ram();
    let (host_base, ram_size) = (ram.host_base(), ram.size());
    let mut last_fault: Option<Instant> = None;
    loop {
        if let Some(at) = last_fault {
            if stop.is_set() {
                return Ok(());
            }
            faults.clear();
            r.uffd
                .read_faults(&mut faults)
                .map_err(|e| format!("reading the userfaultfd failed: {e}"))?;
            if faults.is_empty() {
                if at.elapsed() >= r.spin {
                    last_fault = None;
                }
                std::hint::spin_loop();
                continue;
            }
            serve_batch(r, &faults, host_base, ram_size, &mut buffers)?;
            last_fault = Some(Instant::now());
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: r.uffd.as_raw_fd(),
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
            return Err(format!("poll on the userfaultfd failed: {err}").into());
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        faults.clear();
        r.uffd
            .read_faults(&mut faults)
            .map_err(|e| format!("reading the userfaultfd failed: {e}"))?;
        serve_batch(r, &faults, host_base, ram_size, &mut buffers)?;
        if !faults.is_empty() && !r.spin.is_zero() {
            last_fault = Some(Instant::now());
        }
    }
}

/// Serves one batch of faults read from the userfaultfd.
fn serve_batch(
    r: &Resolver,
    faults: &[Fault],
    host_base: HostAddr,
    ram_size: u64,
    buffers: &mut resolve::Buffers,
) -> Result<(), Failure> {
    {
        for fault in faults {
            fail::fail_point!("fault-serve");
            let start = Instant::now();
            let gpa = fault.address.wrapping_sub(host_base.raw()) & !(PAGE_SIZE - 1);
            if gpa >= ram_size {
                return Err(format!(
                    "fault at host address {:#x}, outside guest RAM",
                    fault.address
                )
                .into());
            }
            if fault.wp {
                resolve::answer_wp(r, gpa)?;
                r.stats.wp_stall_ns.record(start.elapsed());
            } else {
                resolve::serve_missing(r, fault, gpa, buffers)?;
                r.stats.service_ns.record(start.elapsed());
            }
        }
    }
    Ok(())
}
