//! The command line: clap definitions and their conversion into a [`VmConfig`] or a benchmark's
//! configuration. Configuration flows one way, from here: CLI, validated config, VM, memory.
//! Every enum option is a `clap::ValueEnum` (the memory manager's are its [`Choice`]s, offered
//! through [`choice`]), and every default is its type's own (or a constant next to the type),
//! written once.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use guest_abi::layout::{EXTENT_SIZE, LOAD_BASE, MAX_RAM};
use vm_extents::Choice;

use crate::bench::BenchError;
use crate::bench::collapse::{CollapseBenchConfig, Variant};
use crate::bench::faults::{Access, FaultsConfig, Mode, Pattern};
use crate::bench::reclaim::{Mode as ReclaimMode, ReclaimBenchConfig, Shape as ReclaimShape};
use crate::bench::restore::{Density, Mode as RestoreMode, RestoreBenchConfig};
use crate::config::{Collapse, GuestArg, VmConfig};
use crate::seccomp::Seccomp;
use crate::uffd_serve::{Granularity, ServeConfig};
use crate::units::ByteSize;
use vm_extents::{
    Backing, CollapseConfig, CollapseOrder, InstallMethod, MemoryConfig, PageSourceKind, PoolKind,
    Restore,
};

/// A KVM virtual machine monitor whose guest memory is managed in 2 MiB extents.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a guest program.
    Run(Box<RunArgs>),
    /// List the built-in guest programs and their arguments.
    Guests,
    /// Benchmarks: guest demand paging, huge-page collapse, restoring from an image.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve a VMM's guest RAM from a raw memory file over Firecracker's userfaultfd handoff
    /// (this VMM with --page-source external:SOCK, or Firecracker).
    UffdServe(UffdServeArgs),
    /// Convert memory images: to and from raw RAM files (what Firecracker's page servers read).
    #[command(subcommand)]
    Image(ImageCommand),
}

/// `vmm uffd-serve`.
#[derive(Debug, clap::Args)]
pub struct UffdServeArgs {
    /// The socket to listen on (a stale socket there, one nobody listens on, is replaced;
    /// nothing else is).
    pub socket: PathBuf,
    /// Raw guest RAM, no header (`vmm image export`): each region's contents at its offset.
    pub file: PathBuf,
    /// How much of a 4 KiB region one fault resolves: its page, or the 2 MiB around it.
    #[arg(long, value_enum, default_value_t = Granularity::default(), value_name = "4K|2M")]
    pub granularity: Granularity,
    /// Write what was served as JSON here at the end.
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// On a fatal error, kill the VMM (SIGKILL; Firecracker would otherwise wait forever on
    /// its next fault). `off` leaves it to notice the hang-up itself, as this VMM does.
    #[arg(long, value_enum, default_value_t = Switch::On, value_name = "on|off")]
    pub kill_peer: Switch,
    /// Microseconds added to every read of the file (slower storage than this host's).
    #[arg(long, default_value_t = 0, value_name = "US",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub image_latency: u64,
    /// A seccomp filter from the handshake on (the README lists what it allows).
    #[arg(long, value_enum, default_value_t, value_name = "on|off")]
    pub seccomp: Seccomp,
    /// How much to log (RUST_LOG overrides it).
    #[arg(long, value_enum, default_value_t = LogLevel::Info,
          value_name = "error|warn|info|debug|trace|off")]
    pub log_level: LogLevel,
}

impl UffdServeArgs {
    /// The server these arguments describe.
    pub fn to_config(&self) -> ServeConfig {
        ServeConfig {
            socket: self.socket.clone(),
            file: self.file.clone(),
            granularity: self.granularity,
            metrics: self.metrics.clone(),
            kill_peer: self.kill_peer == Switch::On,
            read_latency: Duration::from_micros(self.image_latency),
            seccomp: self.seccomp,
        }
    }
}

/// `vmm image`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Write a memory image (`--save-memory`) as raw RAM: no header, sparse.
    Export {
        /// The memory image.
        image: PathBuf,
        /// The raw file to write (replaced atomically).
        raw: PathBuf,
    },
    /// Make a memory image (for `--page-source image:PATH`) of raw RAM.
    Import {
        /// The raw file: a whole number of 2 MiB of guest RAM.
        raw: PathBuf,
        /// The image to write (replaced atomically).
        image: PathBuf,
    },
}

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
}

