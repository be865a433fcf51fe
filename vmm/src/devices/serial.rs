//! COM1: a vm-superio 16550 whose output goes to the VMM's stdout through a rate limiter.
//!
//! A guest can write to the serial port as fast as it likes; the host copies at most a burst
//! plus a steady rate to stdout and counts the rest as dropped, so a flooding guest can neither
//! grow host memory nor drown the terminal. Control characters other than newline and tab are
//! shown in caret notation (`ESC` as `^[`), so a guest cannot drive the user's terminal with
//! escape sequences.

use crate::snapshot::state::SerialRegs;
use std::io::{self, Write};
use std::sync::Mutex;
use std::time::Instant;

use vm_superio::{Serial, Trigger};

/// Bytes a guest may write at once before the rate limit applies.
pub const BURST_BYTES: u64 = 64 << 10;
/// Steady rate of guest output copied to stdout, in bytes per second: faster than a real
/// 115200-baud line (about 11 KiB/s), so no well-behaved guest notices it.
pub const RATE_BYTES_PER_SEC: u64 = 16 << 10;

/// A token bucket: `take(n)` says how many of `n` bytes may pass now.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: u64,
    rate_per_sec: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u64, rate_per_sec: u64) -> Self {
        TokenBucket {
            capacity,
            rate_per_sec,
            tokens: capacity,
            last: Instant::now(),
        }
    }

    /// Takes up to `n` tokens as of `now`; returns how many were granted.
    pub fn take_at(&mut self, n: u64, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.last);
        let refill = (elapsed.as_nanos() * u128::from(self.rate_per_sec) / 1_000_000_000) as u64;
        if refill > 0 {
            self.tokens = (self.tokens + refill).min(self.capacity);
            self.last = now;
        }
        let granted = n.min(self.tokens);
        self.tokens -= granted;
        granted
    }

    /// Takes `n` tokens as of `now` if all of them are there; takes none otherwise.
    pub fn take_all_at(&mut self, n: u64, now: Instant) -> bool {
        self.take_at(0, now);
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }
}

/// The terminal guest output shares with the live status line (`vm::status`): the status
/// line is drawn only where guest output ended a line, and guest output erases it first, so
/// neither runs into the other.
pub mod terminal {
    use std::sync::atomic::{AtomicBool, Ordering};

    static STATUS_SHOWN: AtomicBool = AtomicBool::new(false);
    static AT_LINE_START: AtomicBool = AtomicBool::new(true);

    /// Whether a status line may be drawn now: guest output last ended a line.
    pub fn at_line_start() -> bool {
        AT_LINE_START.load(Ordering::Relaxed)
    }

    /// A status line is on the terminal that guest output goes to.
    pub fn status_shown() {
        STATUS_SHOWN.store(true, Ordering::Relaxed);
    }

    /// Guest output is about to be written: the escape that erases a status line, if one is
    /// shown.
    pub(super) fn before_output() -> &'static [u8] {
        if STATUS_SHOWN.swap(false, Ordering::Relaxed) {
            b"\r\x1b[2K"
        } else {
            b""
        }
    }

    /// Guest output was written, ending with `last`.
    pub(super) fn after_output(last: Option<u8>) {
        if let Some(b) = last {
            AT_LINE_START.store(b == b'\n', Ordering::Relaxed);
        }
    }
}

/// Guest console output: rate-limited, copied to a writer (stdout in the VMM).
pub struct ConsoleOut<W: Write> {
    out: W,
    bucket: TokenBucket,
    written: u64,
    dropped: u64,
}

impl<W: Write> ConsoleOut<W> {
    /// Output to `out` with the default burst and rate.
    pub fn new(out: W) -> Self {
        ConsoleOut {
            out,
            bucket: TokenBucket::new(BURST_BYTES, RATE_BYTES_PER_SEC),
            written: 0,
            dropped: 0,
        }
    }

    /// Bytes of guest output copied out so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes of guest output dropped by the rate limit so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> ConsoleOut<W> {
    /// Writes `line` and a newline whole, or drops all of it if the rate limit has not room
    /// for it (a line cut in the middle would run into the next one).
    pub fn write_line(&mut self, line: &[u8]) {
        let len = line.len() as u64 + 1;
        if self.bucket.take_all_at(len, Instant::now()) {
            let _ = self.out.write_all(terminal::before_output());
            let _ = self.out.write_all(&sanitize(line));
            let _ = self.out.write_all(b"\n");
            terminal::after_output(Some(b'\n'));
            let _ = self.out.flush();
            self.written += len;
        } else {
            self.dropped += len;
        }
    }
}

/// Guest text made safe for a terminal: control characters but newline and tab in caret
/// notation (`^[` for ESC, `^?` for DEL), everything else as it was.
pub fn sanitize(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let unsafe_byte = |b: u8| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f;
    if !bytes.iter().any(|&b| unsafe_byte(b)) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + 8);
    for &b in bytes {
        if unsafe_byte(b) {
            out.push(b'^');
            out.push(b ^ 0x40);
        } else {
            out.push(b);
        }
    }
    std::borrow::Cow::Owned(out)
}

