//! Benchmarks: guest demand paging (`vmm bench faults`), huge-page collapse
//! (`vmm bench collapse`), restores (`vmm bench restore`) and reclaim (`vmm bench reclaim`),
//! each measured side by side with baselines in the same run, because
//! the machines these run on are shared and noisy. Every figure a benchmark prints is also in
//! its JSON output, and every ratio is computed from figures it printed.

pub mod collapse;
pub mod faults;
pub mod memcg;
pub mod plot;
pub mod reclaim;
pub mod restore;
pub mod resume;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_extents::host_view;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::config::VmConfig;
use crate::devices::Devices;
use crate::vm::{Outcome, RunSummary, Vm, VmError};

/// Errors from a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VM could not be built or run.
    #[error("{what}")]
    Vm {
        /// Which run.
        what: String,
        /// The VM's error.
        #[source]
        source: VmError,
    },
    /// A guest did not finish cleanly.
    #[error("{what}: {outcome}")]
    Guest {
        /// Which run.
        what: String,
        /// The outcome, for the user.
        outcome: String,
    },
    /// Writing an output file failed.
    #[error("cannot write {}", path.display())]
    Output {
        /// The file named.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// Preparing the benchmark failed.
    #[error("{0}")]
    Setup(String),
    /// An option the user gave cannot be measured with.
    #[error("{0}")]
    BadInput(String),
    /// An output path the user gave cannot be written.
    #[error(transparent)]
    OutputPath(Box<crate::files::FileError>),
}

impl From<crate::files::FileError> for BenchError {
    fn from(e: crate::files::FileError) -> Self {
        BenchError::OutputPath(Box::new(e))
    }
}

impl BenchError {
    /// Whether it is the user's input that is wrong (exit 203), not a failure while running.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, BenchError::BadInput(_) | BenchError::OutputPath(_))
    }
}

/// Checks `--json` and `--plot` before anything runs: each a regular file or missing (never a
/// link, a device, a directory), in a writable directory, with a name that fits; a plot must
/// be named `.svg` (plots are drawn as SVG).
pub fn check_outputs(json: Option<&Path>, plot: Option<&Path>) -> Result<(), BenchError> {
    if let Some(path) = json {
        crate::files::ImageTarget::check("--json", path, 0)?;
    }
    if let Some(path) = plot {
        if path.extension().and_then(|e| e.to_str()) != Some("svg") {
            return Err(BenchError::BadInput(format!(
                "--plot {}: plots are drawn as SVG; name a .svg file (convert it to PNG with \
                 any SVG viewer, for example `rsvg-convert -o plot.png {}`)",
                path.display(),
                path.display()
            )));
        }
        crate::files::ImageTarget::check("--plot", path, 0)?;
    }
    Ok(())
}

/// Writes a finished benchmark's JSON and plot, where asked for.
pub fn write_outputs(
    json_to: Option<&Path>,
    plot_to: Option<&Path>,
    json: &Value,
) -> Result<(), BenchError> {
    if let Some(path) = json_to {
        write_json(path, json)?;
    }
    if let Some(path) = plot_to {
        plot::draw(path, json)?;
    }
    Ok(())
}

