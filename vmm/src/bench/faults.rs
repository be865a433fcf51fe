//! `vmm bench faults`: guest demand paging, modelled on the KVM selftest `demand_paging_test`.
//!
//! N vCPUs each touch their own range once (the `touch` guest) on fresh memory, so every first
//! touch is a fault. The modes differ in who resolves the faults and how much at a time: the
//! host kernel 4 KiB at a time (`kernel-4k`, the baseline), the kernel with THP or hugetlb 2 MiB
//! at a time, or this VMM's userfaultfd handler serving zeroes or a memory image, 4 KiB per
//! fault or a whole 2 MiB extent per fault. Rates come from the guest's own clock (rdtsc from a
//! vCPU's first touch to its last), so VM set-up and teardown are not counted.
//!
//! `--vcpus 1,2,4` sweeps vCPU counts in one invocation (modes interleaved within each count);
//! the 2 MiB modes run once per `--install` method. Each mode also runs once more with the
//! guest timing every access (`timing=on`, which slows the guest's loop), for the stall the
//! guest itself saw: its p99 and max, beside the handler's service time.

use std::path::PathBuf;

use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE, PAGE_SIZE};
use serde_json::{Value, json};

use super::{BenchError, Record, median, run_vm, us};
use crate::config::{Collapse, GuestArg, VmConfig};
use crate::stalls::GuestStalls;
use crate::units::ByteSize;
use vm_extents::InstallMethod;
use vm_extents::host_view;
use vm_extents::ram_image;
use vm_extents::{Backing, PageSourceKind};

/// One way of resolving guest faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Anonymous memory the host kernel fills 4 KiB at a time (the baseline).
    Kernel4k,
    /// THP-eligible anonymous memory the host kernel fills 2 MiB at a time.
    KernelThp,
    /// hugetlb memory the host kernel fills 2 MiB at a time.
    Hugetlb,
    /// The VMM's handler, zeroes, 4 KiB per fault.
    UffdZero,
    /// The VMM's handler, from a memory image, 4 KiB per fault.
    UffdImage,
    /// The VMM's handler, zeroes, a whole 2 MiB extent per fault.
    UffdZero2m,
    /// The VMM's handler, from a memory image, a whole 2 MiB extent per fault.
    UffdImage2m,
}

impl Mode {
    /// Every mode, baseline first.
    pub const ALL: [Mode; 7] = [
        Mode::Kernel4k,
        Mode::KernelThp,
        Mode::Hugetlb,
        Mode::UffdZero,
        Mode::UffdImage,
        Mode::UffdZero2m,
        Mode::UffdImage2m,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Kernel4k => "kernel-4k",
            Mode::KernelThp => "kernel-thp",
            Mode::Hugetlb => "hugetlb",
            Mode::UffdZero => "uffd-zero",
            Mode::UffdImage => "uffd-image",
            Mode::UffdZero2m => "uffd-zero-2m",
            Mode::UffdImage2m => "uffd-image-2m",
        }
    }

    fn uses_image(self) -> bool {
        matches!(self, Mode::UffdImage | Mode::UffdImage2m)
    }

    /// Whether faults put whole huge pages in (and so the install method matters).
    fn installs(self) -> bool {
        matches!(self, Mode::UffdZero2m | Mode::UffdImage2m)
    }
}

/// One row of a table: a mode, and for the 2 MiB modes the install method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    mode: Mode,
    install: Option<InstallMethod>,
}

