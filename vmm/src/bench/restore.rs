//! `vmm bench restore`: a guest fills its RAM (all of it, `dense`, or the first quarter,
//! `sparse`) and saves it to an image; the image is then restored in each mode and the
//! restored guest checks a working set (`verify mode=check pattern=random` over a fraction of
//! what was filled), timing every access. Modes: `eager` (the whole image read into THP-backed
//! RAM before the guest starts), `lazy-4k` (4 KiB per fault), `lazy-2m` (a whole extent per
//! fault), `prefetch` (2 MiB per fault, and the prefetcher filling the rest behind the guest),
//! `external` and `external-2m` (guest RAM handed over Firecracker's way to `vmm uffd-serve`,
//! another process, serving the image exported raw 4 KiB or 2 MiB per fault).
//! While each guest runs, the benchmark samples how much of RAM is resident and how much is
//! mapped huge, for the times until all of it is and the plot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE};
use serde_json::{Value, json};

use super::{BenchError, Record, median, quiet_devices, run_sampled, run_vm};
use crate::config::{Collapse, GuestArg, VmConfig};
use crate::units::ByteSize;
use crate::vm::Vm;
use vm_extents::PoolKind;
use vm_extents::{Backing, PageSourceKind, Restore};

/// How a restore is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read it all in before the guest starts.
    Eager,
    /// 4 KiB per fault.
    Lazy4k,
    /// A whole extent per fault.
    Lazy2m,
    /// A whole extent per fault and the prefetcher behind the guest.
    Prefetch,
    /// Handed over Firecracker's way to `vmm uffd-serve` (another process), 4 KiB per fault.
    External,
    /// As `External`, the server resolving 2 MiB per fault.
    External2m,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 6] = [
        Mode::Eager,
        Mode::Lazy4k,
        Mode::Lazy2m,
        Mode::Prefetch,
        Mode::External,
        Mode::External2m,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Lazy4k => "lazy-4k",
            Mode::Lazy2m => "lazy-2m",
            Mode::Prefetch => "prefetch",
            Mode::External => "external",
            Mode::External2m => "external-2m",
        }
    }

    /// The page server's granularity, for the modes served by `vmm uffd-serve`.
    fn external(self) -> Option<&'static str> {
        match self {
            Mode::External => Some("4K"),
            Mode::External2m => Some("2M"),
            _ => None,
        }
    }
}

