use super::*;
use crate::backing::PageSourceKind;
use crate::collapse::CollapseConfig;
use crate::config::MemoryConfig;
use crate::extent::ExtentState;
use crate::huge::pool::PoolKind;
use crate::{Memory, host_view};
use std::time::Instant;
use vm_memory::Bytes;

const SIZE: u64 = 8 << 20;
const PAGES: u64 = SIZE / PAGE_SIZE;

fn pattern(gpa: u64) -> u64 {
    gpa ^ 0x5a5a_0000_0000_5a5a
}

fn read(memory: &Memory, gpa: u64) -> u64 {
    memory
        .ram()
        .view()
        .read_obj::<u64>(GuestAddress(gpa))
        .unwrap()
}

fn write_all(memory: &Memory) {
    for gpa in (0..SIZE).step_by(PAGE_SIZE as usize) {
        memory
            .ram()
            .view()
            .write_obj(pattern(gpa), GuestAddress(gpa))
            .unwrap();
    }
}

/// 8 MiB of zero-source memory, written (a pattern per page), started; with `collapse`,
/// every extent made huge first. `None` (a skip) where this host cannot.
fn memory(collapse: Option<PoolKind>, source: PageSourceKind) -> Option<Memory> {
    memory_with(collapse, source, PartialFree::default())
}

fn memory_with(
    collapse: Option<PoolKind>,
    source: PageSourceKind,
    partial: PartialFree,
) -> Option<Memory> {
    started(
        collapse,
        source,
        |config| config.reclaim_partial = partial,
        Arc::new(|what| panic!("{what}")),
    )
}