impl Row {
    /// `uffd-zero-2m` (moves, the default) or `uffd-zero-2m/mremap`.
    fn label(self) -> String {
        match self.install {
            Some(InstallMethod::Mremap) => format!("{}/mremap", self.mode.name()),
            _ => self.mode.name().to_string(),
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

/// How the guest touches each page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// A store.
    #[default]
    Write,
    /// A load.
    Read,
}

/// In which order the guest touches its pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Ascending addresses.
    #[default]
    Seq,
    /// A shuffle.
    Random,
}

/// The name a value has on the command line (and in the guest's arguments).
fn name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .expect("every value has a name")
        .get_name()
        .to_string()
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct FaultsConfig {
    /// vCPU counts, swept in this order.
    pub vcpus: Vec<u32>,
    /// Memory each vCPU touches.
    pub mem_per_vcpu: ByteSize,
    /// How each page is touched.
    pub access: Access,
    /// In which order.
    pub pattern: Pattern,
    /// Modes to run (empty: all the host supports).
    pub modes: Vec<Mode>,
    /// Rounds; modes run interleaved within each, medians are reported.
    pub repeat: u32,
    /// Where to put the memory image the image modes serve from.
    pub scratch: PathBuf,
    /// Host CPUs the benchmark is pinned to (empty: not pinned), for the report.
    pub pinned: Vec<usize>,
    /// Install methods the 2 MiB modes run with.
    pub installs: Vec<InstallMethod>,
    /// Fault handler threads (`None`: the VMM's default, one per vCPU up to the CPUs).
    pub fault_threads: Option<usize>,
    /// Also run each mode with the guest timing its accesses.
    pub guest_timing: bool,
}

/// One mode's run.
struct Sample {
    rate: f64,
    per_vcpu: Vec<f64>,
    wall_ns: f64,
    service: Value,
    served: u64,
    /// From the timed run, if there was one.
    stalls: Option<GuestStalls>,
}

impl FaultsConfig {
    fn ram(&self, vcpus: u32) -> u64 {
        LOAD_BASE + EXTENT_SIZE + self.touched(vcpus)
    }

    fn touched(&self, vcpus: u32) -> u64 {
        self.mem_per_vcpu.0 * u64::from(vcpus)
    }

    fn largest(&self) -> u32 {
        self.vcpus.iter().copied().max().unwrap_or(1)
    }

    /// The rows: every mode, the 2 MiB ones once per install method.
    fn rows(&self, modes: &[Mode]) -> Vec<Row> {
        modes
            .iter()
            .flat_map(|&mode| {
                let installs: Vec<Option<InstallMethod>> = if mode.installs() {
                    self.installs.iter().copied().map(Some).collect()
                } else {
                    vec![None]
                };
                installs
                    .into_iter()
                    .map(move |install| Row { mode, install })
            })
            .collect()
    }

    fn vm_config(&self, row: Row, vcpus: u32, timed: bool, image: &std::path::Path) -> VmConfig {
        let mode = row.mode;
        let (backing, source, granularity) = match mode {
            Mode::Kernel4k => (Backing::Small, PageSourceKind::Kernel, PAGE_SIZE),
            Mode::KernelThp => (Backing::Thp, PageSourceKind::Kernel, PAGE_SIZE),
            Mode::Hugetlb => (Backing::Hugetlb, PageSourceKind::Kernel, PAGE_SIZE),
            Mode::UffdZero => (Backing::Small, PageSourceKind::Zero, PAGE_SIZE),
            Mode::UffdImage => (
                Backing::Small,
                PageSourceKind::Image(image.into()),
                PAGE_SIZE,
            ),
            Mode::UffdZero2m => (Backing::Small, PageSourceKind::Zero, EXTENT_SIZE),
            Mode::UffdImage2m => (
                Backing::Small,
                PageSourceKind::Image(image.into()),
                EXTENT_SIZE,
            ),
        };
        let arg = |k: &str, v: &str| GuestArg {
            key: k.into(),
            value: v.into(),
        };
        let ram = self.ram(vcpus);
        let uses_uffd = source.uses_uffd();
        VmConfig {
            guest: "touch".into(),
            memory: ByteSize(ram),
            vcpus,
            args: vec![
                arg("pattern", &name(self.pattern)),
                arg("access", &name(self.access)),
                arg("size", &self.touched(vcpus).to_string()),
                arg("timing", if timed { "on" } else { "off" }),
            ],
            backing,
            page_source: source,
            fault_granularity: ByteSize(granularity),
            collapse: Collapse::Off,
            // Huge backings fault on demand here: that is what is measured.
            populate: false,
            // Extent-granular resolution takes pre-zeroed pages from the pool, whose depth
            // follows the rate 2 MiB faults take them (the pipelined default).
            pool_ahead: vm_extents::MemoryConfig::POOL_AHEAD,
            // A filter can never be lifted, and this process goes on to run more VMs.
            seccomp: crate::seccomp::Seccomp::Off,
            // Only the VMM's own handler has threads to set.
            fault_threads: self.fault_threads.filter(|_| uses_uffd),
            install: row.install.unwrap_or_default(),
            // What is measured is the fault path (`vmm bench restore` measures the prefetcher).
            prefetch: Some(false),
            ..VmConfig::default()
        }
    }

