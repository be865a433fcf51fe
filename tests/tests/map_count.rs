//! `vm.max_map_count`: collapsing into guest RAM must stop before it eats the mappings the
//! rest of the VMM needs, and a limit too low to run at all is refused with a message, never
//! an abort. These tests change a system-wide setting (restored on drop), so they live in a
//! test binary of their own: cargo runs test binaries one at a time.

use std::time::Duration;

use integration_tests::{
    SystemSetting, TempDir, assert_no_seccomp_stop, read_json, report_sum, require_kvm, vmm,
    vmm_on_terminal, words,
};
use vmm::vm::exit_code;

/// `vm.max_map_count`, set to `value` until dropped.
struct MaxMapCount;

impl MaxMapCount {
    fn set(value: u64) -> Option<SystemSetting> {
        SystemSetting::set("/proc/sys/vm/max_map_count", &value.to_string())
    }
}

#[test]
fn collapse_stops_before_the_mappings_run_out_and_a_tiny_limit_is_refused() {
    require_kvm!();
    let dir = TempDir::new("map-count");
    let metrics = dir.path("m.json");
    // The kernel page source registers for write-protection only, so installs use `mremap`
    // (one mapping split per extent); `--install mremap` says so for the zero source too.
    let line = format!(
        "run --guest verify --vcpus 2 --memory 256M --arg mode=stress --arg passes=2 \
         --huge-source thp --metrics {metrics}"
    );
    {
        // Enough to run (about 100 mappings plus the reserve), not enough to collapse 128
        // extents with one mapping split each.
        let Some(_limit) = MaxMapCount::set(300) else {
            return;
        };
        let run = vmm(&words(&line));
        assert_eq!(run.code, Some(0), "{run}");
        assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
        assert!(
            run.stderr
                .contains("no more 2 MiB pages will be moved into guest RAM"),
            "{run}"
        );
        assert_eq!(
            run.stderr.matches("no more 2 MiB pages").count(),
            1,
            "said once: {run}"
        );
        let json = read_json(&metrics);
        assert_eq!(json["collapse"]["stopped_for_mappings"], true, "{json}");
        let collapsed = json["collapse"]["pages_collapsed"].as_u64().unwrap();
        assert!(collapsed > 0 && collapsed < 128, "{collapsed}");
        assert_eq!(json["ledger"]["after_teardown_bytes"], 0);
    }
    {
        let Some(_limit) = MaxMapCount::set(300) else {
            return;
        };
        let line = format!(
            "run --guest verify --vcpus 2 --memory 256M --arg mode=stress --arg passes=2 \
             --huge-source thp --page-source zero --install mremap --metrics {metrics}"
        );
        let run = vmm(&words(&line));
        assert_eq!(run.code, Some(0), "{run}");
        let json = read_json(&metrics);
        assert_eq!(json["collapse"]["stopped_for_mappings"], true, "{json}");
    }
    let Some(_limit) = MaxMapCount::set(60) else {
        return;
    };
    let run = vmm(&words(&line));
    assert_eq!(run.code, Some(i32::from(exit_code::BAD_INPUT)), "{run}");
    assert!(run.stderr.contains("vm.max_map_count is 60"), "{run}");
    assert!(
        !run.stderr.contains("panicked") && !run.stderr.contains("memory allocation"),
        "{run}"
    );
}

/// Installs by `UFFDIO_MOVE` split no mapping: with the same low limit, 512 MiB collapse to
/// THPs whole, and guest RAM is covered by as many mappings at the end as at the start.
#[test]
fn moves_collapse_512m_under_a_low_map_count_without_a_mapping_each() {
    require_kvm!();
    let dir = TempDir::new("map-count-move");
    let metrics = dir.path("m.json");
    let Some(_limit) = MaxMapCount::set(300) else {
        return;
    };
    let line = format!(
        "run --guest verify --vcpus 2 --memory 512M --arg mode=stress --arg passes=1 \
         --huge-source thp --page-source zero --install move --metrics {metrics}"
    );
    let run = vmm(&words(&line));
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    let json = read_json(&metrics);
    let ext = &json["memory"]["extents"];
    assert_eq!(ext["total"], 256, "{json}");
    assert_eq!(ext["huge"], 256, "every extent huge: {json}");
    assert_eq!(json["kernel"]["anon_huge_kb"], 512 * 1024, "{json}");
    let kernel = &json["kernel"];
    assert_eq!(
        kernel["ram_mappings"], kernel["ram_mappings_at_start"],
        "a move split a mapping: {kernel}"
    );
    assert_eq!(json["collapse"]["stopped_for_mappings"], false, "{json}");
    assert!(!run.stderr.contains("no more 2 MiB pages"), "{run}");
}

/// The collapse thread's warning that the mappings are running out, logged on a terminal: the
/// logger's terminal check was made once, up front, so the thread stays inside its seccomp
/// filter (before, its first warning on a terminal ended the VMM with `ioctl(TCGETS)`).
#[test]
fn the_mapping_warning_on_a_terminal_stays_inside_the_filters() {
    require_kvm!();
    let Some(_limit) = MaxMapCount::set(175) else {
        return;
    };
    let (run, _) = vmm_on_terminal(
        &words("run --guest verify --memory 32M --arg mode=fill --timeout 60"),
        &[],
        Duration::from_secs(120),
    );
    assert_no_seccomp_stop("a warning on a terminal", &run);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("no more 2 MiB pages"), "{run}");
}