/// As [`memory`], with the configuration changed by `tweak` and failures told to `on_fatal`.
fn started(
    collapse: Option<PoolKind>,
    source: PageSourceKind,
    tweak: impl FnOnce(&mut MemoryConfig),
    on_fatal: crate::OnFailure,
) -> Option<Memory> {
    let mut config = MemoryConfig::small(SIZE);
    config.source = source;
    if let Some(kind) = collapse {
        config.collapse = Some(CollapseConfig::default());
        config.huge_source = kind;
    }
    tweak(&mut config);
    let mut memory = Memory::new(config).unwrap();
    if let Err(e) = memory.start(on_fatal) {
        eprintln!("SKIP: {e}");
        return None;
    }
    write_all(&memory);
    if collapse.is_some() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while memory.counts().unwrap().huge < 4 {
            if Instant::now() > deadline {
                eprintln!("SKIP: no huge pages to be had");
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Some(memory)
}

fn pages(first: u64, n: u64) -> (GuestAddress, u64) {
    (GuestAddress(first * PAGE_SIZE), n * PAGE_SIZE)
}

fn state(memory: &Memory, extent: usize) -> ExtentState {
    memory
        .map()
        .read()
        .get(ExtentIndex(extent))
        .unwrap()
        .state()
}

/// Waits for the collapse thread to finish two more passes over every extent.
fn two_more_scans(memory: &Memory) {
    let scans = memory.collapse_stats().full_scans.get();
    let deadline = Instant::now() + Duration::from_secs(30);
    while memory.collapse_stats().full_scans.get() < scans + 2 {
        assert!(
            Instant::now() < deadline,
            "the collapse thread stopped scanning"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every huge extent's fate: wholly freed, discarded and uncharged; freed past the split
/// threshold, split; freed below it, kept and zeroed. Freed pages read zero, kept ones
/// their data; the collapse does not bring back what was given back; teardown balances.
fn huge_extents_are_given_back_by_state(kind: PoolKind) {
    let Some(memory) = memory(Some(kind), PageSourceKind::Zero) else {
        return;
    };
    let reclaimer = memory.reclaimer().unwrap();
    // Guest RAM's own hugetlb pages (the pool's ready pages are mappings of their own,
    // and its refill may take more from the host's pool meanwhile).
    let ram_hugetlb = || {
        let base = memory.ram().host_base();
        host_view::smaps_totals(base, base + SIZE)
            .unwrap()
            .hugetlb_kb
            << 10
    };
    let hugetlb_before = ram_hugetlb();
    let charged = memory.ledger().charged();
    let ppe = PAGES_PER_EXTENT as u64;
    let done = reclaimer
        .report(&[
            pages(0, ppe),          // extent 0, whole
            pages(ppe, 256),        // extent 1, half
            pages(2 * ppe + 10, 8), // extent 2, 8 pages
        ])
        .unwrap();
    let stats = reclaimer.stats();
    assert_eq!(stats.extents_discarded.get(), 1);
    assert_eq!(memory.ledger().charged(), charged - 2 * EXTENT_SIZE);
    if kind == PoolKind::Hugetlb {
        assert_eq!(
            ram_hugetlb(),
            hugetlb_before - 2 * EXTENT_SIZE,
            "two hugetlb pages left guest RAM"
        );
    }
    // Half freed: demoted to 4 KiB pages holding the kept half (the huge page gone whole).
    assert_eq!(stats.extents_demoted.get(), 1);
    assert_eq!(stats.huge_kept.get(), 1);
    assert_eq!(state(&memory, 1), ExtentState::Small { populated: 256 });
    assert_eq!(done.reported, (ppe + 256 + 8) * PAGE_SIZE);
    assert_eq!(state(&memory, 0), ExtentState::Unpopulated);
    assert_eq!(state(&memory, 2), ExtentState::Huge);
    let freed = |p: u64| {
        p < ppe || (ppe..ppe + 256).contains(&p) || (2 * ppe + 10..2 * ppe + 18).contains(&p)
    };
    for p in 0..PAGES {
        let gpa = p * PAGE_SIZE;
        let expected = if freed(p) { 0 } else { pattern(gpa) };
        assert_eq!(read(&memory, gpa), expected, "page {p}");
    }
    // Reading them back touched the freed pages of extents 0 and 1 again: refaults. Once
    // fewer than the threshold were left given back, the collapse may have made an
    // extent huge again, bringing back (and counting) those few.
    assert!(stats.refaults.get() > 0);
    let reinflated = stats.reinflated_bytes.get();
    assert!(
        reinflated < 2 * u64::from(SPLIT_PAGES) * PAGE_SIZE,
        "{reinflated}"
    );
    // Freed again, untouched this time: no collapse brings the extents back.
    reclaimer.report(&[pages(0, ppe), pages(ppe, 256)]).unwrap();
    two_more_scans(&memory);
    assert_eq!(state(&memory, 0), ExtentState::Unpopulated);
    assert_ne!(state(&memory, 1), ExtentState::Huge);
    assert_eq!(stats.reinflated_bytes.get(), reinflated, "creep");
    assert!(memory.collapse_stats().skipped_reclaimed.get() > 0);
    assert_eq!(memory.teardown().ledger_charged_bytes, 0);
}

#[test]
fn huge_thp_extents_are_given_back_by_state() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    huge_extents_are_given_back_by_state(PoolKind::Thp);
}

#[test]
fn huge_hugetlb_extents_are_given_back_by_state() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    if host_view::hugetlb_pool().free < 6 {
        eprintln!("SKIP: needs 6 free hugetlb pages");
        return;
    }
    huge_extents_are_given_back_by_state(PoolKind::Hugetlb);
}

/// 4 KiB pages given back are gone from the host (not present) and read zero, also from an
/// image that holds other data for them, touched before or not; pages kept are untouched.
#[test]
fn small_pages_given_back_read_zero_whatever_the_source() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    let Some(memory) = memory(None, PageSourceKind::Zero) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("vm-extents-reclaim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ram.img");
    memory.save(&path, "memory image", &|| false).unwrap();
    drop(memory);
    let Some(memory) = memory_from(&path) else {
        return;
    };
    // Extent 1: pages 0..64 touched (read) first, 64..128 never touched; extent 2 whole.
    let first = PAGES_PER_EXTENT as u64;
    for p in first..first + 64 {
        assert_eq!(read(&memory, p * PAGE_SIZE), pattern(p * PAGE_SIZE));
    }
    let reclaimer = memory.reclaimer().unwrap();
    reclaimer
        .report(&[pages(first, 128), pages(2 * first, first)])
        .unwrap();
    assert_eq!(reclaimer.stats().small_bytes.get(), 64 * PAGE_SIZE);
    let present =
        host_view::present_pages(memory.ram().host_at(first * PAGE_SIZE), 128 * PAGE_SIZE).unwrap();
    assert!(present.iter().all(|&p| !p), "given back, yet present");
    for p in 0..PAGES {
        let freed = (first..first + 128).contains(&p) || (2 * first..3 * first).contains(&p);
        let gpa = p * PAGE_SIZE;
        assert_eq!(
            read(&memory, gpa),
            if freed { 0 } else { pattern(gpa) },
            "page {p}"
        );
    }
    // A save after the report holds zeroes there too, not the old image's data.
    let again = dir.join("again.img");
    memory.save(&again, "memory image", &|| false).unwrap();
    drop(memory);
    let memory = memory_from(&again).unwrap();
    assert_eq!(read(&memory, (first + 100) * PAGE_SIZE), 0);
    assert_eq!(
        read(&memory, (first + 200) * PAGE_SIZE),
        pattern((first + 200) * PAGE_SIZE)
    );
    drop(memory);
    std::fs::remove_dir_all(dir).unwrap();
}

fn memory_from(image: &std::path::Path) -> Option<Memory> {
    let mut config = MemoryConfig::small(SIZE);
    config.source = PageSourceKind::Image(image.to_path_buf());
    let mut memory = Memory::new(config).unwrap();
    memory.start(Arc::new(|what| panic!("{what}"))).ok()?;
    Some(memory)
}

/// A report with a bad range is refused whole, naming the range, and changes nothing.
#[test]
fn bad_ranges_are_refused_whole() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    let Some(memory) = memory(None, PageSourceKind::Zero) else {
        return;
    };
    let reclaimer = memory.reclaimer().unwrap();
    let cases = [
        (
            vec![pages(0, 1), (GuestAddress(4097), 4096)],
            "is not whole 4 KiB pages",
        ),
        (
            vec![pages(0, 1), (GuestAddress(0), 100)],
            "is not whole 4 KiB pages",
        ),
        (vec![pages(0, 1), pages(PAGES - 1, 2)], "is not guest RAM"),
        (
            vec![pages(0, 1), (GuestAddress(u64::MAX - 4095), 8192)],
            "is not guest RAM",
        ),
        (vec![pages(0, 1); MAX_RANGES + 1], "ranges (at most 1024)"),
    ];
    for (ranges, says) in cases {
        let e = reclaimer.report(&ranges).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
    assert_eq!(read(&memory, 0), pattern(0));
    assert_eq!(reclaimer.stats().reports.get(), 0);
}

/// Writers that keep writing the pages they kept, while other pages of the same extents
/// are given back, touched again and given back once more, and the collapse runs: no write
/// is lost, every page given back reads zero.
#[test]
fn concurrent_writes_to_kept_thp_pages_are_never_lost() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    concurrent_writes_to_kept_pages_are_never_lost(PoolKind::Thp, PartialFree::Copy);
    concurrent_writes_to_kept_pages_are_never_lost(PoolKind::Thp, PartialFree::Discard);
}

/// As above, each hugetlb extent demoted to 4 KiB pages under the writers.
#[test]
fn concurrent_writes_to_kept_hugetlb_pages_are_never_lost() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    if host_view::hugetlb_pool().free < 6 {
        eprintln!("SKIP: needs 6 free hugetlb pages");
        return;
    }
    concurrent_writes_to_kept_pages_are_never_lost(PoolKind::Hugetlb, PartialFree::Copy);
}

