//! `vmm bench collapse`: guests keep writing their memory (`verify mode=stress`) while it is
//! collapsed to 2 MiB pages, by this VMM's collapse thread in each lock order and by two peers
//! no one here wrote: the kernel's own khugepaged (its scan settings made fast for the run and
//! restored afterwards) and `MADV_COLLAPSE` on each extent. The same run measures a bare 2 MiB
//! `memcpy` and a bare 2 MiB `mremap`, the physical floor of a collapse's write window.
//!
//! The guest times every page it checks and writes (`timing=on`), so each variant also reports
//! the stall the guest itself saw. `--vcpus 1,4` sweeps vCPU counts, `--alloc-latency 0,5`
//! adds that many milliseconds to every huge page allocation (the seed's point is that the
//! write window must not grow with it), and this VMM's orders run once per `--install` method:
//! one table per (vCPU count, latency), all in one run.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_abi::layout::EXTENT_SIZE;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{BenchError, Record, finish, quiet_devices};
use crate::config::{Collapse, GuestArg, VmConfig};
use crate::metrics::{latency_histogram, percentiles};
use crate::units::ByteSize;
use crate::vm::Vm;
use vm_extents::{
    AllocError, Backing, CollapseConfig, CollapseGate, CollapseOrder, GuestRam, HostAddr, HugePage,
    HugePageAllocator, InstallMethod, MemoryBuilder, PageSourceKind, PoolKind, alloc_thp,
    host_view,
};

mod report;
use report::{Floor, median_of_rounds, report_latency_sweep, report_table};

/// Who collapses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// This VMM, allocating under the read lock.
    Prealloc,
    /// This VMM, allocating under the write lock.
    Legacy,
    /// This VMM, allocating with no lock.
    Unlocked,
    /// The host kernel's khugepaged.
    Khugepaged,
    /// `MADV_COLLAPSE`, extent by extent, from a VMM thread.
    MadvCollapse,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 5] = [
        Variant::Prealloc,
        Variant::Legacy,
        Variant::Unlocked,
        Variant::Khugepaged,
        Variant::MadvCollapse,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Prealloc => "prealloc",
            Variant::Legacy => "legacy",
            Variant::Unlocked => "unlocked",
            Variant::Khugepaged => "khugepaged",
            Variant::MadvCollapse => "madv-collapse",
        }
    }

    fn order(self) -> Option<CollapseOrder> {
        match self {
            Variant::Prealloc => Some(CollapseOrder::Prealloc),
            Variant::Legacy => Some(CollapseOrder::Legacy),
            Variant::Unlocked => Some(CollapseOrder::Unlocked),
            _ => None,
        }
    }
}

impl clap::ValueEnum for Variant {
    fn value_variants<'a>() -> &'a [Self] {
        &Variant::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct CollapseBenchConfig {
    /// vCPU counts writing, swept in this order.
    pub vcpus: Vec<u32>,
    /// Guest RAM.
    pub memory: ByteSize,
    /// Stress passes each guest makes (the run must outlast the collapse).
    pub passes: u64,
    /// Variants (empty: all).
    pub variants: Vec<Variant>,
    /// The pool depths this VMM's orders run with, a row each: the least depth of the
    /// pipelined pool (allocating ahead of demand), and 0 (every collapse allocates and zeroes
    /// its page when it needs it: the seed's baseline, where the lock orders differ most).
    pub pool_ahead: Vec<usize>,
    /// Rounds; variants run interleaved within each, medians are reported.
    pub repeat: u32,
    /// Milliseconds added to every huge page allocation, one table each.
    pub alloc_latency_ms: Vec<f64>,
    /// Also a table whose allocations come from memory the host has not recently touched.
    pub cold: bool,
    /// Install methods this VMM's orders run with.
    pub installs: Vec<InstallMethod>,
    /// Where never-touched pages come from, for this VMM's orders (the kernel's peers need
    /// the kernel to populate).
    pub page_source: PageSourceKind,
}

/// One row of a table: a variant, and for this VMM's orders the install method and the
/// pool's depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    variant: Variant,
    install: Option<InstallMethod>,
    pool_ahead: usize,
}

impl Row {
    /// `prealloc` (moves, the pipelined pool: the default), `prealloc/mremap`,
    /// `prealloc/ahead0`, `khugepaged`.
    fn label(self) -> String {
        let mut label = self.variant.name().to_string();
        if self.install == Some(InstallMethod::Mremap) {
            label += "/mremap";
        }
        if self.variant.order().is_some() && self.pool_ahead == 0 {
            label += "/ahead0";
        }
        label
    }
}

/// One table's conditions.
#[derive(Clone, Copy, Debug)]
struct Point {
    vcpus: u32,
    alloc_latency: Duration,
    /// Allocations from memory the host has not recently touched.
    cold: bool,
}

impl Point {
    /// How the table names its allocation conditions.
    fn allocation(&self) -> String {
        if self.cold {
            "cold memory".into()
        } else {
            format!("+{} ms", self.alloc_latency.as_secs_f64() * 1e3)
        }
    }
}

/// Huge pages from `source`, each `latency` late: allocation as slow as reclaim, compaction
/// or a userland backend would make it, as a variable of the run.
struct SlowAllocator {
    source: PoolKind,
    latency: Duration,
}

impl HugePageAllocator for SlowAllocator {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
        self.source.alloc()
    }
}

