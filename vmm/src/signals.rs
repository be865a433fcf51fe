//! SIGINT and SIGTERM as requests to stop: a handler that only records which signal came, and
//! whoever runs a long job (a VM's run loop, a benchmark between its runs) asks whether one
//! did. The request stays until the process ends, so a benchmark that runs several VMs sees a
//! signal that came between two of them.

use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::signal::register_signal_handler;

/// The signal that asked the process to stop (0: none yet).
static REQUESTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a store to an atomic: async-signal-safe.
    REQUESTED.store(num, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM (again, harmlessly, if it is there).
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_stop_signal)?;
    }
    Ok(())
}

/// SIGUSR1s not yet taken as snapshot requests.
static SNAPSHOT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_snapshot_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a store to an atomic: async-signal-safe.
    SNAPSHOT.store(1, Ordering::SeqCst);
}

/// Installs the handler that takes SIGUSR1 as a request for a snapshot.
pub fn install_snapshot() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(libc::SIGUSR1, on_snapshot_signal)
}

/// Whether SIGUSR1 came since this was last asked.
pub fn snapshot_requested() -> bool {
    SNAPSHOT.swap(0, Ordering::SeqCst) != 0
}

/// The signal that asked the process to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// The exit code of a process stopped by `signal` (130 for SIGINT, 143 for SIGTERM).
pub fn exit_code(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}
