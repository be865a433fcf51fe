//! Fault injection through the whole memory path: a failing page-source read, failing
//! `UFFDIO_COPY`, `UFFDIO_WRITEPROTECT` and `mremap` (including an `mremap` that unmaps its
//! destination and then fails, as the kernel may), failed allocations and charges at each step
//! of the fault path and of each collapse order, the kernel's view out of reach, and a panic in
//! every thread. After each, the VM either goes on correctly (the guest checks every page it
//! wrote) or ends with a clear error; either way the ledger is back at zero and every hugetlb
//! page is back in the pool after teardown.
#![cfg(feature = "failpoints")]

use std::time::Duration;

use integration_tests::{
    TempDir, assert_no_seccomp_stop, hugetlb_lock, read_json, report_sum, require_kvm,
    vmm_on_terminal, vmm_within,
};
use serde_json::Value;
use vmm::vm::exit_code;

/// What an injected run must end with.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The guest finished and found every page as it wrote it.
    Correct,
    /// The VM ended with this code and a message containing this text.
    Ends(u8, &'static str),
    /// Either of the two: the failure leaves a window in which a vCPU may fail (said so).
    CorrectOrEnds(u8, &'static str),
}

/// Runs `verify mode=stress` on 2 vCPUs with `failpoints`, checks the outcome and the
/// teardown, and returns the metrics. It runs as a user at a terminal would, logging at
/// `trace`, with every thread making the benign probes (`seccomp-probes`): every warning and
/// failure path an injected failure reaches runs under the seccomp filters, on a terminal,
/// and none may step outside them.
fn inject(args: &str, failpoints: &str, expect: Expect) -> Value {
    let _pool = hugetlb_lock();
    let dir = TempDir::new("inject");
    let image = dir.path("ram.img");
    let metrics = dir.path("m.json");
    if args.contains("IMAGE") {
        let (run, _) = vmm_within(
            &integration_tests::words(&format!(
                "run --guest verify --vcpus 2 --memory 32M --arg mode=fill --arg seed=9 \
                 --save-memory {image}"
            )),
            &[],
            Duration::from_secs(120),
        );
        assert_eq!(run.code, Some(0), "{run}");
    }
    let mode = if args.contains("IMAGE") {
        "--arg mode=check --arg seed=9"
    } else {
        "--arg mode=stress --arg passes=3"
    };
    let line = format!(
        "run --guest verify --vcpus 2 --memory 32M {mode} --metrics {metrics} --log-level trace \
         {}",
        args.replace("IMAGE", &image)
    );
    let failpoints = format!("{failpoints};seccomp-probes=return");
    let (run, took) = vmm_on_terminal(
        &integration_tests::words(&line),
        &[("FAILPOINTS", &failpoints)],
        Duration::from_secs(120),
    );
    let what = format!("{line}\nFAILPOINTS={failpoints}\n{run}");
    assert_no_seccomp_stop(&what, &run);
    assert!(took < Duration::from_secs(100), "took {took:?}: {what}");
    let expect = match expect {
        Expect::CorrectOrEnds(code, needle) if run.code != Some(0) => Expect::Ends(code, needle),
        Expect::CorrectOrEnds(..) => Expect::Correct,
        other => other,
    };
    match expect {
        Expect::CorrectOrEnds(..) => unreachable!(),
        Expect::Correct => {
            assert_eq!(run.code, Some(0), "{what}");
            assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{what}");
        }
        Expect::Ends(code, needle) => {
            assert_eq!(run.code, Some(i32::from(code)), "{what}");
            assert!(
                run.stderr.contains(needle),
                "stderr lacks {needle:?}: {what}"
            );
        }
    }
    let json = read_json(&metrics);
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{what}\n{json}");
    assert_eq!(
        json["kernel"]["hugetlb_free_after_teardown"], json["kernel"]["hugetlb_free_before"],
        "every hugetlb page went back: {what}"
    );
    json
}

const HANDLER_FAILED: u8 = exit_code::VMM_FAILED;

#[test]
fn the_4k_fault_path_ends_the_vm_cleanly_on_each_failure() {
    require_kvm!();
    let source = "--page-source image:IMAGE --collapse off --prefetch off";
    inject(
        source,
        "source-read=1*return",
        Expect::Ends(HANDLER_FAILED, "the page source failed"),
    );
    inject(
        "--page-source zero --collapse off",
        "uffd-copy=1*return",
        Expect::Ends(HANDLER_FAILED, "resolving the fault at guest address"),
    );
    inject(
        "--page-source zero --collapse off",
        "fault-serve=1*panic(injected)",
        Expect::Ends(HANDLER_FAILED, "uffd-handler panicked: injected"),
    );
}

/// A handler that fails releases every vCPU at once, each shard through its own uffd: none
/// is left for the stop's grace period (before, the failing handler unregistered all of RAM
/// through its own uffd, which the kernel refuses with EINVAL, and the error was dropped).
#[test]
fn a_failed_handler_releases_every_shard_through_its_own_uffd() {
    require_kvm!();
    let line = "run --guest verify --vcpus 2 --memory 32M --arg mode=stress --page-source zero \
                --collapse off --fault-threads 2";
    let (run, _) = vmm_within(
        &integration_tests::words(line),
        &[("FAILPOINTS", "uffd-copy=1*return")],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(i32::from(HANDLER_FAILED)), "{run}");
    assert!(
        run.stderr.contains("resolving the fault at guest address"),
        "{run}"
    );
    assert!(!run.stderr.contains("did not stop within"), "{run}");
    assert!(!run.stderr.contains("from its userfaultfd"), "{run}");
}

#[test]
fn the_2m_fault_path_falls_back_or_ends_cleanly_on_each_failure() {
    require_kvm!();
    let source = "--page-source image:IMAGE --fault-granularity 2M --collapse off --prefetch off";
    // No page or no charge: the fault is served 4 KiB at a time instead.
    for failpoints in ["pool-alloc=return", "ledger-charge=return"] {
        let json = inject(source, failpoints, Expect::Correct);
        assert_eq!(json["faults"]["extents_mapped"], 0, "{failpoints}: {json}");
    }
    // An `mremap` install fails (and takes the extent with it): the extent is mapped again
    // and served 4 KiB at a time; later ones go in as usual.
    let by_mremap = format!("{source} --install mremap");
    let json = inject(&by_mremap, "mremap-hole=2*return", Expect::Correct);
    assert!(
        json["faults"]["extents_mapped"].as_u64().unwrap() > 0,
        "{json}"
    );
    // A move fails: the page's contents are copied in 4 KiB at a time instead (the extent is
    // whole, not huge); later ones move as usual.
    // (THPs: hugetlb pages never move.)
    let by_move = format!("{source} --huge-source thp");
    let json = inject(&by_move, "uffd-move=2*return", Expect::Correct);
    let ext = &json["memory"]["extents"];
    assert!(ext["small"].as_u64().unwrap() >= 2, "{json}");
    assert!(
        json["faults"]["extents_mapped"].as_u64().unwrap() > 0,
        "{json}"
    );
    inject(
        source,
        "source-read=1*return",
        Expect::Ends(HANDLER_FAILED, "the page source failed"),
    );
}

#[test]
fn every_collapse_order_survives_each_failure() {
    require_kvm!();
    for order in ["prealloc", "legacy", "unlocked"] {
        for source in ["kernel", "zero"] {
            // Nothing kept ready: every allocation is the collapse's own.
            let args =
                format!("--page-source {source} --collapse-order {order} --huge-pool-ahead 0");
            let json = inject(&args, "pool-alloc=3*return", Expect::Correct);
            assert!(
                json["collapse"]["collapse_alloc_failed"].as_u64().unwrap() >= 1,
                "{json}"
            );
            let json = inject(&args, "ledger-charge=3*return", Expect::Correct);
            assert!(
                json["collapse"]["charge_failed"].as_u64().unwrap() >= 1,
                "{json}"
            );
            // The kernel unmaps the destination before it moves; a move that fails after
            // that leaves a hole until the extent is mapped again (its copy put back). A
            // vCPU that touches the extent in that window fails, and the VMM says why.
            let json = inject(
                &format!("{args} --install mremap"),
                "mremap-hole=2*return",
                Expect::CorrectOrEnds(exit_code::GUEST_FAILED, "a failed mremap unmapped extent"),
            );
            assert!(json["collapse"]["failed"].as_u64().unwrap() >= 1, "{json}");
        }
        // A move that fails after the zap: the copy goes in 4 KiB at a time, that collapse
        // counts as failed, the extent stays whole and is collapsed again later.
        let args = format!(
            "--page-source zero --collapse-order {order} --huge-pool-ahead 0 --huge-source thp"
        );
        let json = inject(&args, "uffd-move=2*return", Expect::Correct);
        let c = &json["collapse"];
        assert!(c["failed"].as_u64().unwrap() >= 1, "{json}");
        assert!(c["split_moves"].as_u64().unwrap() >= 1, "{json}");
        // The first protect fails: that collapse gives up; the rest go on.
        let args = format!("--page-source zero --collapse-order {order}");
        let json = inject(&args, "uffd-writeprotect=1*return", Expect::Correct);
        assert!(json["collapse"]["failed"].as_u64().unwrap() >= 1, "{json}");
    }
}

#[test]
fn a_collapse_that_cannot_see_the_kernels_view_backs_off() {
    require_kvm!();
    let json = inject(
        "--page-source kernel --collapse-alloc-sleep 200",
        "collapse-present-pages=return",
        Expect::Correct,
    );
    let failed = json["collapse"]["failed"].as_u64().unwrap();
    let wall_ms = json["wall_time_ns"].as_u64().unwrap() / 1_000_000;
    assert!(failed >= 1, "{json}");
    // One attempt per back-off, not thousands: at most one per 200 ms, and a few to start.
    assert!(
        failed <= 3 + wall_ms / 200,
        "{failed} failures in {wall_ms} ms"
    );
}

#[test]
fn a_panic_in_any_memory_thread_or_vcpu_ends_the_vm_with_its_name() {
    require_kvm!();
    inject(
        "--page-source zero",
        "collapse-scan=1*panic(injected)",
        Expect::Ends(HANDLER_FAILED, "collapser panicked: injected"),
    );
    inject(
        "--page-source zero",
        "pool-refill=1*panic(injected)",
        // Any of the refill threads may be the first to reach the point.
        Expect::Ends(
            HANDLER_FAILED,
            "the VMM failed while the guest ran: huge-refill",
        ),
    );
    inject(
        "--page-source zero",
        "vcpu-run=1*panic(injected)",
        Expect::Ends(exit_code::GUEST_FAILED, "the vCPU thread panicked"),
    );
}

#[test]
fn the_prefetcher_stops_cleanly_and_ends_the_vm_on_a_bad_image() {
    require_kvm!();
    let source = "--page-source image:IMAGE --collapse off --huge-source thp";
    // Stopped half-way: a guest that touches nothing ends at once, while the prefetcher
    // (each extent held up 40 ms) has most of RAM to go; nothing is left charged, and it
    // never said it was done.
    let dir = TempDir::new("prefetch-stop");
    let (image, metrics) = (dir.path("ram.img"), dir.path("m.json"));
    let save = format!(
        "run --guest verify --memory 32M --arg mode=fill --collapse off --save-memory {image}"
    );
    let (run, _) = vmm_within(
        &integration_tests::words(&save),
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{run}");
    let line = format!(
        "run --guest hello --memory 32M --page-source image:{image} --huge-source thp \
         --collapse off --metrics {metrics}"
    );
    let (run, took) = vmm_within(
        &integration_tests::words(&line),
        &[("FAILPOINTS", "prefetch-extent=sleep(40)")],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{run}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let json = read_json(&metrics);
    let p = &json["restore"]["prefetch"];
    assert_eq!(p["done_ns"], 0, "{p}");
    assert!(p["extents_huge"].as_u64().unwrap() < 15, "{p}");
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{json}");
    // Its read fails: the VM ends, saying where.
    inject(
        source,
        "prefetch-read=return",
        Expect::Ends(HANDLER_FAILED, "prefetching guest address"),
    );
    // A panic in a prefetch thread ends the VM with the thread's name.
    inject(
        &format!("{source} --prefetch-threads 1"),
        "prefetch-extent=1*panic(injected)",
        Expect::Ends(HANDLER_FAILED, "prefetch0 panicked: injected"),
    );
}