impl<W: Write> Write for ConsoleOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let granted = self.bucket.take_at(buf.len() as u64, Instant::now()) as usize;
        if granted > 0 {
            // A closed stdout must not stop the guest: output is best effort.
            let _ = self.out.write_all(terminal::before_output());
            let _ = self.out.write_all(&sanitize(&buf[..granted]));
            terminal::after_output(buf[..granted].last().copied());
            if buf[..granted].contains(&b'\n') {
                let _ = self.out.flush();
            }
        }
        self.written += granted as u64;
        self.dropped += (buf.len() - granted) as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The serial device raises no interrupts: this VMM delivers none, and guests poll.
#[derive(Debug)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// COM1, shared by every vCPU.
pub struct SerialConsole<W: Write> {
    uart: Mutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleOut<W>>>,
}

impl<W: Write> SerialConsole<W> {
    /// The UART's registers and unread input, for a snapshot.
    pub fn state(&self) -> SerialRegs {
        let s = self.lock().state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// This console with its UART's registers set as a snapshot saved them (same output).
    pub fn restored(self, regs: &SerialRegs) -> Result<Self, String> {
        let out = self
            .uart
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_writer();
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: regs.baud_divisor_low,
            baud_divisor_high: regs.baud_divisor_high,
            interrupt_enable: regs.interrupt_enable,
            interrupt_identification: regs.interrupt_identification,
            line_control: regs.line_control,
            line_status: regs.line_status,
            modem_control: regs.modem_control,
            modem_status: regs.modem_status,
            scratch: regs.scratch,
            in_buffer: regs.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, NoInterrupt, vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("the serial port's state: {e:?}"))?;
        Ok(SerialConsole {
            uart: Mutex::new(uart),
        })
    }

    /// A console writing to `out`.
    pub fn new(out: W) -> Self {
        SerialConsole {
            uart: Mutex::new(Serial::new(NoInterrupt, ConsoleOut::new(out))),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleOut<W>>>
    {
        crate::sync::lock(&self.uart)
    }

    /// A guest write of `data` (one byte per register access) at register `offset`.
    pub fn write(&self, offset: u8, data: &[u8]) {
        let mut uart = self.lock();
        for &byte in data {
            // Writes to the transmit register go to ConsoleOut, which never fails.
            let _ = uart.write(offset, byte);
        }
    }

    /// A guest read of register `offset`, filling `data`.
    pub fn read(&self, offset: u8, data: &mut [u8]) {
        let mut uart = self.lock();
        for byte in data {
            *byte = uart.read(offset);
        }
    }

    /// `(bytes written, bytes dropped)` of guest output so far.
    pub fn output_stats(&self) -> (u64, u64) {
        let uart = self.lock();
        (uart.writer().written(), uart.writer().dropped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_grants_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1000);
        b.last = t0;
        assert_eq!(b.take_at(60, t0), 60);
        assert_eq!(b.take_at(60, t0), 40);
        assert_eq!(b.take_at(10, t0), 0);
        assert_eq!(b.take_at(50, t0 + Duration::from_millis(20)), 20);
        assert_eq!(
            b.take_at(500, t0 + Duration::from_secs(10)),
            100,
            "never above capacity"
        );
    }

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        assert_eq!(&*sanitize(b"plain\ttext\n"), b"plain\ttext\n");
        assert_eq!(&*sanitize(b"\x1b[2J\x07\r\x7f"), b"^[[2J^G^M^?");
        let console = SerialConsole::new(Vec::new());
        console.write(0, b"\x1b]0;title\x07");
        let out = console.lock().writer().out.clone();
        assert_eq!(out, b"^[]0;title^G");
        let mut lines = ConsoleOut::new(Vec::new());
        lines.write_line(b"\x1bc");
        assert_eq!(lines.out, b"^[c\n");
    }

    proptest::proptest! {
        /// Whatever a guest writes, what reaches the terminal holds no control character but
        /// newline and tab, and every other byte is kept.
        #[test]
        fn sanitized_text_is_inert(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let out = sanitize(&bytes);
            proptest::prop_assert!(out.iter().all(|&b| b >= 0x20 && b != 0x7f || b == b'\n' || b == b'\t'));
            let kept: Vec<u8> = bytes.iter().copied().filter(|&b| b >= 0x20 && b != 0x7f).collect();
            let shown: Vec<u8> = out.iter().copied().filter(|&b| b >= 0x20 && b != 0x7f).collect();
            proptest::prop_assert!(shown.len() >= kept.len());
        }
    }

    #[test]
    fn lines_pass_whole_or_not_at_all() {
        let mut lines = ConsoleOut::new(Vec::new());
        let line = vec![b'x'; 1000];
        let mut passed = 0;
        for _ in 0..200 {
            lines.write_line(&line);
            passed += 1;
            if lines.dropped() > 0 {
                break;
            }
        }
        assert!(
            lines.dropped() > 0,
            "200 KB of lines at once were not limited"
        );
        assert_eq!(lines.out.len() as u64, lines.written());
        assert_eq!(lines.written() % 1001, 0, "no line was cut");
        assert!(passed > 1);
    }

    #[test]
    fn flood_is_bounded_and_counted() {
        let console = SerialConsole::new(Vec::new());
        let chunk = vec![b'#'; 4096];
        for _ in 0..64 {
            console.write(0, &chunk);
        }
        let (written, dropped) = console.output_stats();
        assert_eq!(written + dropped, 64 * 4096);
        assert!(
            written < BURST_BYTES + RATE_BYTES_PER_SEC,
            "written {written}"
        );
        assert!(dropped > 0);
        assert_eq!(console.lock().writer().out.len() as u64, written);
    }
}