fn concurrent_writes_to_kept_pages_are_never_lost(kind: PoolKind, partial: PartialFree) {
    let Some(memory) = memory_with(Some(kind), PageSourceKind::Zero, partial) else {
        return;
    };
    let reclaimer = memory.reclaimer().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ram = memory.ram().clone();
    // Odd pages are kept, even pages are given back: a writer per half of RAM.
    let kept = |half: u64| {
        (half * PAGES / 2..(half + 1) * PAGES / 2)
            .filter(|p| p % 2 == 1)
            .map(|p| p * PAGE_SIZE)
    };
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u64)
            .map(|half| {
                let (ram, stop) = (&ram, &stop);
                s.spawn(move || {
                    let mut round = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        round += 1;
                        for gpa in kept(half) {
                            ram.view()
                                .write_obj(round << 32 | gpa, GuestAddress(gpa))
                                .unwrap();
                        }
                    }
                    round
                })
            })
            .collect();
        let even: Vec<_> = (0..PAGES)
            .filter(|p| p % 2 == 0)
            .map(|p| pages(p, 1))
            .collect();
        for _ in 0..20 {
            for chunk in even.chunks(MAX_RANGES) {
                reclaimer.report(chunk).unwrap();
            }
            for &(gpa, _) in even.iter().step_by(3) {
                assert_eq!(read(&memory, gpa.0), 0);
                memory.ram().view().write_obj(1u64, gpa).unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        for (half, round) in rounds.into_iter().enumerate() {
            for gpa in kept(half as u64) {
                assert_eq!(
                    read(&memory, gpa),
                    round << 32 | gpa,
                    "a write to {gpa:#x} was lost"
                );
            }
        }
    });
    let stats = reclaimer.stats();
    match (kind, partial) {
        (PoolKind::Thp, PartialFree::Discard) => assert!(stats.extents_split.get() > 0),
        _ => assert!(stats.extents_demoted.get() > 0),
    }
    assert_eq!(memory.teardown().ledger_charged_bytes, 0);
}

