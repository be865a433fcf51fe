//! `vmm bench collapse`: guests keep writing their memory (`verify mode=stress`) while it is
//! collapsed to 2 MiB pages, by this VMM's collapse thread in each lock order and by two peers
//! no one here wrote: the kernel's own khugepaged (its scan settings made fast for the run and
//! restored afterwards) and `MADV_COLLAPSE` on each extent. The same run measures a bare 2 MiB
//! `memcpy` and a bare 2 MiB `mremap`, the physical floor of a collapse's write window.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_abi::layout::EXTENT_SIZE;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::{BenchError, finish, progress, quiet_devices};
use crate::config::{Collapse, GuestArg, VmConfig};
use crate::memory::collapse::{CollapseConfig, CollapseOrder};
use crate::memory::host_view;
use crate::memory::huge::page::alloc_thp;
use crate::memory::huge::pool::PoolKind;
use crate::metrics::{latency_histogram, percentiles};
use crate::units::ByteSize;
use crate::vm::Vm;

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
    /// vCPUs writing.
    pub vcpus: u32,
    /// Guest RAM.
    pub memory: ByteSize,
    /// Stress passes each guest makes (the run must outlast the collapse).
    pub passes: u64,
    /// Variants (empty: all).
    pub variants: Vec<Variant>,
    /// Huge pages the pool keeps ready for this VMM's variants (0: allocate on demand, so
    /// every order really allocates and zeroes a page per collapse).
    pub pool_ahead: usize,
    /// Rounds; variants run interleaved within each, medians are reported.
    pub repeat: u32,
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
fn bytes_with(range: &Range<u64>, mask: u64) -> u64 {
    match host_view::scan(range.start, range.end, mask) {
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

fn run_variant(config: &CollapseBenchConfig, variant: Variant) -> Result<Outcome, BenchError> {
    let arg = |k: &str, v: String| GuestArg {
        key: k.into(),
        value: v,
    };
    // Every variant starts collapsing at the same moment: once the guest has populated all of
    // its RAM with 4 KiB pages (its first pass), while it goes on writing.
    let gate = Arc::new(AtomicBool::new(false));
    let vm_config = VmConfig {
        guest: "verify".into(),
        memory: config.memory,
        vcpus: config.vcpus,
        args: vec![
            arg("mode", "stress".into()),
            arg("passes", config.passes.to_string()),
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
        pool_ahead: config.pool_ahead,
        // A filter can never be lifted, and this process goes on to run more VMs.
        seccomp: crate::seccomp::Seccomp::Off,
        ..VmConfig::default()
    };
    let _khugepaged = if variant == Variant::Khugepaged {
        Some(KhugepagedSettings::fast()?)
    } else {
        None
    };
    let vm = Vm::build_gated(vm_config, quiet_devices(), Some(gate.clone())).map_err(|source| {
        BenchError::Vm {
            what: variant.name().into(),
            source,
        }
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
        gate.store(true, Ordering::Release);
    } else {
        // The kernel's own machinery only works on THP-eligible memory.
        // SAFETY: advice on guest RAM, which stays mapped until `run` returns (`done`); it
        // changes no contents.
        unsafe {
            libc::madvise(
                range.start as *mut libc::c_void,
                total as usize,
                libc::MADV_HUGEPAGE,
            )
        };
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
                    libc::madvise(
                        next as *mut libc::c_void,
                        EXTENT_SIZE as usize,
                        libc::MADV_COLLAPSE,
                    )
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
    let json = json!({
        "variant": variant.name(),
        "all_huge": time_to_huge.is_some(),
        "time_to_all_huge_ns": time_to_huge.map(|t| t.as_nanos() as u64),
        "throughput_gib_per_s": gib_per_s,
        "write_lock_ns": variant.order().map(|_| c["write_lock_ns"].clone()),
        "vcpu_stall_ns": stall,
        "alloc_ns": variant.order().map(|_| c["alloc_ns"].clone()),
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

/// One variant's figures over several rounds: the median of every number (a latency
/// percentile, a time, a rate), the sum of lost writes, and every round kept as it was.
fn median_of_rounds(rounds: &[Value]) -> Value {
    fn merge(values: &[&Value]) -> Value {
        match values[0] {
            Value::Object(first) => Value::Object(
                first
                    .keys()
                    .map(|k| {
                        (
                            k.clone(),
                            merge(&values.iter().map(|v| &v[k.as_str()]).collect::<Vec<_>>()),
                        )
                    })
                    .collect(),
            ),
            Value::Number(_) => {
                let mut nums: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
                if nums.len() < values.len() {
                    return Value::Null;
                }
                json!(super::median(&mut nums))
            }
            other => other.clone(),
        }
    }
    let mut merged = merge(&rounds.iter().collect::<Vec<_>>());
    merged["lost_writes"] = json!(
        rounds
            .iter()
            .filter_map(|r| r["lost_writes"].as_u64())
            .sum::<u64>()
    );
    merged["all_huge"] = json!(rounds.iter().all(|r| r["all_huge"] == true));
    merged["rounds"] = json!(rounds);
    merged
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
    let src = b.addr() as *const u8;
    let memcpy = time_n(100, || {
        let t = Instant::now();
        // SAFETY: `b` is a live 2 MiB mapping we own.
        let from = unsafe { std::slice::from_raw_parts(src, EXTENT_SIZE as usize) };
        a.bytes_mut().copy_from_slice(from);
        std::hint::black_box(&a);
        Ok(t.elapsed())
    })?;
    let mremap = time_n(100, || {
        crate::memory::huge::page::time_bare_move()
            .map_err(|e| BenchError::Setup(format!("the mremap floor: {e}")))
    })?;
    Ok((memcpy, mremap))
}

/// Runs the benchmark, prints the table, and returns every figure as JSON.
pub fn run(config: &CollapseBenchConfig) -> Result<Value, BenchError> {
    let variants = if config.variants.is_empty() {
        Variant::ALL.to_vec()
    } else {
        config.variants.clone()
    };
    let rounds = config.repeat.max(1);
    let bar = progress(variants.len() as u64 * u64::from(rounds) + 1, "collapse");
    bar.set_message("floors");
    let (memcpy, mremap) = floors()?;
    bar.inc(1);
    // Variants interleaved round by round (A B C A B C ...), so that none of them always meets
    // the machine in the same state (cold memory for the first allocations of a run, say).
    let mut per_variant: Vec<Vec<Value>> = variants.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, &v) in variants.iter().enumerate() {
            bar.set_message(v.name());
            per_variant[i].push(run_variant(config, v)?.json);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let results: Vec<Outcome> = per_variant
        .iter()
        .map(|r| Outcome {
            json: median_of_rounds(r),
        })
        .collect();

    let p = |v: &Value, k: &str| v[k].as_f64();
    let floor_json =
        json!({ "memcpy_2m_ns": percentiles(&memcpy), "mremap_2m_ns": percentiles(&mremap) });
    println!(
        "vmm bench collapse: {} vCPU(s) writing {} of guest RAM ({} stress passes), pool ahead {}, {} round(s), medians",
        config.vcpus, config.memory, config.passes, config.pool_ahead, rounds
    );
    println!(
        "{:<14} {:>10} {:>8} {:>22} {:>22} {:>14} {:>6} {:>5}",
        "variant",
        "all huge",
        "GiB/s",
        "write lock p50/p99/max",
        "vCPU stall p50/p99/max",
        "alloc p50/p99",
        "fails",
        "lost"
    );
    let triple = |v: &Value| match (p(v, "p50"), p(v, "p99"), p(v, "max")) {
        (Some(a), Some(b), Some(c)) => format!("{:.0}/{:.0}/{:.0}us", a / 1e3, b / 1e3, c / 1e3),
        _ => "n/a".into(),
    };
    for r in &results {
        let j = &r.json;
        let f = &j["failures"];
        let fails: u64 = ["alloc", "charge", "revalidate", "other", "madv_collapse"]
            .iter()
            .filter_map(|k| f[k].as_u64())
            .sum();
        println!(
            "{:<14} {:>10} {:>8} {:>22} {:>22} {:>14} {:>6} {:>5}",
            j["variant"].as_str().unwrap_or("?"),
            j["time_to_all_huge_ns"]
                .as_f64()
                .map_or("not all".into(), |n| format!("{:.0}ms", n / 1e6)),
            j["throughput_gib_per_s"]
                .as_f64()
                .map_or("-".into(), |g| format!("{g:.2}")),
            triple(&j["write_lock_ns"]),
            triple(&j["vcpu_stall_ns"]),
            match (p(&j["alloc_ns"], "p50"), p(&j["alloc_ns"], "p99")) {
                (Some(a), Some(b)) => format!("{:.0}/{:.0}us", a / 1e3, b / 1e3),
                _ => "n/a".into(),
            },
            fails,
            j["lost_writes"],
        );
    }
    let (cp50, cp99) = (
        memcpy.value_at_quantile(0.5) as f64,
        memcpy.value_at_quantile(0.99) as f64,
    );
    let (mp50, mp99) = (
        mremap.value_at_quantile(0.5) as f64,
        mremap.value_at_quantile(0.99) as f64,
    );
    println!(
        "floor: bare 2 MiB memcpy p50 {:.0}us p99 {:.0}us; bare 2 MiB mremap p50 {:.0}us p99 {:.0}us",
        cp50 / 1e3,
        cp99 / 1e3,
        mp50 / 1e3,
        mp99 / 1e3
    );
    let wl99 = |name: &str| {
        results
            .iter()
            .find(|r| r.json["variant"] == name)
            .and_then(|r| p(&r.json["write_lock_ns"], "p99"))
    };
    let mut ratios = json!({});
    for name in ["prealloc", "legacy", "unlocked"] {
        if let Some(w) = wl99(name) {
            println!(
                "{name}: write-lock p99 = {:.1}x bare mremap p99, {:.1}x bare memcpy p99",
                w / mp99.max(1.0),
                w / cp99.max(1.0)
            );
            ratios[name] = json!({ "write_lock_p99_over_mremap_p99": w / mp99.max(1.0), "write_lock_p99_over_memcpy_p99": w / cp99.max(1.0) });
        }
    }
    if let (Some(pre), Some(leg)) = (wl99("prealloc"), wl99("legacy")) {
        println!(
            "prealloc write-lock p99 / legacy write-lock p99 = {:.3} (1/{:.1})",
            pre / leg,
            leg / pre
        );
        ratios["prealloc_over_legacy_write_lock_p99"] = json!(pre / leg);
    }
    Ok(json!({
        "benchmark": "collapse",
        "vcpus": config.vcpus,
        "memory_bytes": config.memory.0,
        "passes": config.passes,
        "pool_ahead": config.pool_ahead,
        "repeat": rounds,
        "floor": floor_json,
        "variants": results.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        "ratios": ratios,
    }))
}
