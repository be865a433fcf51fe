//! Protocol tests on real memory: a real userfaultfd, real THPs and real `mremap`, with an
//! injected allocator (and ledger observer) that record which locks are held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::{EXTENT_SIZE, PAGE_SIZE};

use super::{CollapseConfig, CollapseOrder, CollapseStats, Collapser, ScanResult};
use crate::backing::Backing;
use crate::extent::{ExtentIndex, ExtentState, ExtentTable, PAGES_PER_EXTENT};
use crate::fault::source::ZeroSource;
use crate::fault::{FaultHandler, FaultStats, Resolver};
use crate::host_view;
use crate::huge::install::{InstallMethod, Installer, MapBudget};
use crate::huge::ledger::Ledger;
use crate::huge::page::{AllocError, HugePage, HugePageAllocator, alloc_thp};
use crate::map::{Held, MemoryMap};
use crate::ram::GuestRam;
use crate::uffd::{self, Uffd, UffdSet};
use crate::worker::ThreadHook;

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

/// RAM registered for write-protection (as with the kernel page source).
fn rig() -> Option<Rig> {
    rig_with(uffd::REGISTER_MODE_WP)
}

/// RAM registered for missing faults too (the zero and image sources), where installs move.
fn rig_missing() -> Option<Rig> {
    rig_with(uffd::REGISTER_MODE_WP | uffd::REGISTER_MODE_MISSING)
}