/// A report that fails part-way (injected) lets every claim go, loses nothing it did not
/// give back, and leaves the ledger balanced.
#[test]
#[cfg(feature = "failpoints")]
fn a_failed_report_lets_every_claim_go_and_loses_nothing() {
    let scenario = fail::FailScenario::setup();
    let Some(memory) = memory(Some(PoolKind::Thp), PageSourceKind::Zero) else {
        return;
    };
    let reclaimer = memory.reclaimer().unwrap();
    let ppe = PAGES_PER_EXTENT as u64;
    // The second extent's give-back fails; the first and third go through.
    fail::cfg("reclaim-extent", "1*off->1*return->off").unwrap();
    let e = reclaimer
        .report(&[pages(0, ppe), pages(ppe, ppe), pages(2 * ppe, ppe)])
        .unwrap_err();
    assert!(e.to_string().contains("extent 1"), "{e}");
    fail::remove("reclaim-extent");
    let table = memory.map().read();
    assert!(table.iter().all(|(_, e)| !e.is_claimed()));
    drop(table);
    assert_eq!(reclaimer.stats().extents_discarded.get(), 2);
    for p in ppe..2 * ppe {
        assert_eq!(read(&memory, p * PAGE_SIZE), pattern(p * PAGE_SIZE));
    }
    assert_eq!(read(&memory, 0), 0);
    assert_eq!(memory.teardown().ledger_charged_bytes, 0);
    scenario.teardown();
}

/// The shrinker's rate in the tests: a pass over their 8 MiB every 8 ms.
const FAST: u64 = 1 << 30;

fn shrinking(collapse: Option<PoolKind>, source: PageSourceKind) -> Option<Memory> {
    started(
        collapse,
        source,
        |config| config.zero_shrinker = Some(FAST),
        Arc::new(|what| panic!("{what}")),
    )
}

fn zero(memory: &Memory, first: u64, n: u64) {
    for p in first..first + n {
        memory
            .ram()
            .view()
            .write_obj(0u64, GuestAddress(p * PAGE_SIZE))
            .unwrap();
    }
}

/// Waits until `done` holds, for at most 30 s.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 4 KiB pages a guest zeroed are given back by the shrinker (gone from the host, reading
/// zero), whoever populated them; pages with data are left alone.
#[test]
fn the_shrinker_gives_back_zeroed_small_pages() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    for source in [PageSourceKind::Zero, PageSourceKind::Kernel] {
        let Some(memory) = shrinking(None, source.clone()) else {
            return;
        };
        let ppe = PAGES_PER_EXTENT as u64;
        zero(&memory, ppe, ppe);
        zero(&memory, 2 * ppe, 100);
        let stats = memory.reclaim_stats().clone();
        wait_for("the shrinker", || {
            stats.shrinker_bytes.get() >= (ppe + 100) * PAGE_SIZE
        });
        let present =
            host_view::present_pages(memory.ram().host_at(ppe * PAGE_SIZE), EXTENT_SIZE).unwrap();
        assert!(
            present.iter().all(|&p| !p),
            "{source:?}: zeroed, yet present"
        );
        assert!(stats.shrinker_passes.get() >= 2);
        for p in 0..PAGES {
            let zeroed =
                (ppe..ppe + ppe + 100).contains(&p) || (2 * ppe..2 * ppe + 100).contains(&p);
            let gpa = p * PAGE_SIZE;
            let expected = if zeroed { 0 } else { pattern(gpa) };
            assert_eq!(read(&memory, gpa), expected, "{source:?}: page {p}");
        }
        assert_eq!(stats.reports.get(), 0);
        assert_eq!(memory.teardown().ledger_charged_bytes, 0);
    }
}

