//! The VM: building it from a validated [`VmConfig`] (the default build recipe) and running it
//! to an [`Outcome`].
//!
//! Field order matters for teardown: vCPU fds and the VM fd (and with them every memslot) are
//! dropped before guest RAM is unmapped.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::layout::{ARGS_ADDR, BOOT_INFO_BASE, BOOT_INFO_STRIDE, EXTENT_SIZE, GDT_ADDR};
use guest_abi::{BOOT_MAGIC, BootInfo};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::arch;
use crate::config::{ConfigError, VmConfig, host_memory};
use crate::devices::Devices;
use crate::files::{FileError, ImageTarget, MetricsTarget};
use crate::loader::{GuestImage, ImageError};
use crate::memory::image::{HEADER_SIZE, ImageFileError, SAVE_FLAG};
use crate::memory::{Memory, MemoryError, Teardown, kernel};
use crate::metrics::{self, VcpuStats};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::{Vcpu, VcpuEnd, VcpuEvent, VcpuShared, VmEvent};

/// Errors that keep a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open {path}: check that KVM is enabled (the kvm_intel or kvm_amd module is \
         loaded and virtualization is on in the firmware) and that this user may read and \
         write {path}"
    )]
    OpenKvm {
        /// The device path.
        path: String,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The KVM device is not one.
    #[error("{path} is not a KVM device: {why}; name the KVM device node (normally /dev/kvm)")]
    NotKvm {
        /// The device path.
        path: String,
        /// What it is instead.
        why: String,
    },
    /// A KVM ioctl failed.
    #[error("KVM call failed: {what}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host's RAM size could not be read.
    #[error("cannot read the host's memory size")]
    HostMemory(#[source] std::io::Error),
    /// A configuration value is not allowed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An output path cannot be used.
    #[error(transparent)]
    Output(#[from] FileError),
    /// The guest program is not usable.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Guest memory could not be set up or saved.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Writing boot data into guest RAM failed.
    #[error("cannot write boot data into guest RAM")]
    BootData(#[source] vm_memory::GuestMemoryError),
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Thread {
        /// The thread.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too few memory mappings are left for the VMM's threads.
    #[error(
        "vm.max_map_count is {max} and this process already uses {used} mappings; the VMM needs \
         {need} more for its threads and buffers (raise it as root: sysctl -w \
         vm.max_map_count=65530)"
    )]
    Mappings {
        /// `vm.max_map_count`.
        max: u64,
        /// Mappings in use.
        used: u64,
        /// Mappings needed.
        need: u64,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install a signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// A vCPU thread panicked.
    #[error("vcpu{0} thread panicked")]
    VcpuPanicked(u32),
    /// A vCPU thread did not stop.
    #[error(
        "vcpu{0} did not stop within {STOP_LIMIT:?}, even with its faults released; exiting \
         without tearing down the memory it may still use"
    )]
    VcpuStuck(u32),
    /// The metrics file could not be written.
    #[error("cannot write metrics to {path}")]
    Metrics {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// Whether the error is about the user's input or host set-up (nothing ran), as opposed
    /// to a failure of the VMM while running.
    pub fn is_bad_input(&self) -> bool {
        match self {
            VmError::Config(_)
            | VmError::Mappings { .. }
            | VmError::Output(_)
            | VmError::Image(_)
            | VmError::OpenKvm { .. }
            | VmError::NotKvm { .. } => true,
            VmError::Memory(MemoryError::HugetlbPool { .. })
            | VmError::Memory(MemoryError::UffdUnavailable { .. }) => true,
            // An unusable image is bad input; an I/O error while saving one is not.
            VmError::Memory(MemoryError::Image(e)) => e.is_bad_input(),
            _ => false,
        }
    }

    fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::Kvm { what, source }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every vCPU sent done; the largest code.
    Done(u64),
    /// A vCPU aborted.
    Aborted {
        /// Which.
        vcpu: u32,
        /// `file:line: message`.
        what: String,
    },
    /// A vCPU failed (triple fault, bad ucall, internal error...).
    Failed {
        /// Which.
        vcpu: u32,
        /// What happened, with registers.
        what: String,
    },
    /// `--timeout` expired.
    TimedOut(Duration),
    /// SIGINT or SIGTERM.
    Interrupted(i32),
    /// A VMM thread failed while the guest ran (the fault handler).
    VmmFailed(String),
    /// The guest finished, but saving its memory failed (the old image, if any, is intact).
    SaveFailed {
        /// The guest's own code.
        code: u64,
        /// Why the save failed.
        what: String,
    },
}

/// Process exit codes for ends that are not a guest's own code.
pub mod exit_code {
    /// Largest guest code passed through; larger codes are clamped to it.
    pub const GUEST_MAX: u8 = 199;
    /// A vCPU aborted (assertion or panic in the guest).
    pub const GUEST_ABORTED: u8 = 200;
    /// A vCPU failed: triple fault, invalid ucall, KVM internal error.
    pub const GUEST_FAILED: u8 = 201;
    /// `--timeout` expired.
    pub const TIMED_OUT: u8 = 202;
    /// Bad input: a value, a file or a device the VMM cannot use (nothing ran).
    pub const BAD_INPUT: u8 = 203;
    /// The VMM itself failed while running.
    pub const VMM_FAILED: u8 = 204;
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Done(code) => (*code).min(u64::from(exit_code::GUEST_MAX)) as u8,
            Outcome::Aborted { .. } => exit_code::GUEST_ABORTED,
            Outcome::Failed { .. } => exit_code::GUEST_FAILED,
            Outcome::TimedOut(_) => exit_code::TIMED_OUT,
            Outcome::Interrupted(sig) => 128 + *sig as u8,
            Outcome::VmmFailed(_) | Outcome::SaveFailed { .. } => exit_code::VMM_FAILED,
        }
    }

    /// A one-line description for the user.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Done(code) => format!("guest finished with code {code}"),
            Outcome::Aborted { vcpu, what } => format!("guest aborted on vcpu{vcpu}: {what}"),
            Outcome::Failed { vcpu, what } => format!("vcpu{vcpu} failed: {what}"),
            Outcome::TimedOut(t) => {
                format!(
                    "the guest did not finish within --timeout {}s; stopped it",
                    t.as_secs_f64()
                )
            }
            Outcome::Interrupted(sig) => format!("stopped by signal {sig}"),
            Outcome::VmmFailed(what) => format!("the VMM failed while the guest ran: {what}"),
            Outcome::SaveFailed { code, what } => {
                format!("the guest finished with code {code}, but saving its memory failed: {what}")
            }
        }
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct RunSummary {
    /// How it ended.
    pub outcome: Outcome,
    /// From the first vCPU start to the end of teardown.
    pub wall: Duration,
    /// Per-vCPU counters.
    pub vcpus: Vec<VcpuStats>,
    /// Serial console bytes written and dropped by the rate limit.
    pub console: (u64, u64),
    /// Ucall text bytes (prints, reports) written and dropped by its rate limit.
    pub ucall_output: (u64, u64),
    /// The memory, faults and kernel sections, read just before teardown.
    pub memory: Value,
    /// What `--save-memory` wrote, if it ran.
    pub saved: Option<Value>,
    /// What teardown left behind.
    pub teardown: Teardown,
    /// Free hugetlb pages before the VM was built.
    pub hugetlb_free_before: u64,
    /// The TSC frequency KVM reported, in kHz (0 if unknown), to turn guest cycles into time.
    pub tsc_khz: u64,
}