fn rig_with(mode: u64) -> Option<Rig> {
    let features =
        uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED | uffd::FEATURE_MOVE;
    let uffd = match Uffd::new(features) {
        Ok(u) if u.features() & features == features => Arc::new(u),
        Ok(_) if mode & uffd::REGISTER_MODE_MISSING != 0 => {
            eprintln!("SKIP: UFFDIO_MOVE is not available here");
            return None;
        }
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
    let base = ram.host_base();
    let present = host_view::present_pages(base, ram.size()).unwrap();
    for (i, extent) in table.iter() {
        extent.add_present(|p| present[i.0 * PAGES_PER_EXTENT + p]);
    }
    let map = Arc::new(MemoryMap::new(table, ram.clone()));
    uffd.register(base, ram.size(), mode).unwrap();
    let all = Arc::new(UffdSet::single(
        uffd.clone(),
        (ram.size() / EXTENT_SIZE) as usize,
    ));
    let handler = FaultHandler::start(
        all,
        Resolver {
            uffd: uffd.clone(),
            map: map.clone(),
            source: Arc::new(ZeroSource),
            granularity: PAGE_SIZE,
            stats: Arc::new(FaultStats::default()),
            huge: None,
            spin: Duration::ZERO,
            hint: None,
            record: None,
            reclaim: Arc::default(),
        },
        &ThreadHook::default(),
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
    let p = ram.host_at(gpa).as_ptr::<u64>();
    // SAFETY: `gpa` is inside the rig's RAM mapping, which outlives every test thread.
    unsafe { p.write_volatile(v) };
}

fn read(ram: &GuestRam, gpa: u64) -> u64 {
    let p = ram.host_at(gpa).as_ptr::<u64>().cast_const();
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
        let page = thp()?;
        self.handed_out.lock().unwrap().push(page.id());
        Ok(page)
    }
}

/// A THP for a test: right after a large build this host's free memory can be too fragmented
/// for one, so a failed allocation asks the kernel to compact memory and tries again, a few
/// times, before the test sees the failure.
fn thp() -> Result<HugePage, AllocError> {
    let mut result = alloc_thp();
    for _ in 0..4 {
        if !matches!(result, Err(AllocError::NotHuge)) {
            break;
        }
        let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
        result = alloc_thp();
    }
    result
}

struct Setup {
    collapser: Collapser,
    probe: Arc<Probe>,
    alloc_seen: Arc<Seen>,
    charge_seen: Arc<Seen>,
}

fn setup(rig: &Rig, order: CollapseOrder, fail: bool, limit: u64) -> Setup {
    setup_with(rig, order, fail, limit, InstallMethod::Mremap)
}

fn setup_with(
    rig: &Rig,
    order: CollapseOrder,
    fail: bool,
    limit: u64,
    method: InstallMethod,
) -> Setup {
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
        uffds: Arc::new(UffdSet::single(rig.uffd.clone(), EXTENTS as usize)),
        source: None,
        installer: Installer {
            pool: probe.clone(),
            ledger,
            maps: Arc::new(MapBudget::new(0).unwrap()),
            ram: rig.ram.clone(),
            uffds: Arc::new(UffdSet::single(rig.uffd.clone(), EXTENTS as usize)),
            method,
            reclaim: Arc::default(),
        },
        config: CollapseConfig {
            order,
            ..CollapseConfig::default()
        },
        stats: Arc::new(CollapseStats::default()),
        stopping: Arc::new(AtomicBool::new(false)),
        kernel_populates: method == InstallMethod::Mremap,
        before_commit: None,
        reclaim_split: crate::reclaim::SPLIT_PAGES,
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
    // By id, not by address: another test may map the same address once a page is gone.
    for &id in s.probe.handed_out.lock().unwrap().iter() {
        assert!(
            !crate::huge::page::live::is_alive(id),
            "huge page {id} was not given back"
        );
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
    let host = rig.ram.host_at(gpa);
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
        let present = host_view::present_pages(rig.ram.host_at(EXTENT_SIZE), EXTENT_SIZE).unwrap();
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
    writers_race_every_order(&rig, InstallMethod::Mremap);
}

/// The same with the zap-and-move commit: the writer also reads and writes the extent while
/// its pages are gone (between the zap and the move), which must wait for the move.
#[test]
fn writes_during_a_zap_and_move_commit_are_never_lost() {
    let Some(rig) = rig_missing() else { return };
    let collapsed = writers_race_every_order(&rig, InstallMethod::Move);
    // Moves split no mapping: guest RAM is still one mapping, each collapsed extent huge.
    let base = rig.ram.host_base();
    let end = base + rig.ram.size();
    assert_eq!(host_view::mappings_in(base, end).unwrap(), 1);
    let totals = host_view::smaps_totals(base, end).unwrap();
    assert_eq!(
        totals.anon_huge_kb,
        collapsed * 2048,
        "every collapsed extent moved in whole"
    );
}

/// Races a writer and a reader against a collapse of its own extent in each order; returns
/// how many collapsed (an order whose collapse found no THP on this host is skipped: nothing
/// was collapsed, so nothing could be lost).
fn writers_race_every_order(rig: &Rig, method: InstallMethod) -> u64 {
    let mut collapsed = 0;
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
        // Wait until the writer has been round twice and, where the handler populates pages,
        // it has recorded every one (on 2 CPUs it may record the last one late, which would
        // fail the revalidation, rightly). With the kernel populating, the collapse itself
        // brings the table up to date.
        let full = || {
            method == InstallMethod::Mremap
                || rig.map.read().get(ExtentIndex(index)).unwrap().state()
                    == ExtentState::Small {
                        populated: PAGES_PER_EXTENT as u32,
                    }
        };
        while rounds.load(Ordering::SeqCst) < 2 || !full() {
            std::thread::yield_now();
        }
        // A reader that keeps reading every page: every page has been written by now, so a
        // zero means a read was served the kernel's zero page (as in the gap between a zap
        // and a move when missing faults are not registered).
        let reader = {
            let (ram, stop) = (rig.ram.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut zeroes = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for p in 0..PAGES_PER_EXTENT as u64 {
                        zeroes += u64::from(read(&ram, base + p * PAGE_SIZE) == 0);
                    }
                }
                zeroes
            })
        };
        let mut s = setup_with(rig, order, false, EXTENT_SIZE, method);
        // Give the writer time to write between the copy and the commit.
        s.collapser.before_commit =
            Some(Arc::new(|_| std::thread::sleep(Duration::from_millis(30))));
        let result = collapse(&s.collapser, index);
        let stats = serde_json::to_string(&*s.collapser.stats).unwrap();
        if result != ScanResult::Succeed && s.collapser.stats.collapse_alloc_failed.get() > 0 {
            eprintln!("SKIP {order:?}: no THP could be allocated here ({stats})");
            stop.store(true, Ordering::SeqCst);
            writer.join().unwrap();
            reader.join().unwrap();
            continue;
        }
        assert_eq!(result, ScanResult::Succeed, "{order:?}: {stats}");
        collapsed += 1;
        let after = rounds.load(Ordering::SeqCst);
        while rounds.load(Ordering::SeqCst) < after + 2 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        let last = writer.join().unwrap();
        assert_eq!(
            reader.join().unwrap(),
            0,
            "{order:?}: a read saw a zero page"
        );
        for p in 0..PAGES_PER_EXTENT as u64 {
            let gpa = base + p * PAGE_SIZE;
            assert_eq!(
                read(&rig.ram, gpa),
                value(gpa, last),
                "{order:?}: page {p} lost a write"
            );
        }
    }
    collapsed
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
        thp()
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
    assert_eq!("legacy".parse(), Ok(CollapseOrder::Legacy));
    assert_eq!(CollapseOrder::Prealloc.to_string(), "prealloc");
    let e = "eager".parse::<CollapseOrder>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "\"eager\" is not one of prealloc, legacy, unlocked"
    );
}

