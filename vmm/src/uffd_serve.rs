//! `vmm uffd-serve`: a page server for a VMM that hands its guest RAM over Firecracker's way
//! (this VMM with `--page-source external:SOCK`, or Firecracker).
//!
//! One thread: it listens, accepts one VMM (and removes its socket), reads its handshake, then waits on the uffd and
//! the socket. Each wake-up drains the uffd's whole queue first (while a remove event is
//! queued every resolving ioctl fails with `EAGAIN`), records removed ranges (they read as
//! zeroes from then on), then resolves the faults it holds, keeping any that met `EAGAIN` for
//! the next round. Pages come from the raw memory file through the VMM's own image page source;
//! `--granularity 2M` resolves a 4 KiB region's fault with the whole 2 MiB around it where
//! nothing there is present or removed. EOF on the socket is the VMM gone: the server ends.
//! On a fatal error after the VMM connected, the server kills it (`SIGKILL`, the pid from
//! `SO_PEERCRED`) unless told not to: a Firecracker VMM would otherwise wait on its next fault
//! forever.
//!
//! From the handshake on the server runs under its own seccomp filter
//! ([`ThreadKind::PageServer`]); SIGINT and SIGTERM end it, with its metrics written, once a
//! VMM is connected.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use guest_abi::layout::{EXTENT_SIZE, PAGE_SIZE};

use crate::files::MetricsTarget;
use crate::metrics::Latencies;
use crate::seccomp::{Seccomp, ThreadKind};
use vm_extents::handoff::{self, HandoffError, Region};
use vm_extents::ram_image::{RamImage, RamImageError};
use vm_extents::uffd::{Event, Fault, Resolved, Uffd};
use vm_extents::{Fill, HostAddr, PageSource, RamImageSource};

/// How much a fault in a 4 KiB region resolves (`--granularity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Granularity {
    /// The faulting page.
    #[default]
    #[value(name = "4K")]
    #[serde(rename = "4K")]
    Page,
    /// The 2 MiB around it (within the region), where none of it is present or removed.
    #[value(name = "2M")]
    #[serde(rename = "2M")]
    Extent,
}

