//! Builds the bare-metal guest programs in `guest/programs` and embeds them in the `vmm` binary.
//!
//! The guests are built by a nested `cargo build --release` for the host's own target (no rustup
//! target or other toolchain is needed), in a target directory of their own so the outer build's
//! lock is never contended. Everything the outer cargo exports that would change how the nested
//! build compiles (flags, wrappers such as clippy-driver, the target directory) is removed.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let guest_dir = manifest_dir.join("../guest/programs");
    let abi_dir = manifest_dir.join("../guest/abi");
    for path in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    println!("cargo:rerun-if-changed={}", abi_dir.join("src").display());
    build_commit(&manifest_dir);

    // Shared by every profile of the outer build (build, test, clippy), so guests build once.
    let target_dir = manifest_dir.join("../target/guest");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--bins", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars() {
        let inherited_build_setting = key.starts_with("CARGO_")
            && !matches!(key.as_str(), "CARGO_HOME" | "CARGO_NET_OFFLINE");
        if inherited_build_setting
            || matches!(
                key.as_str(),
                "RUSTFLAGS" | "RUSTDOCFLAGS" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER"
            )
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest programs");
    assert!(
        status.success(),
        "building the guest programs failed: {status}"
    );

    let bin_dir = target_dir.join("release");
    let mut names: Vec<String> = fs::read_dir(guest_dir.join("src/bin"))
        .expect("guest/programs/src/bin exists")
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();

    let mut code = String::from("/// Every built-in guest program: `(name, static ELF image)`.\n");
    code.push_str("pub const BUILTIN_IMAGES: &[(&str, &[u8])] = &[\n");
    for name in &names {
        let image = copy_image(&bin_dir.join(name), &out_dir.join(name));
        writeln!(
            code,
            "    ({name:?}, include_bytes!({:?})),",
            image.display()
        )
        .unwrap();
    }
    code.push_str("];\n");
    fs::write(out_dir.join("builtin_images.rs"), code).expect("write builtin_images.rs");
}

/// Names the commit this build is made from (`VMM_BUILD_COMMIT`), which a snapshot records:
/// a snapshot is resumed only by the build that took it.
fn build_commit(manifest_dir: &Path) {
    let git = manifest_dir.join("../.git");
    for file in ["HEAD", "refs/heads", "packed-refs"] {
        println!("cargo:rerun-if-changed={}", git.join(file).display());
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(manifest_dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(commit) = commit {
        println!("cargo:rustc-env=VMM_BUILD_COMMIT={commit}");
    }
}

/// Copies a guest binary next to the generated code so the embedded bytes are this build's own.
fn copy_image(from: &Path, to: &Path) -> PathBuf {
    fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    to.to_path_buf()
}
