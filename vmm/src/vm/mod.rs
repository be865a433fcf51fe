//! The VM: building it from a validated [`VmConfig`] (the default build recipe) and running it
//! to an [`Outcome`]; [`error`] says why it could not be, [`summary`] what a run reports.
//!
//! Field order matters for teardown: vCPU fds and the VM fd (and with them every memslot) are
//! dropped before guest RAM is unmapped.

pub mod error;
mod status;
mod stop;
pub mod summary;
mod watch;

pub use crate::error::exit_code;
pub use error::VmError;
pub use stop::{STOP_GRACE, STOP_GRACE_SERVER_GONE, STOP_LIMIT};
pub use summary::{
    ConsoleSection, Outcome, RunSummary, SavedImage, SnapshotTaken, WorkingSetSection,
};

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::layout::{ARGS_ADDR, BOOT_INFO_BASE, BOOT_INFO_STRIDE, EXTENT_SIZE, GDT_ADDR};
use guest_abi::{BOOT_MAGIC, BootInfo};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};
use serde_json::json;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::register_signal_handler;

use crate::arch;
use crate::config::{AfterSnapshot, Collapse, VmConfig, WorkingSetPlan, host_memory};
use crate::devices::Devices;
use crate::files::{ImageTarget, MetricsTarget};
use crate::loader::GuestProgram;
use crate::metrics::{self, VcpuStats};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::state::Raw;
use crate::snapshot::{Loaded, Pause, SNAPSHOT_FLAG, Trigger, VcpuState, VmState};
use crate::vcpu::{Vcpu, VcpuEnd, VcpuEvent, VcpuShared, VmEvent};
use stop::{kick_signal, on_kick, stop_and_join};
use vm_extents::MemoryReport;
use vm_extents::host_view;
use vm_extents::ram_image::SaveStats;
use vm_extents::ram_image::{HEADER_SIZE, RamImageError};
use vmm_sys_util::signal::Killable;

/// The option that names the file an image is saved to.
pub const SAVE_FLAG: &str = "--save-memory";

