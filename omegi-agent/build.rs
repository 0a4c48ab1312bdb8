//! Builds the eBPF programs (`../omegi-ebpf`) with the nightly toolchain and
//! bpf-linker, and leaves the object in `OUT_DIR/omegi.bpf.o` for the agent to
//! embed. `cargo xtask setup` installs what this needs.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../omegi-ebpf");
    let common_dir = manifest_dir.join("../omegi-common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=OMEGI_TOOLS_DIR");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("PATH", path_with_bpf_linker()?);
    // The outer (stable) build's settings must not leak into the nightly one.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    let status = cmd
        .status()
        .context("could not run `rustup run nightly cargo` to build the eBPF programs")?;
    if !status.success() {
        bail!(
            "building the eBPF programs in {} failed ({status}). \
             Run `cargo xtask setup` first: it installs rust-src for the nightly \
             toolchain and bpf-linker.",
            ebpf_dir.display()
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/omegi");
    std::fs::copy(&object, out_dir.join("omegi.bpf.o"))
        .with_context(|| format!("copying {}", object.display()))?;
    Ok(())
}

/// `PATH` with the bpf-linker that `cargo xtask setup` installs put first.
fn path_with_bpf_linker() -> Result<std::ffi::OsString> {
    let mut dirs = vec![tools_dir().join("bpf-linker/bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    Ok(env::join_paths(dirs)?)
}

/// Where `cargo xtask setup` keeps the tools it builds (kept in step with
/// `xtask`'s `tools_dir`).
fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("OMEGI_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".local/share/omegi-tools")
}
