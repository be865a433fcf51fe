//! The live status line `vmm run` keeps on a terminal while a run lasts: guest time, vCPU exits
//! per second, faults served, extents mapped huge, resident MiB. It appears once a run has
//! lasted [`AFTER`], is redrawn every [`EVERY`] in place on stderr, and is erased when the run
//! ends. Off a terminal it never appears (logs and pipes get no control characters).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::devices::serial::terminal;
use vm_extents::MemoryReport;

/// How long a run lasts before the line appears.
pub const AFTER: Duration = Duration::from_secs(2);
/// How often it is redrawn.
pub const EVERY: Duration = Duration::from_secs(1);

/// The line, if stderr is a terminal.
pub struct LiveStatus {
    on: bool,
    /// Whether guest output goes to a terminal too (then it erases the line before it).
    shared: bool,
    started: Instant,
    drawn: Option<(Instant, u64)>,
}

impl LiveStatus {
    /// A line for a run that starts now; off unless stderr is a terminal.
    pub fn new() -> Self {
        LiveStatus {
            on: std::io::stderr().is_terminal(),
            shared: std::io::stdout().is_terminal(),
            started: Instant::now(),
            drawn: None,
        }
    }

    /// Whether it is time to draw the line (the caller then gathers the figures).
    pub fn due(&self) -> bool {
        self.on
            && self.started.elapsed() >= AFTER
            && self.drawn.is_none_or(|(at, _)| at.elapsed() >= EVERY)
            && (!self.shared || terminal::at_line_start())
    }

    /// Draws the line from `exits` (all vCPUs' exits so far) and `memory`.
    pub fn draw(&mut self, exits: u64, memory: &MemoryReport) {
        let now = Instant::now();
        let rate = match self.drawn {
            Some((at, before)) => exits.saturating_sub(before) as f64 / (now - at).as_secs_f64(),
            None => exits as f64 / self.started.elapsed().as_secs_f64(),
        };
        self.drawn = Some((now, exits));
        let extents = &memory.memory.extents;
        let faults = match memory.memory.page_source {
            "kernel" => String::new(),
            _ => format!("{} faults served, ", memory.faults.stats.served.get()),
        };
        let line = format!(
            "vmm: {:.0} s, {} vCPU exits/s, {faults}{} of {} extents 2 MiB pages, {} MiB \
             resident",
            self.started.elapsed().as_secs_f64(),
            compact(rate),
            extents.counts.huge,
            extents.total,
            memory.kernel.smaps.rss_kb >> 10,
        );
        // Carriage return and erase-line: the line is rewritten where it stands.
        let _ = write!(std::io::stderr(), "\r\x1b[2K{line}");
        if self.shared {
            terminal::status_shown();
        }
    }

    /// Erases the line, if it was drawn.
    pub fn clear(&mut self) {
        if self.drawn.take().is_some() {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}

impl Drop for LiveStatus {
    fn drop(&mut self) {
        self.clear();
    }
}

fn compact(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}
