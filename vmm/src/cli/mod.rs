//! The command line: clap definitions and their conversion into a [`VmConfig`] or a benchmark's
//! configuration. Configuration flows one way, from here: CLI, validated config, VM, memory.
//! Every enum option is a `clap::ValueEnum` (the memory manager's are its [`Choice`]s, offered
//! through [`choice`]), and every default is its type's own (or a constant next to the type),
//! written once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use vm_extents::Choice;

use crate::config::{AfterSnapshot, Collapse, GuestArg, VmConfig, WorkingSetMode};
use crate::seccomp::Seccomp;
use crate::snapshot::Loaded;
use crate::uffd_serve::{Granularity, ServeConfig};
use crate::units::ByteSize;
use vm_extents::{
    Backing, CollapseConfig, CollapseOrder, InstallMethod, MemoryConfig, PageSourceKind, PoolKind,
    Restore,
};

mod bench;
pub use bench::{
    BenchCommand, BenchOutput, CollapseArgs, FaultsArgs, ReclaimArgs, RestoreArgs, ResumeArgs,
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
    /// A built-in guest name (see `vmm guests`) or the path of a static x86_64 ELF executable
    /// [default: hello].
    #[arg(long, value_name = "NAME|PATH")]
    pub guest: Option<String>,
    /// Guest RAM: a multiple of 2 MiB, with a K, M or G suffix, from 6M to the host's RAM or
    /// 64G [default: 128M; resumed: the snapshot's].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<ByteSize>,
    /// Number of vCPUs, 1 to what KVM supports (at most 224) [default: 1; resumed: the
    /// snapshot's].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
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
    /// [default: kernel; resumed: the snapshot's memory image].
    #[arg(long, value_name = "kernel|zero|image:PATH|external:SOCKET")]
    pub page_source: Option<PageSourceKind>,
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
    /// touched again. Off, the guest is told so at boot and zeroes what it frees itself
    /// [default: on; resumed: as the snapshot's guest was told].
    #[arg(long, value_enum, value_name = "on|off")]
    pub reclaim: Option<Switch>,
    /// Freed 4 KiB pages of a huge extent from which reclaim splits it and gives them back
    /// (1 to 512); with fewer, the huge page is kept and the freed pages zeroed. An extent is
    /// not collapsed again while this many of its pages stay given back.
    #[arg(long, default_value_t = vm_extents::reclaim::SPLIT_PAGES, value_name = "N")]
    pub reclaim_split_pages: u32,
    /// How a huge extent freed from that threshold gives its freed pages back: copy (the kept
    /// pages copied into 4 KiB pages, the whole huge page freed at once; needs the collapse
    /// thread's write-protection, else THPs are discarded) or discard (MADV_DONTNEED of the
    /// freed pages, as a 4 KiB balloon: the kernel frees a THP's part only when its
    /// deferred split runs).
    #[arg(long, value_parser = choice::<vm_extents::PartialFree>(), default_value_t, value_name = "copy|discard")]
    pub reclaim_partial: vm_extents::PartialFree,
    /// The zero-page shrinker, for guests that do not report what they free: a background
    /// scan gives back 4 KiB pages found all zeroes at two passes in a row, by the same
    /// per-extent rules as reports (needs --reclaim on and 4 KiB backing; not with an external
    /// page server). Off by default: it reads guest memory all the time.
    #[arg(long, value_enum, default_value_t = Switch::Off, value_name = "on|off")]
    pub reclaim_shrinker: Switch,
    /// How much guest RAM the shrinker reads a second [default: 256M].
    #[arg(long, value_name = "BYTES")]
    pub reclaim_shrinker_rate: Option<ByteSize>,
    /// Where snapshots of the running VM go: a directory (made, or an earlier snapshot
    /// replaced whole). A snapshot is taken when the guest asks (its snapshot ucall), on
    /// SIGUSR1, or at --snapshot-after.
    #[arg(long, value_name = "DIR")]
    pub snapshot: Option<PathBuf>,
    /// Take a snapshot this many seconds after the vCPUs start (more than 0, at most
    /// 100000000).
    #[arg(long, value_name = "SECONDS")]
    pub snapshot_after: Option<f64>,
    /// What the VM does once a snapshot is taken: stop (end, exit 0) or run on.
    #[arg(long, value_enum, default_value_t, value_name = "stop|run")]
    pub after_snapshot: AfterSnapshot,
    /// Resume the VM saved in this snapshot directory where it paused: its vCPUs, devices and
    /// memory (served from its memory image as --page-source image: does, lazily unless
    /// --restore eager). The guest, its vCPUs and its RAM are the snapshot's.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// A resumed VM's working set: auto (replay the snapshot's record if it has one, else
    /// record one where the restore is lazy into 4 KiB pages), record (the restore is then
    /// lazy with no prefetcher, so every first touch is seen), replay (the prefetcher fetches
    /// the record first, in order) or off.
    #[arg(
        long,
        value_enum,
        default_value_t,
        value_name = "auto|record|replay|off"
    )]
    pub working_set: WorkingSetMode,
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
        let resume = self
            .resume
            .as_deref()
            .map(|dir| self.resume_from(dir))
            .transpose()?;
        let defaults = VmConfig::default();
        let from = resume.as_ref().map(|r| &r.state);
        Ok(VmConfig {
            guest: from.map_or_else(
                || self.guest.clone().unwrap_or(defaults.guest),
                |s| s.guest.clone(),
            ),
            memory: from.map_or(self.memory.unwrap_or(defaults.memory), |s| {
                ByteSize(s.memory)
            }),
            vcpus: from.map_or(self.vcpus.unwrap_or(defaults.vcpus), |s| s.vcpus),
            args: self.args.clone(),
            timeout: seconds("--timeout", self.timeout)?,
            page_server_timeout: seconds("--page-server-timeout", self.page_server_timeout)?,
            metrics: self.metrics.clone(),
            kvm_device: self.kvm_device.clone(),
            backing: self.backing,
            page_source: match &resume {
                Some(r) => PageSourceKind::Image(r.memory()),
                None => self.page_source.clone().unwrap_or(defaults.page_source),
            },
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
            reclaim: match (from, self.reclaim) {
                (Some(s), _) => s.reclaim,
                (None, r) => r.is_none_or(|r| r == Switch::On),
            },
            reclaim_split_pages: self.reclaim_split_pages,
            reclaim_partial: self.reclaim_partial,
            reclaim_shrinker: match (self.reclaim_shrinker, self.reclaim_shrinker_rate) {
                (Switch::Off, Some(_)) => {
                    return Err(crate::config::ConfigError::ShrinkerRateUnused.to_string());
                }
                (Switch::Off, None) => None,
                (Switch::On, rate) => {
                    Some(rate.unwrap_or(ByteSize(vm_extents::reclaim::shrinker::DEFAULT_RATE)))
                }
            },
            snapshot: self.snapshot.clone(),
            snapshot_after: seconds("--snapshot-after", self.snapshot_after)?,
            after_snapshot: self.after_snapshot,
            resume: resume.map(Arc::new),
            working_set: self.working_set,
        })
    }

    /// Reads the snapshot to resume and checks it against what these options ask for: what a
    /// snapshot fixes (the guest, its arguments, its vCPUs, its RAM, its page source, what
    /// the guest was told of reclaim) may be left out or given the same, never changed.
    fn resume_from(&self, dir: &std::path::Path) -> Result<Loaded, String> {
        let loaded = crate::snapshot::load(dir).map_err(|e| crate::error::chain(&e))?;
        let s = &loaded.state;
        let mismatch = |why: String| {
            crate::error::chain(&crate::snapshot::SnapshotError::Mismatch {
                path: dir.into(),
                why,
            })
        };
        s.check_resumable(self.vcpus, self.memory.map(|m| m.0), None)
            .map_err(mismatch)?;
        if let Some(g) = self.guest.as_ref().filter(|g| **g != s.guest) {
            return Err(mismatch(format!(
                "it runs guest {} and --guest asks for {g}; leave --guest out",
                s.guest
            )));
        }
        if !self.args.is_empty() {
            return Err(mismatch(
                "the guest's arguments are in its memory: leave --arg out".into(),
            ));
        }
        if let Some(p) = &self.page_source {
            return Err(mismatch(format!(
                "its memory comes from its own image; leave --page-source {} out (use \
                 --restore for how it is read)",
                p.name()
            )));
        }
        if let Some(r) = self.reclaim.filter(|r| (*r == Switch::On) != s.reclaim) {
            let word = |on: bool| if on { "on" } else { "off" };
            return Err(mismatch(format!(
                "its guest was told at boot that reclaim is {}; --reclaim {} would contradict \
                 it",
                word(s.reclaim),
                word(r == Switch::On)
            )));
        }
        Ok(loaded)
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