/// Makes the host's free memory cold before a run: a buffer of `bytes` is faulted in page by
/// page (4 KiB pages, so free memory is broken up) and given back, so the run's huge pages
/// come from memory no one touched recently, which must be zeroed from DRAM and may need
/// compaction: allocation as it is on a busy host, not as a quiet one's warm free lists give it.
fn chill(bytes: usize) -> Result<(), BenchError> {
    let buf = vm_memory::mmap::MmapRegion::<()>::new(bytes)
        .map_err(|e| BenchError::Setup(format!("cannot map {bytes} bytes to chill memory: {e}")))?;
    let base = buf.as_ptr();
    // SAFETY: advice on our own fresh mapping.
    unsafe { libc::madvise(base.cast(), bytes, libc::MADV_NOHUGEPAGE) };
    for off in (0..bytes).step_by(4096) {
        // SAFETY: inside our own mapping, written one byte a page.
        unsafe { base.add(off).write_volatile(1) };
    }
    // Dropping the region unmaps it.
    Ok(())
}

/// khugepaged's sysfs knobs, set fast for the run and restored on drop.
struct KhugepagedSettings {
    saved: Vec<(String, String)>,
}

const KHUGEPAGED: &str = "/sys/kernel/mm/transparent_hugepage/khugepaged";

impl KhugepagedSettings {
    fn fast() -> Result<Self, BenchError> {
        let mut saved = Vec::new();
        for (knob, value) in [
            ("scan_sleep_millisecs", "0"),
            ("alloc_sleep_millisecs", "10"),
            ("pages_to_scan", "65536"),
        ] {
            let path = format!("{KHUGEPAGED}/{knob}");
            let old = std::fs::read_to_string(&path)
                .map_err(|e| BenchError::Setup(format!("cannot read {path}: {e}")))?;
            std::fs::write(&path, value)
                .map_err(|e| BenchError::Setup(format!("cannot set {path} (needs root): {e}")))?;
            saved.push((path, old.trim().to_string()));
        }
        Ok(KhugepagedSettings { saved })
    }
}

impl Drop for KhugepagedSettings {
    fn drop(&mut self) {
        for (path, old) in &self.saved {
            if let Err(e) = std::fs::write(path, old) {
                eprintln!("warning: could not restore {path} to {old}: {e}");
            }
        }
    }
}

/// Bytes of `range` whose pages have every category in `mask`.
fn bytes_with(range: &Range<HostAddr>, mask: u64) -> u64 {
    match host_view::scan(range.start.raw(), range.end.raw(), mask) {
        Ok(Some(ranges)) => ranges.iter().map(|r| r.end - r.start).sum(),
        _ if mask == host_view::PAGE_IS_HUGE => {
            host_view::smaps_totals(range.start, range.end).map_or(0, |t| t.anon_huge_kb << 10)
        }
        _ => host_view::smaps_totals(range.start, range.end).map_or(0, |t| t.rss_kb << 10),
    }
}

/// One variant's results.
struct Outcome {
    json: Value,
}

