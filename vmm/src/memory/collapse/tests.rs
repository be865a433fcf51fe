//! Protocol tests on real memory: a real userfaultfd, real THPs and real `mremap`, with an
//! injected allocator (and ledger observer) that record which locks are held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use guest_abi::layout::{EXTENT_SIZE, PAGE_SIZE};

use super::{CollapseConfig, CollapseOrder, CollapseStats, Collapser, ScanResult};
use crate::memory::backing::Backing;
use crate::memory::extent::{ExtentIndex, ExtentState, ExtentTable, PAGES_PER_EXTENT};
use crate::memory::fault::source::ZeroSource;
use crate::memory::fault::{FaultHandler, FaultStats, Resolver};
use crate::memory::host_view;
use crate::memory::huge::install::{Installer, MapBudget};
use crate::memory::huge::ledger::Ledger;
use crate::memory::huge::page::{AllocError, HugePage, HugePageAllocator, alloc_thp};
use crate::memory::map::{Held, MemoryMap};
use crate::memory::ram::GuestRam;
use crate::memory::uffd::{self, Uffd};
use crate::seccomp::Seccomp;

const EXTENTS: u64 = 4;
/// Pages written in each extent; the rest stay unpopulated.
const FILLED: usize = 500;

struct Rig {
    ram: Arc<GuestRam>,
    map: Arc<MemoryMap>,
    uffd: Arc<Uffd>,
    _handler: FaultHandler,
}

fn value(gpa: u64, round: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round
}

fn rig() -> Option<Rig> {
    let features = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;
    let uffd = match Uffd::new(features) {
        Ok(u) if u.features() & features == features => Arc::new(u),
        _ => {
            eprintln!("SKIP: userfaultfd write-protection is not available here");
            return None;
        }
    };
    let ram = Arc::new(GuestRam::new(EXTENTS * EXTENT_SIZE, Backing::Small).unwrap());
    for e in 0..EXTENTS {
        for p in 0..FILLED as u64 {
            write(
                &ram,
                e * EXTENT_SIZE + p * PAGE_SIZE,
                value(e * EXTENT_SIZE + p * PAGE_SIZE, 0),
            );
        }
    }
    let table = ExtentTable::new(ram.size());
    let base = ram.host_base().0 as u64;
    let present = host_view::present_pages(base, ram.size()).unwrap();
    for (i, extent) in table.iter() {
        extent.add_present(|p| present[i.0 * PAGES_PER_EXTENT + p]);
    }
    let map = Arc::new(MemoryMap::new(table, ram.clone()));
    uffd.register(base, ram.size(), uffd::REGISTER_MODE_WP)
        .unwrap();
    let handler = FaultHandler::start(
        Resolver {
            uffd: uffd.clone(),
            map: map.clone(),
            source: Arc::new(ZeroSource),
            granularity: PAGE_SIZE,
            stats: Arc::new(FaultStats::default()),
            huge: None,
        },
        Seccomp::Off,
        |what| panic!("fault handler failed: {what}"),
    )
    .unwrap();
    Some(Rig {
        ram,
        map,
        uffd,
        _handler: handler,
    })
}

fn write(ram: &GuestRam, gpa: u64, v: u64) {
    let p = (ram.host_base().0 as u64 + gpa) as *mut u64;
    // SAFETY: `gpa` is inside the rig's RAM mapping, which outlives every test thread.
    unsafe { p.write_volatile(v) };
}

fn read(ram: &GuestRam, gpa: u64) -> u64 {
    let p = (ram.host_base().0 as u64 + gpa) as *const u64;
    // SAFETY: as in `write`.
    unsafe { p.read_volatile() }
}

/// Which locks the allocator (or the ledger) saw held by the collapsing thread.
#[derive(Default)]
struct Seen {
    write_locked: AtomicBool,
    any_locked: AtomicBool,
}

