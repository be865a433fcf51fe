//! Snapshots of a running VM and resuming from them.
//!
//! A snapshot is a directory:
//!
//! ```text
//! SNAPSHOT/
//!   vm.state        every vCPU's registers, the VM clock, the devices ([`state`])
//!   memory.img      guest RAM, in the memory image format (`vm_extents::ram_image`)
//!   working-set     (after a resume recorded one) the order the guest first touched its RAM
//! ```
//!
//! Taking one: every vCPU is [paused](Pause) out of `KVM_RUN` at an instruction boundary (the
//! one that asked, by ucall, just after its ucall), each saves its own state, and guest RAM is
//! saved under the memory map's write side, so no fault, collapse, prefetch or shrinker pass is
//! in the middle of an extent. The directory is built beside its destination under a
//! temporary name and swapped in whole (`renameat2(RENAME_EXCHANGE)` where one exists
//! already), so a reader sees the old snapshot or the new one, never a mix.

pub mod state;
pub mod working_set;

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;
pub use state::{StateError, VcpuState, VmState};

/// The VM state's file in a snapshot.
pub const STATE_FILE: &str = "vm.state";
/// The memory image's file in a snapshot.
pub const MEMORY_FILE: &str = "memory.img";
/// The working-set record's file in a snapshot.
pub const WORKING_SET_FILE: &str = "working-set";

/// The option that names where snapshots go.
pub const SNAPSHOT_FLAG: &str = "--snapshot";
/// The option that names a snapshot to resume.
pub const RESUME_FLAG: &str = "--resume";

/// What asked for a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The guest's snapshot ucall (from this vCPU).
    Guest(u32),
    /// SIGUSR1.
    Signal,
    /// `--snapshot-after`.
    Timer,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Guest(i) => write!(f, "the guest's snapshot ucall (vcpu{i})"),
            Trigger::Signal => write!(f, "SIGUSR1"),
            Trigger::Timer => write!(f, "--snapshot-after"),
        }
    }
}

/// The vCPUs' meeting point for a snapshot: each one, asked to pause, leaves `KVM_RUN`, saves
/// its state here and waits until the controller lets it go on (or stop).
#[derive(Default)]
pub struct Pause {
    requested: AtomicBool,
    parked: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Default)]
struct Parked {
    /// Per vCPU: its state, once it is parked.
    states: Vec<Option<Result<VcpuState, String>>>,
    /// Per vCPU: its last state, once the guest has ended it (`ended` set).
    finals: Vec<Option<Result<VcpuState, String>>>,
    /// Bumped by every release.
    generation: u64,
    /// Whether the last release asked the vCPUs to stop.
    stop: bool,
}

