//! `vmm`: parse, build, run, report.

use std::process::ExitCode;

use clap::Parser;
use vmm::bench::{self, collapse, faults, reclaim, restore, resume};
use vmm::cli::{BenchCommand, Cli, Command, ImageCommand};
use vmm::devices::Devices;
use vmm::error::{chain, exit_code};
use vmm::loader::BUILTINS;
use vmm::vm::{Outcome, RunSummary, Vm};

fn main() -> ExitCode {
    let _faults = vmm::inject::from_env();
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit_code::BAD_INPUT);
        }
    };
    match cli.command {
        Command::Guests => {
            print!("{}", guests_text());
            ExitCode::SUCCESS
        }
        Command::Bench(bench) => {
            init_logging("warn");
            run_bench(bench)
        }
        Command::UffdServe(args) => {
            init_logging(&args.log_level.filter());
            match vmm::uffd_serve::serve(&args.to_config()) {
                Ok(report) => {
                    eprintln!(
                        "vmm uffd-serve: the VMM closed its end; served {} faults ({} bytes, \
                         {} copies, {} zero fills, {} of 2 MiB; {} removes)",
                        report.faults,
                        report.bytes_served,
                        report.copies,
                        report.zero_fills,
                        report.extents_2m,
                        report.removes
                    );
                    ExitCode::SUCCESS
                }
                Err(vmm::uffd_serve::ServeError::Signal(sig)) => {
                    eprintln!("vmm uffd-serve: stopped by signal {sig}");
                    ExitCode::from(128 + sig as u8)
                }
                Err(e) => failed(&e, e.is_bad_input()),
            }
        }
        Command::Image(command) => {
            let (from, to, to_raw) = match &command {
                ImageCommand::Export { image, raw } => (image, raw, true),
                ImageCommand::Import { raw, image } => (raw, image, false),
            };
            match vm_extents::ram_image::convert(from, to, to_raw) {
                Ok(stats) => {
                    eprintln!(
                        "vmm image: wrote {} ({} data pages, the rest holes)",
                        to.display(),
                        stats.data_pages
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}", vmm::vm::error::image_message(&e));
                    exit_with(e.is_bad_input())
                }
            }
        }
        Command::Run(args) => {
            init_logging(&args.log_level.filter());
            let config = match args.to_config() {
                Ok(c) => c,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    return ExitCode::from(exit_code::BAD_INPUT);
                }
            };
            // SIGUSR1 asks for a snapshot from now on (while the VM is built, it is taken as
            // soon as the vCPUs run), never ends the process.
            if let Err(e) = vmm::signals::install_snapshot() {
                eprintln!("error: installing the signal handlers: {e}");
                return ExitCode::from(exit_code::VMM_FAILED);
            }
            match Vm::build(config, Devices::stdout()).and_then(Vm::run) {
                Ok(summary) => {
                    print_summary(&summary);
                    ExitCode::from(summary.outcome.exit_code())
                }
                Err(e) => failed(&e, e.is_bad_input()),
            }
        }
    }
}

/// `vmm guests`: every built-in and every argument it takes, from their declarations.
fn guests_text() -> String {
    let mut text = String::new();
    for b in BUILTINS {
        text += &format!("{}: {}\n", b.name, b.summary);
        if b.args.is_empty() {
            text += "  (no arguments)\n";
        }
        for a in b.args {
            text += &format!(
                "  --arg {}={}  {}\n      {}\n",
                a.name,
                vmm::loader::placeholder(a),
                vmm::loader::describe(a, None),
                a.help,
            );
        }
        text += "\n";
    }
    text + "A guest file of your own (--guest PATH) takes any --arg KEY=VALUE: it declares none, so \
            none are checked.\n"
}

/// Says what failed and returns the exit code: 203 for bad input, else 204.
fn failed(e: &dyn std::error::Error, bad_input: bool) -> ExitCode {
    eprintln!("error: {}", chain(e));
    exit_with(bad_input)
}

/// 203 for the user's input, else 204.
fn exit_with(bad_input: bool) -> ExitCode {
    ExitCode::from(if bad_input {
        exit_code::BAD_INPUT
    } else {
        exit_code::VMM_FAILED
    })
}

/// The logger, with everything it would otherwise ask per line decided here, once: whether
/// stderr is a terminal (colours) is asked now, in the main thread, before any seccomp filter
/// exists, so no thread's logging ever makes a call its filter has not got.
fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let style = match std::env::var("RUST_LOG_STYLE").as_deref() {
        Ok("never") => env_logger::WriteStyle::Never,
        Ok("always") => env_logger::WriteStyle::Always,
        _ if std::io::stderr().is_terminal() => env_logger::WriteStyle::Always,
        _ => env_logger::WriteStyle::Never,
    };
    env_logger::Builder::new()
        .parse_filters(level)
        .parse_env(env_logger::Env::new().filter("RUST_LOG"))
        .write_style(style)
        .init();
}

