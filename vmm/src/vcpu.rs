//! vCPUs: creating them in long mode, and the thread that runs each one.
//!
//! The exit handler is a plain function of (devices, exit) so it can be tested without a
//! thread or KVM. A vCPU thread ends by sending one [`VcpuEvent`] (done, abort, or failure)
//! and returning its [`VcpuStats`]. It stops early when the VM's stop flag is set; the
//! controller kicks it out of `KVM_RUN` with a signal until it notices.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::arch;
use crate::devices::{Devices, PioResult};
use crate::metrics::VcpuStats;
use crate::snapshot::{Pause, VcpuState, state::Raw};
use crate::ucall::{self, UcallResult};
use vm_extents::{GuestRam, ReclaimError, Reclaimer};

/// Says which KVM call failed, for `map_err`.
fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what} failed: {e}")
}

/// How a vCPU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest sent done (or wrote the exit port) with this code.
    Done(u64),
    /// The guest aborted: `file:line: message`.
    Aborted(String),
    /// The vCPU cannot go on (triple fault, internal error, bad ucall...), with its registers.
    Failed(String),
}

/// Sent once by each vCPU thread when its vCPU ends.
#[derive(Debug)]
pub struct VcpuEvent {
    /// Which vCPU.
    pub index: u32,
    /// The outcome, for the user.
    pub end: VcpuEnd,
}

/// What the VM's controller hears about.
#[derive(Debug)]
pub enum VmEvent {
    /// A vCPU ended.
    Vcpu(VcpuEvent),
    /// A VMM thread (the fault handler) cannot go on; the VM must stop.
    Fatal(String),
    /// The guest asked for a snapshot (this vCPU is pausing already).
    Snapshot(u32),
}

/// What one exit asks of the run loop.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Handled; run again.
    Continue,
    /// A ucall is pending; its address is in `rdi`.
    Ucall,
    /// The vCPU is done.
    Done(u64),
    /// The vCPU cannot go on.
    Fatal(String),
}

/// Handles one exit of a vCPU whose guest has `ram_size` bytes of RAM. Counts it by reason in
/// `stats`.
pub fn handle_exit(
    devices: &Devices,
    ram_size: u64,
    exit: VcpuExit<'_>,
    stats: &mut VcpuStats,
) -> ExitAction {
    // KVM turns an access to guest RAM whose host memory is missing into MMIO: answering it
    // like a device would drop the guest's write (or invent its read) without a word.
    let ram_hole = |addr: u64| {
        ExitAction::Fatal(format!(
            "the guest accessed RAM at {addr:#x}, which has no host memory behind it (a \
             failed mremap?); stopping rather than losing the access"
        ))
    };
    let pio = |r: PioResult| match r {
        PioResult::Handled => ExitAction::Continue,
        PioResult::Ucall => ExitAction::Ucall,
        PioResult::Exit(code) => ExitAction::Done(code),
    };
    match exit {
        VcpuExit::IoOut(port, data) => {
            stats.count_exit("io_out");
            pio(devices.pio_write(port, data))
        }
        VcpuExit::IoIn(port, data) => {
            stats.count_exit("io_in");
            pio(devices.pio_read(port, data))
        }
        VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) if addr < ram_size => {
            stats.count_exit("ram_hole");
            ram_hole(addr)
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.count_exit("mmio_read");
            devices.mmio_read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.count_exit("mmio_write");
            devices.mmio_write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::Hlt => {
            stats.count_exit("hlt");
            ExitAction::Fatal(
                "the guest executed HLT; this VMM delivers no interrupts, so it would never \
                 resume (end a vCPU with a done ucall or a write to port 0xf4)"
                    .into(),
            )
        }
        VcpuExit::Shutdown => {
            stats.count_exit("shutdown");
            ExitAction::Fatal("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into())
        }
        VcpuExit::FailEntry(reason, cpu) => {
            stats.count_exit("fail_entry");
            ExitAction::Fatal(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x} on \
                 host cpu {cpu})"
            ))
        }
        VcpuExit::InternalError => {
            stats.count_exit("internal_error");
            ExitAction::Fatal("KVM internal error (KVM_EXIT_INTERNAL_ERROR)".into())
        }
        VcpuExit::SystemEvent(kind, _) => {
            stats.count_exit("system_event");
            ExitAction::Fatal(format!(
                "the guest raised system event {kind} (reset or crash)"
            ))
        }
        other => {
            stats.count_exit("other");
            ExitAction::Fatal(format!("unexpected vCPU exit {other:?}"))
        }
    }
}

