//! Stopping the vCPUs: the kick signal that takes a vCPU thread out of `KVM_RUN`, and the
//! bounded wait for them all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{Killable, SIGRTMIN};

use super::VmError;
use crate::metrics::VcpuStats;

pub(super) extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only interrupts KVM_RUN; the vCPU loop then checks the stop flag.
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub(super) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// How long vCPU threads get to stop on their own (kicked out of `KVM_RUN` by a signal)
/// before the faults they may be waiting on are released.
pub const STOP_GRACE: Duration = Duration::from_secs(1);
/// How long stopping may take in all before the VMM gives up on a vCPU thread and exits
/// without tearing down what that thread may still be using.
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// How long vCPU threads get to stop when the page server is known to be gone: the faults
/// they wait on will never be served, and a vCPU that is not waiting stops within it.
pub const STOP_GRACE_SERVER_GONE: Duration = Duration::from_millis(100);

/// Sets the stop flag and kicks every vCPU thread out of `KVM_RUN` until it has exited. A
/// thread still running after `grace` may be blocked in a fault nobody will serve (a stalled
/// or dead page server): a kick cannot end that wait (the kernel retries a fault taken inside
/// KVM for any signal but a fatal one), so `release` then ends it: for an external page
/// server, by poisoning the pages it never served (the access fails and the vCPU leaves
/// `KVM_RUN`, no zero page read); else by unregistering guest RAM from userfaultfd, when the
/// kernel completes that access with a zero page and the kicks pending take the thread out
/// before the guest runs another instruction. After [`STOP_LIMIT`] the stop fails with the
/// threads left behind.
pub(super) fn stop_and_join(
    stop: &AtomicBool,
    threads: Vec<(u32, JoinHandle<VcpuStats>)>,
    grace: Duration,
    release: &dyn Fn(),
) -> Result<Vec<VcpuStats>, VmError> {
    stop.store(true, Ordering::Release);
    let start = Instant::now();
    let mut released = false;
    while let Some(&(index, _)) = threads.iter().find(|(_, h)| !h.is_finished()) {
        if !released && start.elapsed() >= grace {
            log::warn!(
                "vcpu{index} did not stop within {grace:?}; releasing the faults it may be \
                 waiting on"
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