/// What a run says on stderr at the end: dropped output, the collapse, how it ended.
fn print_summary(summary: &RunSummary) {
    let console = &summary.console;
    if console.dropped_bytes > 0 {
        eprintln!(
            "vmm: dropped {} bytes of serial output (rate limit)",
            console.dropped_bytes
        );
    }
    if console.ucall_dropped_bytes > 0 {
        eprintln!(
            "vmm: dropped {} bytes of ucall prints and reports (rate limit)",
            console.ucall_dropped_bytes
        );
    }
    for line in memory_summary(summary) {
        eprintln!("vmm: {line}");
    }
    for s in &summary.snapshots {
        eprintln!(
            "vmm: snapshot written to {} (asked by {}; the vCPUs were paused {:.1} ms)",
            s.path.display(),
            s.trigger,
            s.paused_ns as f64 / 1e6
        );
    }
    if let Some(ws) = &summary.working_set {
        let extents = format!("{} extents ({} 4 KiB pages)", ws.extents, ws.pages);
        match ws.mode {
            "record" if ws.saved => {
                eprintln!("vmm: working set: recorded {extents} into the snapshot")
            }
            "record" => eprintln!(
                "vmm: working set: recorded {extents}, not saved: {}",
                ws.not_saved.as_deref().unwrap_or("unknown")
            ),
            "replay" => eprintln!("vmm: working set: replayed {extents} ahead of the guest"),
            _ => {}
        }
    }
    if summary.outcome.exit_code() != 0 || matches!(summary.outcome, Outcome::Snapshotted(_)) {
        eprintln!("vmm: {}", summary.outcome.describe());
    }
}

/// What a run did with guest memory, in a line or two a reader needs no glossary for.
fn memory_summary(summary: &RunSummary) -> Vec<String> {
    let memory = &summary.memory;
    let extents = &memory.memory.extents;
    let mib = |b: u64| b >> 20;
    let mut lines = Vec::new();
    if let Some(restore) = &memory.restore {
        let mut line = format!(
            "restore ({}): read {} MiB of the image",
            format!("{:?}", restore.mode).to_lowercase(),
            mib(restore.image_bytes_read)
        );
        if let Some(p) = &restore.prefetch {
            line += &format!(
                ", {} MiB of it by the prefetcher ({} extents filled as 2 MiB pages, {} as 4 KiB \
                 pages)",
                mib(p.bytes_read.get()),
                p.extents_huge.get(),
                p.extents_small.get()
            );
        }
        line += &format!(
            "; {} faults served; the guest's first instruction ran {:.1} ms after the start",
            memory.faults.stats.served.get(),
            summary.to_first_instruction.as_secs_f64() * 1e3
        );
        lines.push(line);
    }
    let huge = format!(
        "{} of {} extents (2 MiB each) of guest RAM are backed by 2 MiB host pages",
        extents.counts.huge, extents.total
    );
    if memory.collapse.enabled {
        let stats = &memory.collapse.stats;
        let write_lock = stats.write_lock_ns.percentiles();
        let commit = stats.commit_ns.percentiles();
        lines.push(format!(
            "memory: {huge} ({} promoted by the collapse thread, {} MiB of huge pages charged); \
             each promotion held the memory map's write lock p50 {}, p99 {} (all other \
             memory work waits that long), and kept writers of its extent waiting p50 {}, p99 {}",
            stats.pages_collapsed.get(),
            mib(memory.ledger.charged_bytes),
            micros(write_lock.p50),
            micros(write_lock.p99),
            micros(commit.p50),
            micros(commit.p99),
        ));
    } else {
        lines.push(format!(
            "memory: {huge}; {} MiB resident ({} backing, {} page source, no collapse thread)",
            memory.kernel.smaps.rss_kb >> 10,
            format!("{:?}", memory.memory.backing).to_lowercase(),
            memory.memory.page_source
        ));
    }
    lines
}

/// Nanoseconds as microseconds, with a decimal below 10 us.
fn micros(ns: u64) -> String {
    if ns < 10_000 {
        format!("{:.1} us", ns as f64 / 1e3)
    } else {
        format!("{} us", ns / 1000)
    }
}

/// Panics are bugs: say which thread and where. Under seccomp no backtrace is printed (it
/// would open files no thread's filter allows).
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !vmm::seccomp::active() {
            return default(info);
        }
        let thread = std::thread::current();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "vmm: internal error: thread '{}' panicked at {at}: {what}",
            thread.name().unwrap_or("?")
        );
    }));
}

fn run_bench(bench: BenchCommand) -> ExitCode {
    let output = bench.output();
    let (json_to, plot_to) = (output.json.as_deref(), output.plot.as_deref());
    // Every output is checked before the first mode runs, so a bad path never costs a run.
    if let Err(e) = bench::check_outputs(json_to, plot_to) {
        return failed(&e, true);
    }
    // From here a signal ends the benchmark after the run it interrupts, with what was done.
    if let Err(e) = vmm::signals::install() {
        eprintln!("error: installing the signal handlers: {e}");
        return ExitCode::from(exit_code::VMM_FAILED);
    }
    let json = match &bench {
        BenchCommand::Faults(a) => a.to_config().and_then(|config| {
            if !a.pin_cpus.is_empty() {
                bench::pin_to_cpus(&a.pin_cpus)?;
            }
            faults::run(&config)
        }),
        BenchCommand::Collapse(a) => a.to_config().and_then(|c| collapse::run(&c)),
        BenchCommand::Restore(a) => a.to_config().and_then(|c| restore::run(&c)),
        BenchCommand::Reclaim(a) => a.to_config().and_then(|c| reclaim::run(&c)),
        BenchCommand::Resume(a) => a.to_config().and_then(|c| resume::run(&c)),
    };
    let json = match json {
        Ok(json) => json,
        Err(e) => return failed(&e, e.is_bad_input()),
    };
    if let Err(e) = bench::write_outputs(json_to, plot_to, &json) {
        return failed(&e, false);
    }
    ExitCode::from(bench::exit_code(&json))
}