/// How long the vCPUs get to pause for a snapshot before it fails.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// A snapshot's state that this host or KVM would not take.
fn resume_error(resume: &Loaded, why: String) -> VmError {
    VmError::Resume {
        path: resume.dir.display().to_string(),
        why,
    }
}
use vm_extents::{Memory, MemoryBuilder, MemoryError};

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
    /// When the build began (for the time to the guest's first instruction).
    built_from: Instant,
    /// What to add when a guest file of the user's own fails in the guest.
    failure_hint: Option<String>,
    /// Where vCPUs pause for a snapshot.
    pause: Arc<Pause>,
    /// A resumed snapshot's vCPUs that had ended: not run again.
    ended: Vec<VcpuState>,
    /// What the run does with its working set.
    working_set: WorkingSetPlan,
    // Last: unmapped after the VM fd (and its memslot) is gone.
    memory: Option<Memory>,
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
        Self::build_with(config, devices, |memory| memory)
    }

    /// [`Vm::build`], with the memory manager's builder adjusted by `tune` after the
    /// configuration has set it up: where benchmarks add what no user option sets (a collapse
    /// gate, an allocator that models slow allocation). The result is checked as usual.
    pub fn build_with(
        config: VmConfig,
        devices: Devices,
        tune: impl FnOnce(MemoryBuilder) -> MemoryBuilder,
    ) -> Result<Vm, VmError> {
        let built_from = Instant::now();
        let hugetlb_free_before = host_view::hugetlb_pool().free;
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
        if let Some(dir) = &config.snapshot {
            crate::snapshot::check_target(dir)?;
        }
        // A resumed VM's program, boot data and page tables are in its memory image.
        let boot = match &config.resume {
            None => {
                let image = GuestProgram::find(&config.guest)?;
                let exe = image.check(config.memory.0)?;
                let free_start = exe.end().next_multiple_of(EXTENT_SIZE).min(config.memory.0);
                image.check_args(&config.args, config.memory.0 - free_start)?;
                Some((image, exe, free_start))
            }
            Some(_) => None,
        };
        let failure_hint = boot.as_ref().and_then(|(image, exe, _)| {
            (!image.is_builtin()).then(|| crate::loader::bare_metal_hint(exe))
        });
        let working_set = config.working_set_plan()?;

        let mut memory_config = config.memory_config_with(tune)?;
        // Running out of mappings later would abort the process (a thread's stack, an
        // allocation): refuse now, while it can still say why.
        if let (Ok(max), Ok(used)) = (host_view::max_map_count(), host_view::mappings())
            && used + memory_config.map_reserve() > max
        {
            return Err(VmError::Mappings {
                max,
                used,
                need: memory_config.map_reserve(),
            });
        }
        // On by default, the collapse thread is an optimisation: where the host does not
        // allow it, say so once and run without it. Asked for with --collapse on, it must run.
        if memory_config.collapse().is_some()
            && matches!(config.collapse, Collapse::Default(_))
            && let Some(why) = vm_extents::collapse_unavailable()
        {
            eprintln!(
                "vmm: warning: running without the collapse thread: {why}; pass --collapse \
                 off to silence this"
            );
            memory_config = memory_config.without_collapse();
        }
        // The memory threads read the kernel's view through these, opened before any filter.
        host_view::open_views().map_err(|e| VmError::Memory(MemoryError::KernelView(e)))?;
        let mut memory = Memory::new(memory_config)?;
        // Made after the memory, so that on any failure from here the local `vm_fd` (and its
        // memslot) is dropped before `memory` unmaps guest RAM.
        let vm_fd = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
        // SAFETY: the memslot is gone before guest RAM is unmapped: on a failed build by the
        // locals' order (above); in a built `Vm` by its fields' order (`vm_fd` is dropped
        // before `memory`, and the run's teardown takes the fd first).
        unsafe { memory.ram().register(&vm_fd, 0) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;

        // The MSRs a snapshot saves, of those this KVM has.
        let have = kvm
            .get_msr_index_list()
            .map_err(VmError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let msrs: Arc<Vec<u32>> = Arc::new(
            arch::SAVED_MSRS
                .iter()
                .copied()
                .filter(|m| have.as_slice().contains(m))
                .collect(),
        );
        let pause = Arc::new(Pause::new(config.vcpus as usize));
        let Some((image, exe, free_start)) = boot else {
            let resume = config.resume.clone().expect("no program: a resume");
            let (vcpus, ended, tsc_khz) = Self::restore_vcpus(&vm_fd, &resume, msrs)?;
            let devices = devices
                .restored(&resume.state)
                .map_err(|why| resume_error(&resume, why))?;
            let events = mpsc::channel();
            Self::start_memory(&mut memory, &events.0)?;
            return Ok(Vm {
                vcpus,
                vm_fd: Some(vm_fd),
                _kvm: kvm,
                devices: Arc::new(devices),
                config,
                events,
                hugetlb_free_before,
                built_from,
                tsc_khz,
                save_to,
                metrics_to,
                failure_hint,
                pause,
                ended,
                working_set,
                memory: Some(memory),
            });
        };
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
        let mut tsc_khz = 0;
        for index in 0..config.vcpus {
            let boot_addr = BOOT_INFO_BASE + u64::from(index) * BOOT_INFO_STRIDE;
            let vcpu = Vcpu::new(&vm_fd, index, &cpuid, msrs.clone(), exe.entry, boot_addr)
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
                features: if config.reclaim {
                    guest_abi::FEATURE_FREE_REPORTING
                } else {
                    0
                },
            };
            tsc_khz = info.tsc_khz;
            write(&info.to_bytes(), boot_addr)?;
            vcpus.push(vcpu);
        }
        // The VMM's own area (page tables, boot data, stacks) and the program's extents are
        // populated now, so every later fault is the workload's own.
        memory
            .ram()
            .populate_range(GuestAddress(0), free_start)
            .map_err(|source| MemoryError::Populate {
                backing: config.backing,
                source,
            })?;
        let events = mpsc::channel();
        Self::start_memory(&mut memory, &events.0)?;
        Ok(Vm {
            vcpus,
            vm_fd: Some(vm_fd),
            _kvm: kvm,
            devices: Arc::new(devices),
            config,
            events,
            hugetlb_free_before,
            built_from,
            tsc_khz,
            save_to,
            metrics_to,
            failure_hint,
            pause,
            ended: Vec::new(),
            working_set,
            memory: Some(memory),
        })
    }

    /// Starts the memory threads, whose failures end the run.
    fn start_memory(memory: &mut Memory, events: &mpsc::Sender<VmEvent>) -> Result<(), VmError> {
        let fatal = std::sync::Mutex::new(events.clone());
        memory.start(Arc::new(move |what| {
            let _ = fatal
                .lock()
                .map(|tx| tx.send(VmEvent::Fatal(what.to_string())));
        }))?;
        Ok(())
    }

    /// The vCPUs of a snapshot, as it saved them, and the VM clock; the vCPUs that had ended
    /// apart (they are not run again); the TSC frequency, checked against the snapshot's.
    fn restore_vcpus(
        vm_fd: &VmFd,
        resume: &Loaded,
        msrs: Arc<Vec<u32>>,
    ) -> Result<(Vec<Vcpu>, Vec<VcpuState>, u64), VmError> {
        let state = &resume.state;
        let mut vcpus = Vec::new();
        let mut ended = Vec::new();
        let mut tsc_khz = 0;
        for saved in &state.vcpu {
            let vcpu = Vcpu::restore(vm_fd, saved, msrs.clone())
                .map_err(|why| resume_error(resume, format!("vcpu{}: {why}", saved.index)))?;
            let khz = vcpu.tsc_khz();
            state
                .check_resumable(None, None, khz)
                .map_err(|why| resume_error(resume, why))?;
            tsc_khz = khz.map_or(0, u64::from);
            match saved.ended {
                Some(_) => ended.push(saved.clone()),
                None => vcpus.push(vcpu),
            }
        }
        vm_fd
            .set_clock(&state.clock.0)
            .map_err(|e| resume_error(resume, format!("KVM_SET_CLOCK failed: {e}")))?;
        Ok((vcpus, ended, tsc_khz))
    }

    /// Runs every vCPU until the run ends, then stops and joins them all.
    pub fn run(mut self) -> Result<RunSummary, VmError> {
        // Both handlers only store to an atomic or do nothing, which is async-signal-safe.
        register_signal_handler(kick_signal(), on_kick).map_err(VmError::Signal)?;
        crate::signals::install().map_err(VmError::Signal)?;
        crate::signals::install_snapshot().map_err(VmError::Signal)?;
        // From here on the main thread only waits, kicks, saves, reports and tears down; the
        // vCPUs it starts next inherit its filter and add their own.
        seccomp::install(ThreadKind::Main, self.config.seccomp)?;
        let seccomp_mode = self.config.seccomp;

        let start = Instant::now();
        let (events_tx, events) = (self.events.0.clone(), &self.events.1);
        let stop = Arc::new(AtomicBool::new(false));
        let exits = Arc::new(AtomicU64::new(0));
        let vcpu_count = self.config.vcpus as usize;
        let mut threads: Vec<(u32, JoinHandle<VcpuStats>)> = Vec::with_capacity(vcpu_count);
        // A resumed snapshot's vCPUs that had ended count as done with their codes.
        let (mut done, mut max_code) = (0, 0);
        for s in &self.ended {
            self.pause.ended(s.index, Ok(s.clone()));
            done += 1;
            max_code = max_code.max(s.ended.unwrap_or(0));
        }
        for vcpu in std::mem::take(&mut self.vcpus) {
            let index = vcpu.index() as usize;
            let shared = VcpuShared {
                devices: self.devices.clone(),
                ram: self.memory().ram().clone(),
                stop: stop.clone(),
                events: events_tx.clone(),
                exits: exits.clone(),
                reclaimer: self.memory().reclaimer(),
                pause: self.pause.clone(),
                snapshots: self.config.snapshot.is_some(),
            };
            let name = format!("vcpu{index}");
            let spawned = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    if let Err(e) = seccomp::install(ThreadKind::Vcpu, seccomp_mode) {
                        let end = VcpuEnd::Failed(crate::error::chain(&e));
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
                    if stop_and_join(&stop, threads, STOP_GRACE, &released).is_err() {
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
        let mut snapshot_at = self.config.snapshot_after.map(|after| start + after);
        let mut snapshots = Vec::new();
        let mut server_gone = false;
        let mut fault_watch = self.config.page_server_timeout.map(watch::FaultWatch::new);
        let mut live = status::LiveStatus::new();

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
                        let what = match &self.failure_hint {
                            Some(hint) => format!("{what}\n{hint}"),
                            None => what,
                        };
                        break Outcome::Failed {
                            vcpu: event.index,
                            what,
                        };
                    }
                },
                Ok(VmEvent::Fatal(what)) => break Outcome::VmmFailed(what),
                Ok(VmEvent::Snapshot(index)) => {
                    if let Some(end) =
                        self.snapshot(Trigger::Guest(index), start, &threads, &mut snapshots)
                    {
                        break end;
                    }
                }
                Err(_) => {}
            }
            let by_signal = crate::signals::snapshot_requested();
            let by_timer = snapshot_at.is_some_and(|at| Instant::now() >= at);
            if by_signal || by_timer {
                if by_timer {
                    snapshot_at = None;
                }
                let trigger = if by_signal {
                    Trigger::Signal
                } else {
                    Trigger::Timer
                };
                if self.config.snapshot.is_none() {
                    eprintln!(
                        "vmm: SIGUSR1 asks for a snapshot, but no --snapshot DIR was given; ignored"
                    );
                } else if let Some(end) = self.snapshot(trigger, start, &threads, &mut snapshots) {
                    break end;
                }
            }
            if let Some((every, next)) = &mut interval
                && Instant::now() >= *next
            {
                *next += *every;
                self.write_metrics_line(start)?;
            }
            if live.due() {
                live.draw(exits.load(Ordering::Relaxed), &self.memory_report()?);
            }
            if let Some(why) = self.memory().page_server_gone() {
                server_gone = true;
                break Outcome::VmmFailed(why);
            }
            if let Some((vcpu, waited)) = fault_watch.as_mut().and_then(|w| w.overdue()) {
                server_gone = true;
                break Outcome::VmmFailed(format!(
                    "{vcpu} has waited {:.1} s on one page fault the page server has not \
                     answered (--page-server-timeout); it is alive but stalled, so the VM stops",
                    waited.as_secs_f64()
                ));
            }
            if let Some(sig) = crate::signals::requested() {
                break Outcome::Interrupted(sig);
            }
            if let Some((at, t)) = deadline
                && Instant::now() >= at
            {
                break Outcome::TimedOut(t);
            }
        };
        let guest_ended = start.elapsed();
        live.clear();
        // A vCPU waiting on a dead page server's fault waits for nothing.
        let grace = if server_gone {
            STOP_GRACE_SERVER_GONE
        } else {
            STOP_GRACE
        };
        let vcpus = match stop_and_join(&stop, threads, grace, &|| self.memory().release_faults()) {
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
            .stop_background();
        let mut outcome = outcome;
        let saved = match (&self.save_to, &outcome) {
            (Some(target), &Outcome::Done(code)) => {
                let path = target.path();
                let interrupted = || crate::signals::requested().is_some();
                match self.memory().save(path, SAVE_FLAG, &interrupted) {
                    Ok(pages) => {
                        log::info!("saved guest memory to {}: {pages:?}", path.display());
                        Some(SavedImage {
                            path: path.into(),
                            pages,
                        })
                    }
                    Err(MemoryError::Image(RamImageError::Interrupted { .. })) => {
                        eprintln!(
                            "vmm: a signal stopped the save; {} was left as it was",
                            path.display()
                        );
                        outcome = Outcome::Interrupted(
                            crate::signals::requested().unwrap_or(libc::SIGTERM),
                        );
                        None
                    }
                    Err(e) => {
                        outcome = Outcome::SaveFailed {
                            code,
                            what: crate::error::chain(&e),
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
        let working_set = self.finish_working_set(&outcome);
        let mut memory = self.memory_report()?;
        // Teardown: the VM fd (and with it the memslot) first, then guest memory.
        drop(self.vm_fd.take());
        let teardown = self
            .memory
            .take()
            .expect("memory lives until teardown")
            .teardown();
        memory.ledger.after_teardown_bytes = Some(teardown.ledger_charged_bytes);
        memory.kernel.hugetlb_free_before = Some(self.hugetlb_free_before);
        memory.kernel.hugetlb_free_after_teardown = Some(teardown.hugetlb_free_pages);
        let (written_bytes, dropped_bytes) = self.devices.serial.output_stats();
        let (ucall_written_bytes, ucall_dropped_bytes) = self.devices.ucall_output_stats();
        let summary = RunSummary {
            outcome,
            wall: start.elapsed(),
            to_first_instruction: start.duration_since(self.built_from),
            guest: guest_ended,
            vcpus,
            console: ConsoleSection {
                written_bytes,
                dropped_bytes,
                ucall_written_bytes,
                ucall_dropped_bytes,
            },
            memory,
            saved,
            tsc_khz: self.tsc_khz,
            snapshots,
            working_set,
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

/// Writes `ws` beside the snapshot it was recorded from, if `resume.dir` still holds that
/// one (a snapshot this run took may have replaced it at the same path); else why not.
fn save_working_set(
    resume: &crate::snapshot::Loaded,
    ws: &vm_extents::WorkingSet,
) -> Result<(), String> {
    if crate::snapshot::load_id(&resume.dir) != Some(resume.id) {
        return Err(format!(
            "{} no longer holds the snapshot it was recorded from (it was replaced while the \
             VM ran, as by a snapshot of its own)",
            resume.dir.display()
        ));
    }
    let path = resume.working_set();
    crate::snapshot::working_set::save(&path, resume.id, ws)
        .map_err(|e| format!("writing {} failed: {e}", path.display()))
}

impl Vm {
    /// Takes a snapshot asked for by `trigger`: every vCPU paused (kicked out of `KVM_RUN`
    /// until it parks), guest RAM saved under the memory map's write side, the state written
    /// beside it and the directory swapped in. Returns how the run ends if it ends here (the
    /// VM stops after a snapshot, or a snapshot failed), else lets the vCPUs go on.
    fn snapshot(
        &self,
        trigger: Trigger,
        start: Instant,
        threads: &[(u32, JoinHandle<VcpuStats>)],
        taken: &mut Vec<SnapshotTaken>,
    ) -> Option<Outcome> {
        let dir = self
            .config
            .snapshot
            .as_deref()
            .expect("asked only with --snapshot");
        let paused = Instant::now();
        self.pause.request();
        let kick = || {
            for (_, handle) in threads.iter().filter(|(_, h)| !h.is_finished()) {
                let _ = handle.kill(kick_signal());
            }
        };
        let result = self
            .pause
            .wait_parked(PAUSE_LIMIT, &kick)
            .and_then(|vcpus| self.write_snapshot(dir, vcpus));
        let stop = self.config.after_snapshot == AfterSnapshot::Stop || result.is_err();
        let paused_ns = paused.elapsed().as_nanos() as u64;
        self.pause.release(stop);
        match result {
            Ok(memory) => {
                log::info!(
                    "snapshot of the VM written to {} (asked by {trigger}; paused {:.1} ms)",
                    dir.display(),
                    paused_ns as f64 / 1e6
                );
                taken.push(SnapshotTaken {
                    path: dir.into(),
                    trigger,
                    at_ns: paused.duration_since(start).as_nanos() as u64,
                    paused_ns,
                    memory,
                });
                stop.then_some(Outcome::Snapshotted(trigger))
            }
            // Ctrl-C during the save: the user's stop, not the VMM's failure.
            Err(_) if crate::signals::requested().is_some() => {
                eprintln!(
                    "vmm: a signal stopped the snapshot; {} was left as it was",
                    dir.display()
                );
                crate::signals::requested().map(Outcome::Interrupted)
            }
            Err(what) => Some(Outcome::VmmFailed(format!(
                "the snapshot asked by {trigger} failed ({} was left as it was): {what}",
                dir.display()
            ))),
        }
    }

    /// Writes a snapshot of the paused VM (`vcpus` its vCPUs' states) to `dir`.
    fn write_snapshot(&self, dir: &Path, vcpus: Vec<VcpuState>) -> Result<SaveStats, String> {
        let vm_fd = self.vm_fd.as_ref().expect("the VM fd lives until teardown");
        let clock = vm_fd
            .get_clock()
            .map_err(|e| format!("KVM_GET_CLOCK failed: {e}"))?;
        let tmp = crate::snapshot::temporary_dir(dir);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let result = (|| {
            let interrupted = || crate::signals::requested().is_some();
            let memory = self
                .memory()
                .save(
                    &tmp.join(crate::snapshot::MEMORY_FILE),
                    SNAPSHOT_FLAG,
                    &interrupted,
                )
                .map_err(|e| crate::error::chain(&e))?;
            let state = VmState {
                build: crate::snapshot::state::this_build(),
                guest: self.config.guest.clone(),
                vcpus: self.config.vcpus,
                memory: self.config.memory.0,
                tsc_khz: u32::try_from(self.tsc_khz).unwrap_or(0),
                reclaim: self.config.reclaim,
                clock: Raw(clock),
                serial: self.devices.serial.state(),
                stages: self.devices.stages.counts(),
                vcpu: vcpus,
            };
            crate::snapshot::finish(&tmp, dir, &state).map_err(|e| crate::error::chain(&e))?;
            Ok(memory)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Writes the working set recorded this run into the snapshot it resumed, where it was
    /// recorded and the guest finished (a run cut short recorded only part of it).
    fn finish_working_set(&self, outcome: &Outcome) -> Option<WorkingSetSection> {
        let resume = self.config.resume.as_ref()?;
        Some(match &self.working_set {
            WorkingSetPlan::None => WorkingSetSection {
                mode: "none",
                ..Default::default()
            },
            WorkingSetPlan::Replay(ws) => WorkingSetSection {
                mode: "replay",
                extents: ws.extents.len() as u64,
                pages: ws.pages.len() as u64,
                ..Default::default()
            },
            WorkingSetPlan::Record => {
                let ws = self.memory().working_set().unwrap_or_default();
                let result = match outcome {
                    Outcome::Done(_) => save_working_set(resume, &ws),
                    _ => Err("the guest did not finish".to_string()),
                };
                WorkingSetSection {
                    mode: "record",
                    extents: ws.extents.len() as u64,
                    pages: ws.pages.len() as u64,
                    saved: result.is_ok(),
                    not_saved: result.err(),
                }
            }
        })
    }

    /// The host address range of guest RAM (for benchmarks that watch the kernel's view).
    pub fn ram_host_range(&self) -> std::ops::Range<vm_extents::HostAddr> {
        let ram = self.memory().ram();
        let base = ram.host_base();
        base..base + ram.size()
    }

    fn memory(&self) -> &Memory {
        self.memory.as_ref().expect("memory lives until teardown")
    }

    /// What memory reports now, with KVM's own count of 2 MiB mappings.
    fn memory_report(&self) -> Result<MemoryReport, VmError> {
        let mut report = self.memory().report()?;
        let vm_fd = self.vm_fd.as_ref().expect("the VM fd lives until teardown");
        report.kernel.kvm_pages_2m = host_view::kvm_vm_stat(vm_fd, "pages_2m").ok().flatten();
        Ok(report)
    }

    /// Appends one line of metrics to `<--metrics>.jsonl` (or to the metrics stream).
    fn write_metrics_line(&self, start: Instant) -> Result<(), VmError> {
        let Some(target) = &self.metrics_to else {
            return Ok(());
        };
        let mut line = serde_json::to_value(self.memory_report()?).expect("plain data");
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
