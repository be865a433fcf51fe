//! Background threads: the fault handlers, the collapse thread, the pool's refill threads, the
//! prefetchers. Each is a [`Worker`]: a named thread with one [`Stop`] signal, which first runs
//! the VMM's [`ThreadHook`] for its [`ThreadRole`] (where a VMM installs its seccomp filter),
//! whose failure or panic is reported once (so the VM stops instead of hanging), and which is
//! joined on drop with a bound, so a thread stuck in a syscall can delay the VMM's exit but
//! never hang it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::sync::{lock, wait_timeout_while};

/// What a thread the manager starts is for. A [`ThreadHook`] is told, so that a VMM can give
/// each role its own seccomp filter (the system calls of each are listed in the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ThreadRole {
    /// A userfaultfd fault handler: reads faults, fills pages, moves huge pages in.
    FaultHandler,
    /// The collapse thread: scans extents and promotes them to huge pages.
    Collapser,
    /// A huge page pool refill thread: allocates huge pages ahead of demand.
    PoolRefill,
    /// A restore prefetch thread: reads the image behind the guest.
    Prefetcher,
    /// The zero-page shrinker: reads guest RAM, write-protects, discards and demotes extents.
    Shrinker,
}

/// What a [`ThreadHook`] returns when a thread must not run.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Run first on every thread the manager starts, on that thread, before it does anything
/// else: a VMM installs its seccomp filter for the [`ThreadRole`] here (or sets its affinity,
/// its name in a tracer, its signal mask). An error stops the thread before it starts, and is
/// reported as the thread's failure. The default hook does nothing.
#[derive(Clone, Default)]
pub struct ThreadHook(Option<Arc<HookFn>>);

type HookFn = dyn Fn(ThreadRole) -> Result<(), HookError> + Send + Sync;

impl ThreadHook {
    /// A hook that calls `f` with each new thread's role.
    pub fn new(f: impl Fn(ThreadRole) -> Result<(), HookError> + Send + Sync + 'static) -> Self {
        ThreadHook(Some(Arc::new(f)))
    }

    /// Runs the hook for `role` on the calling thread.
    pub fn run(&self, role: ThreadRole) -> Result<(), HookError> {
        self.0.as_ref().map_or(Ok(()), |f| f(role))
    }
}

/// What a thread's body returns when it cannot go on: any error, with its causes.
pub type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Told, once, when a thread the manager started stops before it was asked to. The VM
/// cannot go on as configured (a fault nobody serves would leave a vCPU waiting for ever),
/// so a VMM stops it; guest RAM stays mapped until the VMM drops the [`Memory`](crate::Memory).
pub type OnFailure = Arc<dyn Fn(ThreadFailure) + Send + Sync>;

/// A thread the manager started that stopped before it was asked to. Its `Display` is the
/// whole story on one line: `"<thread> panicked: <message>"`, or the error and its causes.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct ThreadFailure {
    /// The thread's name (`uffd-handler`, `collapser`, `huge-refill2`, `prefetch0`, ...).
    pub thread: String,
    /// What it was for.
    pub role: ThreadRole,
    /// Why it stopped.
    pub cause: FailureCause,
}

/// Why a thread stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum FailureCause {
    /// It panicked, with this message.
    Panicked(String),
    /// The [`ThreadHook`] refused it before it started.
    Hook(HookError),
    /// Its work failed.
    Failed(Failure),
}

impl ThreadFailure {
    fn describe(&self) -> String {
        match &self.cause {
            FailureCause::Panicked(message) => format!("{} panicked: {message}", self.thread),
            FailureCause::Hook(e) | FailureCause::Failed(e) => crate::error::chain(&**e),
        }
    }
}

impl std::fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ThreadHook(set)"
        } else {
            "ThreadHook(none)"
        })
    }
}

/// How long [`Worker::stop`] waits for a thread before leaving it behind.
pub const JOIN_LIMIT: Duration = Duration::from_secs(2);

/// A stop request, seen by a thread however it waits: by polling [`Stop::is_set`], by sleeping
/// in [`Stop::sleep`], or by `poll(2)` on [`Stop::fd`].
#[derive(Debug)]
pub struct Stop {
    set: AtomicBool,
    lock: Mutex<()>,
    cond: Condvar,
    event: EventFd,
}

impl Stop {
    /// A signal not yet set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Stop {
            set: AtomicBool::new(false),
            lock: Mutex::new(()),
            cond: Condvar::new(),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Asks the thread to stop and wakes it wherever it waits.
    pub fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        // Notifying under the lock: a sleeper checks the flag under the same lock, so the
        // wake-up cannot fall between its check and its wait.
        let _guard = lock(&self.lock);
        self.cond.notify_all();
        let _ = self.event.write(1);
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// Sleeps for `d` or until stopped; returns whether a stop was asked for.
    pub fn sleep(&self, d: Duration) -> bool {
        let guard = lock(&self.lock);
        drop(wait_timeout_while(&self.cond, guard, d, |()| {
            !self.is_set()
        }));
        self.is_set()
    }

