//! The VM's configuration: a typed struct built from the CLI, validated once, with errors that
//! name the bad value and what is allowed.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use guest_abi::layout::{ARGS_MAX_LEN, EXTENT_SIZE, LOAD_BASE, MAX_RAM, MAX_VCPUS, PAGE_SIZE};

use crate::seccomp::Seccomp;
pub use crate::units::ByteSize;
use vm_extents::collapse::CollapseConfig;
use vm_extents::collapse::config::MAX_PTES_NONE;
use vm_extents::huge::install::InstallMethod;
use vm_extents::huge::pool::{POOL_AHEAD, PoolKind};
use vm_extents::prefetch::MAX_PREFETCH_THREADS;
use vm_extents::{Backing, MemoryConfig, PageSourceKind, Restore};

/// One `--arg KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArg {
    /// Before the first `=`; not empty.
    pub key: String,
    /// The value (may be empty).
    pub value: String,
}

impl FromStr for GuestArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("invalid guest argument {s:?}: expected KEY=VALUE"))?;
        if key.is_empty() || s.contains('\0') {
            return Err(format!(
                "invalid guest argument {s:?}: the key must be non-empty and neither may hold NUL"
            ));
        }
        Ok(GuestArg {
            key: key.into(),
            value: value.into(),
        })
    }
}

/// Threads allocating huge pages ahead of demand, at least. More than the CPUs spare: a huge
/// page's allocation is mostly waiting, not computing (on a nested host, for the outer
/// hypervisor to back memory the guest kernel touches for the first time), and the waits
/// overlap. Measured here (2 CPUs, fresh 2 MiB pages touched in a loop): one process 6.2 ms a
/// page, four at once 9.4 ms each (2.6x the pages per second).
pub const REFILL_THREADS: usize = 4;

/// Most threads allocating huge pages ahead of demand.
pub const MAX_REFILL_THREADS: usize = 8;

/// Most fault handler threads: one per CPU of a large host, and a uffd each.
pub const MAX_FAULT_THREADS: usize = 256;

/// Most huge pages the pool keeps ready (128 MiB): pages kept ready are memory the ledger
/// does not charge, so they are bounded by this and by the guest's extents.
pub const MAX_POOL_AHEAD: usize = 64;

/// Smallest guest RAM: the reserved area plus one extent for the program.
pub const MIN_MEMORY: u64 = LOAD_BASE + EXTENT_SIZE;

/// The collapse thread, as asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collapse {
    /// Not asked either way: on with 4 KiB backing where the host allows it (and said once
    /// where it does not), off with huge backing.
    Default(CollapseConfig),
    /// `--collapse on`: it must run, or the VM is refused.
    On(CollapseConfig),
    /// `--collapse off`.
    Off,
}

impl Collapse {
    /// The tunables, when the thread is not turned off.
    pub fn config(&self) -> Option<&CollapseConfig> {
        match self {
            Collapse::Default(c) | Collapse::On(c) => Some(c),
            Collapse::Off => None,
        }
    }
}