/// A vCPU set up to enter the guest program in long mode.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    /// The CPUID it was given (a snapshot keeps it).
    cpuid: CpuId,
    /// The MSRs a snapshot saves, of those KVM has.
    msrs: Arc<Vec<u32>>,
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    /// The devices exits reach.
    pub devices: Arc<Devices>,
    /// Guest RAM, for ucalls. A ucall is read without the memory map lock, the way the guest
    /// itself reads memory: the struct may lie in a page nobody touched yet, and then the read
    /// is a userfault the fault handler must serve, perhaps after taking the write side (a
    /// 2 MiB install) or behind a waiting collapse commit. No thread may hold the map lock
    /// across a fault the handler must serve. The read is as safe as the guest's own: guest
    /// RAM stays mapped for the VM's life, and an extent replaced meanwhile holds the same
    /// bytes (it was write-protected and copied first).
    pub ram: Arc<GuestRam>,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// Where the vCPU's end is reported.
    pub events: Sender<VmEvent>,
    /// Every vCPU's exits so far, for the live status line.
    pub exits: Arc<std::sync::atomic::AtomicU64>,
    /// Gives back what the guest reports free (`None`: reclaim is off).
    pub reclaimer: Option<Reclaimer>,
    /// Where vCPUs pause for a snapshot.
    pub pause: Arc<Pause>,
    /// Whether snapshots are taken (`--snapshot`): else the guest's snapshot ucall is ignored.
    pub snapshots: bool,
}

/// Why a free report was not carried out.
enum FreeFailed {
    /// The guest's error: a report where reclaim is off (the guest was told at boot it is not
    /// offered), or a bad range.
    Guest(String),
    /// The host could not give the memory back.
    Host(String),
}