/// Hands out THPs, and records whether the memory map was write-locked when asked.
struct Thp {
    map: Arc<MemoryMap>,
    seen: Arc<Seen>,
}

impl HugePageAllocator for Thp {
    fn alloc(&self) -> Result<HugePage, AllocError> {
        self.seen.look(&self.map);
        thp()
    }
}

/// The 2 MiB fault path moves a whole page into an empty extent under the extent's claim:
/// a vCPU's first touch of an extent is served while another thread holds the memory map's
/// read side from before the touch until after it (a write lock anywhere on that path would
/// wait for the read side forever, and the touch would not complete).
#[test]
fn a_2m_fault_completes_while_the_read_side_is_held_throughout() {
    let features =
        uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED | uffd::FEATURE_MOVE;
    let uffd = match Uffd::new(features) {
        Ok(u) if u.features() & features == features => Arc::new(u),
        _ => {
            eprintln!("SKIP: UFFDIO_MOVE is not available here");
            return;
        }
    };
    let ram = Arc::new(GuestRam::new(EXTENTS * EXTENT_SIZE, Backing::Small).unwrap());
    let map = Arc::new(MemoryMap::new(ExtentTable::new(ram.size()), ram.clone()));
    let base = ram.host_base();
    uffd.register(
        base,
        ram.size(),
        uffd::REGISTER_MODE_MISSING | uffd::REGISTER_MODE_WP,
    )
    .unwrap();
    let seen = Arc::new(Seen::default());
    let uffds = Arc::new(UffdSet::single(uffd.clone(), EXTENTS as usize));
    let _handler = FaultHandler::start(
        uffds.clone(),
        Resolver {
            uffd: uffd.clone(),
            map: map.clone(),
            source: Arc::new(ZeroSource),
            granularity: EXTENT_SIZE,
            stats: Arc::new(FaultStats::default()),
            huge: Some(Installer {
                pool: Arc::new(Thp {
                    map: map.clone(),
                    seen: seen.clone(),
                }),
                ledger: Arc::new(Ledger::new(EXTENTS * EXTENT_SIZE)),
                maps: Arc::new(MapBudget::new(0).unwrap()),
                ram: ram.clone(),
                uffds,
                method: InstallMethod::Move,
                reclaim: Arc::default(),
            }),
            spin: Duration::ZERO,
            hint: None,
            record: None,
            reclaim: Arc::default(),
        },
        &ThreadHook::default(),
        |what| panic!("fault handler failed: {what}"),
    )
    .unwrap();

    let held = map.read();
    let (tx, rx) = mpsc::channel();
    let touch = {
        let ram = ram.clone();
        std::thread::spawn(move || {
            write(&ram, EXTENT_SIZE + 8 * PAGE_SIZE, 0xab);
            let _ = tx.send(read(&ram, EXTENT_SIZE + 9 * PAGE_SIZE));
        })
    };
    let untouched = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
        panic!("the 2 MiB fault did not complete while the read side was held")
    });
    assert_eq!(untouched, 0, "the rest of the extent reads as zeroes");
    assert_eq!(
        held.get(ExtentIndex(1)).unwrap().state(),
        ExtentState::Huge,
        "the fault was served with a whole huge page"
    );
    drop(held);
    touch.join().unwrap();
    assert_eq!(read(&ram, EXTENT_SIZE + 8 * PAGE_SIZE), 0xab);
    assert!(host_view::is_mapped_huge(base + EXTENT_SIZE));
    assert!(!seen.write_locked.load(Ordering::SeqCst));
    assert!(
        seen.any_locked.load(Ordering::SeqCst),
        "allocated under the read side"
    );
    // The other extents are as they were: nothing was moved or split there.
    assert_eq!(host_view::mappings_in(base, base + ram.size()).unwrap(), 1);
}
