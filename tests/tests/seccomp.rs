//! seccomp: every VMM thread runs under the filter of its kind, and a system call outside its
//! list stops the VMM at once with a message naming the thread and the call.
#![cfg(feature = "failpoints")]

use std::time::Duration;

use integration_tests::{
    TempDir, assert_no_seccomp_stop, require_kvm, vmm_on_terminal, vmm_within, words,
};
use vmm::vm::exit_code;

/// Each kind of thread (by name, numbered siblings included), the fault point that makes it
/// call `getppid`, and a run in which that thread exists.
const THREADS: &[(&str, &str, &str)] = &[
    ("vcpu0", "seccomp-vcpu", "run --guest touch --memory 16M"),
    (
        "uffd-handler",
        "seccomp-fault-handler",
        "run --guest touch --memory 16M --page-source zero",
    ),
    (
        "collapser",
        "seccomp-collapser",
        "run --guest verify --arg mode=stress --memory 16M",
    ),
    (
        "huge-refill",
        "seccomp-pool-refill",
        "run --guest verify --arg mode=stress --memory 16M",
    ),
    (
        "vmm",
        "seccomp-main",
        "run --guest touch --memory 16M --arg passes=20",
    ),
];

#[test]
fn a_system_call_outside_a_threads_list_stops_the_vmm() {
    require_kvm!();
    for (thread, point, line) in THREADS {
        let env = [("FAILPOINTS", format!("{point}=1*return"))];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (run, _) = vmm_within(&words(line), &env, Duration::from_secs(60));
        assert_eq!(
            run.code,
            Some(i32::from(exit_code::VMM_FAILED)),
            "{point}\n{run}"
        );
        // Threads of a kind that runs several are numbered after the first ("huge-refill",
        // "huge-refill1", ...), and any of them may be the one that makes the call first.
        let said = format!(
            "' made system call {}, which its filter does not allow",
            libc::SYS_getppid
        );
        let stopped = run.stderr.lines().any(|line| {
            line.strip_prefix("vmm: seccomp: thread '")
                .and_then(|rest| rest.split_once(&said))
                .and_then(|(name, _)| name.strip_prefix(thread))
                .is_some_and(|number| number.bytes().all(|b| b.is_ascii_digit()))
        });
        assert!(
            stopped,
            "{point}: no line says thread '{thread}' (or a numbered sibling) made system call {}\n{run}",
            libc::SYS_getppid
        );
        // The positive control: without filters the same call goes through and the run ends
        // as usual.
        let mut off = words(line);
        off.extend(["--seccomp", "off"]);
        let (run, _) = vmm_within(&off, &env, Duration::from_secs(60));
        assert_eq!(run.code, Some(0), "{point} with --seccomp off\n{run}");
    }
}

/// Every way a huge page goes in runs under the filters: `UFFDIO_MOVE` from the fault handler
/// (2 MiB faults) and from the collapse thread, and `mremap` from both.
#[test]
fn every_install_path_runs_under_its_filters() {
    require_kvm!();
    for install in ["move", "mremap"] {
        for line in [
            "run --guest verify --memory 16M --page-source zero --fault-granularity 2M \
             --collapse off --huge-source thp",
            "run --guest verify --arg mode=stress --memory 16M --page-source zero \
             --huge-source thp --huge-pool-ahead 0",
        ] {
            let mut args = words(line);
            args.extend(["--install", install]);
            let (run, _) = vmm_within(&args, &[], Duration::from_secs(60));
            assert_eq!(run.code, Some(0), "{install}: {line}\n{run}");
            assert!(!run.stderr.contains("seccomp"), "{run}");
        }
    }
}

/// The prefetch threads run under their own filter too: a call outside it stops the VMM,
/// naming the thread.
#[test]
fn a_prefetch_thread_outside_its_list_stops_the_vmm() {
    require_kvm!();
    let dir = integration_tests::TempDir::new("seccomp-prefetch");
    let image = dir.path("ram.img");
    let save = format!(
        "run --guest verify --memory 16M --arg mode=fill --collapse off --save-memory {image}"
    );
    let (run, _) = vmm_within(&words(&save), &[], Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "{run}");
    let line = format!(
        "run --guest verify --arg mode=check --memory 16M --page-source image:{image} \
         --collapse off --prefetch-threads 1"
    );
    // One prefetch thread: with two, either may reach the fault point first.
    let env = [("FAILPOINTS", "seccomp-prefetcher=1*return")];
    let (run, _) = vmm_within(&words(&line), &env, Duration::from_secs(60));
    assert_eq!(run.code, Some(i32::from(exit_code::VMM_FAILED)), "{run}");
    let said = format!(
        "vmm: seccomp: thread 'prefetch0' made system call {}, which its filter does not allow",
        libc::SYS_getppid
    );
    assert!(run.stderr.contains(&said), "{run}");
    // Without the fault point, the same run is correct under the filters.
    let (run, _) = vmm_within(&words(&line), &[], Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "{run}");
}

/// Every kind of thread, on a terminal, logging at `trace`, through the warnings it can reach
/// (the huge-page limit met, 2 MiB faults falling back, prefetching past the limit), with
/// every benign probe made by every thread (`seccomp-probes`): none is stopped by its filter.
/// Before the logger decided its colours up front, the first warning a background thread
/// logged on a terminal ended the VMM (`ioctl(TCGETS)`), and glibc's allocator could end a
/// prefetch thread (`openat`).
#[test]
fn no_thread_on_a_terminal_steps_outside_its_filter() {
    require_kvm!();
    let dir = TempDir::new("seccomp-tty");
    let image = dir.path("ram.img");
    let (run, _) = vmm_within(
        &words(&format!(
            "run --guest verify --memory 32M --arg mode=fill --save-memory {image}"
        )),
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{run}");
    let lines = [
        "run --guest verify --arg mode=stress --vcpus 2 --memory 16M".to_string(),
        "run --guest verify --memory 16M --page-source zero --fault-granularity 2M \
         --huge-limit 2M"
            .into(),
        "run --guest verify --arg mode=stress --memory 16M --page-source zero --huge-limit 4M \
         --huge-pool-ahead 0"
            .into(),
        format!(
            "run --guest verify --memory 32M --arg mode=check --page-source image:{image} \
             --prefetch-threads 4 --huge-limit 2M"
        ),
        format!(
            "run --guest verify --memory 32M --arg mode=check --page-source image:{image} --restore eager"
        ),
    ];
    let mut said = String::new();
    for line in &lines {
        let mut args = words(line);
        args.extend(["--log-level", "trace"]);
        let (run, _) = vmm_on_terminal(
            &args,
            &[("FAILPOINTS", "seccomp-probes=return")],
            Duration::from_secs(120),
        );
        assert_no_seccomp_stop(line, &run);
        assert_eq!(run.code, Some(0), "{line}\n{run}");
        said.push_str(&run.stdout);
    }
    for kind in [
        "Main",
        "Vcpu",
        "FaultHandler",
        "Collapser",
        "PoolRefill",
        "Prefetcher",
    ] {
        let logged = format!("under the {kind} seccomp filter");
        assert!(
            said.contains(&logged),
            "no {kind} thread logged under its filter"
        );
    }
}
