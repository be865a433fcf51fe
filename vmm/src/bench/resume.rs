//! `vmm bench resume`: a `touch` guest fills its RAM and asks for a snapshot; resumed, it reads
//! a chosen share of its RAM in whole extents (the first ones, `seq`, or extents picked at
//! random in a random order, `random`) and ends. Each mode resumes the snapshot in `N` VMM
//! processes at once (`--clones`), each its own VM: `eager` (the image read into THP-backed
//! RAM before the guest starts), `lazy-4k`, `lazy-2m`, `prefetch` (2 MiB faults and the
//! prefetcher in address order) and `replay` (the same, the prefetcher fetching a recorded
//! working set first). The record is made once per pattern, by a resume that records it.
//!
//! Per clone: time to the first instruction after resume (from the process's build of the VM),
//! time until the guest's work is done, vCPU faults, bytes read from the image, resident and
//! huge memory at the end and (first clone) over time; across clones, their p50 and p95. The
//! clones read one image through the page cache: after each group, the image's pages in the
//! cache (`mincore`) are set beside the bytes the clones read from it.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE};
use serde_json::{Value, json};

use super::{BenchError, Record, figure, median};
use crate::snapshot::MEMORY_FILE;
use crate::units::ByteSize;

/// How a clone resumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The whole image read in before the guest starts.
    Eager,
    /// 4 KiB per fault.
    Lazy4k,
    /// A whole extent per fault.
    Lazy2m,
    /// A whole extent per fault, the prefetcher behind the guest in address order.
    Prefetch,
    /// As `Prefetch`, the prefetcher fetching the recorded working set first.
    Replay,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 5] = [
        Mode::Eager,
        Mode::Lazy4k,
        Mode::Lazy2m,
        Mode::Prefetch,
        Mode::Replay,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Lazy4k => "lazy-4k",
            Mode::Lazy2m => "lazy-2m",
            Mode::Prefetch => "prefetch",
            Mode::Replay => "replay",
        }
    }

    /// The `vmm run` options of the mode.
    fn options(self) -> &'static [&'static str] {
        match self {
            Mode::Eager => &[
                "--restore",
                "eager",
                "--backing",
                "thp",
                "--working-set",
                "off",
            ],
            Mode::Lazy4k => &["--prefetch", "off", "--working-set", "off"],
            Mode::Lazy2m => &[
                "--prefetch",
                "off",
                "--fault-granularity",
                "2M",
                "--working-set",
                "off",
            ],
            Mode::Prefetch => &["--fault-granularity", "2M", "--working-set", "off"],
            Mode::Replay => &["--fault-granularity", "2M", "--working-set", "replay"],
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

/// The order the resumed guest reads its working set in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// The first extents of free RAM, in address order.
    Seq,
    /// Extents picked at random from all of free RAM, in a random order.
    Random,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ResumeBenchConfig {
    /// Guest RAM.
    pub memory: ByteSize,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// The working set's share of free RAM.
    pub working_set: f64,
    /// Orders of the working set.
    pub patterns: Vec<Pattern>,
    /// Modes (empty: all).
    pub modes: Vec<Mode>,
    /// Clone counts: how many VMMs resume one snapshot at once.
    pub clones: Vec<u32>,
    /// Drop the image from the page cache before each group (cold), else warm.
    pub cold: bool,
    /// Rounds, modes interleaved.
    pub repeat: u32,
    /// Where the snapshots go.
    pub scratch: PathBuf,
}

impl ResumeBenchConfig {
    /// Guest-physical bytes the guest may use (RAM above the load area and the program).
    fn free(&self) -> u64 {
        self.memory.0 - LOAD_BASE - EXTENT_SIZE
    }

    /// The working set, whole extents.
    pub fn working_set_bytes(&self) -> u64 {
        (((self.free() as f64 * self.working_set) as u64) & !(EXTENT_SIZE - 1)).max(EXTENT_SIZE)
    }

    fn snapshot(&self, p: Pattern) -> PathBuf {
        self.scratch.join(format!("resume-{}", p.name()))
    }
}

/// The smallest guest RAM worth measuring: a quarter of it is at least one extent.
pub const MIN_MEMORY: u64 = LOAD_BASE + EXTENT_SIZE + 4 * EXTENT_SIZE;

fn vmm() -> Result<Command, BenchError> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Setup(format!("cannot find the vmm binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// Waits for a `vmm run` child and says why it failed if it did.
fn finish(what: &str, child: Child) -> Result<(), BenchError> {
    let out = child
        .wait_with_output()
        .map_err(|e| BenchError::Setup(format!("{what}: waiting for vmm: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("").to_string();
    Err(BenchError::Setup(format!(
        "{what}: vmm run {}: {last}",
        out.status
    )))
}

/// Takes the pattern's snapshot: the guest filled all of free RAM and paused before its work.
fn take_snapshot(config: &ResumeBenchConfig, p: Pattern) -> Result<(), BenchError> {
    let dir = config.snapshot(p);
    let _ = std::fs::remove_dir_all(&dir);
    let mut cmd = vmm()?;
    cmd.args([
        "run",
        "--guest",
        "touch",
        "--seccomp",
        "off",
        "--collapse",
        "off",
    ])
    .args(["--memory", &config.memory.to_string()])
    .args(["--vcpus", &config.vcpus.to_string()]);
    for arg in [
        "fill=on".to_string(),
        "snapshot=on".into(),
        "access=read".into(),
        "spread=on".into(),
        format!("pattern={}", p.name()),
        format!("size={}", config.working_set_bytes()),
    ] {
        cmd.args(["--arg", &arg]);
    }
    cmd.arg("--snapshot").arg(&dir);
    let child = cmd
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start vmm: {e}")))?;
    finish("taking the snapshot", child)
}

/// One clone's figures from its metrics (and, for `series`, its lines over time).
fn clone_figures(metrics: &Path, series: bool) -> Result<Value, BenchError> {
    let text = std::fs::read_to_string(metrics)
        .map_err(|e| BenchError::Setup(format!("reading {}: {e}", metrics.display())))?;
    let j: Value = serde_json::from_str(&text)
        .map_err(|e| BenchError::Setup(format!("parsing {}: {e}", metrics.display())))?;
    let first = j["to_first_instruction_ns"].as_u64().unwrap_or(0);
    let kb = |v: &Value| v.as_u64().unwrap_or(0) * 1024;
    let points = if series {
        let lines =
            std::fs::read_to_string(crate::metrics::lines_path(metrics)).unwrap_or_default();
        lines
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|l| {
                let k = &l["kernel"];
                json!([
                    l["elapsed_ns"].as_f64().unwrap_or(0.0) / 1e6,
                    kb(&k["rss_kb"]) >> 20,
                    (kb(&k["anon_huge_kb"]) + kb(&k["hugetlb_kb"])) >> 20
                ])
            })
            .collect()
    } else {
        Vec::new()
    };
    let k = &j["kernel"];
    Ok(json!({
        "to_first_instruction_ns": first,
        "work_ns": j["guest_time_ns"],
        "to_done_ns": first + j["guest_time_ns"].as_u64().unwrap_or(0),
        "vcpu_faults": j["faults"]["served"],
        "bytes_read": j["restore"]["image_bytes_read"],
        "prefetched_bytes": j["restore"]["prefetch"]["bytes_read"].as_u64().unwrap_or(0),
        "replayed_extents": j["restore"]["prefetch"]["extents_replayed"],
        "resident_bytes": kb(&k["rss_kb"]),
        "huge_bytes": kb(&k["anon_huge_kb"]) + kb(&k["hugetlb_kb"]),
        "series_ms_mib_huge_mib": points,
    }))
}

/// Bytes of `path` in the page cache now.
fn cached_bytes(path: &Path) -> Result<u64, BenchError> {
    let file = std::fs::File::open(path)
        .map_err(|e| BenchError::Setup(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared mapping of our own descriptor, unmapped below; only
    // mincore looks at it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(BenchError::Setup(format!(
            "cannot map {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `addr..addr+len` is the mapping made above; `vec` has a byte per page.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(addr, len) };
    if r != 0 {
        return Err(BenchError::Setup(format!(
            "mincore on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096)
}

/// Resumes the snapshot of `p` in `clones` processes at once in `mode`; their figures.
fn group(
    config: &ResumeBenchConfig,
    mode: Mode,
    p: Pattern,
    clones: u32,
) -> Result<Value, BenchError> {
    let dir = config.snapshot(p);
    let image = dir.join(MEMORY_FILE);
    if config.cold {
        super::restore::drop_from_cache(&image)?;
    }
    let metrics: Vec<PathBuf> = (0..clones)
        .map(|i| config.scratch.join(format!("clone-{i}.json")))
        .collect();
    let children = metrics
        .iter()
        .map(|m| {
            let mut cmd = vmm()?;
            cmd.args(["run", "--seccomp", "off", "--collapse", "off"])
                .arg("--resume")
                .arg(&dir)
                .args(mode.options())
                .arg("--metrics")
                .arg(m)
                .args(["--metrics-interval", "0.02"]);
            cmd.spawn()
                .map_err(|e| BenchError::Setup(format!("cannot start vmm: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut failed = None;
    for child in children {
        if let Err(e) = finish(mode.name(), child) {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let per_clone = metrics
        .iter()
        .enumerate()
        .map(|(i, m)| clone_figures(m, i == 0))
        .collect::<Result<Vec<_>, _>>()?;
    for m in &metrics {
        let _ = std::fs::remove_file(m);
        let _ = std::fs::remove_file(crate::metrics::lines_path(m));
    }
    let total_read: u64 = per_clone
        .iter()
        .filter_map(|c| c["bytes_read"].as_u64())
        .sum();
    Ok(json!({
        "mode": mode.name(),
        "clones": clones,
        "image_cached_bytes": cached_bytes(&image)?,
        "image_bytes": std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0),
        "clones_bytes_read": total_read,
        "per_clone": per_clone,
    }))
}

/// The `q` quantile (nearest rank) of `key` over every clone of every round.
fn quantile(rounds: &[Value], key: &str, q: f64) -> Option<f64> {
    let mut v: Vec<f64> = rounds
        .iter()
        .flat_map(|r| r["per_clone"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c[key].as_f64())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// Runs the benchmark, prints a table per pattern, and returns every figure as JSON.
pub fn run(config: &ResumeBenchConfig) -> Result<Value, BenchError> {
    let scratch = super::ScratchDir::create(&config.scratch)?;
    let config = &ResumeBenchConfig {
        scratch: scratch.path().into(),
        ..config.clone()
    };
    let modes = if config.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        config.modes.clone()
    };
    let setups = 1 + u64::from(modes.contains(&Mode::Replay));
    let steps = config.patterns.len() as u64
        * (setups + u64::from(config.repeat.max(1)) * (modes.len() * config.clones.len()) as u64);
    let mut record = Record::new("resume", steps);
    let mut tables = Vec::new();
    for &p in &config.patterns {
        if record.stopped() {
            break;
        }
        let at = format!("{} working set", p.name());
        if let Err(e) = record.step(&format!("snapshot for the {at}"), || {
            take_snapshot(config, p)
        }) {
            record.fail("snapshot", &at, &e);
            continue;
        }
        let mut recorded = Value::Null;
        if modes.contains(&Mode::Replay) {
            match record.step("recording the working set", || record_once(config, p)) {
                Ok(r) => recorded = r,
                Err(e) => record.fail("record", &at, &e),
            }
        }
        let mut groups = Vec::new();
        for &clones in &config.clones {
            let rounds = record.rounds(
                &format!("{at}, {clones} clone(s)"),
                config.repeat.max(1),
                &modes,
                |m| m.name().into(),
                |&mode| group(config, mode, p, clones),
            );
            groups.push((clones, rounds));
        }
        let _ = std::fs::remove_dir_all(config.snapshot(p));
        record.print(|| tables.push(report(config, p, &modes, &groups, recorded)));
    }
    Ok(record.finish(json!({
        "benchmark": "resume",
        "memory_bytes": config.memory.0,
        "vcpus": config.vcpus,
        "working_set": config.working_set,
        "working_set_bytes": config.working_set_bytes(),
        "cache": if config.cold { "cold" } else { "warm" },
        "repeat": config.repeat.max(1),
        "host_cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "tables": tables,
    })))
}

/// The resume that records the working set (lazy, 4 KiB per fault, no prefetcher).
fn record_once(config: &ResumeBenchConfig, p: Pattern) -> Result<Value, BenchError> {
    let metrics = config.scratch.join("record.json");
    let mut cmd = vmm()?;
    cmd.args(["run", "--seccomp", "off", "--collapse", "off"])
        .arg("--resume")
        .arg(config.snapshot(p))
        .args(["--working-set", "record", "--metrics"])
        .arg(&metrics);
    let child = cmd
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start vmm: {e}")))?;
    finish("recording", child)?;
    let mut figures = clone_figures(&metrics, false)?;
    let text = std::fs::read_to_string(&metrics).unwrap_or_default();
    let j: Value = serde_json::from_str(&text).unwrap_or_default();
    figures["recorded"] = j["working_set"].clone();
    let _ = std::fs::remove_file(&metrics);
    Ok(figures)
}

fn ms(v: Option<f64>) -> String {
    figure(v.map(|ns| ns / 1e6), 1)
}

fn report(
    config: &ResumeBenchConfig,
    p: Pattern,
    modes: &[Mode],
    groups: &[(u32, Vec<Vec<Value>>)],
    recorded: Value,
) -> Value {
    let ws = config.working_set_bytes();
    println!(
        "vmm bench resume: {} of RAM, {} vCPU(s), working set {} ({:.0}%) {}, {} cache, {} \
         round(s); p50 (p95) over clones",
        config.memory,
        config.vcpus,
        ByteSize(ws),
        config.working_set * 100.0,
        p.name(),
        if config.cold { "cold" } else { "warm" },
        config.repeat.max(1)
    );
    println!(
        "{:<9} {:>6} {:>15} {:>17} {:>17} {:>9} {:>9} {:>12} {:>8} {:>11}",
        "mode",
        "clones",
        "1st instr ms",
        "work done ms",
        "resume→done ms",
        "faults",
        "read MiB",
        "resident MiB",
        "huge MiB",
        "cached MiB"
    );
    let mib = |v: Option<f64>| figure(v.map(|b| b / 1048576.0), 0);
    let mut rows = Vec::new();
    for (clones, rounds) in groups {
        for (i, &mode) in modes.iter().enumerate() {
            let r = &rounds[i];
            let q = |key: &str, q: f64| quantile(r, key, q);
            let both = |key: &str, f: &dyn Fn(Option<f64>) -> String| {
                format!("{} ({})", f(q(key, 0.5)), f(q(key, 0.95)))
            };
            let cached = {
                let mut v: Vec<f64> = r
                    .iter()
                    .filter_map(|g| g["image_cached_bytes"].as_f64())
                    .collect();
                (!v.is_empty()).then(|| median(&mut v))
            };
            println!(
                "{:<9} {:>6} {:>15} {:>17} {:>17} {:>9} {:>9} {:>12} {:>8} {:>11}",
                mode.name(),
                clones,
                both("to_first_instruction_ns", &ms),
                both("work_ns", &ms),
                both("to_done_ns", &ms),
                figure(q("vcpu_faults", 0.5), 0),
                mib(q("bytes_read", 0.5)),
                mib(q("resident_bytes", 0.5)),
                mib(q("huge_bytes", 0.5)),
                mib(cached),
            );
            let stat = |key: &str| json!({ "p50": q(key, 0.5), "p95": q(key, 0.95) });
            rows.push(json!({
                "mode": mode.name(),
                "clones": clones,
                "to_first_instruction_ns": stat("to_first_instruction_ns"),
                "work_ns": stat("work_ns"),
                "to_done_ns": stat("to_done_ns"),
                "vcpu_faults": stat("vcpu_faults"),
                "bytes_read": stat("bytes_read"),
                "resident_bytes": stat("resident_bytes"),
                "huge_bytes": stat("huge_bytes"),
                "image_cached_bytes": cached,
                "rounds": r,
            }));
        }
    }
    let targets = targets(config, p, &rows);
    for t in targets.as_array().into_iter().flatten() {
        println!(
            "target {}: {} ({})",
            t["target"].as_str().unwrap_or("?"),
            if t["met"] == true {
                "met"
            } else if t["met"] == false {
                "NOT met"
            } else {
                "not measured"
            },
            t["measured"].as_str().unwrap_or("")
        );
    }
    println!();
    // The plot's panel: the single-clone runs' resident and huge memory over time.
    let single: Vec<Value> = rows
        .iter()
        .filter(|r| r["clones"] == 1)
        .map(|r| {
            json!({
                "mode": r["mode"],
                "rounds": [ { "series_ms_mib_huge_mib": r["rounds"][0]["per_clone"][0]["series_ms_mib_huge_mib"] } ],
            })
        })
        .collect();
    json!({
        "pattern": p.name(),
        "working_set_bytes": ws,
        "recorded": recorded,
        "groups": rows,
        "targets": targets,
        "modes": single,
    })
}

/// The targets, each met or not, from this run's figures.
fn targets(config: &ResumeBenchConfig, p: Pattern, rows: &[Value]) -> Value {
    let find = |mode: &str, clones: u32| {
        rows.iter()
            .find(|r| r["mode"] == mode && r["clones"] == clones)
    };
    let get = |mode: &str, clones: u32, key: &str, q: &str| {
        find(mode, clones).and_then(|r| r[key][q].as_f64())
    };
    let mut out = Vec::new();
    let mut push = |target: String, met: Option<bool>, measured: String| {
        out.push(json!({ "target": target, "met": met, "measured": measured }));
    };
    for mode in ["lazy-4k", "prefetch", "replay"] {
        if let Some(first) = get(mode, 1, "to_first_instruction_ns", "p50") {
            push(
                format!(
                    "{mode}: first instruction after resume <= 10 ms at {}",
                    config.memory
                ),
                Some(first <= 10e6),
                format!("{:.1} ms", first / 1e6),
            );
        }
    }
    if p == Pattern::Random {
        let (replay, prefetch) = (
            get("replay", 1, "work_ns", "p50"),
            get("prefetch", 1, "work_ns", "p50"),
        );
        if let (Some(a), Some(b)) = (replay, prefetch) {
            push(
                "replay: the guest's work after resume <= 0.5x prefetch in address order's".into(),
                Some(a <= 0.5 * b),
                format!("{:.1} against {:.1} ms: {:.2}x", a / 1e6, b / 1e6, a / b),
            );
        }
        let (replay, lazy) = (
            get("replay", 1, "vcpu_faults", "p50"),
            get("lazy-4k", 1, "vcpu_faults", "p50"),
        );
        if let (Some(a), Some(b)) = (replay, lazy) {
            push(
                "replay: <= 5% of lazy-4k's vCPU faults".into(),
                Some(a <= 0.05 * b),
                format!("{a:.0} against {b:.0}: {:.1}%", 100.0 * a / b.max(1.0)),
            );
        }
    }
    let most = config.clones.iter().copied().max().unwrap_or(1);
    if most > 1 {
        for mode in ["prefetch", "replay", "lazy-2m"] {
            if let (Some(many), Some(one)) = (
                get(mode, most, "to_done_ns", "p95"),
                get(mode, 1, "to_done_ns", "p95"),
            ) {
                push(
                    format!(
                        "{mode}: at {most} clones, p95 resume-to-done <= 1.5x a single resume's"
                    ),
                    Some(many <= 1.5 * one),
                    format!(
                        "{:.1} against {:.1} ms: {:.2}x",
                        many / 1e6,
                        one / 1e6,
                        many / one
                    ),
                );
            }
        }
    }
    // Resident per clone: its working set, the VMM's area and program, and what the
    // prefetcher chose to fill.
    let ws = config.working_set_bytes() as f64;
    let base = (LOAD_BASE + EXTENT_SIZE) as f64;
    for r in rows.iter().filter(|r| r["mode"] != "eager") {
        let clones: Vec<Value> = r["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["per_clone"].as_array().cloned().unwrap_or_default())
            .collect();
        let worst = clones
            .iter()
            .map(|c| {
                let resident = c["resident_bytes"].as_f64().unwrap_or(0.0);
                let allowed = ws + base + c["prefetched_bytes"].as_f64().unwrap_or(0.0);
                resident / allowed
            })
            .fold(0.0, f64::max);
        if !clones.is_empty() {
            push(
                format!(
                    "{} at {} clone(s): resident per clone <= working set + VMM area + prefetched",
                    r["mode"].as_str().unwrap_or("?"),
                    r["clones"]
                ),
                Some(worst <= 1.0),
                format!("worst clone {:.2}x of that", worst),
            );
        }
    }
    json!(out)
}
