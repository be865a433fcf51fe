//! `vmm bench reclaim`: the `churn` guest fills its RAM (2 MiB faults, so it is all huge
//! first), frees half of it in each shape (`extents`, `pages`, `halves`), keeps checking and
//! rewriting what it kept, and touches part of what it freed again. Modes, side by side:
//! - `no-reclaim`: the guest zeroes what it frees, nothing is given back;
//! - `report-4k`: this VMM on 4 KiB backing (no collapse), guest reports honoured;
//! - `report-thp`, `report-hugetlb`: this VMM, huge pages from THP or the hugetlb pool, guest
//!   reports honoured per extent (discard, split at the threshold, keep below it);
//! - `balloon-4k`: a 4 KiB balloon as Firecracker's works, modelled by the same path with the
//!   split threshold at one page and `--reclaim-partial discard`: every reported page is
//!   discarded with `MADV_DONTNEED`, which splits every THP it touches (and the kernel returns
//!   the freed part of a THP only when its deferred split runs).
//! - `shrinker-thp`: the guest does not report, it zeroes what it frees (`report=off`) and
//!   waits [`HOLD_MS`]; this VMM's zero-page shrinker finds it (THP, collapse on);
//! - `kernel-shrinker`: the same guest on RAM the kernel populates with THPs (`--backing thp`,
//!   no collapse, no reclaim of ours); while the guest waits, the benchmark puts its own process
//!   in a memory cgroup under pressure (the limit lowered step by step towards the live set, then
//!   lifted), so that the kernel reclaims and its THP shrinker (`shrink_underused`) splits what
//!   it counts as underused: the kernel's answer, measured by `Rss` before and after and by
//!   `/proc/vmstat`'s `thp_underused_split_page`. Its setting `khugepaged/max_ptes_none` is read,
//!   not changed; the cgroup is removed after.
//!
//! Per run: the share of reported bytes given back, resident memory at the end against the
//! live set (what the guest still holds), the fully used extents and the touched ones still
//! mapped huge, how long the free took in the guest and at what rate, the guest's stall p99
//! over its passes, refaults, bytes re-inflated, writes lost, and the extent table's resident
//! bytes against the kernel's `Rss`.

use std::time::Instant;

use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE, PAGE_SIZE};
use serde_json::{Value, json};

use super::memcg::{self, Memcg};
use super::{BenchError, Record, median, quiet_devices, run_sampled_with};
use crate::config::{GuestArg, VmConfig};
use crate::units::ByteSize;
use crate::vm::Vm;
use vm_extents::{PageSourceKind, PoolKind, host_view};