impl Pause {
    /// A meeting point for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        let pause = Pause::default();
        {
            let mut p = lock(&pause.parked);
            p.states.resize_with(vcpus, || None);
            p.finals.resize_with(vcpus, || None);
        }
        pause
    }

    /// vCPU `index` has ended (its state's `ended` says with what): no pause waits for it,
    /// and a snapshot stores this state for it.
    pub fn ended(&self, index: u32, state: Result<VcpuState, String>) {
        lock(&self.parked).finals[index as usize] = Some(state);
        self.changed.notify_all();
    }

    /// Asks every vCPU to pause.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a pause is asked for (the vCPU loop looks before each `KVM_RUN`).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Parks vCPU `index` with its state until the controller releases it; returns whether it
    /// goes on running.
    pub fn park(&self, index: u32, state: Result<VcpuState, String>) -> bool {
        let mut p = lock(&self.parked);
        p.states[index as usize] = Some(state);
        let generation = p.generation;
        self.changed.notify_all();
        while p.generation == generation {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        !p.stop
    }

    /// Waits until every vCPU is parked or ended, calling `kick` every 2 ms (a vCPU in
    /// `KVM_RUN` must be kicked out); gives up after `limit` and names a vCPU still running.
    /// Returns the states of the vCPUs (ended ones marked) or the first one that failed.
    pub fn wait_parked(&self, limit: Duration, kick: &dyn Fn()) -> Result<Vec<VcpuState>, String> {
        let start = Instant::now();
        let mut p = lock(&self.parked);
        loop {
            let missing =
                (0..p.states.len()).find(|&i| p.states[i].is_none() && p.finals[i].is_none());
            let Some(missing) = missing else {
                break;
            };
            if start.elapsed() >= limit {
                return Err(format!(
                    "vcpu{missing} did not pause within {limit:?} (is it waiting on a page \
                     fault nobody serves?)"
                ));
            }
            drop(p);
            kick();
            p = lock(&self.parked);
            p = self
                .changed
                .wait_timeout(p, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut out = Vec::with_capacity(p.states.len());
        for i in 0..p.states.len() {
            match (p.states[i].take(), &p.finals[i]) {
                (Some(Ok(s)), _) => out.push(s),
                (Some(Err(e)), _) => return Err(format!("saving vcpu{i}'s state failed: {e}")),
                (None, Some(Ok(last))) => out.push(last.clone()),
                (None, Some(Err(e))) => {
                    return Err(format!("saving ended vcpu{i}'s state failed: {e}"));
                }
                (None, None) => unreachable!("the wait above ends when each has one"),
            }
        }
        Ok(out)
    }

    /// Lets every parked vCPU go on (`stop`: end instead). A vCPU that had ended parks again
    /// only if asked again.
    pub fn release(&self, stop: bool) {
        self.requested.store(false, Ordering::SeqCst);
        let mut p = lock(&self.parked);
        for s in &mut p.states {
            *s = None;
        }
        p.generation += 1;
        p.stop = stop;
        self.changed.notify_all();
    }
}

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot could not be read.
    #[error(transparent)]
    File(#[from] vm_extents::files::FileError),
    /// The path is not a snapshot directory.
    #[error("{RESUME_FLAG} {}: {why}", path.display())]
    NotSnapshot {
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        why: String,
    },
    /// The VM state was refused.
    #[error("{RESUME_FLAG} {}: {STATE_FILE} is refused: {source}", path.display())]
    State {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        #[source]
        source: StateError,
    },
    /// The snapshot does not fit the VM asked for or this build/host.
    #[error("{RESUME_FLAG} {}: cannot resume this snapshot: {why}", path.display())]
    Mismatch {
        /// The snapshot.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Writing a snapshot failed.
    #[error("{SNAPSHOT_FLAG} {}: {what}", path.display())]
    Write {
        /// Where it was going.
        path: PathBuf,
        /// What failed.
        what: String,
    },
}

/// A snapshot read back: its state, its checksum (its name), and where its files are.
#[derive(Debug)]
pub struct Loaded {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The VM state.
    pub state: VmState,
    /// The state file's checksum, which names this snapshot.
    pub id: u32,
    /// The working set recorded from it, if one was.
    pub working_set: Option<std::sync::Arc<vm_extents::WorkingSet>>,
}

impl Loaded {
    /// Its memory image.
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// Its working-set record (which may not exist).
    pub fn working_set(&self) -> PathBuf {
        self.dir.join(WORKING_SET_FILE)
    }
}

/// Reads and checks the snapshot in `dir` (its state; the memory image is checked when the
/// memory manager opens it).
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let not = |why: String| SnapshotError::NotSnapshot {
        path: dir.into(),
        why,
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => {
            return Err(not(format!(
                "it is {}, not a snapshot directory",
                vm_extents::files::kind_name(m.file_type())
            )));
        }
        Err(e) => return Err(not(format!("cannot read it: {e}"))),
    }
    for file in [STATE_FILE, MEMORY_FILE] {
        if !dir.join(file).exists() {
            return Err(not(format!(
                "it has no {file}: it is not a snapshot (made by {SNAPSHOT_FLAG})"
            )));
        }
    }
    let bytes = read_state(dir).map_err(|e| match e {
        ReadState::Open(e) => SnapshotError::File(e),
        ReadState::Read(e) => not(format!("reading {STATE_FILE}: {e}")),
    })?;
    let (state, id) = VmState::decode(&bytes).map_err(|source| SnapshotError::State {
        path: dir.into(),
        source,
    })?;
    let working_set =
        working_set::load(&dir.join(WORKING_SET_FILE), id, state.memory).map_err(|why| {
            SnapshotError::Mismatch {
                path: dir.into(),
                why,
            }
        })?;
    Ok(Loaded {
        dir: dir.into(),
        state,
        id,
        working_set,
    })
}

/// The checksum (the name) of the snapshot in `dir` now, if it holds a readable one.
pub fn load_id(dir: &Path) -> Option<u32> {
    let bytes = read_state(dir).ok()?;
    state::unseal(state::MAGIC, &bytes).ok().map(|(_, crc)| crc)
}

/// Why the state file of a snapshot could not be read whole.
enum ReadState {
    Open(vm_extents::files::FileError),
    Read(std::io::Error),
}

/// The bytes of the state file in `dir`: a regular file, at most `MAX_STATE_LEN` long.
fn read_state(dir: &Path) -> Result<Vec<u8>, ReadState> {
    let path = dir.join(STATE_FILE);
    let (mut file, _) =
        vm_extents::files::open_regular(&path, "VM state file", state::MAX_STATE_LEN)
            .map_err(ReadState::Open)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(ReadState::Read)?;
    Ok(bytes)
}

/// Checks before the guest runs that a snapshot can be written at `dir`: it is missing, or a
/// snapshot (never a file or a directory of something else), and its parent is writable.
pub fn check_target(dir: &Path) -> Result<(), SnapshotError> {
    let bad = |what: String| SnapshotError::Write {
        path: dir.into(),
        what,
    };
    match std::fs::symlink_metadata(dir) {
        Err(_) => {}
        Ok(m) if m.is_dir() => {
            let empty = std::fs::read_dir(dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty && !dir.join(STATE_FILE).exists() {
                return Err(bad(format!(
                    "it is a directory that holds no snapshot ({STATE_FILE}); name a new path \
                     or an earlier snapshot to replace"
                )));
            }
        }
        Ok(m) => {
            return Err(bad(format!(
                "it is {}; a snapshot is a directory (name a new path)",
                vm_extents::files::kind_name(m.file_type())
            )));
        }
    }
    let parent = vm_extents::files::parent_dir(dir);
    vm_extents::files::check_dir_writable(SNAPSHOT_FLAG, dir, &parent)
        .map_err(|e| bad(crate::error::chain(&e)))
}

/// Where a snapshot of `dir` is built before it is swapped in.
pub fn temporary_dir(dir: &Path) -> PathBuf {
    vm_extents::files::temporary_for(dir)
}

/// Writes `state` into the half-built snapshot `tmp` (whose memory image is written), makes it
/// durable, and swaps it in at `dir` whole.
pub fn finish(tmp: &Path, dir: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let fail = |what: String| SnapshotError::Write {
        path: dir.into(),
        what,
    };
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmp.join(STATE_FILE))?;
        f.write_all(&state.encode())?;
        f.sync_all()?;
        std::fs::File::open(tmp)?.sync_all()
    };
    write().map_err(|e| fail(format!("writing {STATE_FILE}: {e}")))?;
    check_target(dir)?;
    if dir.exists() {
        exchange(tmp, dir).map_err(|e| fail(format!("swapping the new snapshot in: {e}")))?;
        // `tmp` now names the old snapshot.
        if let Err(e) = std::fs::remove_dir_all(tmp) {
            log::warn!(
                "could not remove the replaced snapshot {}: {e}",
                tmp.display()
            );
        }
    } else {
        std::fs::rename(tmp, dir).map_err(|e| fail(format!("renaming it into place: {e}")))?;
    }
    if let Ok(parent) = std::fs::File::open(vm_extents::files::parent_dir(dir)) {
        let _ = parent.sync_all();
    }
    Ok(())
}

/// Swaps two paths atomically.
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths; renameat2 reads them only.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_pause_waits_for_every_running_vcpu_and_releases_them() {
        let pause = Arc::new(Pause::new(3));
        let vcpu = |i| {
            let mut s = state::tests::sample().vcpu.remove(0);
            s.index = i;
            s
        };
        pause.ended(
            2,
            Ok(VcpuState {
                ended: Some(7),
                ..vcpu(2)
            }),
        );
        pause.request();
        let parked: Vec<_> = (0..2)
            .map(|i| {
                let (p, s) = (pause.clone(), vcpu(i));
                std::thread::spawn(move || p.park(i, Ok(s)))
            })
            .collect();
        let states = pause.wait_parked(Duration::from_secs(5), &|| {}).unwrap();
        let got: Vec<_> = states.iter().map(|s| (s.index, s.ended)).collect();
        assert_eq!(got, [(0, None), (1, None), (2, Some(7))]);
        pause.release(false);
        for t in parked {
            assert!(t.join().unwrap(), "released to go on");
        }
        assert!(!pause.requested());
    }

    #[test]
    fn a_vcpu_that_never_parks_is_named() {
        let pause = Pause::new(2);
        pause.request();
        let kicks = std::sync::atomic::AtomicU32::new(0);
        let e = pause
            .wait_parked(Duration::from_millis(50), &|| {
                kicks.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap_err();
        assert!(e.contains("vcpu0 did not pause"), "{e}");
        assert!(kicks.load(Ordering::Relaxed) > 1);
    }
}
