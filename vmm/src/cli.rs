//! The command line: clap definitions and their conversion into a [`VmConfig`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{ByteSize, GuestArg, VmConfig};

/// A KVM virtual machine monitor whose guest memory is managed in 2 MiB extents.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a guest program.
    Run(RunArgs),
    /// List the built-in guest programs and their arguments.
    Guests,
}

/// `vmm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A built-in guest name (see `vmm guests`) or the path of a static x86_64 ELF executable.
    #[arg(long, default_value = "hello")]
    pub guest: String,
    /// Guest RAM: a multiple of 2 MiB, with a K, M or G suffix.
    #[arg(long, default_value = "128M")]
    pub memory: ByteSize,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// A guest argument KEY=VALUE (repeatable).
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    pub args: Vec<GuestArg>,
    /// Stop the guest after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Write a JSON summary here at exit.
    #[arg(long, value_name = "PATH")]
    pub metrics: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, default_value = "warn", value_parser = ["error", "warn", "info", "debug", "trace", "off"])]
    pub log_level: String,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm", value_name = "PATH")]
    pub kvm_device: PathBuf,
}

impl RunArgs {
    /// The VM configuration these arguments describe (validated later, against the host).
    pub fn to_config(&self) -> Result<VmConfig, String> {
        let timeout = match self.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => Some(Duration::from_secs_f64(t)),
            Some(t) => {
                return Err(format!(
                    "--timeout {t} is not allowed: give a number of seconds greater than zero"
                ));
            }
        };
        Ok(VmConfig {
            guest: self.guest.clone(),
            memory: self.memory,
            vcpus: self.vcpus,
            args: self.args.clone(),
            timeout,
            metrics: self.metrics.clone(),
            kvm_device: self.kvm_device.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vmm").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_and_values() {
        let Command::Run(run) = parse(&["run"]).unwrap().command else {
            panic!()
        };
        let c = run.to_config().unwrap();
        assert_eq!(
            (c.guest.as_str(), c.memory, c.vcpus),
            ("hello", ByteSize(128 << 20), 1)
        );
        let Command::Run(run) = parse(&[
            "run",
            "--guest",
            "touch",
            "--memory",
            "1G",
            "--vcpus",
            "2",
            "--arg",
            "pattern=random",
            "--timeout",
            "2.5",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let c = run.to_config().unwrap();
        assert_eq!(c.memory, ByteSize(1 << 30));
        assert_eq!(c.args[0].value, "random");
        assert_eq!(c.timeout, Some(Duration::from_millis(2500)));
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse(&["run", "--memory", "lots"]).unwrap_err().to_string();
        assert!(err.contains("\"lots\""), "{err}");
        let err = parse(&["run", "--vcpus", "-1"]).unwrap_err().to_string();
        assert!(err.contains("-1"), "{err}");
        let Command::Run(run) = parse(&["run", "--timeout", "0"]).unwrap().command else {
            panic!()
        };
        assert!(run.to_config().unwrap_err().contains("--timeout 0"));
    }
}
