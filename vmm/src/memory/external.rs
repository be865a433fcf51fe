//! Guest RAM served by an external page server, handed over Firecracker's way
//! ([`crate::handoff`]): the VMM's half of the handoff, and noticing the server's death.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use guest_abi::layout::PAGE_SIZE;

use super::MemoryError;
use super::ram::GuestRam;
use super::uffd::{self, Uffd};
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
    /// all of RAM registered for missing faults, one handshake (Firecracker 1.12's schema, one
    /// region of 4 KiB pages). Returns the uffd too: the VMM keeps its own reference, so a
    /// server that dies leaves faults waiting (not filled with zeroes by the kernel) until the
    /// VM is stopped and RAM unregistered.
    pub fn hand_over(ram: &GuestRam, socket: PathBuf) -> Result<(PageServer, Uffd), MemoryError> {
        let needed_by = "--page-source external".to_string();
        let failed = |what, source| MemoryError::Uffd {
            needed_by: needed_by.clone(),
            what,
            source,
        };
        let uffd = Uffd::new(uffd::FEATURE_EVENT_REMOVE).map_err(|source| {
            MemoryError::UffdUnavailable {
                needed_by: needed_by.clone(),
                alternative: "",
                source,
            }
        })?;
        if uffd.features() & uffd::FEATURE_EVENT_REMOVE == 0 {
            return Err(failed(
                "checking its features",
                std::io::Error::other("the kernel lacks UFFD_FEATURE_EVENT_REMOVE"),
            ));
        }
        let (base, size) = (ram.host_base().0 as u64, ram.size());
        uffd.register(base, size, uffd::REGISTER_MODE_MISSING)
            .map_err(|e| failed("registering guest RAM", e))?;
        let regions = [Region::new(
            base,
            size as usize,
            0,
            PAGE_SIZE as usize,
            Schema::V1_12,
        )];
        let stream = handoff::hand_over(&socket, &regions, &uffd).map_err(MemoryError::Handoff)?;
        log::info!(
            "handed guest RAM to the page server at {}",
            socket.display()
        );
        Ok((PageServer { socket, stream }, uffd))
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
