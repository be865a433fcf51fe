//! Taking the VMM's own locks (devices, metrics), with poisoning handled as the memory
//! manager does (`vm_extents`' locks): every thread reports its panic and the VM stops, and
//! every lock guards data that stays consistent between statements, so whoever takes it next
//! may use the data, and in particular tear down.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
