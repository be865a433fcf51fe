//! What a run measured: per-vCPU exit counts and guest reports, and the JSON summary written
//! at exit (`--metrics PATH`). Later parts of the VMM add their own sections to the summary.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

pub use crate::files::{MetricsTarget, lines_path};
pub use vm_extents::stats::{Counter, Latencies, Percentiles, latency_histogram};

/// Most report ucalls kept per vCPU (keys are at most 256 bytes: about 300 KiB).
pub const MAX_REPORTS: usize = 1024;

/// Counters one vCPU thread keeps; owned by that thread, handed back when it ends.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct VcpuStats {
    /// The vCPU index.
    pub index: u32,
    /// Exits by reason (`io_out`, `io_in`, `mmio_read`, `hlt`...).
    pub exits: BTreeMap<&'static str, u64>,
    /// Sync ucalls seen.
    pub syncs: u64,
    /// Report ucalls, in order: `(key, value)`; at most [`MAX_REPORTS`].
    pub reports: Vec<(String, u64)>,
    /// Reports not kept because [`MAX_REPORTS`] were already.
    pub reports_dropped: u64,
    /// The code this vCPU ended with, if it sent done.
    pub exit_code: Option<u64>,
}

impl VcpuStats {
    /// Empty counters for vCPU `index`.
    pub fn new(index: u32) -> Self {
        VcpuStats {
            index,
            ..Default::default()
        }
    }

    /// Keeps a report, unless [`MAX_REPORTS`] are kept already (then it is only counted): a
    /// guest reporting in a loop must not grow the VMM's memory or its metrics file.
    pub fn add_report(&mut self, key: String, value: u64) {
        if self.reports.len() < MAX_REPORTS {
            self.reports.push((key, value));
        } else {
            self.reports_dropped += 1;
        }
    }

    /// Counts one exit of kind `reason`.
    pub fn count_exit(&mut self, reason: &'static str) {
        *self.exits.entry(reason).or_default() += 1;
    }

    /// The last value reported under `key`.
    pub fn report(&self, key: &str) -> Option<u64> {
        self.reports
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }
}

/// Writes `summary` as pretty JSON to the metrics target: a regular file is replaced
/// atomically, a stream (FIFO, character device) gets the text appended.
pub fn write_summary(target: &MetricsTarget, summary: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)? + "\n";
    match target {
        MetricsTarget::File(path) => write_file_atomically(path, text.as_bytes()),
        MetricsTarget::Stream { file, .. } => write_stream(file, text.as_bytes()),
    }
}

/// Writes `summary` as pretty JSON to a regular file at `path` (benchmarks' outputs).
pub fn write_json(path: &Path, summary: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)? + "\n";
    write_file_atomically(path, text.as_bytes())
}

fn write_file_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = crate::files::temporary_for(path);
    let result = std::fs::write(&tmp, bytes).and_then(|()| {
        crate::files::replace_with(&tmp, path, "--metrics").map_err(std::io::Error::other)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// How long a write to a metrics stream may wait for its reader before it is given up.
pub const STREAM_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes all of `bytes` to a non-blocking stream, waiting at most [`STREAM_WAIT`] in all for
/// a slow reader.
fn write_stream(mut file: &std::fs::File, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + STREAM_WAIT;
    while !bytes.is_empty() {
        match file.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::other(
                        "the metrics reader did not keep up (waited 1 s)",
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends `line` as one line of JSON: to `<path>.jsonl` for a metrics file, to the stream
/// itself for a FIFO or character device.
pub fn append_line(target: &MetricsTarget, line: &Value) -> std::io::Result<()> {
    let text = format!("{line}\n");
    match target {
        MetricsTarget::File(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(lines_path(path))?;
            file.write_all(text.as_bytes())
        }
        MetricsTarget::Stream { file, .. } => write_stream(file, text.as_bytes()),
    }
}

/// Merges the keys of `extra` (an object) into `summary` (an object), recursively.
pub fn merge(summary: &mut Value, extra: &Value) {
    if let (Some(dst), Some(src)) = (summary.as_object_mut(), extra.as_object()) {
        for (k, v) in src {
            match dst.get_mut(k) {
                Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                _ => {
                    dst.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// The `vcpus` section of the summary.
pub fn vcpus_json(vcpus: &[VcpuStats]) -> Value {
    Value::Array(
        vcpus
            .iter()
            .map(|v| {
                json!({
                    "index": v.index,
                    "exit_code": v.exit_code,
                    "exits": v.exits,
                    "syncs": v.syncs,
                    "reports_dropped": v.reports_dropped,
                    "reports": v.reports.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// p50, p99 and max of a histogram of nanoseconds, as JSON (see [`Percentiles`]).
pub fn percentiles(h: &hdrhistogram::Histogram<u64>) -> Value {
    serde_json::to_value(Percentiles::of(h)).expect("plain numbers serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_keep_the_last_value() {
        let mut s = VcpuStats::new(1);
        s.reports.push(("pages".into(), 1));
        s.reports.push(("pages".into(), 2));
        assert_eq!(s.report("pages"), Some(2));
        assert_eq!(s.report("cycles"), None);
        s.count_exit("io_out");
        s.count_exit("io_out");
        assert_eq!(vcpus_json(&[s])[0]["exits"]["io_out"], 2);
    }
}
