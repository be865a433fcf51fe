//! `vmm`: parse, build, run, report.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{Cli, Command};
use vmm::devices::Devices;
use vmm::loader::BUILTINS;
use vmm::vm::{Vm, exit_code};

fn main() -> ExitCode {
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
                    eprint!("error: {e}");
                    let mut source = std::error::Error::source(&e);
                    while let Some(cause) = source {
                        eprint!(": {cause}");
                        source = cause.source();
                    }
                    eprintln!();
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