impl BenchCommand {
    /// Where the benchmark's outputs go.
    pub fn output(&self) -> &BenchOutput {
        match self {
            BenchCommand::Faults(a) => &a.output,
            BenchCommand::Collapse(a) => &a.output,
            BenchCommand::Restore(a) => &a.output,
            BenchCommand::Reclaim(a) => &a.output,
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

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// How much the VMM logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    #[default]
    Warn,
    /// And what it does.
    Info,
    /// And how.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

impl LogLevel {
    /// The level as `env_logger` takes it.
    pub fn filter(self) -> String {
        self.to_possible_value()
            .expect("every level has a name")
            .get_name()
            .to_string()
    }
}

/// `vmm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A built-in guest name (see `vmm guests`) or the path of a static x86_64 ELF executable.
    #[arg(long, default_value = "hello", value_name = "NAME|PATH")]
    pub guest: String,
    /// Guest RAM: a multiple of 2 MiB, with a K, M or G suffix, from 6M to the host's RAM or
    /// 64G.
    #[arg(long, default_value = "128M", value_name = "SIZE")]
    pub memory: ByteSize,
    /// Number of vCPUs, 1 to what KVM supports (at most 224).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,
    /// A guest argument KEY=VALUE (repeatable). A built-in guest's are checked before it
    /// boots against what it declares (`vmm guests` lists them); a guest file of your own
    /// takes any KEY=VALUE, unchecked.
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    pub args: Vec<GuestArg>,
    /// Stop the guest after this many seconds (more than 0, at most 100000000).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// With an external page server: end the VM (204) when a vCPU has waited this many seconds
    /// on one fault the server has not answered (default: wait as long as it takes).
    #[arg(long, value_name = "SECONDS")]
    pub page_server_timeout: Option<f64>,
    /// Write a JSON summary here at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// How much to log (RUST_LOG overrides it).
    #[arg(
        long,
        value_enum,
        default_value_t,
        value_name = "error|warn|info|debug|trace|off"
    )]
    pub log_level: LogLevel,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm", value_name = "PATH")]
    pub kvm_device: PathBuf,
    /// What backs guest RAM: small (4 KiB pages on demand), thp or hugetlb (2 MiB pages for
    /// all RAM, populated up front).
    #[arg(long, value_parser = choice::<Backing>(), default_value_t, value_name = "small|thp|hugetlb")]
    pub backing: Backing,
    /// Where a page's contents come from when first touched: kernel (the host kernel fills
    /// zeroes), zero (the VMM's userfaultfd handler fills zeroes), image:PATH (the handler
    /// serves pages lazily from a memory image) or external:SOCKET (a page server listening
    /// on SOCKET serves them: Firecracker's userfaultfd handoff, `vmm uffd-serve`).
    #[arg(
        long,
        default_value = "kernel",
        value_name = "kernel|zero|image:PATH|external:SOCKET"
    )]
    pub page_source: PageSourceKind,
    /// Bytes the fault handler resolves per fault (a power of two, 4K to 2M).
    #[arg(long, default_value = "4K", value_name = "SIZE")]
    pub fault_granularity: ByteSize,
    /// Save guest RAM to this image file when the guest finishes (atomic, sparse).
    #[arg(long, value_name = "PATH")]
    pub save_memory: Option<PathBuf>,
    /// Also append a JSON line of metrics to PATH.jsonl (PATH: the --metrics file) every this
    /// many seconds (more than 0, at most 100000000).
    #[arg(long, value_name = "SECONDS")]
    pub metrics_interval: Option<f64>,
    /// The collapse thread, which promotes populated extents to 2 MiB pages (default: on with
    /// --backing small, where the host allows it).
    #[arg(long, value_enum, value_name = "on|off")]
    pub collapse: Option<Switch>,
    /// When a collapse allocates its huge page: prealloc (with only the read lock held,
    /// before the write lock is taken: the order Linux's khugepaged took in 2011), legacy
    /// (under the write lock, the order before that) or unlocked (no lock at all, Linux's
    /// order since 2015).
    #[arg(
        long,
        value_parser = choice::<CollapseOrder>(),
        default_value_t,
        value_name = "prealloc|legacy|unlocked"
    )]
    pub collapse_order: CollapseOrder,
    /// Where huge pages come from: auto (hugetlb while the pool has pages, else THP), hugetlb
    /// or thp.
    #[arg(long, value_parser = choice::<PoolKind>(), default_value_t, value_name = "auto|hugetlb|thp")]
    pub huge_source: PoolKind,
    /// Most huge-page memory that may be charged (default: the guest's RAM size).
    #[arg(long, value_name = "SIZE")]
    pub huge_limit: Option<ByteSize>,
    /// Huge pages the pool keeps zeroed and ready ahead of demand, 0 to 64 and at most one
    /// per extent (0: allocate on demand).
    #[arg(long, default_value_t = MemoryConfig::POOL_AHEAD, value_name = "N")]
    pub huge_pool_ahead: usize,
    /// 4 KiB pages the collapse thread scans per round (512 per extent).
    #[arg(long, default_value_t = CollapseConfig::PAGES_TO_SCAN, value_name = "N")]
    pub collapse_pages_to_scan: u64,
    /// Milliseconds the collapse thread sleeps between rounds.
    #[arg(long, default_value_t = CollapseConfig::SCAN_SLEEP_MS, value_name = "MS")]
    pub collapse_scan_sleep: u64,
    /// Milliseconds the collapse thread backs off after a failed collapse.
    #[arg(long, default_value_t = CollapseConfig::ALLOC_SLEEP_MS, value_name = "MS")]
    pub collapse_alloc_sleep: u64,
    /// Most unpopulated 4 KiB pages an extent may have and still be collapsed (0 to 511).
    #[arg(long, default_value_t = CollapseConfig::MAX_PTES_NONE, value_name = "N")]
    pub max_ptes_none: u32,
    /// seccomp filters on every VMM thread, one list per kind of thread (see the README).
    #[arg(long, value_enum, default_value_t, value_name = "on|off")]
    pub seccomp: Seccomp,
    /// Fault handler threads, 1 to 256, each with a userfaultfd over its share of guest RAM
    /// (default: one per vCPU, up to the host's CPUs).
    #[arg(long, value_name = "N")]
    pub fault_threads: Option<usize>,
    /// How a memory image (`--page-source image:PATH`) is restored: lazily, the guest starting
    /// at once (default), or eagerly, read whole into RAM before the guest starts.
    #[arg(long, value_parser = choice::<Restore>(), default_value_t, value_name = "lazy|eager")]
    pub restore: Restore,
    /// Background threads that fill RAM from the image behind the guest, whole extents at a
    /// time (default: on for an image restored lazily into 4 KiB backing).
    #[arg(long, value_enum, value_name = "on|off")]
    pub prefetch: Option<Switch>,
    /// Prefetch threads, 1 to 16 (two reach the bandwidth of a plain sequential read here,
    /// one about half of it).
    #[arg(long, default_value_t = MemoryConfig::PREFETCH_THREADS, value_name = "N")]
    pub prefetch_threads: usize,
    /// How huge pages go into guest RAM: move (UFFDIO_MOVE where the kernel has it and the
    /// page is a THP, else mremap) or mremap.
    #[arg(long, value_parser = choice::<InstallMethod>(), default_value_t, value_name = "move|mremap")]
    pub install: InstallMethod,
    /// Whether the guest's reports of free memory (the free ucall, as `churn` sends) are
    /// honoured: the memory goes back to the host per 2 MiB extent and reads zeroes when
    /// touched again. Off, the guest is told so at boot and zeroes what it frees itself.
    #[arg(long, value_enum, default_value_t = Switch::On, value_name = "on|off")]
    pub reclaim: Switch,
    /// Freed 4 KiB pages of a huge extent from which reclaim splits it and gives them back
    /// (1 to 512); with fewer, the huge page is kept and the freed pages zeroed. An extent is
    /// not collapsed again while this many of its pages stay given back.
    #[arg(long, default_value_t = vm_extents::reclaim::SPLIT_PAGES, value_name = "N")]
    pub reclaim_split_pages: u32,
}