/// How memory the guest frees is (or is not) given back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing given back: the guest zeroes what it frees.
    NoReclaim,
    /// Reports honoured on 4 KiB backing.
    Report4k,
    /// Reports honoured, huge pages from THP.
    ReportThp,
    /// Reports honoured, huge pages from the hugetlb pool.
    ReportHugetlb,
    /// A 4 KiB balloon: every reported page discarded, splitting what it touches.
    Balloon4k,
    /// The guest zeroes what it frees; our zero-page shrinker gives it back.
    ShrinkerThp,
    /// The guest zeroes what it frees; the kernel's THP shrinker, under memcg pressure.
    KernelShrinker,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 7] = [
        Mode::NoReclaim,
        Mode::Report4k,
        Mode::ReportThp,
        Mode::ReportHugetlb,
        Mode::Balloon4k,
        Mode::ShrinkerThp,
        Mode::KernelShrinker,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::NoReclaim => "no-reclaim",
            Mode::Report4k => "report-4k",
            Mode::ReportThp => "report-thp",
            Mode::ReportHugetlb => "report-hugetlb",
            Mode::Balloon4k => "balloon-4k",
            Mode::ShrinkerThp => "shrinker-thp",
            Mode::KernelShrinker => "kernel-shrinker",
        }
    }

    /// Whether the guest zeroes what it frees and waits for a shrinker.
    fn silent(self) -> bool {
        matches!(self, Mode::ShrinkerThp | Mode::KernelShrinker)
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

/// What the guest frees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Whole 2 MiB extents.
    Extents,
    /// Scattered 4 KiB pages of every extent.
    Pages,
    /// The upper half of extents.
    Halves,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Extents => "extents",
            Shape::Pages => "pages",
            Shape::Halves => "halves",
        }
    }

    /// How many of extent `e`'s pages the shape frees at `percent`: all, some or none.
    fn freed_pages(self, e: u64, percent: u64) -> u64 {
        let pages = EXTENT_SIZE / PAGE_SIZE;
        // The guest's rule (`churn`): `percent` of the items, spread evenly.
        let spread = |i: u64| i * percent / 100 != (i + 1) * percent / 100;
        match self {
            Shape::Extents => u64::from(spread(e)) * pages,
            Shape::Pages => (0..pages).filter(|&p| spread(p)).count() as u64,
            Shape::Halves => u64::from(spread(e)) * pages / 2,
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ReclaimBenchConfig {
    /// Guest RAM.
    pub memory: ByteSize,
    /// vCPUs.
    pub vcpus: u32,
    /// Shapes (each a table).
    pub shapes: Vec<Shape>,
    /// Modes (empty: all).
    pub modes: Vec<Mode>,
    /// Percent freed.
    pub free: u64,
    /// Percent of the freed pages touched again.
    pub retouch: u64,
    /// Rounds, modes interleaved.
    pub repeat: u32,
    /// `khugepaged/max_ptes_none` for the kernel-shrinker mode (`None`: the host's).
    pub kernel_max_ptes_none: Option<u32>,
}

/// The smallest guest RAM worth measuring: the VMM's area, the program's extent, and eight
/// extents of data.
pub const MIN_MEMORY: u64 = LOAD_BASE + EXTENT_SIZE + 8 * EXTENT_SIZE;

/// The kernel's THP shrinker splits a THP with more than this many zero-filled pages.
const MAX_PTES_NONE: &str = "/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_none";

/// How long a guest that does not report waits after its free, for a shrinker to find it
/// (ours needs two passes at its default rate, 256 MiB/s).
pub const HOLD_MS: u64 = 3000;

impl ReclaimBenchConfig {
    fn vm_config(&self, mode: Mode, shape: Shape) -> VmConfig {
        let arg = |k: &str, v: String| GuestArg {
            key: k.into(),
            value: v,
        };
        let kernel = mode == Mode::KernelShrinker;
        let huge = mode != Mode::Report4k && !kernel;
        let mut args = vec![
            arg("shape", shape.name().into()),
            arg("free", self.free.to_string()),
            arg("retouch", self.retouch.to_string()),
            arg("timing", "on".into()),
        ];
        if mode.silent() {
            args.push(arg("report", "off".into()));
            args.push(arg("hold", HOLD_MS.to_string()));
        }
        VmConfig {
            guest: "churn".into(),
            memory: self.memory,
            vcpus: self.vcpus,
            args,
            page_source: if kernel {
                PageSourceKind::Kernel
            } else {
                PageSourceKind::Zero
            },
            backing: if kernel {
                vm_extents::Backing::Thp
            } else {
                vm_extents::Backing::Small
            },
            fault_granularity: ByteSize(if huge { EXTENT_SIZE } else { PAGE_SIZE }),
            collapse: if huge {
                crate::config::Collapse::Default(Default::default())
            } else {
                crate::config::Collapse::Off
            },
            huge_source: if mode == Mode::ReportHugetlb {
                PoolKind::Hugetlb
            } else {
                PoolKind::Thp
            },
            reclaim: !matches!(mode, Mode::NoReclaim | Mode::KernelShrinker),
            reclaim_shrinker: (mode == Mode::ShrinkerThp)
                .then_some(ByteSize(vm_extents::reclaim::shrinker::DEFAULT_RATE)),
            reclaim_split_pages: if mode == Mode::Balloon4k {
                1
            } else {
                vm_extents::reclaim::SPLIT_PAGES
            },
            reclaim_partial: if mode == Mode::Balloon4k {
                vm_extents::PartialFree::Discard
            } else {
                vm_extents::PartialFree::Copy
            },
            seccomp: crate::seccomp::Seccomp::Off,
            ..VmConfig::default()
        }
    }

    /// The data extents (above the program) and how many pages of each the shape frees.
    fn extents(&self, shape: Shape) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = (LOAD_BASE + EXTENT_SIZE) / EXTENT_SIZE;
        (first..self.memory.0 / EXTENT_SIZE).map(move |e| (e, shape.freed_pages(e, self.free)))
    }
}

/// One run of `mode` over `shape`.
fn reclaim_once(
    config: &ReclaimBenchConfig,
    mode: Mode,
    shape: Shape,
) -> Result<Value, BenchError> {
    if mode == Mode::ReportHugetlb {
        let need = config.memory.0 / EXTENT_SIZE;
        let pool = host_view::hugetlb_pool();
        if pool.free < need {
            return Err(BenchError::Setup(format!(
                "the hugetlb pool has {} free 2 MiB pages, this mode needs {need} (echo N > \
                 /proc/sys/vm/nr_hugepages)",
                pool.free
            )));
        }
    }
    // Guest RAM is charged to the cgroup from its first page on: entered before the build.
    let (memcg, _setting) = match mode {
        Mode::KernelShrinker => (
            Some(Memcg::enter("vmm-bench-reclaim")?),
            config
                .kernel_max_ptes_none
                .map(|n| memcg::Setting::set(MAX_PTES_NONE, &n.to_string()))
                .transpose()?,
        ),
        _ => (None, None),
    };
    let max_ptes_none = std::fs::read_to_string(MAX_PTES_NONE)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    // The run's clock starts before the build, as the summary's times do.
    let started = Instant::now();
    let devices = quiet_devices();
    let stages = devices.stages.clone();
    let vm =
        Vm::build(config.vm_config(mode, shape), devices).map_err(|source| BenchError::Vm {
            what: mode.name().into(),
            source,
        })?;
    let ram = vm.ram_host_range();
    // What the guest holds once it freed: what the shape keeps, the VMM's area, the program.
    let kept: u64 = config
        .extents(shape)
        .map(|(_, freed)| EXTENT_SIZE - freed * PAGE_SIZE)
        .sum::<u64>()
        + LOAD_BASE
        + EXTENT_SIZE;
    let mut squeezed = None;
    let mut squeeze = || {
        let Some(memcg) = &memcg else { return };
        if squeezed.is_some() || stages.count(2) < config.vcpus {
            return;
        }
        let rss = || host_view::smaps_totals(ram.start, ram.end).map_or(0, |t| t.rss_kb * 1024);
        let (before, splits) = (rss(), memcg::vmstat("thp_underused_split_page"));
        let started = Instant::now();
        // Down to what the cgroup would hold if guest RAM held only the live set.
        let target = memcg.usage().saturating_sub(before.saturating_sub(kept));
        let limit = memcg.squeeze(target, 4 << 20);
        squeezed = Some(json!({
            "rss_before_bytes": before,
            "rss_after_bytes": rss(),
            "target_bytes": target,
            "lowest_limit_bytes": limit,
            "thp_underused_split_page": splits
                .zip(memcg::vmstat("thp_underused_split_page"))
                .map(|(a, b)| b - a),
            "squeeze_ns": started.elapsed().as_nanos() as u64,
        }));
    };
    let sampled = run_sampled_with(mode.name(), vm, started, &mut squeeze)?;
    drop(memcg);
    let summary = &sampled.summary;
    let j = summary.to_json();
    let sum = |key: &str| -> u64 { summary.vcpus.iter().filter_map(|v| v.report(key)).sum() };
    // Freed by the guest: reported, or zeroed where it does not report.
    let reported = sum("reported_bytes");
    let freed = reported + sum("zeroed_bytes");
    let reclaimed = match (mode, &squeezed) {
        (Mode::KernelShrinker, Some(s)) => s["rss_before_bytes"]
            .as_u64()
            .zip(s["rss_after_bytes"].as_u64())
            .map_or(0, |(a, b)| a.saturating_sub(b)),
        (Mode::KernelShrinker, None) => {
            return Err(BenchError::Setup(
                "kernel-shrinker: the guest ended before every vCPU had freed".into(),
            ));
        }
        _ => j["reclaim"]["reclaimed_bytes"].as_u64().unwrap_or(0),
    };
    // What the guest still holds: what it kept, what it touched again, and the VMM's area
    // with the program.
    let live = (sum("kept_pages") + sum("retouched")) * PAGE_SIZE + LOAD_BASE + EXTENT_SIZE;
    // Resident by the kernel's view: `Rss` and the hugetlb pages (which `Rss` leaves out).
    let rss = (j["kernel"]["rss_kb"].as_u64().unwrap_or(0)
        + j["kernel"]["hugetlb_kb"].as_u64().unwrap_or(0))
        * 1024;
    let ext = &j["memory"]["extents"];
    let ours = ext["huge"].as_u64().unwrap_or(0) * EXTENT_SIZE
        + ext["small_pages"].as_u64().unwrap_or(0) * PAGE_SIZE;
    // Which extents were mapped huge at the end, by the kernel's view.
    let huge_at = |e: u64| {
        let start = sampled.range.start + e * EXTENT_SIZE;
        sampled
            .last_huge
            .iter()
            .any(|r| r.start <= start && start + EXTENT_SIZE <= r.end)
    };
    let share = |of: &dyn Fn(u64) -> bool| {
        let all: Vec<u64> = config
            .extents(shape)
            .filter(|&(_, f)| of(f))
            .map(|(e, _)| e)
            .collect();
        (!all.is_empty())
            .then(|| all.iter().filter(|&&e| huge_at(e)).count() as f64 / all.len() as f64)
    };
    let pages = EXTENT_SIZE / PAGE_SIZE;
    let full_huge = share(&|f| f == 0);
    let touched_huge = share(&|f| f > 0 && f < pages);
    // The guest's free, timed by the guest; a guest that zeroes what it frees gives nothing
    // back by it (a shrinker does, later: its time is not the guest's).
    let free_ns = summary
        .vcpus
        .iter()
        .filter_map(|v| v.report("free_cycles"))
        .max()
        .filter(|_| summary.tsc_khz > 0 && !mode.silent() && mode != Mode::NoReclaim)
        .map(|c| c as f64 * 1e6 / summary.tsc_khz as f64);
    let stalls = summary.guest_stalls();
    Ok(json!({
        "mode": mode.name(),
        "reported_bytes": reported,
        "freed_bytes": freed,
        "reclaimed_bytes": reclaimed,
        "returned": (freed > 0).then(|| reclaimed as f64 / freed as f64),
        "resident_bytes": rss,
        "live_bytes": live,
        "resident_over_live": rss as f64 / live as f64,
        "full_extents_huge": full_huge,
        "touched_extents_huge": touched_huge,
        "free_ns": free_ns,
        "reclaim_bytes_per_sec": free_ns.filter(|&ns| ns > 0.0).map(|ns| reclaimed as f64 / (ns / 1e9)),
        "guest_stall_p99_ns": stalls.as_ref().map(|s| s.p99_ns),
        "refaults": j["reclaim"]["refaults"],
        "reinflated_bytes": j["reclaim"]["reinflated_bytes"],
        "lost_writes": sum("mismatches") + sum("nonzero_after_free"),
        "table_resident_bytes": ours,
        "table_vs_kernel": (rss > 0).then(|| ours.abs_diff(rss) as f64 / rss as f64),
        "reclaim": j["reclaim"],
        "kernel_squeeze": squeezed,
        "kernel_max_ptes_none": (mode == Mode::KernelShrinker).then_some(max_ptes_none).flatten(),
        "series_ms_mib_huge_mib": sampled.series,
    }))
}

/// The median of `key` over `rounds` (absent if any round lacks it).
fn med(rounds: &[Value], key: &str) -> Value {
    let mut v: Vec<f64> = rounds.iter().filter_map(|r| r[key].as_f64()).collect();
    if v.is_empty() || v.len() < rounds.len() {
        return Value::Null;
    }
    json!(median(&mut v))
}

/// The keys of a row that are medians over its rounds.
const MEDIANS: &[&str] = &[
    "returned",
    "resident_over_live",
    "full_extents_huge",
    "touched_extents_huge",
    "free_ns",
    "reclaim_bytes_per_sec",
    "guest_stall_p99_ns",
    "refaults",
    "table_vs_kernel",
    "resident_bytes",
    "live_bytes",
];

fn pct(v: &Value) -> String {
    super::figure(v.as_f64().map(|x| x * 100.0), 1)
}

fn report(
    config: &ReclaimBenchConfig,
    shape: Shape,
    modes: &[Mode],
    rounds: &[Vec<Value>],
) -> Value {
    println!(
        "vmm bench reclaim: shape {} ({}% freed, {}% of that touched again), {} on {} vCPU(s), {} round(s), medians",
        shape.name(),
        config.free,
        config.retouch,
        config.memory,
        config.vcpus,
        config.repeat.max(1)
    );
    println!(
        "{:<15} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>10} {:>8} {:>7} {:>5} {:>7}",
        "mode",
        "returned",
        "res/live",
        "full 2M",
        "touch 2M",
        "free ms",
        "MiB/s",
        "stall p99",
        "refaults",
        "reinfl",
        "lost",
        "vs Rss"
    );
    let mut rows = Vec::new();
    for (i, &mode) in modes.iter().enumerate() {
        let r = &rounds[i];
        let mut row = json!({ "mode": mode.name(), "rounds": r });
        for key in MEDIANS {
            row[*key] = med(r, key);
        }
        let total = |key: &str| r.iter().filter_map(|x| x[key].as_u64()).sum::<u64>();
        row["reinflated_bytes"] = json!(total("reinflated_bytes"));
        row["lost_writes"] = json!(total("lost_writes"));
        println!(
            "{:<15} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>10} {:>8} {:>7} {:>5} {:>7}",
            mode.name(),
            pct(&row["returned"]),
            super::figure(row["resident_over_live"].as_f64(), 2),
            pct(&row["full_extents_huge"]),
            pct(&row["touched_extents_huge"]),
            super::figure(row["free_ns"].as_f64().map(|ns| ns / 1e6), 1),
            super::figure(
                row["reclaim_bytes_per_sec"].as_f64().map(|b| b / 1048576.0),
                0
            ),
            super::figure(row["guest_stall_p99_ns"].as_f64().map(|ns| ns / 1e3), 1) + " us",
            super::figure(row["refaults"].as_f64(), 0),
            row["reinflated_bytes"],
            row["lost_writes"],
            pct(&row["table_vs_kernel"]),
        );
        rows.push(row);
    }
    println!();
    json!({ "shape": shape.name(), "modes": rows })
}

/// Each target of the issue, met or not, from the figures printed above.
fn targets(tables: &[Value]) -> Value {
    let row = |shape: &str, mode: &str| -> Option<&Value> {
        tables.iter().find(|t| t["shape"] == shape)?["modes"]
            .as_array()?
            .iter()
            .find(|m| m["mode"] == mode)
    };
    let get = |shape: &str, mode: &str, key: &str| row(shape, mode).and_then(|r| r[key].as_f64());
    let mut out = Vec::new();
    let mut target = |what: String, value: Option<f64>, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        println!("target: {what}: {} ({verdict})", super::figure(value, 3));
        out.push(json!({ "target": what, "value": value, "met": met }));
    };
    let v = get("extents", "report-thp", "returned");
    target(
        "whole extents freed, returned >= 99% (report-thp)".into(),
        v,
        v.map(|v| v >= 0.99),
    );
    let v = get("pages", "report-thp", "returned");
    target(
        "scattered 4 KiB pages freed, returned >= 95% (report-thp)".into(),
        v,
        v.map(|v| v >= 0.95),
    );
    for shape in ["extents", "halves"] {
        let v = get(shape, "report-thp", "full_extents_huge");
        target(
            format!("{shape}: fully used extents still 2 MiB = 100% (report-thp)"),
            v,
            v.map(|v| v >= 1.0),
        );
    }
    let v = get("pages", "balloon-4k", "touched_extents_huge");
    target(
        "pages: touched extents still 2 MiB under the 4 KiB balloon (0% expected)".into(),
        v,
        v.map(|v| v == 0.0),
    );
    for t in tables {
        let shape = t["shape"].as_str().unwrap_or("?");
        let v = get(shape, "report-thp", "resident_over_live");
        target(
            format!("{shape}: resident <= 1.05x the live set (report-thp)"),
            v,
            v.map(|v| v <= 1.05),
        );
        for ours in ["report-thp", "shrinker-thp"] {
            let ratio = get(shape, ours, "guest_stall_p99_ns")
                .zip(get(shape, "no-reclaim", "guest_stall_p99_ns"))
                .map(|(a, b)| a / b);
            target(
                format!("{shape}: guest stall p99 <= 2x no-reclaim's ({ours})"),
                ratio,
                ratio.map(|r| r <= 2.0),
            );
        }
        for m in t["modes"].as_array().into_iter().flatten() {
            let mode = m["mode"].as_str().unwrap_or("?");
            let bad = m["reinflated_bytes"]
                .as_f64()
                .zip(m["lost_writes"].as_f64());
            target(
                format!("{shape}/{mode}: 0 bytes re-inflated, 0 writes lost"),
                bad.map(|(a, b)| a + b),
                bad.map(|(a, b)| a == 0.0 && b == 0.0),
            );
            if mode == "kernel-shrinker" {
                // The kernel split its THPs behind the table (which says all of a huge backing
                // is huge): there is no table of ours to check.
                continue;
            }
            let v = m["table_vs_kernel"].as_f64();
            target(
                format!("{shape}/{mode}: the table's resident within 2% of the kernel's Rss"),
                v,
                v.map(|v| v <= 0.02),
            );
        }
    }
    for t in tables {
        let shape = t["shape"].as_str().unwrap_or("?");
        let kernel = get(shape, "kernel-shrinker", "returned");
        for ours in ["report-thp", "shrinker-thp"] {
            let v = get(shape, ours, "returned");
            target(
                format!(
                    "{shape}: returned ({ours}) >= the kernel THP shrinker's under pressure ({})",
                    super::figure(kernel, 3)
                ),
                v,
                v.zip(kernel).map(|(v, k)| v >= k),
            );
        }
        let v = get(shape, "shrinker-thp", "resident_over_live");
        target(
            format!("{shape}: resident <= 1.05x the live set (shrinker-thp, no report)"),
            v,
            v.map(|v| v <= 1.05),
        );
    }
    json!(out)
}

/// Runs the benchmark, prints a table per shape and the targets, and returns every figure.
pub fn run(config: &ReclaimBenchConfig) -> Result<Value, BenchError> {
    let modes = if config.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        config.modes.clone()
    };
    let steps = config.shapes.len() as u64 * u64::from(config.repeat.max(1)) * modes.len() as u64;
    let mut record = Record::new("reclaim", steps);
    let mut tables = Vec::new();
    for &shape in &config.shapes {
        if record.stopped() {
            break;
        }
        let rounds = record.rounds(
            shape.name(),
            config.repeat.max(1),
            &modes,
            |m| m.name().into(),
            |&mode| reclaim_once(config, mode, shape),
        );
        record.print(|| tables.push(report(config, shape, &modes, &rounds)));
    }
    let mut targets_json = Value::Null;
    record.print(|| targets_json = targets(&tables));
    Ok(record.finish(json!({
        "benchmark": "reclaim",
        "memory_bytes": config.memory.0,
        "vcpus": config.vcpus,
        "free_percent": config.free,
        "retouch_percent": config.retouch,
        "split_pages": vm_extents::reclaim::SPLIT_PAGES,
        "repeat": config.repeat.max(1),
        "tables": tables,
        "targets": targets_json,
    })))
}
