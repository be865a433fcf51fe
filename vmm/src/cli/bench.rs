//! `vmm bench`'s options: one set per benchmark, each turned into that benchmark's
//! configuration (sizes and counts checked here, naming the option given).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use clap::builder::TypedValueParser;
use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE, MAX_RAM};

use super::{Switch, choice};
use crate::bench::BenchError;
use crate::bench::collapse::{CollapseBenchConfig, Variant};
use crate::bench::faults::{Access, FaultsConfig, Mode, Pattern};
use crate::bench::reclaim::{Mode as ReclaimMode, ReclaimBenchConfig, Shape as ReclaimShape};
use crate::bench::restore::{Density, Mode as RestoreMode, RestoreBenchConfig};
use crate::bench::resume::{Mode as ResumeMode, Pattern as ResumePattern, ResumeBenchConfig};
use crate::units::ByteSize;
use vm_extents::{InstallMethod, MemoryConfig, PageSourceKind};

/// `vmm bench`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Guest demand paging rate per way of resolving faults (demand_paging_test's model).
    Faults(FaultsArgs),
    /// Collapse of guest memory to 2 MiB pages while guests write, per lock order and peer.
    Collapse(CollapseArgs),
    /// Restoring a guest from a memory image: eager, lazy 4 KiB, lazy 2 MiB, prefetch.
    Restore(RestoreArgs),
    /// Giving back memory the guest frees, per shape: reports honoured per extent, a 4 KiB
    /// balloon, no reclaim.
    Reclaim(ReclaimArgs),
    /// Resuming a running VM's snapshot, in clones at once: eager, lazy 4 KiB, lazy 2 MiB,
    /// prefetch, prefetch replaying a recorded working set.
    Resume(ResumeArgs),
}

impl BenchCommand {
    /// Where the benchmark's outputs go.
    pub fn output(&self) -> &BenchOutput {
        match self {
            BenchCommand::Faults(a) => &a.output,
            BenchCommand::Collapse(a) => &a.output,
            BenchCommand::Restore(a) => &a.output,
            BenchCommand::Reclaim(a) => &a.output,
            BenchCommand::Resume(a) => &a.output,
        }
    }
}

/// `vmm bench reclaim`.
#[derive(Debug, clap::Args)]
pub struct ReclaimArgs {
    /// Guest RAM.
    #[arg(long, default_value = "128M", value_name = "SIZE")]
    pub memory: ByteSize,
    /// vCPUs, each freeing its own share.
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=guest_abi::layout::MAX_VCPUS as i64))]
    pub vcpus: u32,
    /// What the guest frees: one table per shape.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "extents,pages,halves",
        value_name = "extents|pages|halves,..."
    )]
    pub shapes: Vec<ReclaimShape>,
    /// Comma-separated modes (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "MODE,...")]
    pub modes: Vec<ReclaimMode>,
    /// Percent freed (of the extents, or of each extent's pages for `pages`).
    #[arg(long, default_value_t = 50, value_name = "PERCENT",
          value_parser = clap::value_parser!(u64).range(1..=100))]
    pub free: u64,
    /// Percent of the freed pages the guest touches again.
    #[arg(long, default_value_t = 25, value_name = "PERCENT",
          value_parser = clap::value_parser!(u64).range(0..=100))]
    pub retouch: u64,
    /// Rounds, modes interleaved; medians are reported (1 to 1000).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// The kernel's `khugepaged/max_ptes_none` for the kernel-shrinker mode, 0 to 511, set for
    /// its runs and restored after [default: the host's, unchanged]. At 511 (the kernel's
    /// default) its THP shrinker splits nothing.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=511))]
    pub kernel_max_ptes_none: Option<u32>,
    /// Outputs.
    #[command(flatten)]
    pub output: BenchOutput,
}