fn run_variant(config: &CollapseBenchConfig, row: Row, at: Point) -> Result<Outcome, BenchError> {
    let variant = row.variant;
    let arg = |k: &str, v: String| GuestArg {
        key: k.into(),
        value: v,
    };
    // Every variant starts collapsing at the same moment: once the guest has populated all of
    // its RAM with 4 KiB pages (its first pass), while it goes on writing.
    let gate = CollapseGate::new();
    let vm_config = VmConfig {
        guest: "verify".into(),
        memory: config.memory,
        vcpus: at.vcpus,
        args: vec![
            arg("mode", "stress".into()),
            arg("passes", config.passes.to_string()),
            arg("timing", "on".into()),
        ],
        collapse: match variant.order() {
            Some(order) => Collapse::On(CollapseConfig {
                order,
                scan_sleep: Duration::from_millis(1),
                pages_to_scan: 512 * 64,
                ..CollapseConfig::default()
            }),
            None => Collapse::Off,
        },
        // THP, the kind of page the kernel's peers produce, so all variants build the same.
        huge_source: PoolKind::Thp,
        pool_ahead: row.pool_ahead,
        // A filter can never be lifted, and this process goes on to run more VMs.
        seccomp: crate::seccomp::Seccomp::Off,
        install: row.install.unwrap_or_default(),
        page_source: match variant.order() {
            Some(_) => config.page_source.clone(),
            None => PageSourceKind::Kernel,
        },
        ..VmConfig::default()
    };
    let _khugepaged = if variant == Variant::Khugepaged {
        Some(KhugepagedSettings::fast()?)
    } else {
        None
    };
    if at.cold {
        chill((4 * config.memory.0 as usize).max(512 << 20))?;
    }
    let allocator = SlowAllocator {
        source: PoolKind::Thp,
        latency: at.alloc_latency,
    };
    let tune = |memory: MemoryBuilder| {
        memory
            .collapse_gate(gate.clone())
            .huge_allocator(Arc::new(allocator))
    };
    let vm = Vm::build_with(vm_config, quiet_devices(), tune).map_err(|source| BenchError::Vm {
        what: variant.name().into(),
        source,
    })?;
    let range = vm.ram_host_range();
    let total = range.end - range.start;
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let runner = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = vm.run();
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    // Wait until the guest has populated all of RAM, then let the collapse begin.
    while !done.load(Ordering::SeqCst) && bytes_with(&range, host_view::PAGE_IS_PRESENT) < total {
        std::thread::sleep(Duration::from_millis(2));
    }
    let populated_after = start.elapsed();
    let began = Instant::now();
    if variant.order().is_some() {
        gate.open();
    } else {
        // The kernel's own machinery only works on THP-eligible memory.
        // SAFETY: advice on guest RAM, which stays mapped until `run` returns (`done`); it
        // changes no contents.
        unsafe { libc::madvise(range.start.as_ptr(), total as usize, libc::MADV_HUGEPAGE) };
    }
    // The kernel's peers: watch (and for MADV_COLLAPSE, drive) from here while the guest runs.
    let mut kernel_all_huge = None;
    let mut madv = latency_histogram();
    let mut madv_failures = 0u64;
    if variant.order().is_none() {
        let mut next = range.start;
        while !done.load(Ordering::SeqCst) && kernel_all_huge.is_none() {
            if variant == Variant::MadvCollapse && next < range.end {
                let t = Instant::now();
                // SAFETY: MADV_COLLAPSE on one extent of guest RAM, which stays mapped while the
                // VM runs (`done` is set only after `run` returns); it keeps the contents.
                let r = unsafe {
                    libc::madvise(next.as_ptr(), EXTENT_SIZE as usize, libc::MADV_COLLAPSE)
                };
                madv.saturating_record((t.elapsed().as_nanos() as u64).max(1));
                if r != 0 {
                    madv_failures += 1;
                    log::debug!(
                        "MADV_COLLAPSE at {next:#x}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                next += EXTENT_SIZE;
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
            if bytes_with(&range, host_view::PAGE_IS_HUGE) >= total {
                kernel_all_huge = Some(began.elapsed());
            }
        }
    }
    let summary = finish(
        variant.name(),
        runner
            .join()
            .map_err(|_| BenchError::Setup("the VM thread panicked".into()))?,
    )?;
    let mismatches: u64 = summary
        .vcpus
        .iter()
        .filter_map(|v| v.report("mismatches"))
        .sum();
    let j = summary.to_json();
    let (time_to_huge, stall) = match variant.order() {
        Some(_) => {
            let ns = j["collapse"]["all_huge_ns"].as_u64().unwrap_or(0);
            (
                if ns > 0 {
                    Some(Duration::from_nanos(ns))
                } else {
                    None
                },
                Some(j["faults"]["wp_stall_ns"].clone()),
            )
        }
        None => (kernel_all_huge, None),
    };
    let gib_per_s = time_to_huge.map(|t| total as f64 / (1u64 << 30) as f64 / t.as_secs_f64());
    let c = &j["collapse"];
    let guest = summary.guest_stalls();
    let json = json!({
        "variant": row.label(),
        "install": row.install,
        "all_huge": time_to_huge.is_some(),
        "time_to_all_huge_ns": time_to_huge.map(|t| t.as_nanos() as u64),
        "throughput_gib_per_s": gib_per_s,
        "write_lock_ns": variant.order().map(|_| c["write_lock_ns"].clone()),
        "commit_ns": variant.order().map(|_| c["commit_ns"].clone()),
        "vcpu_stall_ns": stall,
        "guest_stall_ns": guest.as_ref().map(|g| json!({ "p50": g.p50_ns, "p99": g.p99_ns, "max": g.max_ns })),
        "guest_stalls": guest,
        "split_moves": c["split_moves"],
        "alloc_ns": variant.order().map(|_| c["alloc_ns"].clone()),
        "pool_alloc_ns": variant.order().map(|_| c["pool"]["alloc_ns"].clone()),
        "pool_hit_rate": variant.order().map(|_| c["pool"]["hit_rate"].clone()),
        "pool_depth_peak": variant.order().map(|_| c["pool"]["depth_peak"].clone()),
        "alloc_outside_write_lock": variant.order().map(|o| o != CollapseOrder::Legacy),
        "read_phase_ns": variant.order().map(|_| c["read_phase_ns"].clone()),
        "madv_collapse_ns": (variant == Variant::MadvCollapse).then(|| percentiles(&madv)),
        "failures": {
            "alloc": c["collapse_alloc_failed"], "charge": c["charge_failed"],
            "revalidate": c["revalidate_failed"], "other": c["failed"],
            "madv_collapse": (variant == Variant::MadvCollapse).then_some(madv_failures),
        },
        "extents_collapsed": c["pages_collapsed"],
        "kernel_huge_kb": j["kernel"]["anon_huge_kb"].as_u64().unwrap_or(0) + j["kernel"]["hugetlb_kb"].as_u64().unwrap_or(0),
        "lost_writes": mismatches,
        "populated_after_ns": populated_after.as_nanos() as u64,
        "guest_wall_ns": summary.wall.as_nanos() as u64,
    });
    Ok(Outcome { json })
}

/// Times `f` `n` times into a histogram.
fn time_n(
    n: usize,
    mut f: impl FnMut() -> Result<Duration, BenchError>,
) -> Result<Histogram<u64>, BenchError> {
    let mut h = latency_histogram();
    for _ in 0..n {
        h.saturating_record((f()?.as_nanos() as u64).max(1));
    }
    Ok(h)
}

/// The floor: a bare 2 MiB copy between two huge pages, and a bare 2 MiB `mremap` of a huge
/// page over a 4 KiB-populated 2 MiB mapping, the two things a collapse's write window must do.
fn floors() -> Result<(Histogram<u64>, Histogram<u64>), BenchError> {
    let thp = || {
        alloc_thp().map_err(|e| BenchError::Setup(format!("cannot get a THP for the floor: {e}")))
    };
    let (mut a, b) = (thp()?, thp()?);
    let src = b.addr().as_ptr::<u8>().cast_const();
    let memcpy = time_n(100, || {
        let t = Instant::now();
        // SAFETY: `b` is a live 2 MiB mapping we own.
        let from = unsafe { std::slice::from_raw_parts(src, EXTENT_SIZE as usize) };
        a.bytes_mut().copy_from_slice(from);
        std::hint::black_box(&a);
        Ok(t.elapsed())
    })?;
    let mremap = time_n(100, || {
        time_bare_move().map_err(|e| BenchError::Setup(format!("the mremap floor: {e}")))
    })?;
    Ok((memcpy, mremap))
}

/// Times one bare move of a THP over a 4 KiB-populated 2 MiB mapping of its own: the floor
/// of a collapse's write window.
fn time_bare_move() -> std::io::Result<Duration> {
    let page = alloc_thp().map_err(std::io::Error::other)?;
    let dst = GuestRam::new(EXTENT_SIZE, Backing::Small).map_err(std::io::Error::other)?;
    dst.populate()?;
    let start = Instant::now();
    // SAFETY: `dst` is a 2 MiB-aligned mapping of our own that nothing else uses, populated
    // only to be replaced; the moved page becomes part of it and is unmapped with it.
    let moved = unsafe { page.move_to(dst.host_base()) };
    let took = start.elapsed();
    moved.map(|_| took).map_err(|failed| failed.source)
}

/// The smallest guest RAM worth measuring a collapse in: the reserved area and the program's
/// extent, and at least one extent of the guest's data.
pub const MIN_MEMORY: u64 = guest_abi::layout::LOAD_BASE + 2 * EXTENT_SIZE;

/// Runs the benchmark, prints a table per (vCPU count, allocation latency), and returns every
/// figure as JSON.
pub fn run(config: &CollapseBenchConfig) -> Result<Value, BenchError> {
    let variants = if config.variants.is_empty() {
        Variant::ALL.to_vec()
    } else {
        config.variants.clone()
    };
    let latencies: Vec<f64> = if config.alloc_latency_ms.is_empty() {
        vec![0.0]
    } else {
        config.alloc_latency_ms.clone()
    };
    let rounds = config.repeat.max(1);
    // The kernel's peers do not allocate through our pool: they run at the first latency only.
    let rows_at = |first: bool| -> Vec<Row> {
        variants
            .iter()
            .flat_map(|&variant| match variant.order() {
                Some(_) => config
                    .installs
                    .iter()
                    .flat_map(|&i| {
                        config.pool_ahead.iter().map(move |&pool_ahead| Row {
                            variant,
                            install: Some(i),
                            pool_ahead,
                        })
                    })
                    .collect::<Vec<_>>(),
                None if first => vec![Row {
                    variant,
                    install: None,
                    pool_ahead: 0,
                }],
                None => vec![],
            })
            .collect()
    };
    let cold = config.cold;
    let points: Vec<(Point, Vec<Row>)> = config
        .vcpus
        .iter()
        .flat_map(|&vcpus| {
            let warm = latencies.iter().enumerate().map(move |(k, &ms)| {
                (
                    Point {
                        vcpus,
                        alloc_latency: Duration::from_secs_f64(ms / 1e3),
                        cold: false,
                    },
                    k == 0,
                )
            });
            // Cold: the kernel's peers too, since their allocations are as cold.
            let cold = cold.then_some((
                Point {
                    vcpus,
                    alloc_latency: Duration::ZERO,
                    cold: true,
                },
                true,
            ));
            warm.chain(cold)
        })
        .map(|(p, first)| (p, rows_at(first)))
        .collect();
    let steps: u64 = points.iter().map(|(_, r)| r.len() as u64).sum::<u64>() * u64::from(rounds);
    let mut record = Record::new("collapse", steps + 1);
    let (memcpy, mremap) = record.step("the memcpy and mremap floors", floors)?;
    let floor = Floor::of(&memcpy, &mremap);
    let mut tables = Vec::new();
    for (at, rows) in &points {
        if record.stopped() {
            break;
        }
        let here = format!("{} vCPU(s), {} allocation", at.vcpus, at.allocation());
        let per_row = record.rounds(
            &here,
            rounds,
            rows,
            |r| r.label(),
            |&row| run_variant(config, row, *at).map(|o| o.json),
        );
        let results: Vec<Value> = per_row
            .iter()
            .zip(rows)
            .map(|(r, row)| {
                if r.is_empty() {
                    json!({ "variant": row.label(), "no_figures": true })
                } else {
                    median_of_rounds(r)
                }
            })
            .collect();
        record.print(|| tables.push(report_table(config, *at, &results, &floor)));
    }
    record.print(|| floor.print());
    let by_latency = report_latency_sweep(&tables);
    Ok(record.finish(json!({
        "benchmark": "collapse",
        "host_cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "vcpus": config.vcpus,
        "memory_bytes": config.memory.0,
        "passes": config.passes,
        "pool_ahead": config.pool_ahead,
        "cold": config.cold,
        "page_source": config.page_source.name(),
        "repeat": rounds,
        "alloc_latency_ms": latencies,
        "floor": floor.json,
        "tables": tables,
        "by_alloc_latency": by_latency,
    })))
}
