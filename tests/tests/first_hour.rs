//! What a new user meets first: guest arguments checked before boot, a live status line on
//! a terminal (and none elsewhere), a summary of what memory did for every kind of run, and a
//! hint when a guest file of their own turns out to be a Linux program.

use std::time::Duration;

use integration_tests::{TempDir, require_kvm, vmm, vmm_fails, vmm_ok, vmm_on_terminal, words};
use vmm::vm::exit_code::BAD_INPUT;

#[test]
fn guest_arguments_are_checked_before_the_guest_boots() {
    require_kvm!();
    for (arg, needles) in [
        (
            "mod=stress",
            &["takes no argument \"mod\"", "did you mean \"mode\"?"][..],
        ),
        ("pases=3", &["did you mean \"passes\" or \"pass\"?"]),
        (
            "passes=abc",
            &["--arg passes=abc", "not a whole number", "from 1 to"],
        ),
        (
            "passes=0",
            &["0 is out of range", "from 1 to 4294967295 (default 4)"],
        ),
        (
            "mode=strss",
            &[
                "did you mean \"stress\"?",
                "one of fill-check, fill, check, stress",
            ],
        ),
        ("size=100M", &["100M is more than the 58M of RAM free"]),
        ("size=5000", &["not a whole number of 4 KiB pages"]),
    ] {
        let run = vmm_fails(
            &words(&format!("run --guest verify --memory 64M --arg {arg}")),
            BAD_INPUT,
            needles,
        );
        // Nothing ran: no guest output, no memory summary.
        assert!(run.stdout.is_empty(), "{arg}: {run}");
        assert!(!run.stderr.contains("vmm: memory"), "{arg}: {run}");
    }
    vmm_fails(
        &words("run --guest verify --memory 64M --arg seed=1 --arg seed=2"),
        BAD_INPUT,
        &["given twice"],
    );
    vmm_fails(
        &words("run --guest hello --memory 8M --arg x=1"),
        BAD_INPUT,
        &["guest hello takes no argument \"x\"", "it takes none"],
    );
    // A guest file of one's own takes any KEY=VALUE: nothing declares what it reads.
    let dir = TempDir::new("own-guest-args");
    let hello = integration_tests::builtin_as_file(&dir, "hello");
    vmm_ok(&words(&format!(
        "run --guest {hello} --memory 8M --arg anything=at-all --arg mod=stress"
    )));
}

/// On a terminal, a run that lasts gets a live status line, redrawn in place and erased at
/// the end; off a terminal there is none, and no control character.
#[test]
fn a_long_run_on_a_terminal_shows_a_live_status_line() {
    require_kvm!();
    let line = "run --guest verify --memory 128M --arg mode=stress --arg passes=3 \
                --page-source zero";
    let (run, took) = vmm_on_terminal(&words(line), &[], Duration::from_secs(240));
    assert_eq!(run.code, Some(0), "{run}");
    if took > Duration::from_secs(3) {
        assert!(run.stdout.contains("vCPU exits/s"), "{run}");
        assert!(run.stdout.contains("faults served"), "{run}");
        assert!(run.stdout.contains("MiB resident"), "{run}");
        assert!(run.stdout.contains("\r\x1b[2K"), "never erased\n{run}");
        // Guest output never runs into the line: every guest line starts a line.
        for l in run.stdout.lines().filter(|l| l.contains("[vcpu0]")) {
            let tail = l.rsplit('\r').next().unwrap();
            assert!(
                tail.trim_start_matches("\x1b[2K").starts_with("[vcpu0]"),
                "{l:?}"
            );
        }
    }
    let piped = vmm_ok(&words(line));
    assert!(!piped.stderr.contains("exits/s"), "{piped}");
    assert!(!piped.stderr.contains('\x1b'), "{piped}");
}

/// Every kind of run says what memory did: the collapse's promotions, the backing and
/// page source without one, and a restore's reads and first instruction.
#[test]
fn every_kind_of_run_summarises_its_memory() {
    require_kvm!();
    let run = vmm_ok(&words(
        "run --guest verify --memory 32M --arg mode=stress --arg passes=2 --page-source zero",
    ));
    assert!(
        run.stderr.contains("promoted by the collapse thread"),
        "{run}"
    );
    assert!(run.stderr.contains("write lock p50"), "{run}");
    let run = vmm_ok(&words("run --guest verify --memory 32M --backing thp"));
    assert!(
        run.stderr
            .contains("thp backing, kernel page source, no collapse thread"),
        "{run}"
    );
    let run = vmm_ok(&words("run --guest verify --memory 32M --collapse off"));
    assert!(run.stderr.contains("MiB resident (small backing"), "{run}");
    let dir = TempDir::new("restore-summary");
    let image = dir.path("ram.img");
    vmm_ok(&words(&format!(
        "run --guest verify --memory 32M --arg mode=fill --save-memory {image}"
    )));
    let run = vmm_ok(&words(&format!(
        "run --guest verify --memory 32M --arg mode=check --page-source image:{image}"
    )));
    assert!(run.stderr.contains("vmm: restore (lazy): read"), "{run}");
    assert!(run.stderr.contains("by the prefetcher"), "{run}");
    assert!(run.stderr.contains("first instruction ran"), "{run}");
}

/// A guest file that fails in the guest gets a hint that guests are bare-metal programs; a
/// Linux executable is told it looks like one.
#[test]
fn a_failing_guest_file_gets_a_bare_metal_hint() {
    require_kvm!();
    let dir = TempDir::new("bare-metal-hint");
    let own = integration_tests::builtin_as_file(&dir, "misbehave");
    let run = vmm(&words(&format!("run --guest {own} --memory 8M")));
    assert_eq!(run.code, Some(201), "{run}");
    assert!(
        run.stderr.contains("hint: a guest is a bare-metal program"),
        "{run}"
    );
    // The built-in itself fails the same way, with no hint: it is one of ours.
    let run = vmm(&words("run --guest misbehave --memory 8M"));
    assert!(!run.stderr.contains("hint:"), "{run}");
    // A static Linux executable, where the host can link one.
    let (src, exe) = (dir.path("linux.c"), dir.path("linux"));
    std::fs::write(
        &src,
        "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n",
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .args(["-static", "-no-pie", "-o", &exe, &src])
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        eprintln!("SKIP: the Linux-executable part (cc -static is not available)");
        return;
    }
    let run = vmm(&words(&format!(
        "run --guest {exe} --memory 64M --timeout 60"
    )));
    assert_eq!(run.code, Some(201), "{run}");
    assert!(run.stderr.contains("it looks made for Linux"), "{run}");
}
