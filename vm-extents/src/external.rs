//! Guest RAM served by an external page server, handed over Firecracker's way
//! ([`crate::handoff`]): the VMM's half of the handoff, and noticing the server's death.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::{HostAddr, PAGE_SIZE};

use vmm_sys_util::signal::register_signal_handler;

use super::host_view;
use super::ram::GuestRam;
use super::uffd::{self, Uffd};
use super::{MemoryError, UffdUser};
use crate::handoff::{self, Region, Schema};

/// The page server guest RAM was handed to: our end of its socket, open for as long as guest
/// RAM lives (the server takes EOF as the VMM gone).
#[derive(Debug)]
pub struct PageServer {
    socket: PathBuf,
    stream: UnixStream,
}

impl PageServer {
    /// Hands `ram` to the page server listening at `socket`: a uffd asking for remove events,
    /// and one handshake (Firecracker 1.12's schema) with a region of 4 KiB pages for every run
    /// of guest RAM nobody has populated yet (split where a memslot starts, so that each lies in
    /// one memslot), each registered for missing faults. What the VMM
    /// wrote itself before the handoff (page tables, boot data, the program) stays its own: a
    /// server is handed only missing pages, as Firecracker's handlers assume (its `fault_all`
    /// example copies each whole region at the first fault, and a page already there would
    /// stop that copy). Each region's `offset` is its offset in guest RAM, so the server's file
    /// is a raw file of all of RAM. Returns the uffd too: the VMM keeps its own reference, so a
    /// server that dies leaves faults waiting (not filled with zeroes by the kernel) until the
    /// VM is stopped and RAM unregistered.
    pub fn hand_over(ram: &GuestRam, socket: PathBuf) -> Result<(PageServer, Uffd), MemoryError> {
        let needed_by = UffdUser::ExternalServer;
        let failed = |what, source| MemoryError::Uffd {
            needed_by,
            what,
            source,
        };
        // Poison, to release a dead server's faults without zeroes, where the kernel has it.
        let uffd = Uffd::new(uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_POISON)
            .or_else(|_| Uffd::new(uffd::FEATURE_EVENT_REMOVE))
            .map_err(|source| MemoryError::UffdUnavailable { needed_by, source })?;
        if uffd.features() & uffd::FEATURE_EVENT_REMOVE == 0 {
            return Err(failed(
                "checking its features",
                std::io::Error::other("the kernel lacks UFFD_FEATURE_EVENT_REMOVE"),
            ));
        }
        let (base, size) = (ram.host_base(), ram.size());
        let present = host_view::present_pages(base, size)
            .map_err(|e| failed("reading which guest pages the VMM populated", e))?;
        let regions = missing_runs(&present, &page_bounds(ram))
            .map(|run| {
                let (offset, len) = (run.start as u64 * PAGE_SIZE, run.len() as u64 * PAGE_SIZE);
                Region::new(
                    (base + offset).raw(),
                    len as usize,
                    offset,
                    PAGE_SIZE as usize,
                    Schema::V1_12,
                )
            })
            .collect::<Vec<_>>();
        if regions.len() > handoff::MAX_REGIONS {
            return Err(failed(
                "describing guest RAM",
                std::io::Error::other(format!(
                    "its unpopulated ranges number {}, more than the {} a handshake carries",
                    regions.len(),
                    handoff::MAX_REGIONS
                )),
            ));
        }
        for r in &regions {
            uffd.register(
                HostAddr::new(r.base_host_virt_addr),
                r.size as u64,
                uffd::REGISTER_MODE_MISSING,
            )
            .map_err(|e| failed("registering guest RAM", e))?;
        }
        let stream = handoff::hand_over(&socket, &regions, &uffd).map_err(MemoryError::Handoff)?;
        log::info!(
            "handed {} of guest RAM in {} regions to the page server at {}",
            crate::units::ByteSize(regions.iter().map(|r| r.size as u64).sum()),
            regions.len(),
            socket.display()
        );
        Ok((PageServer { socket, stream }, uffd))
    }

