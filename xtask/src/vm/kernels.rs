//! Debian's cloud kernels for the VM tasks: found through apt's own
//! metadata (the newest one of each series, never a hard-coded version that
//! will vanish from the mirror), downloaded with `apt-get download` and
//! extracted with `dpkg-deb -x` into `<tools>/vm/kernels/<release>/`.
//!
//! Each Debian release gets an apt configuration of ours under
//! `<tools>/vm/apt/`, with lists and caches of its own: the system's sources
//! are never changed, and a host that is not bookworm can still fetch
//! bookworm's and bullseye's kernels. The mirrors are the ones the system's
//! apt already uses.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    str::FromStr,
};

use anyhow::{anyhow, bail, Context, Result};

use super::tools::vm_dir;
use crate::run;

/// A kernel series that the VM tasks can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Series {
    /// Debian 11 (bullseye-security): no `bpf_get_attach_cookie`, no
    /// `uprobe_multi`.
    V5_10,
    /// Debian 12 (bookworm): what Debian 12 nodes and Amazon Linux 2023 run.
    V6_1,
    /// Debian 12's newer kernel (bookworm-security): has `uprobe_multi`.
    V6_12,
}

impl Series {
    /// Every series, newest first (the order of `--kernel all`).
    pub const ALL: [Series; 3] = [Series::V6_12, Series::V6_1, Series::V5_10];

    /// The Debian release whose archive has this series.
    fn archive(self) -> Archive {
        match self {
            Series::V5_10 => BULLSEYE,
            Series::V6_1 | Series::V6_12 => BOOKWORM,
        }
    }

    /// The meta-package that depends on the newest kernel of the series.
    fn meta_package(self) -> &'static str {
        match self {
            Series::V5_10 | Series::V6_1 => "linux-image-cloud-amd64",
            Series::V6_12 => "linux-image-6.12-cloud-amd64",
        }
    }

    /// How a kernel release (`uname -r`, and the image package's name after
    /// `linux-image-`) of the series starts: `6.1.0-57-cloud-amd64`,
    /// `6.12.117+deb12-cloud-amd64`, `5.10.0-46-cloud-amd64`.
    fn release_prefix(self) -> &'static str {
        match self {
            Series::V5_10 => "5.10.0-",
            Series::V6_1 => "6.1.0-",
            Series::V6_12 => "6.12.",
        }
    }

    /// Whether `release` is a cloud kernel of this series. The part after
    /// the prefix starts with a number (the ABI or the patch level), which
    /// keeps `6.1.` apart from `6.12.`.
    fn is_release(self, release: &str) -> bool {
        release
            .strip_prefix(self.release_prefix())
            .and_then(|rest| rest.strip_suffix(RELEASE_SUFFIX))
            .is_some_and(|middle| middle.starts_with(|c: char| c.is_ascii_digit()))
    }

    /// The number that orders releases of the series (ABI number for 5.10
    /// and 6.1, patch level for 6.12): only used when apt's meta-package
    /// does not settle it.
    fn release_number(self, release: &str) -> u64 {
        let rest = release.strip_prefix(self.release_prefix()).unwrap_or("");
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or(0)
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Series::V5_10 => "5.10",
            Series::V6_1 => "6.1",
            Series::V6_12 => "6.12",
        })
    }
}

impl FromStr for Series {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        Series::ALL
            .into_iter()
            .find(|series| series.to_string() == text)
            .ok_or_else(|| anyhow!("no kernel {text:?}: one of 5.10, 6.1, 6.12"))
    }
}

/// Debian's cloud flavour: small, virtio drivers, BTF. It has no 9p.
const RELEASE_SUFFIX: &str = "-cloud-amd64";

/// The keyring of Debian's archives (package debian-archive-keyring), which
/// also holds the keys of the previous releases.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A Debian release's archive: its suites, on the system's main mirror and
/// on its security mirror.
#[derive(Clone, Copy)]
struct Archive {
    name: &'static str,
    main_suites: &'static [&'static str],
    security_suites: &'static [&'static str],
}

const BOOKWORM: Archive = Archive {
    name: "bookworm",
    main_suites: &["bookworm", "bookworm-updates"],
    security_suites: &["bookworm-security"],
};

/// Bullseye's newest 5.10 kernels are in its security suite only.
const BULLSEYE: Archive = Archive {
    name: "bullseye",
    main_suites: &[],
    security_suites: &["bullseye-security"],
};

/// A kernel extracted from its package, ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Its `uname -r`, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The Debian package's version, e.g. `6.1.192-3`.
    pub version: String,
    /// The extracted package: `boot/vmlinuz-<release>` and
    /// `lib/modules/<release>/` (with `modules.dep`).
    pub dir: PathBuf,
}

