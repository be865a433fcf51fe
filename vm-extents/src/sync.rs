//! Taking locks, with poisoning handled here, once, for every lock in the manager.
//!
//! A lock is poisoned when a thread panics while holding it. Every thread of the manager reports
//! its panic (the VM then stops), and every lock guards data that stays consistent between
//! statements: counters, queues, histograms, the extent table (whose state changes are atomic
//! stores, or sets of them under the write side that nothing in them can interrupt by
//! panicking). So whoever takes the lock next may use the data, and in particular tear down;
//! these functions take the data over instead of propagating the panic.

use std::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, WaitTimeoutResult,
};
use std::time::Duration;

/// Locks a mutex.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits on `cond` with `guard` for at most `d`.
pub fn wait_timeout<'a, T>(
    cond: &Condvar,
    guard: MutexGuard<'a, T>,
    d: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cond.wait_timeout(guard, d)
        .unwrap_or_else(|p| p.into_inner())
}

/// Waits on `cond` with `guard` while `condition` holds, for at most `d`.
pub fn wait_timeout_while<'a, T>(
    cond: &Condvar,
    guard: MutexGuard<'a, T>,
    d: Duration,
    condition: impl FnMut(&mut T) -> bool,
) -> MutexGuard<'a, T> {
    cond.wait_timeout_while(guard, d, condition)
        .unwrap_or_else(|p| p.into_inner())
        .0
}

/// Takes the read side of an `RwLock`.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// Takes the write side of an `RwLock`.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}
