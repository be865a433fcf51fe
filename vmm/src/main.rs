//! `vmm`: parse, build, run, report.

use std::process::ExitCode;

use clap::Parser;
use vmm::bench::collapse::{self, CollapseBenchConfig};
use vmm::bench::faults::{self, FaultsConfig};
use vmm::bench::{self, BenchError, plot};
use vmm::cli::{BenchCommand, Cli, Command};
use vmm::devices::Devices;
use vmm::loader::BUILTINS;
use vmm::vm::{Vm, exit_code};

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
            for b in BUILTINS {
                println!("{:<10} {}\n{:<10} args: {}", b.name, b.summary, "", b.args);
            }
            ExitCode::SUCCESS
        }
        Command::Bench(bench) => {
            env_logger::Builder::new()
                .parse_filters("warn")
                .parse_env("RUST_LOG")
                .init();
            match run_bench(bench) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    print_chain(&e);
                    ExitCode::from(exit_code::VMM_FAILED)
                }
            }
        }
        Command::Run(args) => {
            env_logger::Builder::new()
                .parse_filters(&args.log_level)
                .parse_env("RUST_LOG")
                .init();
            let config = match args.to_config() {
                Ok(c) => c,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    return ExitCode::from(exit_code::BAD_INPUT);
                }
            };
            let result = Vm::build(config, Devices::stdout()).and_then(Vm::run);
            match result {
                Ok(summary) => {
                    let (_, dropped) = summary.console;
                    if dropped > 0 {
                        eprintln!("vmm: dropped {dropped} bytes of serial output (rate limit)");
                    }
                    let (_, dropped) = summary.ucall_output;
                    if dropped > 0 {
                        eprintln!(
                            "vmm: dropped {dropped} bytes of ucall prints and reports (rate limit)"
                        );
                    }
                    let json = summary.to_json();
                    if json["collapse"]["enabled"] == true {
                        let (ext, c) = (&json["memory"]["extents"], &json["collapse"]);
                        eprintln!(
                            "vmm: memory: {} of {} extents are 2 MiB pages ({} collapsed, {} MiB \
                             charged); write lock held p50 {} us, p99 {} us",
                            ext["huge"],
                            ext["total"],
                            c["pages_collapsed"],
                            json["ledger"]["charged_bytes"].as_u64().unwrap_or(0) >> 20,
                            c["write_lock_ns"]["p50"].as_u64().unwrap_or(0) / 1000,
                            c["write_lock_ns"]["p99"].as_u64().unwrap_or(0) / 1000,
                        );
                    }
                    let code = summary.outcome.exit_code();
                    if code != 0 {
                        eprintln!("vmm: {}", summary.outcome.describe());
                    }
                    ExitCode::from(code)
                }
                Err(e) => {
                    print_chain(&e);
                    ExitCode::from(if e.is_bad_input() {
                        exit_code::BAD_INPUT
                    } else {
                        exit_code::VMM_FAILED
                    })
                }
            }
        }
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

/// Prints an error and its causes on one line.
fn print_chain(e: &dyn std::error::Error) {
    eprint!("error: {e}");
    let mut source = e.source();
    while let Some(cause) = source {
        eprint!(": {cause}");
        source = cause.source();
    }
    eprintln!();
}

fn run_bench(bench: BenchCommand) -> Result<(), BenchError> {
    let (json, output) = match bench {
        BenchCommand::Faults(a) => {
            if !a.pin_cpus.is_empty() {
                bench::pin_to_cpus(&a.pin_cpus)?;
            }
            let config = FaultsConfig {
                vcpus: a.vcpus,
                mem_per_vcpu: a.mem_per_vcpu,
                access: a.access,
                pattern: a.pattern,
                modes: a.modes,
                repeat: a.repeat.max(1),
                scratch: std::env::temp_dir(),
                pinned: a.pin_cpus.clone(),
            };
            let json = faults::run(&config)?;
            if let Some(path) = &a.output.plot {
                let rates: Vec<(String, f64)> = json["modes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| {
                        (
                            m["mode"].as_str().unwrap_or("?").to_string(),
                            m["pages_per_sec"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect();
                plot::paging_rates(path, &rates)?;
            }
            (json, a.output)
        }
        BenchCommand::Collapse(a) => {
            let config = CollapseBenchConfig {
                vcpus: a.vcpus,
                memory: a.memory,
                passes: a.passes,
                variants: a.variants,
                pool_ahead: a.huge_pool_ahead,
                repeat: a.repeat,
            };
            let json = collapse::run(&config)?;
            if let Some(path) = &a.output.plot {
                let series: Vec<(String, serde_json::Value)> = json["variants"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|v| v["vcpu_stall_ns"].is_object())
                    .map(|v| {
                        (
                            v["variant"].as_str().unwrap_or("?").to_string(),
                            v["vcpu_stall_ns"].clone(),
                        )
                    })
                    .collect();
                plot::latency_cdfs(
                    path,
                    "vCPU stall per write-protect fault during collapse (CDF)",
                    &series,
                )?;
            }
            (json, a.output)
        }
    };
    if let Some(path) = &output.json {
        bench::write_json(path, &json)?;
    }
    Ok(())
}