impl RunSummary {
    /// The JSON summary written by `--metrics`.
    pub fn to_json(&self) -> Value {
        let mut summary = json!({
            "exit_code": self.outcome.exit_code(),
            "outcome": self.outcome.describe(),
            "wall_time_ns": self.wall.as_nanos() as u64,
            "vcpus": metrics::vcpus_json(&self.vcpus),
            "console": {
                "written_bytes": self.console.0,
                "dropped_bytes": self.console.1,
                "ucall_written_bytes": self.ucall_output.0,
                "ucall_dropped_bytes": self.ucall_output.1,
            },
            "saved_image": self.saved,
        });
        metrics::merge(&mut summary, &self.memory);
        metrics::merge(
            &mut summary,
            &json!({
                "ledger": { "after_teardown_bytes": self.teardown.ledger_charged_bytes },
                "kernel": {
                    "hugetlb_free_before": self.hugetlb_free_before,
                    "hugetlb_free_after_teardown": self.teardown.hugetlb_free_pages,
                },
            }),
        );
        summary
    }
}

/// A VM ready to run.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    vm_fd: Option<VmFd>,
    _kvm: Kvm,
    devices: Arc<Devices>,
    config: VmConfig,
    events: (mpsc::Sender<VmEvent>, mpsc::Receiver<VmEvent>),
    hugetlb_free_before: u64,
    tsc_khz: u64,
    save_to: Option<ImageTarget>,
    metrics_to: Option<MetricsTarget>,
    // Last: unmapped after the VM fd (and its memslot) is gone.
    memory: Option<Memory>,
}

