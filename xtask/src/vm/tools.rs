//! What booting another kernel needs on the host: QEMU, virtme-ng (which
//! boots a kernel with the host's root filesystem as the guest's) and
//! virtiofsd (Debian's cloud kernels have no 9p, so the root filesystem is
//! shared over virtio-fs). Installed once into the tools directory and
//! checked quickly afterwards; only the VM tasks and `cargo xtask setup --vm`
//! ask for them, so the ordinary setup does not get slower.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    run,
    setup::{apt_install, tools_dir, works},
};

/// Debian packages: QEMU (software emulation: `/dev/kvm` here cannot boot
/// Debian's kernels), kmod (depmod for the extracted kernels' modules, and
/// virtme-ng's initramfs), busybox-static (the initramfs's shell),
/// python3-venv (virtme-ng's virtualenv), and the libseccomp and libcap-ng
/// headers that building virtiofsd needs.
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "python3-venv",
    "libseccomp-dev",
    "libcap-ng-dev",
];

/// The virtme-ng release the VM tasks were written against (PyPI).
const VIRTME_NG_VERSION: &str = "1.42";

/// The virtiofsd release (crates.io).
const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Where the VM tools and kernels live: `<tools>/vm`.
pub fn vm_dir() -> PathBuf {
    tools_dir().join("vm")
}

fn virtme_ng_dir() -> PathBuf {
    vm_dir().join("virtme-ng")
}

/// virtme-ng's `vng`, in its virtualenv.
pub fn vng_binary() -> PathBuf {
    virtme_ng_dir().join("bin/vng")
}

fn virtiofsd_dir() -> PathBuf {
    tools_dir().join("virtiofsd")
}

/// `PATH` for running vng: it finds virtiofsd (and its own helpers) there.
pub fn path() -> OsString {
    let mut dirs = vec![virtiofsd_dir().join("bin"), virtme_ng_dir().join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries are valid")
}

/// Installs what is missing: the Debian packages, virtme-ng, virtiofsd
/// (about 4 minutes to build on 2 cores the first time).
pub fn install() -> Result<()> {
    apt_install(APT_PACKAGES)?;
    virtme_ng()?;
    virtiofsd()
}

fn virtme_ng() -> Result<()> {
    let wanted = format!("virtme-ng {VIRTME_NG_VERSION}");
    let installed = Command::new(vng_binary())
        .arg("--version")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == wanted);
    if installed {
        return Ok(());
    }
    println!("setup: installing virtme-ng {VIRTME_NG_VERSION} (PyPI) into a virtualenv");
    let dir = virtme_ng_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(vm_dir())?;
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))
        .context("python3 -m venv (Debian's python3-venv)")?;
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")))
}

fn virtiofsd() -> Result<()> {
    let binary = virtiofsd_dir().join("bin/virtiofsd");
    let installed = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).trim()
                == format!("virtiofsd {VIRTIOFSD_VERSION}")
        });
    if installed {
        return Ok(());
    }
    println!("setup: building virtiofsd {VIRTIOFSD_VERSION} (about 4 minutes the first time)");
    run(Command::new("nice")
        .args(["-n", "10", "cargo", "install", "virtiofsd"])
        .args([
            "--version",
            VIRTIOFSD_VERSION,
            "--locked",
            "--force",
            "--root",
        ])
        .arg(virtiofsd_dir())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))?;
    if !works(Command::new(&binary).arg("--version")) {
        bail!("{} does not run after installing it", binary.display());
    }
    Ok(())
}