/// Everything needed to build and run one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// A built-in guest name or the path of a static ELF executable.
    pub guest: String,
    /// Guest RAM in bytes.
    pub memory: ByteSize,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Workload arguments passed to the guest.
    pub args: Vec<GuestArg>,
    /// End the run after this long.
    pub timeout: Option<Duration>,
    /// End the run when a vCPU has waited this long on one fault an external page server has
    /// not answered.
    pub page_server_timeout: Option<Duration>,
    /// Where to write the JSON summary at exit.
    pub metrics: Option<PathBuf>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// What backs guest RAM from the start.
    pub backing: Backing,
    /// Where first-touch page contents come from.
    pub page_source: PageSourceKind,
    /// Bytes the fault handler resolves per fault.
    pub fault_granularity: ByteSize,
    /// Where to save guest RAM when the guest finishes.
    pub save_memory: Option<PathBuf>,
    /// How often to append a JSON line of metrics while the guest runs.
    pub metrics_interval: Option<Duration>,
    /// The collapse thread, and its tunables.
    pub collapse: Collapse,
    /// Where huge pages come from.
    pub huge_source: PoolKind,
    /// Most huge-page memory it may charge (default: all of RAM).
    pub huge_limit: Option<ByteSize>,
    /// Huge pages kept ready ahead of demand.
    pub pool_ahead: usize,
    /// Populate huge-backed RAM up front (benchmarks turn it off to measure faulting).
    pub populate: bool,
    /// seccomp filters on every thread.
    pub seccomp: Seccomp,
    /// Fault handler threads (`None`: one per vCPU, up to the host's CPUs).
    pub fault_threads: Option<usize>,
    /// How huge pages go in.
    pub install: InstallMethod,
    /// Added to every huge page allocation (benchmarks: model reclaim, compaction or a slow
    /// userland backend; not a `vmm run` option).
    pub alloc_latency: std::time::Duration,
    /// How an image source is restored.
    pub restore: Restore,
    /// The restore prefetcher (`None`: on where it applies, an image restored lazily into
    /// 4 KiB backing).
    pub prefetch: Option<bool>,
    /// Prefetch threads.
    pub prefetch_threads: usize,
    /// Added to every read of a memory image (benchmarks: slower storage; not a `vmm run`
    /// option).
    pub image_read_latency: std::time::Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            guest: "hello".into(),
            memory: ByteSize(128 << 20),
            vcpus: 1,
            args: Vec::new(),
            timeout: None,
            page_server_timeout: None,
            metrics: None,
            kvm_device: "/dev/kvm".into(),
            backing: Backing::Small,
            page_source: PageSourceKind::Kernel,
            fault_granularity: ByteSize(PAGE_SIZE),
            save_memory: None,
            metrics_interval: None,
            collapse: Collapse::Default(CollapseConfig::default()),
            huge_source: PoolKind::default(),
            huge_limit: None,
            pool_ahead: POOL_AHEAD,
            populate: true,
            seccomp: Seccomp::On,
            fault_threads: None,
            install: InstallMethod::default(),
            alloc_latency: std::time::Duration::ZERO,
            restore: Restore::Lazy,
            prefetch: None,
            prefetch_threads: vm_extents::prefetch::PREFETCH_THREADS,
            image_read_latency: std::time::Duration::ZERO,
        }
    }
}