/// The signal that last asked the VMM to stop (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP_SIGNAL.store(num, Ordering::SeqCst);
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only interrupts KVM_RUN; the vCPU loop then checks the stop flag.
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn open_kvm(config: &VmConfig) -> Result<Kvm, VmError> {
    let path = config.kvm_device.display().to_string();
    let c_path =
        CString::new(config.kvm_device.as_os_str().as_bytes()).map_err(|_| VmError::OpenKvm {
            path: path.clone(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
    // A FIFO or a regular file named as the device would block or answer nonsense.
    match std::fs::metadata(&config.kvm_device) {
        Ok(meta) if !std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()) => {
            return Err(VmError::NotKvm {
                path,
                why: format!("it is {}", crate::files::kind_name(meta.file_type())),
            });
        }
        _ => {}
    }
    let kvm = Kvm::new_with_path(&c_path).map_err(|source| VmError::OpenKvm {
        path: path.clone(),
        source,
    })?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        v if v < 0 => Err(VmError::NotKvm {
            path,
            why: format!(
                "it does not answer KVM_GET_API_VERSION ({})",
                std::io::Error::last_os_error()
            ),
        }),
        v => Err(VmError::NotKvm {
            path,
            why: format!("it reports KVM API version {v}, not 12"),
        }),
    }
}

impl Vm {
    /// Validates `config` against this host, then builds the VM: KVM, RAM, boot data, vCPUs.
    pub fn build(config: VmConfig, devices: Devices) -> Result<Vm, VmError> {
        let hugetlb_free_before = kernel::hugetlb_pool().free;
        let kvm = open_kvm(&config)?;
        let host_mem = host_memory().map_err(VmError::HostMemory)?;
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        config.validate(host_mem, max_vcpus)?;
        // Every output is checked before anything runs, so a bad path never costs a run.
        let save_to = config
            .save_memory
            .as_deref()
            .map(|p| ImageTarget::check(SAVE_FLAG, p, HEADER_SIZE + config.memory.0))
            .transpose()?;
        let metrics_to = config
            .metrics
            .as_deref()
            .map(|p| MetricsTarget::open("--metrics", p))
            .transpose()?;
        let image = GuestImage::find(&config.guest)?;
        let exe = image.check(config.memory.0)?;

        let vm_fd = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
        let mut memory_config = config.memory_config();
        // Running out of mappings later would abort the process (a thread's stack, an
        // allocation): refuse now, while it can still say why.
        if let (Ok(max), Ok(used)) = (kernel::max_map_count(), kernel::mappings())
            && used + memory_config.map_reserve > max
        {
            return Err(VmError::Mappings {
                max,
                used,
                need: memory_config.map_reserve,
            });
        }
        // On by default, the collapse thread is an optimisation: where the host does not
        // allow it, say so once and run without it. Asked for with --collapse on, it must run.
        if memory_config.collapse.is_some()
            && config.collapse.is_none()
            && let Some(why) = crate::memory::collapse_unavailable()
        {
            eprintln!(
                "vmm: warning: running without the collapse thread: {why}; pass --collapse \
                 off to silence this"
            );
            memory_config.collapse = None;
        }
        // The memory threads read the kernel's view through these, opened before any filter.
        kernel::open_views().map_err(|e| VmError::Memory(MemoryError::KernelView(e)))?;
        let mut memory = Memory::new(memory_config)?;
        memory
            .ram()
            .register(&vm_fd, 0)
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;

        let mem = memory.ram().view();
        let write = |data: &[u8], at: u64| {
            mem.write_slice(data, GuestAddress(at))
                .map_err(VmError::BootData)
        };
        write(&arch::gdt(), GDT_ADDR)?;
        for (addr, page) in arch::page_tables(config.memory.0) {
            write(&page, addr)?;
        }
        let args = config.args_block();
        write(&args, ARGS_ADDR)?;
        image.load(&exe, mem)?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        let free_start = exe.end().next_multiple_of(EXTENT_SIZE).min(config.memory.0);
        let mut tsc_khz = 0;
        for index in 0..config.vcpus {
            let boot_addr = BOOT_INFO_BASE + u64::from(index) * BOOT_INFO_STRIDE;
            let vcpu = Vcpu::new(&vm_fd, index, &cpuid, exe.entry, boot_addr)
                .map_err(VmError::kvm("creating a vCPU"))?;
            let info = BootInfo {
                magic: BOOT_MAGIC,
                vcpu_index: u64::from(index),
                vcpu_count: u64::from(config.vcpus),
                ram_size: config.memory.0,
                free_start,
                free_end: config.memory.0,
                args_addr: ARGS_ADDR,
                args_len: args.len() as u64,
                tsc_khz: vcpu.tsc_khz().map_or(0, u64::from),
            };
            tsc_khz = info.tsc_khz;
            write(&info.to_bytes(), boot_addr)?;
            vcpus.push(vcpu);
        }
        // The VMM's own area (page tables, boot data, stacks) and the program's extents are
        // populated now, so every later fault is the workload's own.
        memory
            .ram()
            .populate_range(0, free_start)
            .map_err(|source| MemoryError::Populate {
                backing: config.backing,
                source,
            })?;
        let events = mpsc::channel();
        let fatal = std::sync::Mutex::new(events.0.clone());
        memory.start(Arc::new(move |what| {
            let _ = fatal.lock().map(|tx| tx.send(VmEvent::Fatal(what)));
        }))?;
        Ok(Vm {
            vcpus,
            vm_fd: Some(vm_fd),
            _kvm: kvm,
            devices: Arc::new(devices),
            config,
            events,
            hugetlb_free_before,
            tsc_khz,
            save_to,
            metrics_to,
            memory: Some(memory),
        })
    }

    /// Runs every vCPU until the run ends, then stops and joins them all.
    pub fn run(mut self) -> Result<RunSummary, VmError> {
        // Both handlers only store to an atomic or do nothing, which is async-signal-safe.
        register_signal_handler(kick_signal(), on_kick).map_err(VmError::Signal)?;
        for sig in [libc::SIGINT, libc::SIGTERM] {
            register_signal_handler(sig, on_stop_signal).map_err(VmError::Signal)?;
        }
        STOP_SIGNAL.store(0, Ordering::SeqCst);
        // From here on the main thread only waits, kicks, saves, reports and tears down; the
        // vCPUs it starts next inherit its filter and add their own.
        seccomp::install(ThreadKind::Main, self.config.seccomp)?;
        let seccomp_mode = self.config.seccomp;

        let start = Instant::now();
        let (events_tx, events) = (self.events.0.clone(), &self.events.1);
        let stop = Arc::new(AtomicBool::new(false));
        let vcpu_count = self.vcpus.len();
        let mut threads: Vec<(u32, JoinHandle<VcpuStats>)> = Vec::with_capacity(vcpu_count);
        for (index, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let shared = VcpuShared {
                devices: self.devices.clone(),
                ram: self.memory().ram().clone(),
                stop: stop.clone(),
                events: events_tx.clone(),
            };
            let name = format!("vcpu{index}");
            let spawned = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    // SAFETY: gettid cannot fail and touches no memory.
                    log::debug!("thread vcpu{index} is tid {}", unsafe { libc::gettid() });
                    if let Err(e) = seccomp::install(ThreadKind::Vcpu, seccomp_mode) {
                        let end = VcpuEnd::Failed(error_chain(&e));
                        let index = index as u32;
                        let _ = shared.events.send(VmEvent::Vcpu(VcpuEvent { index, end }));
                        return VcpuStats::new(index);
                    }
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        vcpu.run(&shared)
                    }));
                    result.unwrap_or_else(|_| {
                        // Report the panic so the VM stops instead of waiting for this vCPU.
                        let end = VcpuEnd::Failed("the vCPU thread panicked".into());
                        let index = index as u32;
                        let _ = shared.events.send(VmEvent::Vcpu(VcpuEvent { index, end }));
                        VcpuStats::new(index)
                    })
                });
            match spawned {
                Ok(handle) => threads.push((index as u32, handle)),
                Err(source) => {
                    let released = || self.memory().release_faults();
                    if stop_and_join(&stop, threads, &released).is_err() {
                        std::mem::forget(self.memory.take());
                    }
                    return Err(VmError::Thread { name, source });
                }
            }
        }
        drop(events_tx);

        let mut interval = self
            .config
            .metrics_interval
            .map(|every| (every, start + every));
        let deadline = self.config.timeout.map(|t| (start + t, t));
        let mut done = 0;
        let mut max_code = 0;

        let outcome = loop {
            crate::seccomp::forbidden_call_point("seccomp-main");
            match events.recv_timeout(Duration::from_millis(20)) {
                Ok(VmEvent::Vcpu(event)) => match event.end {
                    VcpuEnd::Done(code) => {
                        done += 1;
                        max_code = max_code.max(code);
                        if done == vcpu_count {
                            break Outcome::Done(max_code);
                        }
                    }
                    VcpuEnd::Aborted(what) => {
                        break Outcome::Aborted {
                            vcpu: event.index,
                            what,
                        };
                    }
                    VcpuEnd::Failed(what) => {
                        break Outcome::Failed {
                            vcpu: event.index,
                            what,
                        };
                    }
                },
                Ok(VmEvent::Fatal(what)) => break Outcome::VmmFailed(what),
                Err(_) => {}
            }
            if let Some((every, next)) = &mut interval
                && Instant::now() >= *next
            {
                *next += *every;
                self.write_metrics_line(start)?;
            }
            let sig = STOP_SIGNAL.load(Ordering::SeqCst);
            if sig != 0 {
                break Outcome::Interrupted(sig);
            }
            if let Some((at, t)) = deadline
                && Instant::now() >= at
            {
                break Outcome::TimedOut(t);
            }
        };
        let vcpus = match stop_and_join(&stop, threads, &|| self.memory().release_faults()) {
            Ok(v) => v,
            Err(e) => {
                // A thread may still be inside guest RAM: leave it mapped for the exit.
                std::mem::forget(self.memory.take());
                return Err(e);
            }
        };
        self.memory
            .as_mut()
            .expect("memory lives until teardown")
            .stop_collapse();
        let mut outcome = outcome;
        let saved = match (&self.save_to, &outcome) {
            (Some(target), &Outcome::Done(code)) => {
                let path = target.path();
                let interrupted = || STOP_SIGNAL.load(Ordering::SeqCst) != 0;
                match self.memory().save(path, &interrupted) {
                    Ok(stats) => {
                        log::info!("saved guest memory to {}: {stats:?}", path.display());
                        Some(json!({"path": path, "pages": stats}))
                    }
                    Err(MemoryError::Image(ImageFileError::Interrupted { .. })) => {
                        eprintln!(
                            "vmm: a signal stopped the save; {} was left as it was",
                            path.display()
                        );
                        outcome = Outcome::Interrupted(STOP_SIGNAL.load(Ordering::SeqCst));
                        None
                    }
                    Err(e) => {
                        outcome = Outcome::SaveFailed {
                            code,
                            what: error_chain(&e),
                        };
                        None
                    }
                }
            }
            (Some(target), _) => {
                eprintln!(
                    "vmm: not saving memory to {}: the guest did not finish",
                    target.path().display()
                );
                None
            }
            (None, _) => None,
        };
        let memory = self.memory_metrics()?;
        // Teardown: the VM fd (and with it the memslot) first, then guest memory.
        drop(self.vm_fd.take());
        let teardown = self
            .memory
            .take()
            .expect("memory lives until teardown")
            .teardown();
        let summary = RunSummary {
            outcome,
            wall: start.elapsed(),
            vcpus,
            console: self.devices.serial.output_stats(),
            ucall_output: self.devices.ucall_output_stats(),
            memory,
            saved,
            teardown,
            hugetlb_free_before: self.hugetlb_free_before,
            tsc_khz: self.tsc_khz,
        };
        if let Some(target) = &self.metrics_to {
            metrics::write_summary(target, &summary.to_json()).map_err(|source| {
                VmError::Metrics {
                    path: self
                        .config
                        .metrics
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display()
                        .to_string(),
                    source,
                }
            })?;
        }
        Ok(summary)
    }
}