    /// Releases every thread waiting on a fault the server will never serve, for a VM that is
    /// stopping (its vCPUs told to stop and kicked): every page of guest RAM still missing is
    /// poisoned (`UFFDIO_POISON`), which wakes the waiters with an error instead of a page, so
    /// no vCPU ever reads a zero page where guest data should be. A vCPU whose access then
    /// fails inside KVM leaves `KVM_RUN`; a thread that touches such a page from user space
    /// (`SIGBUS`) ends the process at once with exit 204 and a line on stderr. Returns false
    /// where the kernel cannot poison (before Linux 6.6): the caller then unregisters RAM.
    pub fn release(&self, ram: &GuestRam, uffd: &Uffd) -> bool {
        if uffd.features() & uffd::FEATURE_POISON == 0 {
            return false;
        }
        let base = ram.host_base();
        let present = match host_view::present_pages(base, ram.size()) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("reading which guest pages are present: {e}");
                return false;
            }
        };
        if let Err(e) = register_signal_handler(libc::SIGBUS, on_poisoned_access) {
            log::warn!("installing the SIGBUS handler: {e}");
            return false;
        }
        let mut page = 0;
        let mut poisoned = 0;
        while page < present.len() {
            let run = present[page..].iter().take_while(|&&p| !p).count();
            if run == 0 {
                page += 1;
                continue;
            }
            let (at, len) = (base + page as u64 * PAGE_SIZE, run as u64 * PAGE_SIZE);
            // SAFETY: a range of guest RAM registered with this uffd, in a VM that is
            // stopping: its contents were never served and never will be.
            if let Err(e) = unsafe { uffd.poison(at, len) } {
                log::warn!("poisoning guest RAM at {at:#x}: {e}; unregistering it instead");
                return false;
            }
            poisoned += run;
            page += run;
        }
        log::info!("poisoned the {poisoned} guest pages the page server never served");
        true
    }

    /// Why the server is gone, if it is: it closed its end of the socket (it exited, crashed or
    /// was killed), so the guest pages it has not served can never be read.
    pub fn gone(&self) -> Option<String> {
        handoff::hung_up(&self.stream).then(|| {
            format!(
                "the page server at {} hung up (it exited or closed its socket): the guest \
                 pages it has not served can never be read, so the VM stops",
                self.socket.display()
            )
        })
    }
}

/// The exit status of a process that touched guest memory a dead page server never served
/// (a VMM's "failed while running" code).
pub const EXIT_POISONED_ACCESS: u8 = 204;

/// `SIGBUS` once a dead server's pages are poisoned: a user-space access to one of them. The
/// VM is already stopping with exit 204; this ends the process at once, as it must not run on.
extern "C" fn on_poisoned_access(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    const SAID: &[u8] = b"vmm: a thread touched guest memory the page server never served \
        (it is gone); exiting (204)\n";
    // SAFETY: write and _exit are async-signal-safe; SAID is a static buffer.
    unsafe {
        libc::write(2, SAID.as_ptr().cast(), SAID.len());
        libc::_exit(i32::from(EXIT_POISONED_ACCESS));
    }
}

/// The runs of pages that are not present, as page index ranges.
/// The page index where each region of guest RAM starts, after the first.
fn page_bounds(ram: &GuestRam) -> Vec<usize> {
    ram.regions()[1..]
        .iter()
        .map(|r| (r.offset / PAGE_SIZE) as usize)
        .collect()
}

/// The runs of pages not `present`, split where a region (memslot) starts (`bounds`,
/// ascending page indices): each handshake region lies inside one memslot, as Firecracker's
/// regions are its memslots.
fn missing_runs<'a>(
    present: &'a [bool],
    bounds: &'a [usize],
) -> impl Iterator<Item = std::ops::Range<usize>> + 'a {
    let mut page = 0;
    std::iter::from_fn(move || {
        let start = page + present[page..].iter().position(|&p| !p)?;
        let limit = bounds
            .iter()
            .copied()
            .find(|&b| b > start)
            .unwrap_or(present.len());
        let len = present[start..limit].iter().take_while(|&&p| !p).count();
        page = start + len;
        Some(start..page)
    })
}

#[cfg(test)]
mod tests {
    use super::missing_runs;

    #[test]
    fn missing_runs_are_the_gaps_between_present_pages() {
        let runs = |p: &[u8], bounds: &[usize]| {
            missing_runs(&p.iter().map(|&b| b == 1).collect::<Vec<_>>(), bounds).collect::<Vec<_>>()
        };
        assert_eq!(runs(&[], &[]), vec![]);
        assert_eq!(runs(&[1, 1], &[]), vec![]);
        assert_eq!(runs(&[0, 0], &[]), vec![0..2]);
        assert_eq!(runs(&[1, 0, 0, 1, 0, 1, 1, 0], &[]), vec![1..3, 4..5, 7..8]);
    }

    #[test]
    fn no_run_crosses_a_memslot() {
        let present = [true, false, false, false, false, true, false, false];
        let runs: Vec<_> = missing_runs(&present, &[2, 4, 7]).collect();
        assert_eq!(runs, vec![1..2, 2..4, 4..5, 6..7, 7..8]);
    }
}