impl clap::ValueEnum for Mode {
    fn value_variants<'a>() -> &'a [Self] {
        &Mode::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// How much of RAM the saved guest filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Density {
    /// All of it.
    Dense,
    /// The first quarter; the rest are holes in the image.
    Sparse,
}

impl Density {
    fn fraction(self) -> f64 {
        match self {
            Density::Dense => 1.0,
            Density::Sparse => 0.25,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Density::Dense => "dense",
            Density::Sparse => "sparse",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct RestoreBenchConfig {
    /// Guest RAM.
    pub memory: ByteSize,
    /// Densities of the saved image.
    pub densities: Vec<Density>,
    /// Modes (empty: all).
    pub modes: Vec<Mode>,
    /// Fraction of the filled memory the restored guest checks.
    pub working_set: f64,
    /// Drop the image from the page cache before each restore (cold), else warm.
    pub cold: bool,
    /// Added to every read of the image.
    pub image_latency: Duration,
    /// Prefetch threads in the `prefetch` mode.
    pub prefetch_threads: usize,
    /// Rounds, modes interleaved.
    pub repeat: u32,
    /// Where the images go.
    pub scratch: PathBuf,
}

impl RestoreBenchConfig {
    /// Guest-physical bytes the guest programs may use (RAM above the load area).
    fn free(&self) -> u64 {
        self.memory.0 - LOAD_BASE - EXTENT_SIZE
    }

    fn filled(&self, d: Density) -> u64 {
        ((self.free() as f64 * d.fraction()) as u64) & !(EXTENT_SIZE - 1)
    }

    fn checked(&self, d: Density) -> u64 {
        ((self.filled(d) as f64 * self.working_set) as u64) & !(EXTENT_SIZE - 1)
    }

    fn socket(&self, d: Density) -> PathBuf {
        self.scratch.join(format!(
            "bench-restore-{}-{}.sock",
            d.name(),
            std::process::id()
        ))
    }

    fn raw(&self, d: Density) -> PathBuf {
        self.scratch.join(format!("bench-restore-{}.raw", d.name()))
    }

    fn vm_config(&self, mode: Mode, d: Density, image: &Path) -> VmConfig {
        let arg = |k: &str, v: String| GuestArg {
            key: k.into(),
            value: v,
        };
        let (backing, restore, granularity, prefetch) = match mode {
            Mode::Eager => (Backing::Thp, Restore::Eager, 4096, None),
            Mode::Lazy4k => (Backing::Small, Restore::Lazy, 4096, Some(false)),
            Mode::Lazy2m => (Backing::Small, Restore::Lazy, EXTENT_SIZE, Some(false)),
            Mode::Prefetch => (Backing::Small, Restore::Lazy, EXTENT_SIZE, Some(true)),
            Mode::External | Mode::External2m => (Backing::Small, Restore::Lazy, 4096, None),
        };
        let page_source = match mode.external() {
            Some(_) => PageSourceKind::External(self.socket(d)),
            None => PageSourceKind::Image(image.into()),
        };
        VmConfig {
            guest: "verify".into(),
            memory: self.memory,
            args: vec![
                arg("mode", "check".into()),
                arg("pattern", "random".into()),
                arg("size", self.checked(d).to_string()),
                arg("timing", "on".into()),
            ],
            backing,
            page_source,
            restore,
            prefetch: prefetch.filter(|_| backing == Backing::Small),
            fault_granularity: ByteSize(granularity),
            collapse: Collapse::Off,
            huge_source: PoolKind::Thp,
            prefetch_threads: self.prefetch_threads,
            seccomp: crate::seccomp::Seccomp::Off,
            ..VmConfig::default()
        }
    }
}

/// Drops `path`'s pages from the page cache (no root needed: advice on our own file).
pub(crate) fn drop_from_cache(path: &Path) -> Result<(), BenchError> {
    let file = File::open(path)
        .map_err(|e| BenchError::Setup(format!("cannot open {}: {e}", path.display())))?;
    file.sync_all()
        .map_err(|e| BenchError::Setup(format!("cannot sync {}: {e}", path.display())))?;
    // SAFETY: advice on an open descriptor we own; it changes no data.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(BenchError::Setup(format!(
            "cannot drop {} from the page cache: {}",
            path.display(),
            std::io::Error::from_raw_os_error(r)
        )));
    }
    Ok(())
}

