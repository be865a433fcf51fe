//! The devices a vCPU exit can reach: COM1, the ucall port, the exit port. Anything else is
//! unclaimed: logged (rate-limited), reads return all ones, and the guest goes on.

pub mod serial;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use guest_abi::ports;

use crate::sync::lock;
use serial::{ConsoleOut, SerialConsole};
use vm_extents::log_ratelimited;

/// Where guest output goes (stdout in the VMM, a buffer in tests).
pub type Output = Box<dyn std::io::Write + Send>;

/// Every device of a VM, shared by its vCPUs.
pub struct Devices {
    /// COM1.
    pub serial: SerialConsole<Output>,
    /// Where ucall prints and reports go: rate-limited like the serial console (with a
    /// budget of its own), whole lines only.
    pub ucall_out: Mutex<ConsoleOut<Output>>,
    /// How many vCPUs reached each stage (the sync ucall), for whoever watches the run.
    pub stages: Arc<Stages>,
}

/// The guest's sync stages: per stage number (up to [`Stages::MAX`]), how many vCPUs reached it.
#[derive(Debug, Default)]
pub struct Stages([AtomicU32; Stages::MAX as usize + 1]);

impl Stages {
    /// The highest stage counted (later ones are only logged).
    pub const MAX: u64 = 15;

    /// Records that a vCPU reached `stage`.
    pub fn reached(&self, stage: u64) {
        if let Some(n) = self.0.get(stage as usize) {
            n.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Every stage's count, for a snapshot.
    pub fn counts(&self) -> Vec<u32> {
        self.0.iter().map(|n| n.load(Ordering::SeqCst)).collect()
    }

    /// Sets the counts a snapshot saved (later stages than are counted are ignored).
    pub fn restore(&self, counts: &[u32]) {
        for (n, &c) in self.0.iter().zip(counts) {
            n.store(c, Ordering::SeqCst);
        }
    }

    /// How many vCPUs reached `stage`.
    pub fn count(&self, stage: u64) -> u32 {
        self.0
            .get(stage as usize)
            .map_or(0, |n| n.load(Ordering::SeqCst))
    }
}

/// What a port-I/O or MMIO access asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum PioResult {
    /// Handled; keep running.
    Handled,
    /// A ucall: the loop reads the struct address from `rdi`.
    Ucall,
    /// The exit port was written: this vCPU is done with the given code.
    Exit(u64),
}

impl Devices {
    /// Devices writing guest console output to `serial_out` and ucall text to `ucall_out`.
    pub fn new(serial_out: Output, ucall_out: Output) -> Self {
        Devices {
            serial: SerialConsole::new(serial_out),
            ucall_out: Mutex::new(ConsoleOut::new(ucall_out)),
            stages: Arc::default(),
        }
    }

    /// These devices as a snapshot left them: the UART's registers, the stages reached.
    pub fn restored(self, state: &crate::snapshot::VmState) -> Result<Self, String> {
        self.stages.restore(&state.stages);
        Ok(Devices {
            serial: self.serial.restored(&state.serial)?,
            ..self
        })
    }

    /// Devices writing everything to the VMM's stdout.
    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()), Box::new(std::io::stdout()))
    }

    /// A guest `out` of `data` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioResult {
        match port {
            p if (ports::COM1..ports::COM1 + ports::COM1_LEN).contains(&p) => {
                self.serial.write((p - ports::COM1) as u8, data);
            }
            ports::EXIT => return PioResult::Exit(data.first().copied().unwrap_or(0).into()),
            _ => log_ratelimited!(
                log::Level::Warn,
                "guest wrote {data:02x?} to unclaimed port {port:#x}; ignored"
            ),
        }
        PioResult::Handled
    }

    /// A guest `in` from `port`, filling `data`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> PioResult {
        match port {
            p if (ports::COM1..ports::COM1 + ports::COM1_LEN).contains(&p) => {
                self.serial.read((p - ports::COM1) as u8, data);
            }
            ports::UCALL => {
                data.fill(0);
                return PioResult::Ucall;
            }
            _ => {
                log_ratelimited!(
                    log::Level::Warn,
                    "guest read {} bytes from unclaimed port {port:#x}; returning all ones",
                    data.len()
                );
                data.fill(0xff);
            }
        }
        PioResult::Handled
    }

    /// A guest MMIO read: nothing is mapped there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log_ratelimited!(
            log::Level::Warn,
            "guest read {} bytes from unclaimed MMIO address {addr:#x}; returning all ones",
            data.len()
        );
        data.fill(0xff);
    }

    /// A guest MMIO write: nothing is mapped there.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        log_ratelimited!(
            log::Level::Warn,
            "guest wrote {data:02x?} to unclaimed MMIO address {addr:#x}; ignored"
        );
    }

    /// Writes a line of host-formatted guest text (ucall prints and reports), or drops it
    /// whole when the guest has printed too much too fast.
    pub fn print_line(&self, line: &str) {
        lock(&self.ucall_out).write_line(line.as_bytes());
    }

    /// `(bytes written, bytes dropped)` of ucall text so far.
    pub fn ucall_output_stats(&self) -> (u64, u64) {
        let out = lock(&self.ucall_out);
        (out.written(), out.dropped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(Box::new(Vec::new()), Box::new(Vec::new()))
    }

    #[test]
    fn unclaimed_reads_return_all_ones() {
        let d = devices();
        let mut data = [0u8; 4];
        assert_eq!(d.pio_read(0x2345, &mut data), PioResult::Handled);
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 8];
        d.mmio_read(0x1_0000_0000, &mut data);
        assert_eq!(data, [0xff; 8]);
        assert_eq!(d.pio_write(0x2345, &[1]), PioResult::Handled);
    }

    #[test]
    fn ucall_and_exit_ports_are_decoded() {
        let d = devices();
        let mut data = [0xaau8; 1];
        assert_eq!(d.pio_read(ports::UCALL, &mut data), PioResult::Ucall);
        assert_eq!(data, [0]);
        assert_eq!(d.pio_write(ports::EXIT, &[7]), PioResult::Exit(7));
    }

    #[test]
    fn serial_transmit_reaches_the_console() {
        let d = devices();
        d.pio_write(ports::COM1, b"hi\n");
        assert_eq!(d.serial.output_stats(), (3, 0));
        // Line status: transmitter empty, so polling guests never wait.
        let mut lsr = [0u8];
        d.pio_read(ports::COM1 + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