/// A directory of a benchmark's own for its scratch files (images, sockets), made fresh for
/// the run (mode 0700, never one that exists already) and removed with all it holds when
/// dropped, so two benchmarks at once never share a file and nobody else can plant one.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Makes `vmm-bench-PID-N` in `parent`.
    pub fn create(parent: &Path) -> Result<Self, BenchError> {
        use std::os::unix::fs::DirBuilderExt;
        for n in 0u32.. {
            let path = parent.join(format!("vmm-bench-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(ScratchDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => {}
                Err(e) => {
                    return Err(BenchError::Setup(format!(
                        "cannot make a scratch directory in {}: {e}",
                        parent.display()
                    )));
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("removing the scratch directory {}: {e}", self.0.display());
        }
    }
}

/// Builds and runs one VM with guest output discarded, and checks that the guest finished
/// with code 0.
pub fn run_vm(what: &str, config: VmConfig) -> Result<RunSummary, BenchError> {
    let vm = Vm::build(config, quiet_devices()).map_err(|source| BenchError::Vm {
        what: what.into(),
        source,
    })?;
    finish(what, vm.run())
}

/// What a guest's run looked like from the host while it ran: resident and 2 MiB-mapped guest
/// RAM sampled every few milliseconds until the guest ended (teardown is not sampled).
pub struct Sampled {
    /// The run's summary, checked by [`finish`].
    pub summary: RunSummary,
    /// `[ms since start, resident MiB, huge MiB]`.
    pub series: Vec<Value>,
    /// The host ranges mapped huge at the last sample before the guest ended.
    pub last_huge: Vec<std::ops::Range<u64>>,
    /// Guest RAM's host range.
    pub range: std::ops::Range<u64>,
}

/// Runs `vm` to its end on a thread of its own, sampling what the kernel maps of guest RAM
/// from `started` on.
pub fn run_sampled(what: &str, vm: Vm, started: Instant) -> Result<Sampled, BenchError> {
    run_sampled_with(what, vm, started, &mut || {})
}

/// [`run_sampled`], calling `each_sample` after every sample (on the sampling thread).
pub fn run_sampled_with(
    what: &str,
    vm: Vm,
    started: Instant,
    each_sample: &mut dyn FnMut(),
) -> Result<Sampled, BenchError> {
    let range = vm.ram_host_range();
    let range = range.start.raw()..range.end.raw();
    let done = Arc::new(AtomicBool::new(false));
    let runner = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = vm.run();
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let scan = |mask| match host_view::scan(range.start, range.end, mask) {
        Ok(Some(r)) => r,
        _ => Vec::new(),
    };
    // The latest samples' huge ranges, to pick the last one before the guest ended.
    let mut recent: std::collections::VecDeque<(f64, Vec<std::ops::Range<u64>>)> =
        std::collections::VecDeque::new();
    let mut series = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let bytes = |r: &[std::ops::Range<u64>]| r.iter().map(|r| r.end - r.start).sum::<u64>();
        let huge = scan(host_view::PAGE_IS_HUGE);
        let present = bytes(&scan(host_view::PAGE_IS_PRESENT));
        series.push(serde_json::json!([ms, present >> 20, bytes(&huge) >> 20]));
        recent.push_back((ms, huge));
        if recent.len() > 400 {
            recent.pop_front();
        }
        each_sample();
        std::thread::sleep(Duration::from_millis(5));
    }
    let summary = finish(
        what,
        runner
            .join()
            .map_err(|_| BenchError::Setup("the VM thread panicked".into()))?,
    )?;
    // What was sampled after the guest ended is teardown.
    let end_ms = (summary.to_first_instruction + summary.guest).as_secs_f64() * 1e3;
    series.retain(|p| p[0].as_f64().is_some_and(|t| t <= end_ms));
    let last_huge = recent
        .into_iter()
        .rev()
        .find(|(ms, _)| *ms <= end_ms)
        .map(|(_, huge)| huge)
        .unwrap_or_default();
    Ok(Sampled {
        summary,
        series,
        last_huge,
        range,
    })
}

/// Devices that swallow guest output: benchmarks read guest reports from the summary.
pub fn quiet_devices() -> Devices {
    Devices::new(Box::new(std::io::sink()), Box::new(std::io::sink()))
}

/// Checks a finished run.
pub fn finish(what: &str, result: Result<RunSummary, VmError>) -> Result<RunSummary, BenchError> {
    let summary = result.map_err(|source| BenchError::Vm {
        what: what.into(),
        source,
    })?;
    match &summary.outcome {
        Outcome::Done(0) => Ok(summary),
        other => Err(BenchError::Guest {
            what: what.into(),
            outcome: other.describe(),
        }),
    }
}

/// A progress bar on stderr while a benchmark runs, drawn only when stderr is a terminal.
pub fn progress(steps: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A run that did not give figures: what, where in the sweep, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// The mode or variant.
    pub mode: String,
    /// Where in the sweep (the vCPU count, the allocation latency, the image).
    pub at: String,
    /// What went wrong.
    pub reason: String,
}

/// A benchmark's progress and what became of its runs beyond their figures: which failed
/// and why, and whether a signal cut it short. A failed mode is run no more at that point of
/// the sweep and the others go on; a signal (SIGINT, SIGTERM) ends the benchmark after the
/// run it interrupted, whose figures are dropped, and what was finished is still reported.
/// On a terminal it draws a progress bar; elsewhere it prints a line per finished run.
pub struct Record {
    name: &'static str,
    bar: ProgressBar,
    terminal: bool,
    failed: Vec<Failure>,
    interrupted: Option<i32>,
}

impl Record {
    /// A record for benchmark `name`, which will make `steps` runs.
    pub fn new(name: &'static str, steps: u64) -> Record {
        use std::io::IsTerminal;
        Record {
            name,
            bar: progress(steps, name),
            terminal: std::io::stderr().is_terminal(),
            failed: Vec::new(),
            interrupted: None,
        }
    }

    /// Whether the benchmark is to stop: a signal came.
    pub fn stopped(&mut self) -> bool {
        if self.interrupted.is_none() {
            self.interrupted = crate::signals::requested();
        }
        self.interrupted.is_some()
    }

    /// Runs one step that is not a mode (a setup, a floor), saying what it is.
    pub fn step<T>(
        &mut self,
        what: &str,
        f: impl FnOnce() -> Result<T, BenchError>,
    ) -> Result<T, BenchError> {
        self.bar.set_message(what.to_string());
        let started = std::time::Instant::now();
        let result = f();
        self.bar.inc(1);
        if !self.terminal && result.is_ok() {
            eprintln!(
                "vmm bench {}: {what}: done in {:.1} s",
                self.name,
                started.elapsed().as_secs_f64()
            );
        }
        result
    }

    /// Runs `rounds` rounds of every row (interleaved, A B C A B C ..., so that none always
    /// meets the machine in the same state), at point `at` of the sweep, and returns each
    /// row's figures, one per round it finished. A row whose run fails is recorded with the
    /// reason and runs no more here; a signal stops all of it.
    pub fn rounds<R, S>(
        &mut self,
        at: &str,
        rounds: u32,
        rows: &[R],
        label: impl Fn(&R) -> String,
        mut sample: impl FnMut(&R) -> Result<S, BenchError>,
    ) -> Vec<Vec<S>> {
        let mut samples: Vec<Vec<S>> = rows.iter().map(|_| Vec::new()).collect();
        let mut failed = vec![false; rows.len()];
        for round in 1..=rounds {
            for (i, row) in rows.iter().enumerate() {
                if failed[i] {
                    self.bar.inc(1);
                    continue;
                }
                if self.stopped() {
                    return samples;
                }
                let name = label(row);
                self.bar.set_message(format!("{name} {at}"));
                let started = std::time::Instant::now();
                let result = sample(row);
                self.bar.inc(1);
                match result {
                    Ok(s) => {
                        samples[i].push(s);
                        if !self.terminal {
                            eprintln!(
                                "vmm bench {}: {name} ({at}), round {round} of {rounds}: done in \
                                 {:.1} s",
                                self.name,
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    // Interrupted: its figures are not whole, and the benchmark stops.
                    Err(_) if self.stopped() => return samples,
                    Err(e) => {
                        let reason = crate::error::chain(&e);
                        self.bar.suspend(|| {
                            eprintln!(
                                "vmm bench {}: {name} ({at}) failed: {reason}; going on without \
                                 it",
                                self.name
                            )
                        });
                        self.failed.push(Failure {
                            mode: name,
                            at: at.into(),
                            reason,
                        });
                        failed[i] = true;
                    }
                }
            }
        }
        samples
    }

    /// Records a failure outside [`Record::rounds`] (a setup that a point of the sweep needs).
    pub fn fail(&mut self, mode: &str, at: &str, e: &BenchError) {
        let reason = crate::error::chain(e);
        self.bar
            .suspend(|| eprintln!("vmm bench {}: {mode} ({at}) failed: {reason}", self.name));
        self.failed.push(Failure {
            mode: mode.into(),
            at: at.into(),
            reason,
        });
    }

    /// Prints (a table) without the progress bar in the way.
    pub fn print(&self, f: impl FnOnce()) {
        self.bar.suspend(f);
    }

    /// Ends the record: the bar goes, and `json` gains `partial`, `interrupted_by_signal` and
    /// `failed`.
    pub fn finish(self, mut json: Value) -> Value {
        self.bar.finish_and_clear();
        json["partial"] = Value::Bool(self.interrupted.is_some());
        json["interrupted_by_signal"] = serde_json::json!(self.interrupted);
        json["failed"] = serde_json::json!(self.failed);
        if let Some(sig) = self.interrupted {
            eprintln!(
                "vmm bench {}: stopped by signal {sig}; what was finished is reported, marked \
                 partial",
                self.name
            );
        }
        json
    }
}

/// How a finished benchmark ends: 130 or 143 if a signal cut it short, 204 if a mode failed,
/// else 0.
pub fn exit_code(json: &Value) -> u8 {
    if let Some(sig) = json["interrupted_by_signal"].as_i64() {
        return crate::signals::exit_code(sig as i32);
    }
    match json["failed"].as_array() {
        Some(failed) if !failed.is_empty() => {
            eprintln!(
                "vmm bench: {} run(s) failed (the JSON's `failed` says which and why)",
                failed.len()
            );
            crate::error::exit_code::VMM_FAILED
        }
        _ => 0,
    }
}

/// A figure for a table: `-` where there is none (no run finished, a ratio to nothing), never
/// `NaN`.
pub fn figure(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

/// Pins the calling thread, and every thread it starts later, to `cpus`.
pub fn pin_to_cpus(cpus: &[usize]) -> Result<(), BenchError> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(BenchError::Setup(format!("CPU {cpu} is out of range")));
        }
        // SAFETY: `cpu` is within the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sets this thread's affinity from a valid set of the right size.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(BenchError::Setup(format!(
            "cannot pin to CPUs {cpus:?}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The median of `values` (0 for none).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &Value) -> Result<(), BenchError> {
    crate::metrics::write_json(path, value).map_err(|source| BenchError::Output {
        path: path.into(),
        source,
    })
}

/// Formats nanoseconds as microseconds with one decimal.
pub fn us(ns: f64) -> String {
    format!("{:.1}", ns / 1000.0)
}

/// A duration in milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }
}
