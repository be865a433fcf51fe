//! The collapse thread end to end: guests keep writing while their memory is collapsed to
//! 2 MiB pages; no write may be lost, and the kernel must agree about what is huge.

use integration_tests::{
    HugetlbHog, TempDir, hugetlb_available, hugetlb_lock, hugetlb_pool, read_json, report_sum,
    require_kvm, vmm_ok, words,
};
use serde_json::Value;

/// Runs `verify mode=stress` on 2 vCPUs with the collapse thread on; returns the metrics after
/// checking that no write was lost and that the kernel's view matches the VMM's.
fn stress(memory: &str, extra: &str) -> Value {
    let dir = TempDir::new("collapse");
    let metrics = dir.path("m.json");
    let line = format!(
        "run --guest verify --vcpus 2 --memory {memory} --arg mode=stress --arg passes=4 \
         --collapse on --metrics {metrics} {extra}"
    );
    let run = vmm_ok(&words(&line));
    assert_eq!(
        report_sum(&run.stdout, "mismatches"),
        0,
        "a guest write was lost\n{run}"
    );
    let json = read_json(&metrics);
    let ext = &json["memory"]["extents"];
    let (huge, total) = (
        ext["huge"].as_u64().unwrap(),
        ext["total"].as_u64().unwrap(),
    );
    let kernel = &json["kernel"];
    let kernel_huge_kb =
        kernel["anon_huge_kb"].as_u64().unwrap() + kernel["hugetlb_kb"].as_u64().unwrap();
    assert_eq!(
        kernel_huge_kb,
        huge * 2048,
        "smaps disagrees with memory.extents.huge: {json}"
    );
    let c = &json["collapse"];
    // Restoring from an image, the prefetcher puts extents in huge too.
    let prefetched = json["restore"]["prefetch"]["extents_huge"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        c["pages_collapsed"].as_u64().unwrap() + prefetched,
        huge,
        "{c}"
    );
    assert_eq!(
        json["ledger"]["charged_bytes"].as_u64().unwrap(),
        huge << 21
    );
    assert_eq!(
        json["ledger"]["after_teardown_bytes"], 0,
        "teardown left charges behind"
    );
    assert!(huge <= total);
    json
}

fn assert_mostly_huge(json: &Value, what: &str) {
    let ext = &json["memory"]["extents"];
    let (huge, total) = (
        ext["huge"].as_u64().unwrap(),
        ext["total"].as_u64().unwrap(),
    );
    assert!(
        huge * 4 >= total * 3,
        "{what}: only {huge} of {total} extents collapsed: {json}"
    );
    let c = &json["collapse"];
    for key in ["write_lock_ns", "read_phase_ns"] {
        let (p50, p99, max) = (
            c[key]["p50"].as_u64().unwrap(),
            c[key]["p99"].as_u64().unwrap(),
            c[key]["max"].as_u64().unwrap(),
        );
        assert!(
            0 < p50 && p50 <= p99 && p99 <= max,
            "{what}: {key} {}",
            c[key]
        );
    }
}

#[test]
fn every_page_source_and_order_loses_nothing() {
    require_kvm!();
    let dir = TempDir::new("collapse-image");
    let image = dir.path("ram.img");
    let line = format!(
        "run --guest verify --memory 20M --arg mode=fill --collapse off --save-memory {image}"
    );
    vmm_ok(&words(&line));
    // The kernel source registers write-protection only, so it always installs by `mremap`
    // (a zap-and-move there would let reads in the gap see the kernel's zero page); the zero
    // and image sources hold every access in the gap, and move by default.
    for (source, installs) in [
        ("kernel".to_string(), &["mremap"][..]),
        ("zero".to_string(), &["move", "mremap"][..]),
        (format!("image:{image}"), &["move", "mremap"][..]),
    ] {
        for install in installs {
            for order in ["prealloc", "legacy", "unlocked"] {
                let json = stress(
                    "20M",
                    &format!(
                        "--page-source {source} --collapse-order {order} --huge-source thp \
                         --install {install}"
                    ),
                );
                let what = format!("{source} {install} {order}");
                assert_mostly_huge(&json, &what);
                assert_eq!(json["collapse"]["order"], order);
                let kernel = &json["kernel"];
                let split = kernel["ram_mappings"].as_u64().unwrap()
                    - kernel["ram_mappings_at_start"].as_u64().unwrap();
                let huge = json["memory"]["extents"]["huge"].as_u64().unwrap();
                if *install == "move" {
                    assert_eq!(split, 0, "{what}: a move split a mapping: {kernel}");
                } else {
                    assert!(split > 0 && split <= 2 * huge, "{what}: {kernel}");
                }
            }
        }
    }
}

