//! The VM's configuration: a typed struct built from the CLI, validated once, with errors that
//! name the bad value and what is allowed.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use guest_abi::layout::{ARGS_MAX_LEN, EXTENT_SIZE, LOAD_BASE, MAX_RAM, MAX_VCPUS, PAGE_SIZE};

use crate::seccomp::Seccomp;
use crate::snapshot::Loaded;
pub use crate::units::ByteSize;
use vm_extents::{
    Backing, Choice, CollapseConfig, InstallMethod, MemoryBuilder, MemoryConfig, PageSourceKind,
    PoolKind, Restore,
};

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
    /// How an image source is restored.
    pub restore: Restore,
    /// The restore prefetcher (`None`: on where it applies, an image restored lazily into
    /// 4 KiB backing).
    pub prefetch: Option<bool>,
    /// Prefetch threads.
    pub prefetch_threads: usize,
    /// The guest's reports of free memory honoured (the `free` ucall).
    pub reclaim: bool,
    /// Freed pages of a huge extent from which reclaim splits it.
    pub reclaim_split_pages: u32,
    /// How such an extent gives its freed pages back.
    pub reclaim_partial: vm_extents::PartialFree,
    /// The zero-page shrinker's rate (bytes of guest RAM read a second); `None`: it does not
    /// run.
    pub reclaim_shrinker: Option<ByteSize>,
    /// Where snapshots of the running VM are written (`--snapshot`).
    pub snapshot: Option<PathBuf>,
    /// Take a snapshot this long after the vCPUs start.
    pub snapshot_after: Option<Duration>,
    /// What the VM does after a snapshot.
    pub after_snapshot: AfterSnapshot,
    /// The snapshot this VM resumes from (`--resume`), read and checked.
    pub resume: Option<Arc<Loaded>>,
    /// Whether a resumed VM records its working set or replays a recorded one.
    pub working_set: WorkingSetMode,
}

/// What the VM does once a snapshot is taken (`--after-snapshot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterSnapshot {
    /// The VM ends (exit 0): the snapshot is what it leaves.
    #[default]
    Stop,
    /// The VM runs on, as if nothing happened.
    Run,
}

/// The working set of a resumed VM (`--working-set`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkingSetMode {
    /// Replay the snapshot's record where it has one and the prefetcher runs; else record
    /// one where the VMM serves every fault (a lazy restore into 4 KiB backing); else neither.
    #[default]
    Auto,
    /// Record (replacing any record): the restore is lazy, with no prefetcher.
    Record,
    /// Replay the snapshot's record: the prefetcher fills it first.
    Replay,
    /// Neither.
    Off,
}