impl Seen {
    fn look(&self, map: &MemoryMap) {
        match map.held() {
            Held::Free => {}
            Held::Read => self.any_locked.store(true, Ordering::SeqCst),
            Held::Write => {
                self.write_locked.store(true, Ordering::SeqCst);
                self.any_locked.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// An allocator that records lock state and every page it hands out, and can fail.
struct Probe {
    map: Arc<MemoryMap>,
    seen: Arc<Seen>,
    fail: bool,
    handed_out: Mutex<Vec<u64>>,
}

impl HugePageAllocator for Probe {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        self.seen.look(&self.map);
        if self.fail {
            return Err(AllocError::GaveUp("injected failure".into()));
        }
        let page = alloc_thp()?;
        self.handed_out.lock().unwrap().push(page.addr());
        Ok(page)
    }
}

struct Setup {
    collapser: Collapser,
    probe: Arc<Probe>,
    alloc_seen: Arc<Seen>,
    charge_seen: Arc<Seen>,
}

fn setup(rig: &Rig, order: CollapseOrder, fail: bool, limit: u64) -> Setup {
    let alloc_seen = Arc::new(Seen::default());
    let charge_seen = Arc::new(Seen::default());
    let probe = Arc::new(Probe {
        map: rig.map.clone(),
        seen: alloc_seen.clone(),
        fail,
        handed_out: Mutex::new(Vec::new()),
    });
    let (map, seen) = (rig.map.clone(), charge_seen.clone());
    let ledger = Arc::new(Ledger::with_observer(
        limit,
        Box::new(move || seen.look(&map)),
    ));
    let collapser = Collapser {
        map: rig.map.clone(),
        uffd: rig.uffd.clone(),
        source: None,
        installer: Installer {
            pool: probe.clone(),
            ledger,
            maps: Arc::new(MapBudget::new(0).unwrap()),
            ram: rig.ram.clone(),
            uffd: rig.uffd.clone(),
        },
        config: CollapseConfig {
            order,
            ..CollapseConfig::default()
        },
        stats: Arc::new(CollapseStats::default()),
        stopping: Arc::new(AtomicBool::new(false)),
        kernel_populates: true,
        before_commit: None,
    };
    Setup {
        collapser,
        probe,
        alloc_seen,
        charge_seen,
    }
}

fn collapse(c: &Collapser, index: usize) -> ScanResult {
    let guard = c.map.read();
    c.collapse(guard, ExtentIndex(index))
        .expect("no unrecoverable failure")
}

/// A write to `gpa` from another thread completes: the page is not left protected.
fn assert_writable(ram: &Arc<GuestRam>, gpa: u64) {
    let (tx, rx) = mpsc::channel();
    let ram = ram.clone();
    std::thread::spawn(move || {
        let old = read(&ram, gpa);
        write(&ram, gpa, old);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
        panic!("a write to {gpa:#x} is still blocked: the extent was left write-protected")
    });
}

/// After a failed collapse: nothing charged, every page handed out unmapped again, the
/// extent small, untracked and writable, its data intact.
fn assert_left_as_before(rig: &Rig, s: &Setup, index: usize) {
    assert_eq!(s.collapser.installer.ledger.charged(), 0);
    for &addr in s.probe.handed_out.lock().unwrap().iter() {
        let mut v = [0u8; 1];
        // SAFETY: mincore only reports on the range; ENOMEM means it is not mapped.
        let r = unsafe {
            libc::mincore(
                addr as *mut libc::c_void,
                PAGE_SIZE as usize,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(r, -1, "huge page {addr:#x} was not given back");
    }
    let table = rig.map.read();
    let extent = table.get(ExtentIndex(index)).unwrap();
    assert!(matches!(extent.state(), ExtentState::Small { .. }));
    assert!(!extent.is_tracking());
    drop(table);
    let gpa = index as u64 * EXTENT_SIZE;
    assert_writable(&rig.ram, gpa);
    assert_writable(&rig.ram, gpa + (FILLED as u64 + 3) * PAGE_SIZE);
    assert_eq!(read(&rig.ram, gpa + PAGE_SIZE), value(gpa + PAGE_SIZE, 0));
}

#[test]
fn prealloc_allocates_and_charges_outside_the_write_lock() {
    let Some(rig) = rig() else { return };
    for (index, order) in [
        (1, CollapseOrder::Prealloc),
        (2, CollapseOrder::Unlocked),
        (3, CollapseOrder::Legacy),
    ] {
        let s = setup(&rig, order, false, EXTENT_SIZE);
        assert_eq!(
            collapse(&s.collapser, index),
            ScanResult::Succeed,
            "{order:?}"
        );
        let (alloc_w, charge_w) = (
            s.alloc_seen.write_locked.load(Ordering::SeqCst),
            s.charge_seen.write_locked.load(Ordering::SeqCst),
        );
        let (alloc_any, charge_any) = (
            s.alloc_seen.any_locked.load(Ordering::SeqCst),
            s.charge_seen.any_locked.load(Ordering::SeqCst),
        );
        match order {
            CollapseOrder::Prealloc => {
                assert!(
                    !alloc_w && !charge_w,
                    "prealloc allocated or charged under the write lock"
                );
                assert!(
                    alloc_any && charge_any,
                    "prealloc holds the read lock while allocating"
                );
            }
            CollapseOrder::Unlocked => {
                assert!(!alloc_any && !charge_any, "unlocked holds no lock")
            }
            // The positive control: the probe does see a write lock when one is held.
            CollapseOrder::Legacy => {
                assert!(alloc_w && charge_w, "legacy allocates under the write lock")
            }
        }
        assert_eq!(s.collapser.installer.ledger.charged(), EXTENT_SIZE);
        let stats = &s.collapser.stats;
        assert_eq!(stats.pages_collapsed.get(), 1);
        assert_eq!(stats.write_lock_ns.count(), 1);
    }
}

#[test]
fn collapse_keeps_the_data_and_maps_the_extent_huge() {
    let Some(rig) = rig() else { return };
    let s = setup(&rig, CollapseOrder::Prealloc, false, EXTENT_SIZE);
    assert_eq!(collapse(&s.collapser, 2), ScanResult::Succeed);
    let gpa = 2 * EXTENT_SIZE;
    for p in 0..PAGES_PER_EXTENT as u64 {
        let expected = if p < FILLED as u64 {
            value(gpa + p * PAGE_SIZE, 0)
        } else {
            0
        };
        assert_eq!(read(&rig.ram, gpa + p * PAGE_SIZE), expected, "page {p}");
    }
    assert_eq!(
        rig.map.read().get(ExtentIndex(2)).unwrap().state(),
        ExtentState::Huge
    );
    let host = rig.ram.host_base().0 as u64 + gpa;
    let smaps = host_view::smaps_totals(host, host + EXTENT_SIZE).unwrap();
    assert_eq!(
        smaps.anon_huge_kb, 2048,
        "the kernel maps the extent with one THP"
    );
    assert_writable(&rig.ram, gpa + 5 * PAGE_SIZE);
    // A second attempt finds it huge already.
    assert_eq!(collapse(&s.collapser, 2), ScanResult::PmdMapped);
}

#[test]
fn revalidation_catches_an_extent_that_changed_while_unlocked() {
    let Some(rig) = rig() else { return };
    for order in [
        CollapseOrder::Prealloc,
        CollapseOrder::Unlocked,
        CollapseOrder::Legacy,
    ] {
        let mut s = setup(&rig, order, false, EXTENT_SIZE);
        let map = rig.map.clone();
        // As if the fault handler populated a page while no lock was held.
        s.collapser.before_commit = Some(Arc::new(move |index: ExtentIndex| {
            let page = index.gpa() + (FILLED as u64 + 1) * PAGE_SIZE;
            assert!(map.read().mark_populated(page));
        }));
        assert_eq!(collapse(&s.collapser, 1), ScanResult::Changed, "{order:?}");
        assert_eq!(s.collapser.stats.revalidate_changed.get(), 1);
        assert_left_as_before(&rig, &s, 1);
        // Forget the injected page again for the next order.
        let table = rig.map.read();
        let present =
            host_view::present_pages(rig.ram.host_base().0 as u64 + EXTENT_SIZE, EXTENT_SIZE)
                .unwrap();
        let extent = table.get(ExtentIndex(1)).unwrap();
        extent.clear_pages();
        extent.add_present(|p| present[p]);
    }
}

/// A move that unmaps the extent and then fails (as the kernel may, late in `mremap`):
/// the extent is mapped again with its data, registered again, and collapses later.
#[test]
#[cfg(feature = "failpoints")]
fn a_failed_move_that_left_a_hole_puts_the_extent_back() {
    let Some(rig) = rig() else { return };
    let scenario = fail::FailScenario::setup();
    fail::cfg("mremap-hole", "1*return").unwrap();
    let s = setup(&rig, CollapseOrder::Prealloc, false, EXTENT_SIZE);
    assert_eq!(collapse(&s.collapser, 3), ScanResult::Fail);
    assert_eq!(s.collapser.installer.ledger.charged(), 0);
    let gpa = 3 * EXTENT_SIZE;
    for p in 0..FILLED as u64 {
        let at = gpa + p * PAGE_SIZE;
        assert_eq!(read(&rig.ram, at), value(at, 0), "page {p}");
    }
    assert_writable(&rig.ram, gpa + 7 * PAGE_SIZE);
    // Registered again for write-protection: the next collapse protects and succeeds.
    assert_eq!(collapse(&s.collapser, 3), ScanResult::Succeed);
    scenario.teardown();
}

#[test]
fn stopping_fails_revalidation_cleanly() {
    let Some(rig) = rig() else { return };
    let mut s = setup(&rig, CollapseOrder::Prealloc, false, EXTENT_SIZE);
    let stopping = s.collapser.stopping.clone();
    s.collapser.before_commit = Some(Arc::new(move |_| stopping.store(true, Ordering::SeqCst)));
    assert_eq!(collapse(&s.collapser, 3), ScanResult::VmaCheck);
    assert_left_as_before(&rig, &s, 3);
}

#[test]
fn allocation_and_charge_failures_leave_nothing_behind() {
    let Some(rig) = rig() else { return };
    for order in [
        CollapseOrder::Prealloc,
        CollapseOrder::Unlocked,
        CollapseOrder::Legacy,
    ] {
        let s = setup(&rig, order, true, EXTENT_SIZE);
        assert_eq!(
            collapse(&s.collapser, 0),
            ScanResult::AllocHugePageFail,
            "{order:?}"
        );
        assert_eq!(s.collapser.stats.collapse_alloc_failed.get(), 1);
        assert_left_as_before(&rig, &s, 0);

        let s = setup(&rig, order, false, EXTENT_SIZE - 1);
        assert_eq!(
            collapse(&s.collapser, 0),
            ScanResult::CgroupChargeFail,
            "{order:?}"
        );
        assert_eq!(s.probe.handed_out.lock().unwrap().len(), 1);
        assert_eq!(s.collapser.installer.ledger.failures(), 1);
        assert_left_as_before(&rig, &s, 0);
    }
}

#[test]
fn writes_during_a_collapse_are_never_lost() {
    let Some(rig) = rig() else { return };
    for (index, order) in [
        (1, CollapseOrder::Prealloc),
        (2, CollapseOrder::Unlocked),
        (3, CollapseOrder::Legacy),
    ] {
        let base = index as u64 * EXTENT_SIZE;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        // A writer that keeps rewriting every page of the extent (populated or not).
        let writer = {
            let (ram, stop, rounds) = (rig.ram.clone(), stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut round = 1;
                while !stop.load(Ordering::SeqCst) {
                    for p in 0..PAGES_PER_EXTENT as u64 {
                        write(
                            &ram,
                            base + p * PAGE_SIZE,
                            value(base + p * PAGE_SIZE, round),
                        );
                    }
                    rounds.store(round, Ordering::SeqCst);
                    round += 1;
                }
                round - 1
            })
        };
        while rounds.load(Ordering::SeqCst) < 2 {
            std::thread::yield_now();
        }
        let mut s = setup(&rig, order, false, EXTENT_SIZE);
        // Give the writer time to write between the copy and the commit.
        s.collapser.before_commit =
            Some(Arc::new(|_| std::thread::sleep(Duration::from_millis(30))));
        assert_eq!(
            collapse(&s.collapser, index),
            ScanResult::Succeed,
            "{order:?}"
        );
        let after = rounds.load(Ordering::SeqCst);
        while rounds.load(Ordering::SeqCst) < after + 2 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        let last = writer.join().unwrap();
        for p in 0..PAGES_PER_EXTENT as u64 {
            let gpa = base + p * PAGE_SIZE;
            assert_eq!(
                read(&rig.ram, gpa),
                value(gpa, last),
                "{order:?}: page {p} lost a write"
            );
        }
    }
}

/// The seed commit's deadlock, with a userland backend: the pool is empty and is refilled only
/// when an I/O backend finishes a request, which needs the memory map's read lock.
struct Backend {
    requests: Mutex<mpsc::Sender<()>>,
    refilled: Arc<(Mutex<bool>, Condvar)>,
    gave_up: AtomicBool,
}

impl HugePageAllocator for Backend {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        self.requests.lock().unwrap().send(()).unwrap();
        let (lock, cond) = &*self.refilled;
        let (refilled, timeout) = cond
            .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(2), |r| !*r)
            .unwrap();
        if timeout.timed_out() && !*refilled {
            self.gave_up.store(true, Ordering::SeqCst);
            return Err(AllocError::GaveUp(
                "the I/O backend never finished: deadlock".into(),
            ));
        }
        alloc_thp()
    }
}

fn run_backend_scenario(rig: &Rig, order: CollapseOrder, index: usize) -> (ScanResult, bool) {
    let (tx, rx) = mpsc::channel::<()>();
    let refilled = Arc::new((Mutex::new(false), Condvar::new()));
    let backend = Arc::new(Backend {
        requests: Mutex::new(tx),
        refilled: refilled.clone(),
        gave_up: AtomicBool::new(false),
    });
    let io_thread = {
        let map = rig.map.clone();
        std::thread::spawn(move || {
            for () in rx {
                // Completing the I/O needs the read side, like a userland backend
                // that takes a page fault in its I/O path.
                let _guard = map.read();
                *refilled.0.lock().unwrap() = true;
                refilled.1.notify_all();
            }
        })
    };
    let mut s = setup(rig, order, false, EXTENT_SIZE);
    s.collapser.installer.pool = backend.clone();
    let result = collapse(&s.collapser, index);
    let deadlocked = backend.gave_up.load(Ordering::SeqCst);
    drop(s);
    drop(backend);
    io_thread.join().unwrap();
    (result, deadlocked)
}

#[test]
fn the_seed_deadlock_happens_with_legacy_and_not_with_prealloc() {
    let Some(rig) = rig() else { return };
    let (result, deadlocked) = run_backend_scenario(&rig, CollapseOrder::Legacy, 1);
    assert!(
        deadlocked,
        "legacy order: the allocation should wait forever on the backend"
    );
    assert_eq!(result, ScanResult::AllocHugePageFail);
    let (result, deadlocked) = run_backend_scenario(&rig, CollapseOrder::Prealloc, 2);
    assert!(
        !deadlocked,
        "prealloc order: the backend shares the read lock and finishes"
    );
    assert_eq!(result, ScanResult::Succeed);
}

#[test]
fn orders_have_their_command_line_names() {
    use clap::ValueEnum;
    assert_eq!(
        CollapseOrder::from_str("legacy", false),
        Ok(CollapseOrder::Legacy)
    );
    assert!(CollapseOrder::from_str("eager", false).is_err());
}