impl ReclaimArgs {
    /// The benchmark these arguments describe, or why it cannot run.
    pub fn to_config(&self) -> Result<ReclaimBenchConfig, BenchError> {
        bench_size(
            "--memory",
            self.memory,
            crate::bench::reclaim::MIN_MEMORY,
            "eight extents of data to free from",
        )?;
        Ok(ReclaimBenchConfig {
            memory: self.memory,
            vcpus: self.vcpus,
            shapes: self.shapes.clone(),
            modes: self.modes.clone(),
            free: self.free,
            retouch: self.retouch,
            kernel_max_ptes_none: self.kernel_max_ptes_none,
            repeat: self.repeat,
        })
    }
}

/// `vmm bench restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    pub memory: ByteSize,
    /// Images to restore: every page filled, or the first quarter (the rest holes).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "dense,sparse",
        value_name = "dense|sparse,..."
    )]
    pub density: Vec<Density>,
    /// Comma-separated modes (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "MODE,...")]
    pub modes: Vec<RestoreMode>,
    /// Percent of the filled memory the restored guest checks, at random.
    #[arg(long, default_value_t = 50, value_name = "PERCENT",
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub working_set: u8,
    /// Drop the image from the page cache before each restore (a cold start; advice on the
    /// file, no root needed).
    #[arg(long)]
    pub drop_caches: bool,
    /// Microseconds added to every read of the image (slower storage than this host's).
    #[arg(long, default_value_t = 0, value_name = "US",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub image_latency: u64,
    /// Prefetch threads in the `prefetch` mode (1 to 16).
    #[arg(long, default_value_t = MemoryConfig::PREFETCH_THREADS, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=16).map(|n| n as usize))]
    pub prefetch_threads: usize,
    /// Rounds, modes interleaved; medians are reported (1 to 1000).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Outputs.
    #[command(flatten)]
    pub output: BenchOutput,
}

impl RestoreArgs {
    /// The benchmark these arguments describe, or why it cannot run.
    pub fn to_config(&self) -> Result<RestoreBenchConfig, BenchError> {
        bench_size(
            "--memory",
            self.memory,
            crate::bench::restore::MIN_MEMORY,
            "a sparse image must fill at least one extent",
        )?;
        Ok(RestoreBenchConfig {
            memory: self.memory,
            densities: self.density.clone(),
            modes: self.modes.clone(),
            working_set: f64::from(self.working_set) / 100.0,
            cold: self.drop_caches,
            image_latency: Duration::from_micros(self.image_latency),
            prefetch_threads: self.prefetch_threads,
            repeat: self.repeat,
            scratch: std::env::temp_dir(),
        })
    }
}

/// Outputs every benchmark takes.
#[derive(Debug, clap::Args)]
pub struct BenchOutput {
    /// Write every figure as JSON here.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Draw an SVG plot here.
    #[arg(long, value_name = "PATH.svg")]
    pub plot: Option<PathBuf>,
}

/// `vmm bench faults`.
#[derive(Debug, clap::Args)]
pub struct FaultsArgs {
    /// vCPU counts, each vCPU touching its own memory: one table per count, swept in one
    /// run (such as `1,2,4,8,16`).
    #[arg(long, default_value = "1", value_delimiter = ',', value_name = "N,...",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: Vec<u32>,
    /// Memory each vCPU touches (a multiple of 2 MiB).
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    pub mem_per_vcpu: ByteSize,
    /// How each page is touched.
    #[arg(long, value_enum, default_value_t, value_name = "write|read")]
    pub access: Access,
    /// In which order.
    #[arg(long, value_enum, default_value_t, value_name = "seq|random")]
    pub pattern: Pattern,
    /// Comma-separated modes (default: all the host supports).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "MODE,...")]
    pub modes: Vec<Mode>,
    /// Rounds, modes interleaved (A B C A B C ...); medians are reported (1 to 1000).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Pin the whole benchmark (vCPU and fault-handler threads) to these host CPUs, such as
    /// `0` (default: no pinning). With one vCPU and one CPU, a fault's wake-ups stay on one
    /// core, which on nested hosts is most of a userfaultfd round trip.
    #[arg(long, value_delimiter = ',', value_name = "CPU,...")]
    pub pin_cpus: Vec<usize>,
    /// Install methods the 2 MiB modes run with, each a row of its own.
    #[arg(
        long,
        value_parser = choice::<InstallMethod>(),
        value_delimiter = ',',
        value_name = "METHOD,...",
        default_value = "move,mremap"
    )]
    pub install: Vec<InstallMethod>,
    /// Fault handler threads, each with its own userfaultfd (default: one per vCPU, up to
    /// the host's CPUs).
    #[arg(long, value_name = "N")]
    pub fault_threads: Option<usize>,
    /// Also run each mode with the guest timing every access, for the stall it saw.
    #[arg(long, value_enum, default_value_t = Switch::On, value_name = "on|off")]
    pub guest_timing: Switch,
    /// Outputs.
    #[command(flatten)]
    pub output: BenchOutput,
}