#[test]
fn hugetlb_pages_when_the_pool_has_them() {
    require_kvm!();
    let _lock = hugetlb_lock();
    if !hugetlb_available("collapse with hugetlb", 12) {
        return;
    }
    let json = stress("24M", "--huge-source hugetlb --huge-pool-ahead 0");
    assert_mostly_huge(&json, "hugetlb");
    assert_eq!(json["kernel"]["anon_huge_kb"], 0);
    assert_eq!(json["collapse"]["pool"]["thp"], 0);
    // After teardown the pool has every page back.
    assert_eq!(
        json["kernel"]["hugetlb_free_after_teardown"],
        json["kernel"]["hugetlb_free_before"]
    );
}

#[test]
fn an_exhausted_hugetlb_pool_counts_failures_or_falls_back() {
    require_kvm!();
    let _lock = hugetlb_lock();
    let (_, free) = hugetlb_pool();
    // Leave exactly 2 free pages.
    let Some(_hog) = HugetlbHog::take(free.saturating_sub(2)) else {
        panic!("could not take {} hugetlb pages", free.saturating_sub(2));
    };
    let left = hugetlb_pool().1;
    assert!(left <= 2, "{left} pages still free");
    let json = stress(
        "24M",
        "--huge-source hugetlb --huge-pool-ahead 0 --collapse-alloc-sleep 20",
    );
    let c = &json["collapse"];
    assert!(c["collapse_alloc_failed"].as_u64().unwrap() > 0, "{c}");
    assert!(
        json["memory"]["extents"]["huge"].as_u64().unwrap() <= left,
        "{json}"
    );
    // auto falls back to THP and collapses anyway.
    let json = stress("24M", "--huge-source auto --huge-pool-ahead 0");
    assert_mostly_huge(&json, "auto with an exhausted hugetlb pool");
    assert!(
        json["collapse"]["pool"]["thp"].as_u64().unwrap() > 0,
        "{json}"
    );
}

#[test]
fn huge_limit_holds() {
    require_kvm!();
    let json = stress(
        "20M",
        "--huge-limit 4M --huge-source thp --collapse-alloc-sleep 20",
    );
    let ext = &json["memory"]["extents"];
    assert!(ext["huge"].as_u64().unwrap() <= 2, "{json}");
    assert_eq!(json["ledger"]["limit_bytes"], 4 << 20);
    assert!(json["ledger"]["peak_charged_bytes"].as_u64().unwrap() <= 4 << 20);
    assert!(
        json["collapse"]["charge_failed"].as_u64().unwrap() > 0,
        "{json}"
    );
}

#[test]
fn collapse_is_off_for_huge_backings_and_can_be_turned_off() {
    require_kvm!();
    let dir = TempDir::new("collapse-off");
    let metrics = dir.path("m.json");
    vmm_ok(&words(&format!(
        "run --memory 16M --collapse off --metrics {metrics}"
    )));
    let json = read_json(&metrics);
    assert_eq!(json["collapse"]["enabled"], false);
    assert_eq!(json["collapse"]["pages_collapsed"], 0);
    vmm_ok(&words(&format!(
        "run --memory 16M --backing thp --metrics {metrics}"
    )));
    assert_eq!(read_json(&metrics)["collapse"]["enabled"], false);
    integration_tests::vmm_fails(
        &words("run --memory 16M --backing thp --collapse on"),
        vmm::vm::exit_code::BAD_INPUT,
        &["--collapse on needs --backing small"],
    );
    integration_tests::vmm_fails(
        &words("run --collapse-order eager"),
        vmm::vm::exit_code::BAD_INPUT,
        &["'eager'", "possible values: prealloc, legacy, unlocked"],
    );
}