/// A configuration value outside what is allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Memory is not a whole number of extents.
    #[error("--memory {0} is not a multiple of 2 MiB (try {1})")]
    MemoryNotAligned(ByteSize, ByteSize),
    /// Memory outside the allowed range.
    #[error("--memory {value} is out of range: allowed {min} to {max}{why}")]
    MemoryRange {
        /// The value given.
        value: ByteSize,
        /// Smallest allowed.
        min: ByteSize,
        /// Largest allowed.
        max: ByteSize,
        /// Where the maximum comes from.
        why: &'static str,
    },
    /// vCPU count outside the allowed range.
    #[error("--vcpus {value} is out of range: allowed 1 to {max} ({why})")]
    Vcpus {
        /// The value given.
        value: u32,
        /// Largest allowed.
        max: u32,
        /// Where the maximum comes from.
        why: String,
    },
    /// The arguments do not fit the guest's argument block.
    #[error("the --arg values take {0} bytes; at most {ARGS_MAX_LEN} are allowed")]
    ArgsTooLong(u64),
    /// A zero timeout.
    #[error("--timeout must be greater than zero seconds")]
    ZeroTimeout,
    /// A fault granularity that is not a power of two from 4 KiB to 2 MiB.
    #[error("--fault-granularity {0} is not allowed: use a power of two from 4K to 2M")]
    FaultGranularity(ByteSize),
    /// `--metrics-interval` without `--metrics`.
    #[error("--metrics-interval needs --metrics PATH (the lines go to PATH.jsonl)")]
    IntervalWithoutMetrics,
    /// A page source the backing cannot use.
    #[error("--fault-granularity applies to --page-source zero or image with --backing small")]
    GranularityNeedsUffd,
    /// The collapse thread asked for with huge backing.
    #[error("--collapse on needs --backing small (with {0:?} backing all RAM is huge already)")]
    CollapseNeedsSmall(Backing),
    /// A max_ptes_none outside 0..=511.
    #[error("--max-ptes-none {0} is out of range: allowed 0 to 511")]
    MaxPtesNone(u32),
    /// A zero pages-to-scan.
    #[error("--collapse-pages-to-scan must be at least 1")]
    PagesToScan,
    /// A huge-page limit that is not a whole number of huge pages or exceeds RAM.
    #[error(
        "--huge-limit {value} is not allowed: give a multiple of 2 MiB from 2M to {ram} (the guest's RAM)"
    )]
    HugeLimit {
        /// The value given.
        value: ByteSize,
        /// Guest RAM.
        ram: ByteSize,
    },
    /// A huge-page limit where nothing charges huge pages.
    #[error(
        "--huge-limit applies only where huge pages are charged: the collapse thread (on by \
         default with --backing small), --fault-granularity 2M, or the restore prefetcher"
    )]
    HugeLimitUnused,
    /// A fault handler count out of range.
    #[error("--fault-threads {0} is out of range: allowed 1 to {MAX_FAULT_THREADS}")]
    FaultThreads(usize),
    /// Fault threads where the VMM serves no faults.
    #[error("--fault-threads applies to --page-source zero or image with --backing small")]
    FaultThreadsNeedUffd,
    /// A restore mode without an image.
    #[error("--restore {0} applies to --page-source image:PATH")]
    RestoreNeedsImage(&'static str),
    /// The prefetcher where it cannot run.
    #[error(
        "--prefetch on applies to --page-source image:PATH restored lazily (--restore lazy) \
         with --backing small"
    )]
    PrefetchNeedsLazyImage,
    /// Fault-handler options where an eager restore leaves no fault to serve.
    #[error(
        "--fault-granularity and --fault-threads do not apply to --restore eager (after the \
         copy the kernel serves every fault)"
    )]
    EagerServesNoFaults,
    /// Too few or too many prefetch threads.
    #[error("--prefetch-threads {0} is out of range: allowed 1 to {max}", max = MAX_PREFETCH_THREADS)]
    PrefetchThreads(usize),
    /// More huge pages kept ready than make sense.
    #[error(
        "--huge-pool-ahead {value} is out of range: allowed 0 to {max} (one per extent of guest \
         RAM, at most {MAX_POOL_AHEAD})"
    )]
    PoolAhead {
        /// The value given.
        value: usize,
        /// Largest allowed.
        max: usize,
    },
    /// An external page server with a backing it cannot fill.
    #[error(
        "--page-source external:SOCKET needs --backing small: the page server fills 4 KiB \
         pages (with {0:?} backing the VMM populates all of RAM itself)"
    )]
    ExternalNeedsSmall(Backing),
    /// The collapse thread asked for where an external page server owns the faults.
    #[error(
        "--collapse on cannot run with --page-source external: its write-protect faults would \
         reach a page server that does not answer them, and a page it moves out of the way \
         would be filled again by that server from its file (stale); the collapse is off with \
         an external page server (drop --collapse on)"
    )]
    CollapseWithExternal,
    /// A fault-wait bound without an external page server.
    #[error("--page-server-timeout applies to --page-source external:SOCKET")]
    PageServerTimeoutUnused,
    /// A save where an external page server holds what the guest never touched.
    #[error(
        "--save-memory cannot save a guest served by an external page server: the pages the \
         guest never touched live in that server's file, not here (save the server's file \
         instead; `vmm image import RAW IMAGE` makes an image of it)"
    )]
    SaveWithExternal,
    /// An output file whose directory does not exist.
    #[error("{flag} {path}: the directory {dir} does not exist")]
    OutputDir {
        /// The option that named it.
        flag: &'static str,
        /// The path given.
        path: String,
        /// Its directory.
        dir: String,
    },
}

