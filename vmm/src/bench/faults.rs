//! `vmm bench faults`: guest demand paging, modelled on the KVM selftest `demand_paging_test`.
//!
//! N vCPUs each touch their own range once (the `touch` guest) on fresh memory, so every first
//! touch is a fault. The modes differ in who resolves the faults and how much at a time: the
//! host kernel 4 KiB at a time (`kernel-4k`, the baseline), the kernel with THP or hugetlb 2 MiB
//! at a time, or this VMM's userfaultfd handler serving zeroes or a memory image, 4 KiB per
//! fault or a whole 2 MiB extent per fault. Rates come from the guest's own clock (rdtsc from a
//! vCPU's first touch to its last), so VM set-up and teardown are not counted.

use std::path::PathBuf;

use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE, PAGE_SIZE};
use serde_json::{Value, json};

use super::{BenchError, median, progress, run_vm, us};
use crate::config::{Collapse, GuestArg, VmConfig};
use crate::memory::host_view;
use crate::memory::ram_image;
use crate::memory::{Backing, PageSourceKind};
use crate::units::ByteSize;

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
    /// vCPUs.
    pub vcpus: u32,
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
}

/// One mode's run.
struct Sample {
    rate: f64,
    per_vcpu: Vec<f64>,
    wall_ns: f64,
    service: Value,
    served: u64,
}

impl FaultsConfig {
    fn ram(&self) -> u64 {
        LOAD_BASE + EXTENT_SIZE + self.touched()
    }

    fn touched(&self) -> u64 {
        self.mem_per_vcpu.0 * u64::from(self.vcpus)
    }

    fn vm_config(&self, mode: Mode, image: &std::path::Path) -> VmConfig {
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
        VmConfig {
            guest: "touch".into(),
            memory: ByteSize(self.ram()),
            vcpus: self.vcpus,
            args: vec![
                arg("pattern", &name(self.pattern)),
                arg("access", &name(self.access)),
                arg("size", &self.touched().to_string()),
            ],
            backing,
            page_source: source,
            fault_granularity: ByteSize(granularity),
            collapse: Collapse::Off,
            // Huge backings fault on demand here: that is what is measured.
            populate: false,
            // Extent-granular resolution takes pre-zeroed pages from the pool; keep enough
            // ready that the refill thread (on another CPU) stays ahead of a fast guest.
            pool_ahead: 8.min((self.ram() / EXTENT_SIZE) as usize),
            // A filter can never be lifted, and this process goes on to run more VMs.
            seccomp: crate::seccomp::Seccomp::Off,
            ..VmConfig::default()
        }
    }

    /// Why `mode` cannot run on this host, if it cannot.
    fn unsupported(&self, mode: Mode) -> Option<String> {
        if mode == Mode::Hugetlb {
            let need = self.ram() / EXTENT_SIZE;
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
    mode: Mode,
    image: &std::path::Path,
) -> Result<Sample, BenchError> {
    let summary = run_vm(mode.name(), config.vm_config(mode, image))?;
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
    })
}

/// Runs the benchmark, prints the table, and returns every figure as JSON.
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
    let image_path = config.scratch.join("bench-faults.img");
    if runnable.iter().any(|m| m.uses_image()) {
        // Every page holds data, so the handler really copies (no zero-page shortcut).
        ram_image::save(
            &image_path,
            config.ram(),
            |gpa, buf| {
                buf.fill((gpa >> 12) as u8 | 1);
                Ok(ram_image::Page::Read)
            },
            &|| false,
        )
        .map_err(|e| {
            BenchError::Setup(format!("cannot write the benchmark's memory image: {e}"))
        })?;
    }

    let bar = progress(u64::from(config.repeat) * runnable.len() as u64, "faults");
    let mut samples: Vec<Vec<Sample>> = runnable.iter().map(|_| Vec::new()).collect();
    for _ in 0..config.repeat {
        for (i, &mode) in runnable.iter().enumerate() {
            bar.set_message(mode.name());
            samples[i].push(sample(config, mode, &image_path)?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_file(&image_path);

    let rate = |i: usize| median(&mut samples[i].iter().map(|s| s.rate).collect::<Vec<_>>());
    let baseline = runnable.iter().position(|&m| m == Mode::Kernel4k).map(rate);
    let pinning = if config.pinned.is_empty() {
        "not pinned".to_string()
    } else {
        format!("pinned to CPUs {:?}", config.pinned)
    };
    println!(
        "vmm bench faults: {} vCPU(s) x {} each, access={}, pattern={}, {} round(s), medians, {pinning}",
        config.vcpus,
        config.mem_per_vcpu,
        name(config.access),
        name(config.pattern),
        config.repeat
    );
    println!(
        "{:<14} {:>14} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "mode", "pages/s", "vs 4k", "wall ms", "svc p50us", "svc p99us", "served"
    );
    let mut modes_json = Vec::new();
    for (i, &mode) in runnable.iter().enumerate() {
        let r = rate(i);
        let ratio = baseline.filter(|b| *b > 0.0).map(|b| r / b);
        let wall = median(&mut samples[i].iter().map(|s| s.wall_ns).collect::<Vec<_>>());
        let pct = |key: &str| {
            median(
                &mut samples[i]
                    .iter()
                    .map(|s| s.service[key].as_f64().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
            )
        };
        let served = samples[i].last().map_or(0, |s| s.served);
        let vcpus = samples[i][0].per_vcpu.len();
        let per_vcpu: Vec<f64> = (0..vcpus)
            .map(|v| median(&mut samples[i].iter().map(|s| s.per_vcpu[v]).collect::<Vec<_>>()))
            .collect();
        println!(
            "{:<14} {:>14.0} {:>10} {:>12.1} {:>10} {:>10} {:>10}",
            mode.name(),
            r,
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            wall / 1e6,
            us(pct("p50")),
            us(pct("p99")),
            served
        );
        modes_json.push(json!({
            "mode": mode.name(),
            "pages_per_sec": r,
            "per_vcpu_pages_per_sec": per_vcpu,
            "ratio_to_kernel_4k": ratio,
            "wall_ns": wall,
            "service_ns": { "p50": pct("p50"), "p99": pct("p99"), "max": pct("max") },
            "faults_served": served,
            "rounds": samples[i].iter().map(|s| s.rate).collect::<Vec<_>>(),
        }));
    }
    for (i, &mode) in runnable.iter().enumerate() {
        println!(
            "{}: Overall demand paging rate: {:.0} pgs/sec",
            mode.name(),
            rate(i)
        );
    }
    for (mode, why) in &skipped {
        println!("{:<14} skipped: {why}", mode.name());
    }
    Ok(json!({
        "benchmark": "faults",
        "vcpus": config.vcpus,
        "mem_per_vcpu_bytes": config.mem_per_vcpu.0,
        "access": config.access,
        "pattern": config.pattern,
        "repeat": config.repeat,
        "pinned_cpus": config.pinned,
        "modes": modes_json,
        "skipped": skipped.iter().map(|(m, why)| json!({"mode": m.name(), "reason": why})).collect::<Vec<_>>(),
    }))
}