/// What to serve, and how.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The socket to listen on.
    pub socket: PathBuf,
    /// The raw memory file.
    pub file: PathBuf,
    /// How much a 4 KiB region's fault resolves.
    pub granularity: Granularity,
    /// Where to write what was served, at the end.
    pub metrics: Option<PathBuf>,
    /// Kill the VMM on a fatal error (Firecracker's handlers do: it would hang otherwise).
    pub kill_peer: bool,
    /// Added to every read of the file (benchmarks: slower storage).
    pub read_latency: std::time::Duration,
    /// The seccomp filter, from the handshake on.
    pub seccomp: Seccomp,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The memory file cannot be served.
    #[error(transparent)]
    File(#[from] RamImageError),
    /// The metrics target is unusable.
    #[error(transparent)]
    Metrics(#[from] crate::files::FileError),
    /// The socket path cannot be listened on.
    #[error("cannot listen on {}: {why}", path.display())]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The handshake failed or was refused.
    #[error(transparent)]
    Handshake(#[from] HandoffError),
    /// Reading the memory file failed while serving (it was truncated or changed under us).
    #[error("reading the memory file while serving")]
    Read(#[source] RamImageError),
    /// A fault outside every region.
    #[error("a fault at {0:#x} lies in no region of the handshake")]
    OutsideRegions(u64),
    /// The uffd failed.
    #[error("{what} at {addr:#x}")]
    Uffd {
        /// What was being done.
        what: &'static str,
        /// Where.
        addr: u64,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// SIGINT or SIGTERM ended serving.
    #[error("stopped by signal {0}")]
    Signal(i32),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(crate::seccomp::SeccompError),
    /// Writing the metrics failed.
    #[error("writing --metrics {}", path.display())]
    WriteMetrics {
        /// The path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

impl ServeError {
    /// Whether the error is about what the user or the VMM gave (bad input), not a failure
    /// while serving.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ServeError::File(e) => e.is_bad_input(),
            ServeError::Metrics(_) | ServeError::Listen { .. } => true,
            ServeError::Handshake(e) => !matches!(e, HandoffError::Io { .. }),
            _ => false,
        }
    }
}

/// What a server did, written to `--metrics` at the end.
#[derive(Debug, Default, serde::Serialize)]
pub struct ServeReport {
    /// The VMM's pid.
    pub peer_pid: i32,
    /// The handshake's regions.
    pub regions: Vec<Region>,
    /// How a 4 KiB region's faults were resolved.
    pub granularity: Granularity,
    /// Fault messages read.
    pub faults: u64,
    /// Resolutions by copying data from the file.
    pub copies: u64,
    /// Resolutions with zeroes (a hole in the file, a zero page, a removed range).
    pub zero_fills: u64,
    /// Of all resolutions, those of a whole 2 MiB at once.
    pub extents_2m: u64,
    /// Faults on a page already present (another fault resolved it first).
    pub already_present: u64,
    /// Resolutions the kernel refused with `EAGAIN` (a remove was queued), tried again.
    pub retries: u64,
    /// Bytes put into guest RAM.
    pub bytes_served: u64,
    /// Remove events read.
    pub removes: u64,
    /// Bytes those removes discarded.
    pub removed_bytes: u64,
    /// Bytes read from the memory file.
    pub file_bytes_read: u64,
    /// Time from reading a fault to resolving it.
    pub service_ns: Latencies,
    /// Why serving ended: "vmm-closed", or the error.
    pub end: String,
}

/// Listens on `config.socket`, serves one VMM until it closes its end, and reports.
pub fn serve(config: &ServeConfig) -> Result<ServeReport, ServeError> {
    let image = Arc::new(RamImage::open_raw(&config.file, "memory file")?);
    let metrics = config
        .metrics
        .as_deref()
        .map(|p| MetricsTarget::open("--metrics", p))
        .transpose()?;
    // SIGINT and SIGTERM end the server at any moment from here on: before a VMM connects
    // (the socket is removed), during the handshake, and while serving (the metrics are
    // written, the VMM dealt with as on any other end that leaves it unserved).
    crate::signals::install().map_err(|e| ServeError::Listen {
        path: config.socket.clone(),
        why: format!("installing a signal handler: {e}"),
    })?;
    let listener = listen(&config.socket)?;
    eprintln!(
        "vmm uffd-serve: serving {} on {}",
        config.file.display(),
        config.socket.display()
    );
    let accepted = accept_vmm(&listener, config, image.ram_size());
    // One VMM per server: nobody else may connect, and no stale socket is left behind.
    drop(listener);
    let _ = std::fs::remove_file(&config.socket);
    let (stream, handshake) = accepted?;
    let peer = Peer::of(&stream);
    let mut report = ServeReport {
        peer_pid: peer.pid,
        granularity: config.granularity,
        ..ServeReport::default()
    };
    let result = handshake.and_then(|(regions, uffd)| {
        report.regions = regions.clone();
        // From here on only what serving and reporting need (the `seccomp-page-server` fault
        // point makes a forbidden call, for the tests).
        crate::seccomp::install(ThreadKind::PageServer, config.seccomp)
            .map_err(ServeError::Seccomp)?;
        crate::seccomp::forbidden_call_point("seccomp-page-server");
        Server {
            regions,
            uffd,
            source: crate::storage::SlowSource::wrap(
                Arc::new(RamImageSource::new(image.clone())),
                config.read_latency,
            ),
            granularity: config.granularity,
            removed: Vec::new(),
            pending: VecDeque::new(),
            buf: vec![0; EXTENT_SIZE as usize],
            report: &mut report,
        }
        .run(&stream)
    });
    // A failure because the VMM went away (its memory is gone, so a resolution fails) is the
    // VMM's end, not ours: the normal end.
    let result = match result {
        Err(e) if !matches!(e, ServeError::Signal(_)) && peer.gone_within(&stream, PEER_EXIT) => {
            log::info!(
                "the VMM went away while being served ({})",
                crate::error::chain(&e)
            );
            Ok(())
        }
        other => other,
    };
    report.file_bytes_read = image.bytes_read();
    report.end = match &result {
        Ok(()) => "vmm-closed".into(),
        Err(e) => crate::error::chain(e),
    };
    if let Err(e) = &result
        && config.kill_peer
    {
        match peer.kill() {
            Ok(true) => eprintln!(
                "vmm uffd-serve: killed the VMM (pid {}): it would wait forever on faults \
                 nobody serves after: {}",
                peer.pid,
                crate::error::chain(e)
            ),
            Ok(false) => {}
            Err(why) => eprintln!(
                "vmm uffd-serve: cannot kill the VMM (pid {}): {why}; it may wait forever on \
                 faults nobody serves",
                peer.pid
            ),
        }
    }
    if let (Some(target), Some(path)) = (&metrics, &config.metrics) {
        let json = serde_json::to_value(&report).expect("plain data");
        crate::metrics::write_summary(target, &json).map_err(|source| {
            ServeError::WriteMetrics {
                path: path.clone(),
                source,
            }
        })?;
    }
    result.map(|()| report)
}

/// How long a failure waits for the VMM to be seen gone before it counts as the server's own.
const PEER_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the accepted VMM sent: its connection, and its handshake's regions and uffd.
type Accepted = (UnixStream, Result<(Vec<Region>, Uffd), ServeError>);

/// Waits for a VMM and its handshake. A connection that closes without sending a byte (someone
/// asking whether this server is alive) is not a VMM: the server goes on listening. SIGINT and
/// SIGTERM end the wait.
fn accept_vmm(
    listener: &UnixListener,
    config: &ServeConfig,
    file_len: u64,
) -> Result<Accepted, ServeError> {
    let listen_err = |why: String| ServeError::Listen {
        path: config.socket.clone(),
        why,
    };
    loop {
        if let Some(sig) = crate::signals::requested() {
            return Err(ServeError::Signal(sig));
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout bounds how late a signal is seen.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(listen_err(format!("accept failed: {e}"))),
        };
        match handshake(&stream, &config.file, file_len) {
            Err(ServeError::Handshake(HandoffError::Closed(0))) => {
                log::info!("a connection closed without a handshake (not a VMM); listening on");
            }
            Err(ServeError::Handshake(HandoffError::Interrupted)) => {
                return Err(ServeError::Signal(
                    crate::signals::requested().unwrap_or(libc::SIGTERM),
                ));
            }
            result => return Ok((stream, result)),
        }
    }
}

/// Binds `path`, replacing a stale socket left there: one nobody listens on (connecting to it
/// is refused). Never anything else, and never a live server's socket.
fn listen(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |why: String| ServeError::Listen {
        path: path.into(),
        why,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live server accepts this and, seeing it close with nothing sent, listens on.
            if UnixStream::connect(path).is_ok() {
                return Err(err(
                    "another page server is listening on it; stop that one or name a new path"
                        .into(),
                ));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("removing the old socket: {e}")))?
        }
        Ok(meta) => {
            return Err(err(format!(
                "it is {}, not a socket; name a new path",
                crate::files::kind_name(meta.file_type())
            )));
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|e| err(e.to_string()))
}

/// Reads and checks the handshake: the regions and the uffd.
fn handshake(
    stream: &UnixStream,
    file: &Path,
    file_len: u64,
) -> Result<(Vec<Region>, Uffd), ServeError> {
    let (regions, fd) = handoff::receive(stream, &|| crate::signals::requested().is_some())?;
    handoff::check(&regions, file, file_len)?;
    let fd: OwnedFd = fd.into();
    Ok((regions, Uffd::from_owned(fd, 0)))
}

/// The VMM being served, held by a pidfd taken while it was connected: signalling it can never
/// reach another process that got its pid later.
struct Peer {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        let pidfd = handoff::peer_pidfd(stream)
            .inspect_err(|e| log::warn!("no pidfd for the VMM: {e}; it will not be killed"))
            .ok();
        Peer {
            pid: handoff::peer_pid(stream).unwrap_or(0),
            pidfd,
        }
    }

    /// Whether the VMM has exited or closed its end, waiting up to `limit` for it.
    fn gone_within(&self, stream: &UnixStream, limit: std::time::Duration) -> bool {
        let mut fds = vec![libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        }];
        if let Some(pidfd) = &self.pidfd {
            fds.push(libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // SAFETY: valid pollfds, a bounded wait.
            let ready =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, left.as_millis() as i32) };
            if ready > 0 {
                return fds.iter().any(|f| f.revents != 0);
            }
            if ready == 0 || left.is_zero() {
                return false;
            }
        }
    }

    /// Sends the VMM `SIGKILL` through its pidfd; `Ok(false)` if it is already gone.
    fn kill(&self) -> std::io::Result<bool> {
        let Some(pidfd) = &self.pidfd else {
            return Err(std::io::Error::other("no pidfd was taken for it"));
        };
        // SAFETY: pidfd_send_signal takes our pidfd, a signal, no siginfo and no flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match ret {
            0 => Ok(true),
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) => Ok(false),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

/// A resolution's outcome.
enum Done {
    /// Resolved (or found resolved).
    Yes,
    /// The kernel said `EAGAIN`: keep the fault for after the next read of the queue.
    Again,
}

struct Server<'a> {
    regions: Vec<Region>,
    uffd: Uffd,
    source: Arc<dyn PageSource>,
    granularity: Granularity,
    /// Ranges the VMM discarded: zeroes from now on.
    removed: Vec<std::ops::Range<u64>>,
    /// Faults read, not yet resolved, with when they were read.
    pending: VecDeque<(Fault, Instant)>,
    buf: Vec<u8>,
    report: &'a mut ServeReport,
}