impl VmConfig {
    /// Checks every value against this host: `host_memory` is the host's total RAM and
    /// `kvm_max_vcpus` what KVM reports.
    pub fn validate(&self, host_memory: u64, kvm_max_vcpus: u32) -> Result<(), ConfigError> {
        self.validate_machine(host_memory, kvm_max_vcpus)?;
        self.validate_outputs()?;
        self.validate_memory_management()
    }

    /// RAM, vCPUs, the guest's arguments, the timeout.
    fn validate_machine(&self, host_memory: u64, kvm_max_vcpus: u32) -> Result<(), ConfigError> {
        let mem = self.memory.0;
        if !mem.is_multiple_of(EXTENT_SIZE) {
            return Err(ConfigError::MemoryNotAligned(
                self.memory,
                ByteSize(mem.next_multiple_of(EXTENT_SIZE)),
            ));
        }
        let (max, why) = if host_memory < MAX_RAM {
            (host_memory / EXTENT_SIZE * EXTENT_SIZE, " (the host's RAM)")
        } else {
            (MAX_RAM, " (what the guest page tables map)")
        };
        if mem < MIN_MEMORY || mem > max {
            return Err(ConfigError::MemoryRange {
                value: self.memory,
                min: ByteSize(MIN_MEMORY),
                max: ByteSize(max),
                why,
            });
        }
        let (max_vcpus, why) = if u64::from(kvm_max_vcpus) < MAX_VCPUS {
            (kvm_max_vcpus, "what KVM supports here".to_string())
        } else {
            (MAX_VCPUS as u32, "the VMM's stack area".to_string())
        };
        if self.vcpus == 0 || self.vcpus > max_vcpus {
            return Err(ConfigError::Vcpus {
                value: self.vcpus,
                max: max_vcpus,
                why,
            });
        }
        let args_len = self.args_block().len() as u64;
        if args_len > ARGS_MAX_LEN {
            return Err(ConfigError::ArgsTooLong(args_len));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }

    /// Where the metrics and the image go (their directories; the files themselves are
    /// checked by [`crate::files`] before the guest starts).
    fn validate_outputs(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.metrics {
            check_output_dir("--metrics", path)?;
        }
        if let Some(path) = &self.save_memory {
            check_output_dir("--save-memory", path)?;
            if self.external() {
                return Err(ConfigError::SaveWithExternal);
            }
        }
        if self.metrics_interval.is_some() && self.metrics.is_none() {
            return Err(ConfigError::IntervalWithoutMetrics);
        }
        Ok(())
    }

    /// The fault granularity, the collapse thread, huge pages.
    fn validate_memory_management(&self) -> Result<(), ConfigError> {
        let mem = self.memory.0;
        if matches!(self.collapse, Collapse::On(_)) && self.backing != Backing::Small {
            return Err(ConfigError::CollapseNeedsSmall(self.backing));
        }
        if self.page_server_timeout.is_some() && !self.external() {
            return Err(ConfigError::PageServerTimeoutUnused);
        }
        if self.external() {
            if self.backing != Backing::Small {
                return Err(ConfigError::ExternalNeedsSmall(self.backing));
            }
            if matches!(self.collapse, Collapse::On(_)) {
                return Err(ConfigError::CollapseWithExternal);
            }
        }
        if let Some(c) = self.collapse.config() {
            if c.max_ptes_none > MAX_PTES_NONE {
                return Err(ConfigError::MaxPtesNone(c.max_ptes_none));
            }
            if c.pages_to_scan == 0 {
                return Err(ConfigError::PagesToScan);
            }
        }
        let g = self.fault_granularity.0;
        if !g.is_power_of_two() || !(PAGE_SIZE..=EXTENT_SIZE).contains(&g) {
            return Err(ConfigError::FaultGranularity(self.fault_granularity));
        }
        if g != PAGE_SIZE && (self.backing != Backing::Small || !self.page_source.uses_uffd()) {
            return Err(ConfigError::GranularityNeedsUffd);
        }
        if let Some(limit) = self.huge_limit {
            if !limit.0.is_multiple_of(EXTENT_SIZE) || limit.0 > mem {
                return Err(ConfigError::HugeLimit {
                    value: limit,
                    ram: self.memory,
                });
            }
            if self.collapse_on().is_none() && g != EXTENT_SIZE && !self.prefetch_on() {
                return Err(ConfigError::HugeLimitUnused);
            }
        }
        if let Some(n) = self.fault_threads {
            if n == 0 || n > MAX_FAULT_THREADS {
                return Err(ConfigError::FaultThreads(n));
            }
            if !self.page_source.uses_uffd() || self.backing != Backing::Small {
                return Err(ConfigError::FaultThreadsNeedUffd);
            }
        }
        let image = matches!(self.page_source, PageSourceKind::Image(_));
        if self.restore == Restore::Eager && !image {
            return Err(ConfigError::RestoreNeedsImage("eager"));
        }
        if self.prefetch == Some(true) && !self.prefetch_applies() {
            return Err(ConfigError::PrefetchNeedsLazyImage);
        }
        if self.prefetch_threads == 0 || self.prefetch_threads > MAX_PREFETCH_THREADS {
            return Err(ConfigError::PrefetchThreads(self.prefetch_threads));
        }
        if self.restore == Restore::Eager && (g != PAGE_SIZE || self.fault_threads.is_some()) {
            return Err(ConfigError::EagerServesNoFaults);
        }
        let max = MAX_POOL_AHEAD.min((mem / EXTENT_SIZE) as usize);
        if self.pool_ahead > max {
            return Err(ConfigError::PoolAhead {
                value: self.pool_ahead,
                max,
            });
        }
        Ok(())
    }

    /// The arguments as the guest sees them: `key=value\0` for each.
    pub fn args_block(&self) -> Vec<u8> {
        let mut block = Vec::new();
        for arg in &self.args {
            block.extend_from_slice(arg.key.as_bytes());
            block.push(b'=');
            block.extend_from_slice(arg.value.as_bytes());
            block.push(0);
        }
        block
    }

    /// The collapse thread's tunables if it is to run: asked for, or by default with 4 KiB
    /// backing.
    pub fn collapse_on(&self) -> Option<&CollapseConfig> {
        match &self.collapse {
            Collapse::Default(_) if self.backing != Backing::Small || self.external() => None,
            other => other.config(),
        }
    }

    /// The memory part of the configuration.
    pub fn memory_config(&self) -> MemoryConfig {
        MemoryConfig {
            size: self.memory.0,
            backing: self.backing,
            source: self.page_source.clone(),
            fault_granularity: self.fault_granularity.0,
            collapse: self.collapse_on().cloned(),
            huge_source: self.huge_source,
            huge_limit: self.huge_limit.map_or(self.memory.0, |l| l.0),
            pool_ahead: self.pool_ahead,
            pool_refill_threads: self.pool_refill_threads(),
            populate: self.populate,
            map_reserve: vm_extents::MAP_RESERVE
                + vm_extents::MAPS_PER_THREAD * u64::from(self.vcpus),
            thread_hook: crate::seccomp::memory_thread_hook(self.seccomp),
            fault_threads: self.fault_threads(),
            install: self.install,
            alloc_latency: self.alloc_latency,
            fault_spin: self.fault_spin(),
            restore: self.restore,
            image_read_latency: self.image_read_latency,
            prefetch_threads: if self.prefetch_on() {
                self.prefetch_threads
            } else {
                0
            },
        }
    }

    /// Whether an external page server fills guest RAM.
    pub fn external(&self) -> bool {
        matches!(self.page_source, PageSourceKind::External(_))
    }

    /// Whether the prefetcher runs: as asked, or by default wherever it applies (an image
    /// restored lazily into 4 KiB backing).
    pub fn prefetch_on(&self) -> bool {
        self.prefetch.unwrap_or_else(|| self.prefetch_applies())
    }

    fn prefetch_applies(&self) -> bool {
        matches!(self.page_source, PageSourceKind::Image(_))
            && self.restore == Restore::Lazy
            && self.backing == Backing::Small
    }

    /// How long each fault handler looks for the next fault before it sleeps: a while, where
    /// the handlers and the vCPUs each have a host CPU of their own; else not at all (a
    /// spinning handler would take the CPU a vCPU needs to make the next fault).
    pub fn fault_spin(&self) -> std::time::Duration {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.vcpus as usize + self.fault_threads() <= cpus {
            vm_extents::fault::SPIN_AFTER_FAULT
        } else {
            std::time::Duration::ZERO
        }
    }

    /// Threads allocating huge pages ahead of demand: [`REFILL_THREADS`], or one per host CPU
    /// the vCPUs leave spare where that is more, at most [`MAX_REFILL_THREADS`].
    pub fn pool_refill_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        cpus.saturating_sub(self.vcpus as usize)
            .clamp(REFILL_THREADS, MAX_REFILL_THREADS)
    }