    /// Why `mode` cannot run on this host, if it cannot.
    fn unsupported(&self, mode: Mode) -> Option<String> {
        if mode == Mode::Hugetlb {
            let need = self.ram(self.largest()) / EXTENT_SIZE;
            let pool = host_view::hugetlb_pool();
            if pool.free < need {
                return Some(format!(
                    "needs {need} free 2 MiB hugetlb pages, the pool has {} (echo {need} > /proc/sys/vm/nr_hugepages)",
                    pool.free
                ));
            }
        }
        None
    }
}

fn sample(
    config: &FaultsConfig,
    row: Row,
    vcpus: u32,
    image: &std::path::Path,
) -> Result<Sample, BenchError> {
    let stalls = if config.guest_timing {
        let timed = run_vm(&row.label(), config.vm_config(row, vcpus, true, image))?;
        timed.guest_stalls()
    } else {
        None
    };
    let summary = run_vm(&row.label(), config.vm_config(row, vcpus, false, image))?;
    let tsc_hz = summary.tsc_khz as f64 * 1000.0;
    if tsc_hz == 0.0 {
        return Err(BenchError::Setup(
            "KVM reports no TSC frequency; cannot time the guest".into(),
        ));
    }
    let mut per_vcpu = Vec::new();
    let (mut pages, mut slowest) = (0u64, 0f64);
    for v in &summary.vcpus {
        let (p, c) = (
            v.report("pages").unwrap_or(0),
            v.report("cycles").unwrap_or(0),
        );
        let secs = c as f64 / tsc_hz;
        per_vcpu.push(if secs > 0.0 { p as f64 / secs } else { 0.0 });
        pages += p;
        slowest = slowest.max(secs);
    }
    let json = summary.to_json();
    Ok(Sample {
        rate: if slowest > 0.0 {
            pages as f64 / slowest
        } else {
            0.0
        },
        per_vcpu,
        wall_ns: summary.wall.as_nanos() as f64,
        service: json["faults"]["service_ns"].clone(),
        served: json["faults"]["served"].as_u64().unwrap_or(0),
        stalls,
    })
}

/// Runs the benchmark, prints a table per vCPU count, and returns every figure as JSON.
pub fn run(config: &FaultsConfig) -> Result<Value, BenchError> {
    let modes = if config.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        config.modes.clone()
    };
    let mut skipped = Vec::new();
    let runnable: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|&m| match config.unsupported(m) {
            Some(why) => {
                skipped.push((m, why));
                false
            }
            None => true,
        })
        .collect();
    let rows = config.rows(&runnable);
    let scratch = super::ScratchDir::create(&config.scratch)?;
    let image_path = scratch.path().join("ram.img");
    // An image of exactly the RAM of `vcpus` vCPUs' VM. Every page holds data, so the handler
    // really copies (no zero-page shortcut).
    let write_image = |vcpus: u32| -> Result<(), BenchError> {
        if !runnable.iter().any(|m| m.uses_image()) {
            return Ok(());
        }
        ram_image::save(
            &image_path,
            "the benchmark's image",
            config.ram(vcpus),
            |gpa, buf| {
                buf.fill((gpa >> 12) as u8 | 1);
                Ok(ram_image::Page::Read)
            },
            &|| false,
        )
        .map(|_| ())
        .map_err(|e| BenchError::Setup(format!("cannot write the benchmark's memory image: {e}")))
    };
    let steps = config.vcpus.len() as u64 * u64::from(config.repeat) * rows.len() as u64;
    let mut record = Record::new("faults", steps);
    let mut counts = Vec::new();
    for &vcpus in &config.vcpus {
        if record.stopped() {
            break;
        }
        let at = format!("{vcpus} vCPU(s)");
        if let Err(e) = write_image(vcpus) {
            record.fail("the memory image", &at, &e);
            continue;
        }
        let mut samples = record.rounds(
            &at,
            config.repeat,
            &rows,
            |r| r.label(),
            |&row| sample(config, row, vcpus, &image_path),
        );
        record.print(|| counts.push(report_count(config, vcpus, &rows, &mut samples)));
    }
    drop(scratch);
    for (mode, why) in &skipped {
        println!("{:<20} skipped: {why}", mode.name());
    }
    Ok(record.finish(json!({
        "benchmark": "faults",
        "host_cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "vcpus": config.vcpus,
        "mem_per_vcpu_bytes": config.mem_per_vcpu.0,
        "access": config.access,
        "pattern": config.pattern,
        "repeat": config.repeat,
        "pinned_cpus": config.pinned,
        "fault_threads": config.fault_threads,
        "guest_timing": config.guest_timing,
        "counts": counts,
        "skipped": skipped.iter().map(|(m, why)| json!({"mode": m.name(), "reason": why})).collect::<Vec<_>>(),
    })))
}