/// Huge extents by the same rules as reports: all zero, discarded; zero from the split
/// threshold, demoted to 4 KiB pages; fewer, kept huge. And no creep after.
#[test]
fn the_shrinker_gives_back_huge_extents_by_state() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    let Some(memory) = shrinking(Some(PoolKind::Thp), PageSourceKind::Zero) else {
        return;
    };
    let ppe = PAGES_PER_EXTENT as u64;
    let charged = memory.ledger().charged();
    zero(&memory, 0, ppe);
    zero(&memory, ppe, 256);
    zero(&memory, 2 * ppe, 64);
    let stats = memory.reclaim_stats().clone();
    wait_for("the shrinker", || {
        stats.extents_discarded.get() >= 1 && stats.extents_demoted.get() >= 1
    });
    assert_eq!(state(&memory, 0), ExtentState::Unpopulated);
    assert_eq!(state(&memory, 1), ExtentState::Small { populated: 256 });
    assert_eq!(memory.ledger().charged(), charged - 2 * EXTENT_SIZE);
    two_more_scans(&memory);
    assert_eq!(
        state(&memory, 2),
        ExtentState::Huge,
        "below the threshold: kept"
    );
    assert_eq!(state(&memory, 0), ExtentState::Unpopulated, "creep");
    assert_eq!(stats.huge_kept.get(), 0, "nothing is zeroed that was zero");
    assert_eq!(stats.reinflated_bytes.get(), 0);
    for p in 0..PAGES {
        let zeroed = p < ppe + 256 || (2 * ppe..2 * ppe + 64).contains(&p);
        let gpa = p * PAGE_SIZE;
        assert_eq!(
            read(&memory, gpa),
            if zeroed { 0 } else { pattern(gpa) },
            "page {p}"
        );
    }
    assert_eq!(memory.teardown().ledger_charged_bytes, 0);
}

/// Writers that zero their pages and write them again, over and over, while the shrinker
/// gives back what is zero and the collapse brings extents back: a write that landed is
/// never lost (the shrinker decides only with the extent write-protected).
#[test]
fn the_shrinker_never_loses_a_concurrent_write() {
    #[cfg(feature = "failpoints")]
    let _alone = fail::FailScenario::setup();
    for collapse in [None, Some(PoolKind::Thp)] {
        let Some(memory) = shrinking(collapse, PageSourceKind::Zero) else {
            return;
        };
        let ram = memory.ram().clone();
        let deadline = Instant::now() + Duration::from_secs(2);
        std::thread::scope(|s| {
            for half in 0..2u64 {
                let ram = &ram;
                s.spawn(move || {
                    let mine = || (half * PAGES / 2..(half + 1) * PAGES / 2).map(|p| p * PAGE_SIZE);
                    let mut round = 0u64;
                    while Instant::now() < deadline {
                        round += 1;
                        for gpa in mine() {
                            ram.view()
                                .write_obj(round << 32 | gpa, GuestAddress(gpa))
                                .unwrap();
                        }
                        for gpa in mine() {
                            let got: u64 = ram.view().read_obj(GuestAddress(gpa)).unwrap();
                            assert_eq!(got, round << 32 | gpa, "a write to {gpa:#x} was lost");
                            ram.view().write_obj(0u64, GuestAddress(gpa)).unwrap();
                        }
                    }
                });
            }
        });
        assert!(
            memory.reclaim_stats().shrinker_bytes.get() > 0,
            "{collapse:?}"
        );
        assert_eq!(memory.teardown().ledger_charged_bytes, 0);
    }
}

/// A shrinker whose give-back fails (injected) stops as a failure of its own, told once,
/// with every claim let go, nothing lost and the ledger balanced.
#[test]
#[cfg(feature = "failpoints")]
fn a_failed_shrink_is_fatal_and_loses_nothing() {
    let scenario = fail::FailScenario::setup();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let Some(memory) = started(
        Some(PoolKind::Thp),
        PageSourceKind::Zero,
        |config| config.zero_shrinker = Some(FAST),
        Arc::new(move |what| {
            let _ = tx.lock().unwrap().send(what.to_string());
        }),
    ) else {
        return;
    };
    fail::cfg("reclaim-extent", "return").unwrap();
    let ppe = PAGES_PER_EXTENT as u64;
    zero(&memory, ppe, ppe);
    let what = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        what.contains("zero-page shrinker") && what.contains("extent 1"),
        "{what}"
    );
    fail::remove("reclaim-extent");
    assert!(memory.map().read().iter().all(|(_, e)| !e.is_claimed()));
    assert_eq!(state(&memory, 1), ExtentState::Huge);
    for p in 0..PAGES {
        let gpa = p * PAGE_SIZE;
        let zeroed = (ppe..2 * ppe).contains(&p);
        assert_eq!(
            read(&memory, gpa),
            if zeroed { 0 } else { pattern(gpa) },
            "page {p}"
        );
    }
    assert!(rx.try_recv().is_err(), "told once");
    assert_eq!(memory.teardown().ledger_charged_bytes, 0);
    scenario.teardown();
}