/// Gives back the memory of a guest's free report (`count` ranges at guest address `at`): when
/// it returns, the vCPU runs on and the memory reads as zeroes.
fn free(shared: &VcpuShared, at: u64, count: u64) -> Result<(), FreeFailed> {
    let Some(reclaimer) = &shared.reclaimer else {
        return Err(FreeFailed::Guest(
            "the guest reported free memory, but reclaim is off (--reclaim off), as its boot \
             block said"
                .into(),
        ));
    };
    let ranges =
        ucall::read_free_ranges(shared.ram.view(), at, count).map_err(FreeFailed::Guest)?;
    reclaimer.report(&ranges).map(drop).map_err(|e| {
        let what = format!(
            "the guest's free report failed: {}",
            crate::error::chain(&e)
        );
        match e {
            ReclaimError::Discard { .. } => FreeFailed::Host(what),
            _ => FreeFailed::Guest(what),
        }
    })
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`, entering at `entry` with `rdi = boot_info`.
    pub fn new(
        vm: &VmFd,
        index: u32,
        cpuid: &CpuId,
        msrs: Arc<Vec<u32>>,
        entry: u64,
        boot_info: u64,
    ) -> Result<Self, kvm_ioctls::Error> {
        let fd = vm.create_vcpu(u64::from(index))?;
        let mut cpuid = cpuid.clone();
        for e in cpuid.as_mut_slice() {
            // The initial APIC ID, so a guest reading CPUID sees which vCPU it runs on.
            if e.function == 1 {
                e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
            }
            if e.function == 0xb || e.function == 0x1f {
                e.edx = index;
            }
        }
        fd.set_cpuid2(&cpuid)?;
        let mut sregs = fd.get_sregs()?;
        arch::long_mode_sregs(&mut sregs);
        fd.set_sregs(&sregs)?;
        fd.set_regs(&arch::entry_regs(entry, boot_info, u64::from(index)))?;
        fd.set_fpu(&arch::fpu())?;
        Ok(Vcpu {
            index,
            fd,
            cpuid,
            msrs,
        })
    }

    /// Creates vCPU `state.index` of `vm` as a snapshot saved it, to go on where it paused.
    /// Says which part KVM refused.
    pub fn restore(vm: &VmFd, state: &VcpuState, msrs: Arc<Vec<u32>>) -> Result<Self, String> {
        let fd = vm
            .create_vcpu(u64::from(state.index))
            .map_err(kvm("KVM_CREATE_VCPU"))?;
        let entries: Vec<_> = state.cpuid.iter().map(|e| e.0).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|e| format!("the CPUID: {e:?}"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_mp_state(state.mp_state.0)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs.0).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs.0).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: a `kvm_xsave` of the legacy size, which is what KVM_GET_XSAVE saved (no
        // XSAVE2 area beyond it is read).
        unsafe { fd.set_xsave(&state.xsave.0) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs.0).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs.0)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        let entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|e| format!("the MSRs: {e:?}"))?;
        let set = fd.set_msrs(&list).map_err(kvm("KVM_SET_MSRS"))?;
        if set < entries.len() {
            return Err(format!(
                "KVM_SET_MSRS refused MSR {:#x} (value {:#x})",
                entries[set].index, entries[set].data
            ));
        }
        fd.set_vcpu_events(&state.events.0)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(Vcpu {
            index: state.index,
            fd,
            cpuid,
            msrs,
        })
    }

    /// Saves this vCPU's state, out of `KVM_RUN`. An exit just handled (the `in` of a ucall)
    /// is completed first by entering KVM once with `immediate_exit` set, so the saved RIP is
    /// past the instruction and its result written.
    pub fn save(&mut self) -> Result<VcpuState, String> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("completing the last exit failed: {e}")),
            Ok(exit) => Err(format!("completing the last exit ran the guest: {exit:?}")),
        };
        self.fd.set_kvm_immediate_exit(0);
        completed?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("the MSRs: {e:?}"))?;
        let read = self.fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read < entries.len() {
            return Err(format!(
                "KVM_GET_MSRS could not read MSR {:#x}",
                entries[read].index
            ));
        }
        Ok(VcpuState {
            index: self.index,
            ended: None,
            cpuid: self.cpuid.as_slice().iter().map(|e| Raw(*e)).collect(),
            regs: Raw(self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?),
            sregs: Raw(self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?),
            xsave: Raw(self.fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?),
            xcrs: Raw(self.fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?),
            debugregs: Raw(self.fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?),
            events: Raw(self
                .fd
                .get_vcpu_events()
                .map_err(kvm("KVM_GET_VCPU_EVENTS"))?),
            mp_state: Raw(self.fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        })
    }

    /// Which vCPU this is.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The host TSC frequency KVM reports for this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    /// Runs the vCPU until it ends or the VM stops; reports the end and returns its counters.
    pub fn run(mut self, shared: &VcpuShared) -> VcpuStats {
        let mut stats = VcpuStats::new(self.index);
        let end = loop {
            if shared.stop.load(Ordering::Acquire) {
                break None;
            }
            if shared.pause.requested() {
                let state = self.save();
                if !shared.pause.park(self.index, state) {
                    break None;
                }
                continue;
            }
            fail::fail_point!("vcpu-run");
            crate::seccomp::forbidden_call_point("seccomp-vcpu");
            let ran = self.fd.run();
            shared.exits.fetch_add(1, Ordering::Relaxed);
            let action = match ran {
                Ok(VcpuExit::InternalError) => {
                    stats.count_exit("internal_error");
                    ExitAction::Fatal(self.internal_error())
                }
                Ok(exit) => handle_exit(&shared.devices, shared.ram.size(), exit, &mut stats),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    stats.count_exit("interrupted");
                    continue;
                }
                Err(e) => break Some(VcpuEnd::Failed(format!("KVM_RUN failed: {e}"))),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Done(code) => break Some(VcpuEnd::Done(code)),
                ExitAction::Fatal(what) => {
                    break Some(VcpuEnd::Failed(format!("{what}{}", self.describe())));
                }
                ExitAction::Ucall => {
                    let rdi = match self.fd.get_regs() {
                        Ok(regs) => regs.rdi,
                        Err(e) => break Some(VcpuEnd::Failed(format!("KVM_GET_REGS failed: {e}"))),
                    };
                    let bytes = ucall::read(shared.ram.view(), rdi);
                    let result = match bytes {
                        Ok(bytes) => ucall::dispatch(&bytes, &shared.devices, rdi, &mut stats),
                        Err(invalid) => invalid,
                    };
                    match result {
                        UcallResult::Continue => {}
                        UcallResult::Done(code) => break Some(VcpuEnd::Done(code)),
                        UcallResult::Abort { what } => break Some(VcpuEnd::Aborted(what)),
                        UcallResult::Invalid(what) => {
                            break Some(VcpuEnd::Failed(format!("{what}{}", self.describe())));
                        }
                        UcallResult::Snapshot if shared.snapshots => {
                            // Paused before the guest runs on: the snapshot is taken here.
                            shared.pause.request();
                            let _ = shared.events.send(VmEvent::Snapshot(self.index));
                        }
                        UcallResult::Snapshot => vm_extents::log_ratelimited!(
                            log::Level::Warn,
                            "vcpu{} asked for a snapshot, but no --snapshot path was given; \
                             ignored",
                            self.index
                        ),
                        UcallResult::Free { ranges, count } => match free(shared, ranges, count) {
                            Ok(()) => {}
                            Err(FreeFailed::Guest(what)) => {
                                break Some(VcpuEnd::Failed(format!("{what}{}", self.describe())));
                            }
                            Err(FreeFailed::Host(what)) => {
                                // The VMM's own failure: the VM stops as for a failed thread.
                                let _ = shared.events.send(VmEvent::Fatal(what));
                                break None;
                            }
                        },
                    }
                }
            }
        };
        if let Some(end) = end {
            if let VcpuEnd::Done(code) = end {
                stats.exit_code = Some(code);
                // A snapshot taken from now on holds this vCPU as ended.
                let state = self.save().map(|s| VcpuState {
                    ended: Some(code),
                    ..s
                });
                shared.pause.ended(self.index, state);
            }
            // The controller may already be gone if another vCPU ended the run.
            let _ = shared.events.send(VmEvent::Vcpu(VcpuEvent {
                index: self.index,
                end,
            }));
        }
        stats
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR` from the details KVM left in `kvm_run`.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live union
        // member; `ndata` is clamped to the array's length.
        let (suberror, data) = unsafe {
            let internal = &run.__bindgen_anon_1.internal;
            let n = (internal.ndata as usize).min(internal.data.len());
            (internal.suberror, internal.data[..n].to_vec())
        };
        let kind = match suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event failed",
            _ => "unknown suberror",
        };
        format!("KVM internal error: {kind} (suberror {suberror}, data {data:#x?})")
    }

    /// The registers, for messages about a vCPU that cannot go on.
    fn describe(&mut self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.fd.get_regs() {
            out += &format!(
                "\n  vcpu{} registers: rip={:#018x} rsp={:#018x} rflags={:#x}\n  \
                 rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n  \
                 r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
                self.index,
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                r.r8,
                r.r9,
                r.r10,
                r.r11,
                r.r12,
                r.r13,
                r.r14,
                r.r15
            );
        }
        if let Ok(s) = self.fd.get_sregs() {
            out += &format!(
                "\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            );
        }
        out
    }
}