impl Server<'_> {
    fn run(&mut self, stream: &UnixStream) -> Result<(), ServeError> {
        let mut events = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // Faults held back by EAGAIN are tried again soon, whatever comes.
            let wait = if self.pending.is_empty() { -1 } else { 1 };
            // SAFETY: two valid pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
            if let Some(signal) = crate::signals::requested() {
                return Err(ServeError::Signal(signal));
            }
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(ServeError::Uffd {
                    what: "waiting on the uffd",
                    addr: 0,
                    source: e,
                });
            }
            if fds[1].revents != 0 && self.vmm_closed(stream) {
                return Ok(());
            }
            events.clear();
            self.uffd
                .read_events(&mut events)
                .map_err(|source| ServeError::Uffd {
                    what: "reading the uffd",
                    addr: 0,
                    source,
                })?;
            let now = Instant::now();
            for event in &events {
                match *event {
                    Event::Fault(f) => {
                        self.report.faults += 1;
                        self.pending.push_back((f, now));
                    }
                    Event::Remove { start, end } => {
                        self.report.removes += 1;
                        self.report.removed_bytes += end - start;
                        add_range(&mut self.removed, start..end);
                    }
                }
            }
            while let Some((fault, read_at)) = self.pending.pop_front() {
                match self.resolve(fault)? {
                    Done::Yes => self.report.service_ns.record(read_at.elapsed()),
                    Done::Again => {
                        self.report.retries += 1;
                        self.pending.push_front((fault, read_at));
                        break;
                    }
                }
            }
        }
    }

    /// Whether the VMM closed its end (it never sends anything after the handshake; what it
    /// might is read and dropped).
    fn vmm_closed(&self, stream: &UnixStream) -> bool {
        let mut buf = [0u8; 256];
        // SAFETY: reads into our own buffer without waiting.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        n == 0 || (n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN))
    }

    fn is_removed(&self, start: u64, len: u64) -> bool {
        self.removed
            .iter()
            .any(|r| r.start < start + len && start < r.end)
    }

    /// Resolves one fault: the page (or its region's page, 2 MiB for hugetlb), or with
    /// `--granularity 2M` the 2 MiB around it when that is free to fill.
    fn resolve(&mut self, fault: Fault) -> Result<Done, ServeError> {
        let region = self
            .regions
            .iter()
            .find(|r| r.contains(fault.address))
            .cloned()
            .ok_or(ServeError::OutsideRegions(fault.address))?;
        let page = region.page_bytes();
        if page == PAGE_SIZE && self.granularity == Granularity::Extent {
            let start = (fault.address & !(EXTENT_SIZE - 1)).max(region.base_host_virt_addr);
            let len = start.saturating_add(EXTENT_SIZE).min(region.end()) - start;
            if !self.is_removed(start, len) {
                match self.fill(&region, start, len)? {
                    Resolved::Filled => {
                        self.report.extents_2m += 1;
                        return Ok(Done::Yes);
                    }
                    // Some page there is present (or the queue holds a remove): the faulting
                    // page alone, below, tells which.
                    Resolved::AlreadyPresent | Resolved::Retry => {}
                }
            }
        }
        let start = fault.address & !(page - 1);
        Ok(match self.fill(&region, start, page)? {
            Resolved::Filled => Done::Yes,
            Resolved::AlreadyPresent => {
                self.report.already_present += 1;
                // Resolved by an earlier, wider fill whose wake-up this waiter may have missed.
                self.uffd
                    .wake(HostAddr::new(start), page)
                    .map_err(|source| ServeError::Uffd {
                        what: "waking a fault",
                        addr: start,
                        source,
                    })?;
                Done::Yes
            }
            Resolved::Retry => Done::Again,
        })
    }

    /// Fills `[start, start + len)` of `region` from the file, or with zeroes where it was
    /// removed or the file holds zeroes.
    fn fill(&mut self, region: &Region, start: u64, len: u64) -> Result<Resolved, ServeError> {
        let removed = self.is_removed(start, len);
        let buf = &mut self.buf[..len as usize];
        let zero = if removed {
            true
        } else {
            let offset = region.offset + (start - region.base_host_virt_addr);
            self.source.fill(offset, buf).map_err(ServeError::Read)? == Fill::Zero
        };
        let hugetlb = region.page_bytes() != PAGE_SIZE;
        let uffd_err = |what| {
            move |source| ServeError::Uffd {
                what,
                addr: start,
                source,
            }
        };
        let resolved = if zero && !hugetlb {
            // SAFETY: `start..start+len` lies in a region the VMM registered with this uffd
            // and handed over for us to fill.
            unsafe { self.uffd.zeropage(HostAddr::new(start), len) }
                .map_err(uffd_err("UFFDIO_ZEROPAGE"))?
        } else {
            if zero {
                // hugetlb has no zero page: copy zeroes.
                buf.fill(0);
            }
            // SAFETY: as above; `buf` holds `len` readable bytes.
            unsafe { self.uffd.copy(HostAddr::new(start), buf.as_ptr(), len) }
                .map_err(uffd_err("UFFDIO_COPY"))?
        };
        if resolved == Resolved::Filled {
            self.report.bytes_served += len;
            if zero {
                self.report.zero_fills += 1;
            } else {
                self.report.copies += 1;
            }
        }
        Ok(resolved)
    }
}

/// Adds `range` to a sorted list of disjoint ranges, merging what touches it.
fn add_range(ranges: &mut Vec<std::ops::Range<u64>>, range: std::ops::Range<u64>) {
    ranges.push(range);
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_ranges_merge() {
        let mut r = Vec::new();
        add_range(&mut r, 8..12);
        add_range(&mut r, 0..4);
        add_range(&mut r, 4..6);
        add_range(&mut r, 20..30);
        add_range(&mut r, 10..21);
        assert_eq!(r, vec![0..6, 8..30]);
    }
}