/// Fails unless `size`, given as `flag`, is a multiple of 2 MiB of at least `min`.
/// `vmm bench resume`.
#[derive(Debug, clap::Args)]
pub struct ResumeArgs {
    /// Guest RAM.
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    pub memory: ByteSize,
    /// vCPUs of the guest (1 to 16).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub vcpus: u32,
    /// Percent of free RAM the resumed guest reads (whole extents).
    #[arg(long, default_value_t = 25, value_name = "PERCENT",
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub working_set: u8,
    /// Orders of the working set: the first extents, or extents at random in random order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "seq,random",
        value_name = "seq|random,..."
    )]
    pub patterns: Vec<ResumePattern>,
    /// Comma-separated modes (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "MODE,...")]
    pub modes: Vec<ResumeMode>,
    /// How many VMM processes resume the snapshot at once, comma-separated (1 to 64 each).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8", value_name = "N,...",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub clones: Vec<u32>,
    /// Drop the image from the page cache before each group of clones (a cold start).
    #[arg(long)]
    pub drop_caches: bool,
    /// Rounds, modes interleaved (1 to 1000).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Outputs.
    #[command(flatten)]
    pub output: BenchOutput,
}

impl ResumeArgs {
    /// The benchmark these arguments describe, or why it cannot run.
    pub fn to_config(&self) -> Result<ResumeBenchConfig, BenchError> {
        bench_size(
            "--memory",
            self.memory,
            crate::bench::resume::MIN_MEMORY,
            "the working set must be at least one extent",
        )?;
        Ok(ResumeBenchConfig {
            memory: self.memory,
            vcpus: self.vcpus,
            working_set: f64::from(self.working_set) / 100.0,
            patterns: self.patterns.clone(),
            modes: self.modes.clone(),
            clones: self.clones.clone(),
            cold: self.drop_caches,
            repeat: self.repeat,
            scratch: std::env::temp_dir(),
        })
    }
}

fn bench_size(flag: &str, size: ByteSize, min: u64, why: &str) -> Result<(), BenchError> {
    if !size.0.is_multiple_of(EXTENT_SIZE) || size.0 < min {
        return Err(BenchError::BadInput(format!(
            "{flag} {size}: a multiple of 2 MiB of at least {} is needed ({why})",
            ByteSize(min)
        )));
    }
    if size.0 > MAX_RAM {
        return Err(BenchError::BadInput(format!(
            "{flag} {size}: at most {} of guest RAM",
            ByteSize(MAX_RAM)
        )));
    }
    Ok(())
}

impl FaultsArgs {
    /// The benchmark these arguments describe, or why it cannot run.
    pub fn to_config(&self) -> Result<FaultsConfig, BenchError> {
        bench_size(
            "--mem-per-vcpu",
            self.mem_per_vcpu,
            EXTENT_SIZE,
            "each vCPU touches whole extents",
        )?;
        let most = self.vcpus.iter().copied().max().unwrap_or(1);
        if self.mem_per_vcpu.0.saturating_mul(u64::from(most)) > MAX_RAM - LOAD_BASE - EXTENT_SIZE {
            return Err(BenchError::BadInput(format!(
                "--vcpus {most} x --mem-per-vcpu {} is more than the {} of guest RAM a VM may \
                 have",
                self.mem_per_vcpu,
                ByteSize(MAX_RAM)
            )));
        }
        Ok(FaultsConfig {
            vcpus: self.vcpus.clone(),
            mem_per_vcpu: self.mem_per_vcpu,
            access: self.access,
            pattern: self.pattern,
            modes: self.modes.clone(),
            repeat: self.repeat,
            scratch: std::env::temp_dir(),
            pinned: self.pin_cpus.clone(),
            installs: self.install.clone(),
            fault_threads: self.fault_threads,
            guest_timing: self.guest_timing == Switch::On,
        })
    }
}