impl Kernel {
    /// The kernel image to boot.
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

fn kernels_dir() -> PathBuf {
    vm_dir().join("kernels")
}

/// The file in an extracted kernel's directory that says which package it
/// came from; it is written last, so a directory without it is incomplete.
const MARKER: &str = ".omegi-package";

/// The newest kernel of `series`, downloaded and extracted unless the cache
/// has it already. When the archive cannot be reached (or the download
/// fails), the newest kernel of the series in the cache is used, with a
/// warning.
pub fn prepare(series: Series) -> Result<Kernel> {
    let fetched =
        newest_in_archive(series).and_then(|(package, version)| fetch(series, &package, &version));
    match fetched {
        Ok(kernel) => Ok(kernel),
        Err(error) => {
            let Some(cached) = cached(series).into_iter().next_back() else {
                return Err(
                    error.context(format!("cannot find a {series} kernel, and none is cached"))
                );
            };
            eprintln!(
                "vm: warning: cannot get the newest {series} kernel from the archive \
                 ({error:#}); using the cached {} ({})",
                cached.release, cached.version
            );
            Ok(cached)
        }
    }
}

/// The image package and version of the newest kernel of `series`.
fn newest_in_archive(series: Series) -> Result<(String, String)> {
    let apt = Apt::configure(series.archive())?;
    apt.update()?;
    let wanted = |name: &str| {
        name.strip_prefix("linux-image-")
            .is_some_and(|release| series.is_release(release))
    };
    // The meta-package names the newest kernel; if it has moved on to
    // another series (or is gone), take the highest-numbered image package.
    let from_meta = apt
        .show_field(series.meta_package(), "Depends")
        .ok()
        .and_then(|depends| {
            let first = depends.split([',', '|']).next()?;
            let name = first.split_whitespace().next()?.to_owned();
            wanted(&name).then_some(name)
        });
    let package = match from_meta {
        Some(name) => name,
        None => apt
            .package_names(&format!("linux-image-{}", series.release_prefix()))?
            .into_iter()
            .filter(|name| wanted(name))
            .max_by_key(|name| series.release_number(&name["linux-image-".len()..]))
            .with_context(|| format!("no {series} cloud kernel in {}", apt.archive.name))?,
    };
    let version = apt.show_field(&package, "Version")?;
    Ok((package, version))
}

/// Downloads and extracts `package` at `version` unless the cache has it.
fn fetch(series: Series, package: &str, version: &str) -> Result<Kernel> {
    let release = package["linux-image-".len()..].to_owned();
    let dir = kernels_dir().join(&release);
    let marker = format!("{package} {version}\n");
    if std::fs::read_to_string(dir.join(MARKER)).is_ok_and(|text| text == marker) {
        return Ok(Kernel {
            release,
            version: version.to_owned(),
            dir,
        });
    }
    println!("vm: downloading {package} {version}");
    let apt = Apt::configure(series.archive())?;
    // Per process: two VM tasks may fetch at once (the cache is shared by
    // every work tree); the last rename wins and both get the same files.
    let download = Scratch::new(kernels_dir().join(format!(".download-{}", std::process::id())))?;
    let download = &download.0;
    apt.download(&format!("{package}={version}"), download)?;
    let deb = std::fs::read_dir(download)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    let partial =
        Scratch::new(kernels_dir().join(format!("{release}.partial-{}", std::process::id())))?;
    let partial = &partial.0;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(partial))?;
    // The package ships no modules.dep (the postinst makes it); the guest
    // loads virtio-fs, overlayfs and the rest from this tree, so make it.
    let base = if partial.join("lib/modules").join(&release).is_dir() {
        partial.to_owned()
    } else {
        partial.join("usr")
    };
    run(Command::new("depmod").arg("-b").arg(&base).arg(&release))?;
    std::fs::write(partial.join(MARKER), &marker)?;
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(error) = std::fs::rename(partial, &dir) {
        // Fine when another task has just put the same kernel there.
        if !dir.join(MARKER).exists() {
            return Err(error)
                .with_context(|| format!("cannot move the kernel to {}", dir.display()));
        }
    }
    // Older kernels of the series are of no more use: each is ~100 MB.
    for old in cached(series) {
        if old.release != release {
            let _ = std::fs::remove_dir_all(&old.dir);
        }
    }
    Ok(Kernel {
        release,
        version: version.to_owned(),
        dir,
    })
}

/// A directory of our own, made empty, and removed when dropped (whatever
/// happened to the download or extraction in it).
struct Scratch(PathBuf);

impl Scratch {
    fn new(path: PathBuf) -> Result<Scratch> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The complete kernels of `series` in the cache, oldest first.
fn cached(series: Series) -> Vec<Kernel> {
    let Ok(entries) = std::fs::read_dir(kernels_dir()) else {
        return Vec::new();
    };
    let mut kernels: Vec<Kernel> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let release = entry.file_name().to_str()?.to_owned();
            if !series.is_release(&release) {
                return None;
            }
            let marker = std::fs::read_to_string(entry.path().join(MARKER)).ok()?;
            let version = marker.split_whitespace().nth(1)?.to_owned();
            Some(Kernel {
                release,
                version,
                dir: entry.path(),
            })
        })
        .collect();
    kernels.sort_by_key(|kernel| series.release_number(&kernel.release));
    kernels
}