/// A plain sequential read of the whole file (`cat file > /dev/null`), in bytes per second.
fn read_bandwidth(path: &Path) -> Result<f64, BenchError> {
    use std::io::Read;
    let mut file = File::open(path)
        .map_err(|e| BenchError::Setup(format!("cannot open {}: {e}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let (start, mut total) = (Instant::now(), 0u64);
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| BenchError::Setup(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// One restore: the run's figures, and resident / huge bytes sampled over time.
fn restore_once(
    config: &RestoreBenchConfig,
    mode: Mode,
    d: Density,
    image: &Path,
) -> Result<Value, BenchError> {
    let server = match mode.external() {
        Some(granularity) => Some(PageServer::start(config, d, granularity)?),
        None => {
            if config.cold {
                drop_from_cache(image)?;
            }
            None
        }
    };
    let started = Instant::now();
    // Slower storage than this host's, under every read of the image.
    let latency = config.image_latency;
    let tune = move |memory: vm_extents::MemoryBuilder| {
        memory.image_source_layer(move |source| crate::storage::SlowSource::wrap(source, latency))
    };
    let vm = Vm::build_with(config.vm_config(mode, d, image), quiet_devices(), tune).map_err(
        |source| BenchError::Vm {
            what: mode.name().into(),
            source,
        },
    )?;
    let sampled = run_sampled(mode.name(), vm, started)?;
    let data = config.filled(d);
    let reached = |i: usize| {
        sampled
            .series
            .iter()
            .find(|p| p[i].as_u64().is_some_and(|mib| mib << 20 >= data))
            .and_then(|p| p[0].as_f64())
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
    };
    let (resident_at, huge_at) = (reached(1), reached(2));
    let summary = sampled.summary;
    let series = sampled.series;
    let j = summary.to_json();
    let mismatches: u64 = summary
        .vcpus
        .iter()
        .filter_map(|v| v.report("mismatches"))
        .sum();
    let stalls = summary.guest_stalls();
    let first = summary.to_first_instruction;
    let (faults, bytes_read, served) = match server {
        Some(server) => {
            let served = server.finish()?;
            (
                served["faults"].clone(),
                served["file_bytes_read"].clone(),
                served,
            )
        }
        None => (
            j["faults"]["served"].clone(),
            j["restore"]["image_bytes_read"].clone(),
            Value::Null,
        ),
    };
    Ok(json!({
        "mode": mode.name(),
        "to_first_instruction_ns": first.as_nanos() as u64,
        "to_guest_end_ns": (first + summary.guest).as_nanos() as u64,
        "vcpu_faults": faults,
        "guest_stall_ns": stalls.as_ref().map(|g| json!({ "p99": g.p99_ns, "max": g.max_ns })),
        "all_resident_ns": resident_at.map(|t| t.as_nanos() as u64),
        "all_huge_ns": huge_at.map(|t| t.as_nanos() as u64),
        "huge_extents_at_end": j["memory"]["extents"]["huge"],
        "bytes_read": bytes_read,
        "prefetch": j["restore"]["prefetch"],
        "page_server": served,
        "mismatches": mismatches,
        "series_ms_mib_huge_mib": series,
    }))
}

/// `vmm uffd-serve` serving the raw image for one external restore.
struct PageServer {
    child: std::process::Child,
    metrics: PathBuf,
}

impl PageServer {
    fn start(
        config: &RestoreBenchConfig,
        d: Density,
        granularity: &str,
    ) -> Result<Self, BenchError> {
        let (raw, socket) = (config.raw(d), config.socket(d));
        if config.cold {
            drop_from_cache(&raw)?;
        }
        let metrics = config
            .scratch
            .join(format!("bench-restore-served-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::Setup(format!("cannot find the vmm binary: {e}")))?;
        let child = std::process::Command::new(exe)
            .arg("uffd-serve")
            .arg(&socket)
            .arg(&raw)
            .args([
                "--granularity",
                granularity,
                "--kill-peer",
                "off",
                "--image-latency",
            ])
            .arg(config.image_latency.as_micros().to_string())
            .arg("--metrics")
            .arg(&metrics)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Setup(format!("cannot start vmm uffd-serve: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&socket).is_err() {
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "vmm uffd-serve never listened on {}",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(PageServer { child, metrics })
    }

    /// Waits for the server to end (the VM is gone) and returns what it served.
    fn finish(mut self) -> Result<Value, BenchError> {
        let status = self
            .child
            .wait()
            .map_err(|e| BenchError::Setup(format!("waiting for vmm uffd-serve: {e}")))?;
        if !status.success() {
            return Err(BenchError::Setup(format!(
                "vmm uffd-serve failed: {status}"
            )));
        }
        let text = std::fs::read_to_string(&self.metrics)
            .map_err(|e| BenchError::Setup(format!("reading what vmm uffd-serve served: {e}")))?;
        let _ = std::fs::remove_file(&self.metrics);
        serde_json::from_str(&text)
            .map_err(|e| BenchError::Setup(format!("vmm uffd-serve's metrics: {e}")))
    }
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |ns| format!("{:.0}", ns / 1e6))
}

/// The smallest guest RAM worth measuring a restore in: a sparse image (a quarter of the
/// RAM free above the program) fills at least one extent.
pub const MIN_MEMORY: u64 = LOAD_BASE + EXTENT_SIZE + 4 * EXTENT_SIZE;

/// Runs the benchmark, prints a table per density, and returns every figure as JSON.
pub fn run(config: &RestoreBenchConfig) -> Result<Value, BenchError> {
    let scratch = super::ScratchDir::create(&config.scratch)?;
    let config = &RestoreBenchConfig {
        scratch: scratch.path().into(),
        ..config.clone()
    };
    let modes = if config.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        config.modes.clone()
    };
    let steps = config.densities.len() as u64 * (1 + u64::from(config.repeat) * modes.len() as u64);
    let mut record = Record::new("restore", steps);
    let mut tables = Vec::new();
    for &d in &config.densities {
        if record.stopped() {
            break;
        }
        let image = config
            .scratch
            .join(format!("bench-restore-{}.img", d.name()));
        let at = format!("{} image", d.name());
        let cat = match record.step(&format!("saving a {} image", d.name()), || {
            prepare_image(config, d, &image, &modes)
        }) {
            Ok(cat) => cat,
            Err(e) => {
                record.fail("saving the image", &at, &e);
                continue;
            }
        };
        let rounds = record.rounds(
            &at,
            config.repeat.max(1),
            &modes,
            |m| m.name().into(),
            |&mode| restore_once(config, mode, d, &image),
        );
        let _ = std::fs::remove_file(&image);
        let _ = std::fs::remove_file(config.raw(d));
        record.print(|| tables.push(report(config, d, &modes, &rounds, cat)));
    }
    Ok(record.finish(json!({
        "benchmark": "restore",
        "memory_bytes": config.memory.0,
        "working_set": config.working_set,
        "cache": if config.cold { "cold" } else { "warm" },
        "image_latency_us": config.image_latency.as_secs_f64() * 1e6,
        "prefetch_threads": config.prefetch_threads,
        "repeat": config.repeat.max(1),
        "tables": tables,
    })))
}

/// Saves the image a density's restores read (and its raw export, for the external modes),
/// and returns a plain sequential read's bandwidth of it.
fn prepare_image(
    config: &RestoreBenchConfig,
    d: Density,
    image: &Path,
    modes: &[Mode],
) -> Result<f64, BenchError> {
    let save = VmConfig {
        guest: "verify".into(),
        memory: config.memory,
        args: vec![
            GuestArg {
                key: "mode".into(),
                value: "fill".into(),
            },
            GuestArg {
                key: "size".into(),
                value: config.filled(d).to_string(),
            },
        ],
        collapse: Collapse::Off,
        save_memory: Some(image.into()),
        seccomp: crate::seccomp::Seccomp::Off,
        ..VmConfig::default()
    };
    run_vm("saving the image", save)?;
    if config.cold {
        drop_from_cache(image)?;
    }
    let cat = read_bandwidth(image)?;
    if modes.iter().any(|m| m.external().is_some()) {
        vm_extents::ram_image::convert(image, &config.raw(d), true)
            .map_err(|e| BenchError::Setup(format!("exporting the image raw: {e}")))?;
    }
    Ok(cat)
}

/// The median of `key` over `rounds` (absent if any round lacks it).
fn med(rounds: &[Value], key: &str) -> Value {
    let mut v: Vec<f64> = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
    if v.is_empty() || v.len() < rounds.len() {
        return Value::Null;
    }
    json!(median(&mut v))
}

fn report(
    config: &RestoreBenchConfig,
    d: Density,
    modes: &[Mode],
    rounds: &[Vec<Value>],
    cat: f64,
) -> Value {
    println!(
        "vmm bench restore: {} image of {} ({} filled), working set {:.0}% checked at random, {} cache, image latency {} us, {} round(s), medians",
        d.name(),
        config.memory,
        ByteSize(config.filled(d)),
        config.working_set * 100.0,
        if config.cold { "cold" } else { "warm" },
        config.image_latency.as_micros(),
        config.repeat.max(1)
    );
    println!(
        "{:<11} {:>9} {:>9} {:>8} {:>16} {:>10} {:>9} {:>8} {:>9} {:>5}",
        "mode",
        "1st ms",
        "end ms",
        "faults",
        "stall p99/max us",
        "resident",
        "all huge",
        "huge end",
        "read MiB",
        "bad"
    );
    let mut rows = Vec::new();
    for (i, &mode) in modes.iter().enumerate() {
        let r = &rounds[i];
        let stall = |k: &str| {
            let mut v: Vec<f64> = r
                .iter()
                .filter_map(|x| x["guest_stall_ns"][k].as_f64())
                .collect();
            (!v.is_empty()).then(|| median(&mut v))
        };
        let row = json!({
            "mode": mode.name(),
            "to_first_instruction_ns": med(r, "to_first_instruction_ns"),
            "to_guest_end_ns": med(r, "to_guest_end_ns"),
            "vcpu_faults": med(r, "vcpu_faults"),
            "guest_stall_ns": { "p99": stall("p99"), "max": stall("max") },
            "all_resident_ns": med(r, "all_resident_ns"),
            "all_huge_ns": med(r, "all_huge_ns"),
            "huge_extents_at_end": med(r, "huge_extents_at_end"),
            "bytes_read": med(r, "bytes_read"),
            "mismatches": r.iter().filter_map(|x| x["mismatches"].as_u64()).sum::<u64>(),
            "rounds": r,
        });
        println!(
            "{:<11} {:>9} {:>9} {:>8} {:>16} {:>10} {:>9} {:>8} {:>9} {:>5}",
            mode.name(),
            ms(&row["to_first_instruction_ns"]),
            ms(&row["to_guest_end_ns"]),
            row["vcpu_faults"]
                .as_f64()
                .map_or("-".into(), |f| format!("{f:.0}")),
            match (stall("p99"), stall("max")) {
                (Some(a), Some(b)) => format!("{:.0}/{:.0}", a / 1e3, b / 1e3),
                _ => "n/a".into(),
            },
            ms(&row["all_resident_ns"]),
            ms(&row["all_huge_ns"]),
            row["huge_extents_at_end"]
                .as_f64()
                .map_or("-".into(), |f| format!("{f:.0}")),
            row["bytes_read"]
                .as_f64()
                .map_or("-".into(), |b| format!("{:.0}", b / 1048576.0)),
            row["mismatches"],
        );
        rows.push(row);
    }
    let prefetch_bw = rounds
        .iter()
        .flatten()
        .filter(|r| r["mode"] == "prefetch")
        .filter_map(|r| {
            let p = &r["prefetch"];
            let (bytes, ns) = (p["bytes_read"].as_f64()?, p["done_ns"].as_f64()?);
            (ns > 0.0).then_some(bytes / (ns / 1e9))
        })
        .collect::<Vec<_>>();
    let prefetch_bw = (!prefetch_bw.is_empty()).then(|| median(&mut prefetch_bw.clone()));
    println!(
        "image reads: a plain sequential read of the file {:.0} MiB/s{}\n",
        cat / 1048576.0,
        prefetch_bw.map_or(String::new(), |b| format!(
            "; the prefetcher {:.0} MiB/s ({:.2}x)",
            b / 1048576.0,
            b / cat
        ))
    );
    json!({
        "density": d.name(),
        "filled_bytes": config.filled(d),
        "checked_bytes": config.checked(d),
        "cat_bytes_per_sec": cat,
        "prefetch_bytes_per_sec": prefetch_bw,
        "modes": rows,
    })
}