/// `vmm bench collapse`.
#[derive(Debug, clap::Args)]
pub struct CollapseArgs {
    /// vCPU counts writing their memory: one table per count, swept in one run.
    #[arg(long, default_value = "1", value_delimiter = ',', value_name = "N,...",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: Vec<u32>,
    /// Guest RAM.
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    pub memory: ByteSize,
    /// Stress passes of the writing guest (the run must outlast the collapse; 2 to 1000000).
    #[arg(long, default_value_t = 12, value_name = "N",
          value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub passes: u64,
    /// Comma-separated variants (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "VARIANT,...")]
    pub variants: Vec<Variant>,
    /// The least pool depths this VMM's orders run with, a row each, 0 to 64: the pipelined
    /// pool (allocating ahead of demand, the default 2), and 0 (every collapse allocates and
    /// zeroes its page when it needs it: the baseline where the lock orders differ most).
    #[arg(long, default_value = "2,0", value_delimiter = ',', value_name = "N,...",
          value_parser = clap::value_parser!(u64).range(0..=64).map(|n| n as usize))]
    pub huge_pool_ahead: Vec<usize>,
    /// Rounds, variants interleaved; medians are reported (1 to 1000).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Milliseconds added to every huge page allocation (modelling reclaim, compaction or a
    /// userland backend), one table per value.
    #[arg(long, value_delimiter = ',', value_name = "MS,...", default_value = "0",
          value_parser = parse_latency_ms)]
    pub alloc_latency: Vec<f64>,
    /// Also a table whose huge pages come from memory the host has not touched recently (a
    /// buffer of four times the guest's RAM is faulted in 4 KiB pages and freed before each
    /// run), so that how warm this host's free memory happens to be does not decide the result.
    #[arg(long)]
    pub cold: bool,
    /// Install methods this VMM's orders run with, each a row of its own.
    #[arg(
        long,
        value_parser = choice::<InstallMethod>(),
        value_delimiter = ',',
        value_name = "METHOD,...",
        default_value = "move,mremap"
    )]
    pub install: Vec<InstallMethod>,
    /// Where never-touched pages come from. `zero` (the default here) registers guest RAM
    /// for missing faults, which a commit by `UFFDIO_MOVE` needs; with `kernel` every commit
    /// uses `mremap`.
    #[arg(long, default_value = "zero", value_name = "kernel|zero")]
    pub page_source: PageSourceKind,
    /// Outputs.
    #[command(flatten)]
    pub output: BenchOutput,
}

/// A latency in milliseconds: finite, from 0 to 10 s.
fn parse_latency_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ms) if (0.0..=10_000.0).contains(&ms) => Ok(ms),
        _ => Err(format!(
            "{s:?} is not a latency in milliseconds from 0 to 10000"
        )),
    }
}

impl CollapseArgs {
    /// The benchmark these arguments describe, or why it cannot run.
    pub fn to_config(&self) -> Result<CollapseBenchConfig, BenchError> {
        bench_size(
            "--memory",
            self.memory,
            crate::bench::collapse::MIN_MEMORY,
            "the guest's data must fill at least one extent above the program",
        )?;
        Ok(CollapseBenchConfig {
            vcpus: self.vcpus.clone(),
            memory: self.memory,
            passes: self.passes,
            variants: self.variants.clone(),
            pool_ahead: self.huge_pool_ahead.clone(),
            repeat: self.repeat,
            alloc_latency_ms: self.alloc_latency.clone(),
            cold: self.cold,
            installs: self.install.clone(),
            page_source: self.page_source.clone(),
        })
    }
}