/// apt with a configuration of our own for one Debian release.
struct Apt {
    archive: Archive,
    dir: PathBuf,
}

impl Apt {
    /// Writes the sources list for `archive`, on the mirrors that the
    /// system's apt uses for Debian and for Debian's security updates.
    fn configure(archive: Archive) -> Result<Apt> {
        let (main_mirror, security_mirror) = system_mirrors()?;
        let dir = vm_dir().join("apt").join(archive.name);
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut sources =
            String::from("# Written by cargo xtask (VM kernels); not the system's.\n");
        for (mirror, suites) in [
            (&main_mirror, archive.main_suites),
            (&security_mirror, archive.security_suites),
        ] {
            for suite in suites {
                sources.push_str(&format!(
                    "deb [signed-by={KEYRING}] {mirror} {suite} main\n"
                ));
            }
        }
        std::fs::write(dir.join("sources.list"), sources)?;
        Ok(Apt { archive, dir })
    }

    /// The options that point apt at this configuration only: our sources
    /// list and no other, our lists and caches, no pinning, and an empty
    /// dpkg status (nothing is installed from here).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let option = |key: &str, value: &Path| format!("{key}={}", value.display());
        for (key, value) in [
            ("Dir::Etc::SourceList", self.dir.join("sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".into()),
            ("Dir::Etc::Preferences", "/dev/null".into()),
            ("Dir::Etc::PreferencesParts", "/dev/null".into()),
            ("Dir::State::Lists", self.dir.join("lists")),
            ("Dir::State::status", "/dev/null".into()),
            ("Dir::Cache", self.dir.join("cache")),
        ] {
            command.arg("-o").arg(option(key, &value));
        }
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    fn update(&self) -> Result<()> {
        let output = self
            .command("apt-get")
            .args(["update", "-q", "-q"])
            .output()
            .context("apt-get update")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        // apt-get update exits 0 when a source failed; its lines say so.
        if !output.status.success() || stderr.lines().any(|line| line.starts_with("E:")) {
            bail!(
                "apt-get update for {} failed: {}",
                self.archive.name,
                stderr.trim()
            );
        }
        // A source that could not be reached is a warning to apt, which
        // goes on with the lists it had: the newest kernel may be missed.
        if let Some(line) = stderr.lines().find(|line| line.starts_with("W: Failed")) {
            eprintln!(
                "vm: warning: apt-get update for {}: {line}",
                self.archive.name
            );
        }
        Ok(())
    }

    /// A field of the candidate version's record of `package`.
    fn show_field(&self, package: &str, field: &str) -> Result<String> {
        let output = self
            .command("apt-cache")
            .args(["show", "--no-all-versions", package])
            .output()
            .context("apt-cache show")?;
        if !output.status.success() {
            bail!("no package {package} in {}", self.archive.name);
        }
        let prefix = format!("{field}: ");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
            .with_context(|| format!("{package} has no {field}"))
    }

    fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        let output = self
            .command("apt-cache")
            .args(["pkgnames", prefix])
            .output()
            .context("apt-cache pkgnames")?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    fn download(&self, package: &str, into: &Path) -> Result<()> {
        run(self
            .command("apt-get")
            // The download directory is root's, where apt's `_apt` sandbox
            // user cannot write.
            .args(["-o", "APT::Sandbox::User=root", "-q", "download", package])
            .current_dir(into))
    }
}

/// The Debian mirror and the Debian security mirror that the system's apt
/// is configured with (its index targets: `URI suite` pairs).
fn system_mirrors() -> Result<(String, String)> {
    let output = Command::new("apt-get")
        .args(["indextargets", "--format", "$(REPO_URI) $(RELEASE)"])
        .output()
        .context("apt-get indextargets")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut main = None;
    let mut security = None;
    for line in text.lines() {
        let Some((uri, suite)) = line.split_once(' ') else {
            continue;
        };
        let slot = if suite.ends_with("-security") {
            &mut security
        } else {
            &mut main
        };
        // Debian's own archives only (a vendor's repository is no mirror).
        let is_debian = uri.trim_end_matches('/').ends_with("/debian")
            || uri.trim_end_matches('/').ends_with("/debian-security");
        if slot.is_none() && is_debian {
            *slot = Some(uri.to_owned());
        }
    }
    match (main, security) {
        (Some(main), Some(security)) => Ok((main, security)),
        _ => bail!(
            "the system's apt sources have no Debian mirror and Debian security mirror \
             to fetch kernels from (apt-get indextargets)"
        ),
    }
}
