//! The benchmarks run end to end on small sizes, and their JSON is complete and consistent
//! with what they printed. No test here asserts a speed.

use integration_tests::{TempDir, read_json, require_kvm, vmm_ok, words};
use serde_json::Value;

fn ordered(p: &Value) -> bool {
    match (p["p50"].as_f64(), p["p99"].as_f64(), p["max"].as_f64()) {
        (Some(a), Some(b), Some(c)) => a <= b && b <= c,
        _ => false,
    }
}

#[test]
fn bench_faults_reports_every_mode_consistently() {
    require_kvm!();
    let dir = TempDir::new("bench-faults");
    let (json_path, plot) = (dir.path("f.json"), dir.path("f.svg"));
    let run = vmm_ok(&words(&format!(
        "bench faults --mem-per-vcpu 4M --vcpus 1 --repeat 2 --json {json_path} --plot {plot}"
    )));
    let json = read_json(&json_path);
    let modes = json["modes"].as_array().unwrap();
    let skipped = json["skipped"].as_array().unwrap();
    let all = [
        "kernel-4k",
        "kernel-thp",
        "hugetlb",
        "uffd-zero",
        "uffd-image",
        "uffd-zero-2m",
        "uffd-image-2m",
    ];
    for name in all {
        let ran = modes.iter().find(|m| m["mode"] == name);
        let skip = skipped.iter().find(|m| m["mode"] == name);
        assert!(
            ran.is_some() != skip.is_some(),
            "{name}: neither run nor skipped (or both)"
        );
        if let Some(s) = skip {
            assert!(!s["reason"].as_str().unwrap().is_empty());
            continue;
        }
        let m = ran.unwrap();
        let rate = m["pages_per_sec"].as_f64().unwrap();
        assert!(rate > 0.0, "{name}: {m}");
        assert_eq!(m["rounds"].as_array().unwrap().len(), 2, "--repeat 2");
        assert!(
            run.stdout.contains(&format!(
                "{name}: Overall demand paging rate: {rate:.0} pgs/sec"
            )),
            "{run}"
        );
        let base = modes.iter().find(|m| m["mode"] == "kernel-4k").unwrap()["pages_per_sec"]
            .as_f64()
            .unwrap();
        let ratio = m["ratio_to_kernel_4k"].as_f64().unwrap();
        assert!(
            (ratio - rate / base).abs() < 1e-9,
            "{name}: ratio {ratio} is not {rate}/{base}"
        );
        if name.starts_with("uffd") {
            assert!(ordered(&m["service_ns"]), "{name}: {}", m["service_ns"]);
            assert!(m["faults_served"].as_u64().unwrap() > 0);
        }
    }
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
}

#[test]
fn bench_collapse_reports_every_variant_and_restores_khugepaged() {
    require_kvm!();
    let knob = "/sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs";
    let before = std::fs::read_to_string(knob).ok();
    let dir = TempDir::new("bench-collapse");
    let (json_path, plot) = (dir.path("c.json"), dir.path("c.svg"));
    let run = vmm_ok(&words(&format!(
        "bench collapse --memory 16M --passes 3 --json {json_path} --plot {plot}"
    )));
    assert_eq!(
        std::fs::read_to_string(knob).ok(),
        before,
        "khugepaged's settings were not restored"
    );
    let json = read_json(&json_path);
    let variants = json["variants"].as_array().unwrap();
    for name in [
        "prealloc",
        "legacy",
        "unlocked",
        "khugepaged",
        "madv-collapse",
    ] {
        let v = variants
            .iter()
            .find(|v| v["variant"] == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(v["lost_writes"], 0, "{name} lost a guest write");
        if ["prealloc", "legacy", "unlocked"].contains(&name) {
            assert!(
                ordered(&v["write_lock_ns"]),
                "{name}: {}",
                v["write_lock_ns"]
            );
            assert!(ordered(&v["alloc_ns"]), "{name}: {}", v["alloc_ns"]);
            assert_eq!(v["alloc_outside_write_lock"], name != "legacy");
        } else {
            assert!(
                v["write_lock_ns"].is_null(),
                "{name}: the kernel's lock is not ours to time"
            );
        }
    }
    for key in ["memcpy_2m_ns", "mremap_2m_ns"] {
        assert!(ordered(&json["floor"][key]), "{key}");
    }
    let p99 = |name: &str| {
        variants.iter().find(|v| v["variant"] == name).unwrap()["write_lock_ns"]["p99"]
            .as_f64()
            .unwrap()
    };
    let ratio = json["ratios"]["prealloc_over_legacy_write_lock_p99"]
        .as_f64()
        .unwrap();
    assert!((ratio - p99("prealloc") / p99("legacy")).abs() < 1e-9);
    let over_mremap = json["ratios"]["prealloc"]["write_lock_p99_over_mremap_p99"]
        .as_f64()
        .unwrap();
    let mremap = json["floor"]["mremap_2m_ns"]["p99"].as_f64().unwrap();
    assert!((over_mremap - p99("prealloc") / mremap).abs() < 1e-9);
    assert!(
        run.stdout
            .contains("prealloc write-lock p99 / legacy write-lock p99"),
        "{run}"
    );
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
}