/// The value parser of a memory option with named values ([`Choice`]): its names, each with
/// its line of help, as `clap::ValueEnum` gives this CLI's own options.
fn choice<T: Choice + Clone + Send + Sync>() -> impl TypedValueParser<Value = T> {
    let names = T::CHOICES
        .iter()
        .map(|&(_, name, help)| PossibleValue::new(name).help(help));
    PossibleValuesParser::new(names).map(|name| T::from_name(&name).expect("one of its names"))
}

/// Longest `--timeout` or `--metrics-interval`, in seconds: far beyond any run, and far from
/// where a deadline would overflow the clock.
pub const MAX_SECONDS: f64 = 1e8;

/// A number of seconds given for `flag`, checked.
fn seconds(flag: &str, value: Option<f64>) -> Result<Option<Duration>, String> {
    match value {
        None => Ok(None),
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_SECONDS => {
            Ok(Some(Duration::from_secs_f64(t)))
        }
        Some(t) => Err(format!(
            "{flag} {t} is out of range: give a number of seconds greater than 0 and at most \
             {MAX_SECONDS} (about three years)"
        )),
    }
}

impl RunArgs {
    /// The VM configuration these arguments describe (validated later, against the host).
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let tunables = CollapseConfig {
            order: self.collapse_order,
            pages_to_scan: self.collapse_pages_to_scan,
            scan_sleep: Duration::from_millis(self.collapse_scan_sleep),
            alloc_sleep: Duration::from_millis(self.collapse_alloc_sleep),
            max_ptes_none: self.max_ptes_none,
        };
        Ok(VmConfig {
            guest: self.guest.clone(),
            memory: self.memory,
            vcpus: self.vcpus,
            args: self.args.clone(),
            timeout: seconds("--timeout", self.timeout)?,
            page_server_timeout: seconds("--page-server-timeout", self.page_server_timeout)?,
            metrics: self.metrics.clone(),
            kvm_device: self.kvm_device.clone(),
            backing: self.backing,
            page_source: self.page_source.clone(),
            fault_granularity: self.fault_granularity,
            save_memory: self.save_memory.clone(),
            metrics_interval: seconds("--metrics-interval", self.metrics_interval)?,
            collapse: match self.collapse {
                None => Collapse::Default(tunables),
                Some(Switch::On) => Collapse::On(tunables),
                Some(Switch::Off) => Collapse::Off,
            },
            huge_source: self.huge_source,
            huge_limit: self.huge_limit,
            pool_ahead: self.huge_pool_ahead,
            populate: true,
            seccomp: self.seccomp,
            fault_threads: self.fault_threads,
            install: self.install,
            restore: self.restore,
            prefetch: self.prefetch.map(|s| s == Switch::On),
            prefetch_threads: self.prefetch_threads,
            reclaim: self.reclaim == Switch::On,
            reclaim_split_pages: self.reclaim_split_pages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_and_values() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else {
            panic!()
        };
        let c = run.to_config().unwrap();
        assert_eq!(
            (c.guest.as_str(), c.memory, c.vcpus),
            ("hello", ByteSize(128 << 20), 1)
        );
        // The command line's defaults are the types' own.
        let defaults = VmConfig::default();
        assert_eq!(c.collapse, defaults.collapse);
        assert_eq!(
            (c.backing, c.huge_source, c.pool_ahead, c.seccomp),
            (
                defaults.backing,
                defaults.huge_source,
                defaults.pool_ahead,
                defaults.seccomp
            )
        );
        let Command::Run(run) = parse(&[
            "run",
            "--guest",
            "touch",
            "--memory",
            "1G",
            "--vcpus",
            "2",
            "--arg",
            "pattern=random",
            "--timeout",
            "2.5",
            "--collapse",
            "on",
            "--collapse-order",
            "legacy",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let c = run.to_config().unwrap();
        assert_eq!(c.memory, ByteSize(1 << 30));
        assert_eq!(c.args[0].value, "random");
        assert_eq!(c.timeout, Some(Duration::from_millis(2500)));
        assert!(matches!(
            c.collapse,
            Collapse::On(CollapseConfig {
                order: CollapseOrder::Legacy,
                ..
            })
        ));
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse(&["run", "--memory", "lots"]).unwrap_err().to_string();
        assert!(err.contains("\"lots\""), "{err}");
        let err = parse(&["run", "--vcpus", "-1"]).unwrap_err().to_string();
        assert!(err.contains("-1"), "{err}");
        let err = parse(&["run", "--backing", "huge"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'huge'") && err.contains("small, thp, hugetlb"),
            "{err}"
        );
        let Command::Run(run) = parse(&["run", "--timeout", "0"]).unwrap().command else {
            panic!()
        };
        assert!(run.to_config().unwrap_err().contains("--timeout 0"));
    }
}