/// What a resumed VM does with its working set, once decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkingSetPlan {
    /// Nothing.
    None,
    /// Records it into the snapshot at the end of the run.
    Record,
    /// Replays this record.
    Replay(Arc<vm_extents::WorkingSet>),
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
            pool_ahead: MemoryConfig::POOL_AHEAD,
            populate: true,
            seccomp: Seccomp::On,
            fault_threads: None,
            install: InstallMethod::default(),
            restore: Restore::Lazy,
            prefetch: None,
            prefetch_threads: MemoryConfig::PREFETCH_THREADS,
            reclaim: true,
            reclaim_split_pages: vm_extents::reclaim::SPLIT_PAGES,
            reclaim_partial: vm_extents::PartialFree::default(),
            reclaim_shrinker: None,
            snapshot: None,
            snapshot_after: None,
            after_snapshot: AfterSnapshot::Stop,
            resume: None,
            working_set: WorkingSetMode::Auto,
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
    #[error("--fault-threads {0} is out of range: allowed 1 to {max}", max = MemoryConfig::MAX_FAULT_THREADS)]
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
    /// A reclaim split threshold outside an extent.
    #[error("--reclaim-split-pages {0} is out of range: allowed 1 to 512")]
    ReclaimSplitPages(u32),
    /// A shrinker rate outside what it can be paced at.
    #[error("--reclaim-shrinker-rate {0} is out of range: allowed {min} to {max} (bytes a second)", min = ByteSize(vm_extents::reclaim::shrinker::MIN_RATE), max = ByteSize(vm_extents::reclaim::shrinker::MAX_RATE))]
    ShrinkerRate(ByteSize),
    /// The shrinker where it cannot run.
    #[error("--reclaim-shrinker on {0}")]
    Shrinker(&'static str),
    /// A snapshot of RAM an external page server fills.
    #[error(
        "--snapshot cannot save a VM whose RAM an external page server fills (the server holds its contents); snapshot a VM with --page-source kernel, zero or image:PATH"
    )]
    SnapshotWithExternal,
    /// A snapshot option without `--snapshot`.
    #[error("{0} applies only with --snapshot DIR (where the snapshot goes)")]
    SnapshotUnused(&'static str),
    /// A working-set mode that cannot be carried out.
    #[error("--working-set {mode}: {why}")]
    WorkingSet {
        /// The mode asked for.
        mode: &'static str,
        /// Why not, and what is allowed.
        why: String,
    },
    /// A shrinker rate without the shrinker.
    #[error("--reclaim-shrinker-rate applies only with --reclaim-shrinker on")]
    ShrinkerRateUnused,
    /// Too few or too many prefetch threads.
    #[error("--prefetch-threads {0} is out of range: allowed 1 to {max}", max = MemoryConfig::MAX_PREFETCH_THREADS)]
    PrefetchThreads(usize),
    /// More huge pages kept ready than make sense.
    #[error(
        "--huge-pool-ahead {value} is out of range: allowed 0 to {max} (one per extent of guest \
         RAM, at most {})",
        MemoryConfig::MAX_POOL_AHEAD
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
    /// Another rule of the memory manager's.
    #[error("{0}")]
    Memory(vm_extents::ConfigError),
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
        if self.snapshot.is_some() && self.external() {
            return Err(ConfigError::SnapshotWithExternal);
        }
        if self.snapshot.is_none() {
            if self.snapshot_after.is_some() {
                return Err(ConfigError::SnapshotUnused("--snapshot-after"));
            }
            if self.after_snapshot != AfterSnapshot::Stop {
                return Err(ConfigError::SnapshotUnused("--after-snapshot"));
            }
        }
        Ok(())
    }

    /// Memory management: the memory manager's own rules (see [`Self::memory_config`]), and
    /// the one about a page server this VMM adds.
    fn validate_memory_management(&self) -> Result<(), ConfigError> {
        if let Collapse::On(_) = self.collapse
            && self.backing != Backing::Small
        {
            return Err(ConfigError::CollapseNeedsSmall(self.backing));
        }
        if self.page_server_timeout.is_some() && !self.external() {
            return Err(ConfigError::PageServerTimeoutUnused);
        }
        self.working_set_plan()?;
        self.memory_config().map(drop)
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

    /// The memory part of the configuration, checked by the memory manager, with its errors
    /// told in this CLI's options.
    pub fn memory_config(&self) -> Result<MemoryConfig, ConfigError> {
        self.memory_config_with(|memory| memory)
    }

    /// [`Self::memory_config`], with the builder adjusted by `tune` before it checks.
    pub fn memory_config_with(
        &self,
        tune: impl FnOnce(MemoryBuilder) -> MemoryBuilder,
    ) -> Result<MemoryConfig, ConfigError> {
        tune(self.memory_builder())
            .build()
            .map_err(|e| self.option_error(e))
    }

    /// What the VM does with its working set: `--working-set` against the snapshot (whether
    /// it has a record) and the restore asked for (whether the VMM serves every fault, and
    /// whether the prefetcher runs).
    pub fn working_set_plan(&self) -> Result<WorkingSetPlan, ConfigError> {
        let mode = self.working_set;
        let name = match mode {
            WorkingSetMode::Auto => "auto",
            WorkingSetMode::Record => "record",
            WorkingSetMode::Replay => "replay",
            WorkingSetMode::Off => "off",
        };
        let refuse = |why: &str| {
            Err(ConfigError::WorkingSet {
                mode: name,
                why: why.into(),
            })
        };
        let Some(resume) = &self.resume else {
            return match mode {
                WorkingSetMode::Auto | WorkingSetMode::Off => Ok(WorkingSetPlan::None),
                _ => refuse("applies to a resumed VM (--resume SNAPSHOT)"),
            };
        };
        let lazy_small = self.restore == Restore::Lazy && self.backing == Backing::Small;
        let recordable = lazy_small && self.prefetch != Some(true);
        let replayable = lazy_small && self.prefetch != Some(false);
        match (mode, &resume.working_set) {
            (WorkingSetMode::Off, _) => Ok(WorkingSetPlan::None),
            (WorkingSetMode::Auto, Some(ws)) if replayable => {
                Ok(WorkingSetPlan::Replay(ws.clone()))
            }
            (WorkingSetMode::Auto, None) if recordable => Ok(WorkingSetPlan::Record),
            (WorkingSetMode::Auto, _) => Ok(WorkingSetPlan::None),
            (WorkingSetMode::Record, _) if recordable => Ok(WorkingSetPlan::Record),
            (WorkingSetMode::Record, _) => refuse(
                "recording needs every first touch to be a fault the VMM serves: --restore lazy, \
                 --backing small and no --prefetch on",
            ),
            (WorkingSetMode::Replay, None) => refuse(
                "the snapshot has no working-set record (resume it once with --working-set \
                 record or auto to make one)",
            ),
            (WorkingSetMode::Replay, Some(ws)) if replayable => {
                Ok(WorkingSetPlan::Replay(ws.clone()))
            }
            (WorkingSetMode::Replay, Some(_)) => refuse(
                "replay is done by the prefetcher: --restore lazy, --backing small and no \
                 --prefetch off",
            ),
        }
    }

    fn memory_builder(&self) -> MemoryBuilder {
        let mut b = MemoryConfig::builder(self.memory.0)
            .vcpus(self.vcpus as usize)
            .backing(self.backing)
            .source(self.page_source.clone())
            .fault_granularity(self.fault_granularity.0)
            .collapse(self.collapse_on().cloned())
            .huge_source(self.huge_source)
            .pool_ahead(self.pool_ahead)
            .populate(self.populate)
            .thread_hook(crate::seccomp::memory_thread_hook(self.seccomp))
            .install(self.install)
            .restore(self.restore)
            .prefetch_threads(self.prefetch_threads);
        if let Some(limit) = self.huge_limit {
            b = b.huge_limit(limit.0);
        }
        if let Some(n) = self.fault_threads {
            b = b.fault_threads(n);
        }
        if let Some(on) = self.prefetch {
            b = b.prefetch(on);
        }
        match self.working_set_plan() {
            Ok(WorkingSetPlan::Record) => b = b.record_working_set(true),
            Ok(WorkingSetPlan::Replay(ws)) => b = b.replay_working_set(ws),
            // Refused by `validate` first.
            Ok(WorkingSetPlan::None) | Err(_) => {}
        }
        b.reclaim_split_pages(self.reclaim_split_pages)
            .reclaim_partial(self.reclaim_partial)
            .reclaim(self.reclaim)
            .zero_shrinker(self.reclaim_shrinker.map(|r| r.0))
    }

    /// A memory manager's rule broken, in the options that set it.
    fn option_error(&self, e: vm_extents::ConfigError) -> ConfigError {
        use vm_extents::ConfigError as E;
        match e {
            E::SizeNotAligned(size) => ConfigError::MemoryNotAligned(
                ByteSize(size),
                ByteSize(size.next_multiple_of(EXTENT_SIZE)),
            ),
            E::FaultGranularity(g) => ConfigError::FaultGranularity(ByteSize(g)),
            E::GranularityNeedsUffd => ConfigError::GranularityNeedsUffd,
            E::CollapseNeedsSmall(b) => ConfigError::CollapseNeedsSmall(b),
            E::CollapseWithExternal => ConfigError::CollapseWithExternal,
            E::ExternalNeedsSmall(b) => ConfigError::ExternalNeedsSmall(b),
            E::MaxPtesNone(n) => ConfigError::MaxPtesNone(n),
            E::PagesToScan => ConfigError::PagesToScan,
            E::HugeLimit { value, ram } => ConfigError::HugeLimit {
                value: ByteSize(value),
                ram: ByteSize(ram),
            },
            E::HugeLimitUnused => ConfigError::HugeLimitUnused,
            E::FaultThreads(n) => ConfigError::FaultThreads(n),
            E::FaultThreadsNeedUffd => ConfigError::FaultThreadsNeedUffd,
            E::RestoreNeedsImage => ConfigError::RestoreNeedsImage(self.restore.name()),
            E::PrefetchNeedsLazyImage => ConfigError::PrefetchNeedsLazyImage,
            E::EagerServesNoFaults => ConfigError::EagerServesNoFaults,
            E::ReclaimSplitPages(n) => ConfigError::ReclaimSplitPages(n),
            E::ZeroShrinkerRate(r) => ConfigError::ShrinkerRate(ByteSize(r)),
            E::ZeroShrinker(why) => ConfigError::Shrinker(why),
            E::PrefetchThreads(n) => ConfigError::PrefetchThreads(n),
            E::PoolAhead { value, max } => ConfigError::PoolAhead { value, max },
            other => ConfigError::Memory(other),
        }
    }

    /// Whether an external page server fills guest RAM.
    pub fn external(&self) -> bool {
        matches!(self.page_source, PageSourceKind::External(_))
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