/// Prints one vCPU count's table and returns its JSON.
fn report_count(
    config: &FaultsConfig,
    vcpus: u32,
    rows: &[Row],
    samples: &mut [Vec<Sample>],
) -> Value {
    let rate = |s: &[Sample]| {
        (!s.is_empty()).then(|| median(&mut s.iter().map(|s| s.rate).collect::<Vec<_>>()))
    };
    let baseline = rows
        .iter()
        .position(|r| r.mode == Mode::Kernel4k)
        .and_then(|i| rate(&samples[i]));
    let pinning = if config.pinned.is_empty() {
        "not pinned".to_string()
    } else {
        format!("pinned to CPUs {:?}", config.pinned)
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "vmm bench faults: {vcpus} vCPU(s) x {} each on a {cpus}-CPU host, access={}, pattern={}, {} round(s), medians, {pinning}",
        config.mem_per_vcpu,
        name(config.access),
        name(config.pattern),
        config.repeat
    );
    if vcpus as usize > cpus {
        println!(
            "(oversubscribed: {vcpus} vCPUs on {cpus} host CPUs; the vCPUs take turns, and the \
             figures say more about the scheduler than about faults)"
        );
    }
    println!(
        "{:<20} {:>12} {:>8} {:>10} {:>10} {:>10} {:>11} {:>11} {:>9}",
        "mode",
        "pages/s",
        "vs 4k",
        "wall ms",
        "svc p50us",
        "svc p99us",
        "guest p99us",
        "guest maxus",
        "served"
    );
    let mut modes_json = Vec::new();
    for (i, &row) in rows.iter().enumerate() {
        let s = &samples[i];
        let Some(r) = rate(s) else {
            println!(
                "{:<20} no figures (it failed or was not run; see above)",
                row.label()
            );
            continue;
        };
        let ratio = baseline.filter(|b| *b > 0.0).map(|b| r / b);
        let wall = median(&mut s.iter().map(|s| s.wall_ns).collect::<Vec<_>>());
        let pct = |key: &str| {
            median(
                &mut s
                    .iter()
                    .map(|s| s.service[key].as_f64().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
            )
        };
        let stall = |f: fn(&GuestStalls) -> u64| {
            let mut v: Vec<f64> = s
                .iter()
                .filter_map(|s| s.stalls.as_ref().map(|g| f(g) as f64))
                .collect();
            (!v.is_empty()).then(|| median(&mut v))
        };
        let (g99, gmax) = (stall(|g| g.p99_ns), stall(|g| g.max_ns));
        let served = s.last().map_or(0, |s| s.served);
        let per_vcpu: Vec<f64> = (0..s[0].per_vcpu.len())
            .map(|v| median(&mut s.iter().map(|s| s.per_vcpu[v]).collect::<Vec<_>>()))
            .collect();
        let opt_us = |v: Option<f64>| v.map_or("-".into(), us);
        println!(
            "{:<20} {:>12.0} {:>8} {:>10.1} {:>10} {:>10} {:>11} {:>11} {:>9}",
            row.label(),
            r,
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            wall / 1e6,
            us(pct("p50")),
            us(pct("p99")),
            opt_us(g99),
            opt_us(gmax),
            served
        );
        modes_json.push(json!({
            "mode": row.label(),
            "install": row.install,
            "pages_per_sec": r,
            "per_vcpu_pages_per_sec": per_vcpu,
            "ratio_to_kernel_4k": ratio,
            "wall_ns": wall,
            "service_ns": { "p50": pct("p50"), "p99": pct("p99"), "max": pct("max") },
            "guest_stall_ns": g99.map(|p99| json!({ "p99": p99, "max": gmax })),
            "guest_stalls": s.iter().map(|s| s.stalls.clone()).collect::<Vec<_>>(),
            "faults_served": served,
            "rounds": s.iter().map(|s| s.rate).collect::<Vec<_>>(),
        }));
    }
    for (i, &row) in rows.iter().enumerate() {
        if let Some(r) = rate(&samples[i]) {
            println!(
                "{}: Overall demand paging rate: {r:.0} pgs/sec",
                row.label()
            );
        }
    }
    println!();
    json!({ "vcpus": vcpus, "modes": modes_json })
}
