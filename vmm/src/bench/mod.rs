//! Benchmarks: guest demand paging (`vmm bench faults`) and huge-page collapse
//! (`vmm bench collapse`), each measured side by side with baselines in the same run, because
//! the machines these run on are shared and noisy. Every figure a benchmark prints is also in
//! its JSON output, and every ratio is computed from figures it printed.

pub mod collapse;
pub mod faults;
pub mod plot;
pub mod restore;

use std::path::{Path, PathBuf};
use std::time::Duration;

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