impl Vm {
    /// The memory, faults and kernel sections of the metrics, with KVM's own `pages_2m`.
    /// The host address range of guest RAM (for benchmarks that watch the kernel's view).
    pub fn ram_host_range(&self) -> std::ops::Range<u64> {
        let ram = self.memory().ram();
        let base = ram.host_base().0 as u64;
        base..base + ram.size()
    }

    fn memory(&self) -> &Memory {
        self.memory.as_ref().expect("memory lives until teardown")
    }

    fn memory_metrics(&self) -> Result<Value, VmError> {
        let mut value = self.memory().metrics_json()?;
        let vm_fd = self.vm_fd.as_ref().expect("the VM fd lives until teardown");
        let pages_2m = kernel::kvm_vm_stat(vm_fd, "pages_2m").ok().flatten();
        value["kernel"]["kvm_pages_2m"] = json!(pages_2m);
        Ok(value)
    }

    /// Appends one line of metrics to `<--metrics>.jsonl` (or to the metrics stream).
    fn write_metrics_line(&self, start: Instant) -> Result<(), VmError> {
        let Some(target) = &self.metrics_to else {
            return Ok(());
        };
        let mut line = self.memory_metrics()?;
        line["elapsed_ns"] = json!(start.elapsed().as_nanos() as u64);
        metrics::append_line(target, &line).map_err(|source| VmError::Metrics {
            path: match target {
                MetricsTarget::File(p) => metrics::lines_path(p),
                MetricsTarget::Stream { path, .. } => path.clone(),
            }
            .display()
            .to_string(),
            source,
        })
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out += &format!(": {cause}");
        source = cause.source();
    }
    out
}