    /// Fault handler threads: as asked, or one per vCPU up to the host's CPUs, never more than
    /// one per extent.
    pub fn fault_threads(&self) -> usize {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let extents = (self.memory.0 / EXTENT_SIZE).max(1) as usize;
        self.fault_threads
            .unwrap_or_else(|| (self.vcpus as usize).min(cpus))
            .clamp(1, extents)
    }
}

/// Checks, before a run that may be long, that an output file can be created where asked.
fn check_output_dir(flag: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if dir.is_dir() {
        return Ok(());
    }
    Err(ConfigError::OutputDir {
        flag,
        path: path.display().to_string(),
        dir: dir.display().to_string(),
    })
}

/// The host's total RAM in bytes, from `/proc/meminfo`.
pub fn host_memory() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| std::io::Error::other("no MemTotal in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(memory: u64, vcpus: u32) -> VmConfig {
        VmConfig {
            memory: ByteSize(memory),
            vcpus,
            ..Default::default()
        }
    }

    #[test]
    fn memory_and_vcpus_are_range_checked() {
        let host = 24 << 30;
        assert_eq!(config(128 << 20, 2).validate(host, 1024), Ok(()));
        assert!(matches!(
            config((128 << 20) + 4096, 1).validate(host, 1024),
            Err(ConfigError::MemoryNotAligned(_, ByteSize(x))) if x == 130 << 20
        ));
        assert!(matches!(
            config(2 << 20, 1).validate(host, 1024),
            Err(ConfigError::MemoryRange { .. })
        ));
        let err = config(32 << 30, 1)
            .validate(host, 1024)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("32G") && err.contains("24G") && err.contains("host"),
            "{err}"
        );
        assert!(matches!(
            config(8 << 20, 0).validate(host, 1024),
            Err(ConfigError::Vcpus { value: 0, .. })
        ));
        let err = config(8 << 20, 5)
            .validate(host, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--vcpus 5") && err.contains("1 to 4"), "{err}");
        assert!(matches!(
            config(8 << 20, 1000).validate(host, 1024),
            Err(ConfigError::Vcpus { max, .. }) if u64::from(max) == MAX_VCPUS
        ));
    }

    #[test]
    fn args_build_the_guest_block() {
        let mut c = config(8 << 20, 1);
        c.args = vec!["mode=fill".parse().unwrap(), "seed=".parse().unwrap()];
        assert_eq!(c.args_block(), b"mode=fill\0seed=\0");
        assert!("novalue".parse::<GuestArg>().is_err());
        assert!("=x".parse::<GuestArg>().is_err());
        c.args = vec![GuestArg {
            key: "k".into(),
            value: "v".repeat(ARGS_MAX_LEN as usize),
        }];
        assert!(matches!(
            c.validate(1 << 34, 8),
            Err(ConfigError::ArgsTooLong(_))
        ));
    }
}