    /// Wakes every thread waiting on a condition guarded by `mutex` (one that also checks
    /// [`Stop::is_set`] under it): set first, then notify under the lock.
    pub fn set_and_notify<T>(&self, mutex: &Mutex<T>, cond: &Condvar) {
        self.set();
        let _guard = lock(mutex);
        cond.notify_all();
    }

    /// An fd that becomes readable once a stop was asked for.
    pub fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// A running background thread; stopped and joined on drop.
pub struct Worker {
    name: String,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `body` on a thread called `name` in `role`, after `hook`. If `body` fails or
    /// panics, or the hook fails, `on_failure` is called once with what went wrong.
    pub fn spawn(
        name: &str,
        role: ThreadRole,
        hook: &ThreadHook,
        body: impl FnOnce(&Stop) -> Result<(), Failure> + Send + 'static,
        on_failure: impl FnOnce(ThreadFailure) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let stop = Arc::new(Stop::new()?);
        let thread_stop = stop.clone();
        let thread_name = name.to_string();
        let hook = hook.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let cause = match hook.run(role) {
                    Err(e) => FailureCause::Hook(e),
                    Ok(()) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        body(&thread_stop)
                    })) {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => FailureCause::Failed(e),
                        Err(panic) => FailureCause::Panicked(panic_message(&*panic).into()),
                    },
                };
                on_failure(ThreadFailure {
                    thread: thread_name,
                    role,
                    cause,
                });
            })?;
        Ok(Worker {
            name: name.into(),
            stop,
            thread: Some(thread),
        })
    }

    /// The thread's stop signal.
    pub fn stop_signal(&self) -> &Arc<Stop> {
        &self.stop
    }

    /// Asks the thread to stop and waits for it, at most [`JOIN_LIMIT`]; a thread that does
    /// not stop by then (stuck in a syscall) is left behind, with a warning. Whatever it may
    /// still touch it holds by `Arc`, so nothing it uses goes away under it.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.set();
        let deadline = Instant::now() + JOIN_LIMIT;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                log::warn!(
                    "thread {} did not stop within {JOIN_LIMIT:?}; leaving it behind",
                    self.name
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // The body's panics were caught inside the thread, so join only collects it.
        let _ = thread.join();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_stop_wakes_a_sleeper_at_once() {
        let mut w = Worker::spawn(
            "sleeper",
            ThreadRole::PoolRefill,
            &ThreadHook::default(),
            |stop| {
                assert!(stop.sleep(Duration::from_secs(60)));
                Ok(())
            },
            |what| panic!("{what}"),
        )
        .unwrap();
        let start = Instant::now();
        w.stop();
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn failures_and_panics_are_reported_once() {
        for (fail, expected) in [(false, "worker panicked: boom"), (true, "it failed")] {
            let (tx, rx) = mpsc::channel();
            let _w = Worker::spawn(
                "worker",
                ThreadRole::PoolRefill,
                &ThreadHook::default(),
                move |_| {
                    if fail {
                        return Err("it failed".into());
                    }
                    panic!("boom")
                },
                move |what| tx.send(what).unwrap(),
            )
            .unwrap();
            let failure: ThreadFailure = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(failure.to_string(), expected);
            assert_eq!(
                (failure.thread.as_str(), failure.role),
                ("worker", ThreadRole::PoolRefill)
            );
            assert!(matches!(
                (fail, &failure.cause),
                (false, FailureCause::Panicked(_)) | (true, FailureCause::Failed(_))
            ));
            assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        }
    }

    #[test]
    fn a_hook_that_refuses_stops_the_thread_before_its_body() {
        let (tx, rx) = mpsc::channel();
        let hook = ThreadHook::new(|role| Err(format!("no filter for {role:?}").into()));
        let _w = Worker::spawn(
            "refused",
            ThreadRole::Collapser,
            &hook,
            |_| panic!("the body must not run"),
            move |what| tx.send(what).unwrap(),
        )
        .unwrap();
        let failure = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(failure.cause, FailureCause::Hook(_)));
        assert_eq!(failure.to_string(), "no filter for Collapser");
    }

    #[test]
    fn a_stuck_thread_is_left_behind_within_the_bound() {
        let (tx, rx) = mpsc::channel::<()>();
        let mut w = Worker::spawn(
            "stuck",
            ThreadRole::PoolRefill,
            &ThreadHook::default(),
            move |_| {
                // Ignores the stop signal until the test lets it go.
                let _ = rx.recv();
                Ok(())
            },
            |what| panic!("{what}"),
        )
        .unwrap();
        let start = Instant::now();
        w.stop();
        let took = start.elapsed();
        assert!(took >= JOIN_LIMIT && took < JOIN_LIMIT * 5, "{took:?}");
        drop(tx);
    }

    #[test]
    fn the_fd_becomes_readable_on_stop() {
        let stop = Stop::new().unwrap();
        let mut pfd = libc::pollfd {
            fd: stop.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
        stop.set();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
    }
}