/// How long vCPU threads get to stop on their own (kicked out of `KVM_RUN` by a signal)
/// before the faults they may be waiting on are released.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// How long stopping may take in all before the VMM gives up on a vCPU thread and exits
/// without tearing down what that thread may still be using.
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Sets the stop flag and kicks every vCPU thread out of `KVM_RUN` until it has exited. A
/// thread still running after [`STOP_GRACE`] may be blocked in a fault nobody will serve (a
/// stalled or dead page server): `release` then unregisters guest RAM from userfaultfd, which
/// wakes every such waiter. After [`STOP_LIMIT`] the stop fails with the threads left behind.
fn stop_and_join(
    stop: &AtomicBool,
    threads: Vec<(u32, JoinHandle<VcpuStats>)>,
    release: &dyn Fn(),
) -> Result<Vec<VcpuStats>, VmError> {
    stop.store(true, Ordering::Release);
    let start = Instant::now();
    let mut released = false;
    while let Some(&(index, _)) = threads.iter().find(|(_, h)| !h.is_finished()) {
        if !released && start.elapsed() >= STOP_GRACE {
            log::warn!(
                "vcpu{index} did not stop within {STOP_GRACE:?}; releasing the faults it may \
                 be waiting on"
            );
            release();
            released = true;
        }
        if start.elapsed() >= STOP_LIMIT {
            return Err(VmError::VcpuStuck(index));
        }
        // A signal that lands just before KVM_RUN is lost, so keep kicking until it is out.
        for (_, handle) in threads.iter().filter(|(_, h)| !h.is_finished()) {
            let _ = handle.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    threads
        .into_iter()
        .map(|(index, handle)| handle.join().map_err(|_| VmError::VcpuPanicked(index)))
        .collect()
}
