//! The harness for omegi's end-to-end tests (`tests/e2e/*.rs`, which run as
//! integration tests of `omegi-agent` so that they use the freshly built
//! agent).
//!
//! - [`fixtures`]: builds the programs in `tests/fixtures` (C, C++, Rust) with
//!   debug info, as PIE and non-PIE executables.
//! - [`run`]: runs a fixture with and without the agent and reads back the
//!   spans it exported (`--format json`).
//! - [`spans`]: exported spans and the call trees they form.
//! - [`otlp`]: an OTLP collector (gRPC and HTTP/protobuf) that keeps what it
//!   receives.
//! - [`kafka`]: a tansu Kafka broker on loopback, and reading topics back.
//! - [`peers`]: real HTTP peers: the OpenTelemetry Python client, server and
//!   relay, and the `http_server` / `http_client` fixtures.

pub mod fixtures;
pub mod kafka;
pub mod otlp;
pub mod peers;
pub mod run;
pub mod spans;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// The repository's `tests/` directory.
pub fn tests_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where `cargo xtask setup` installs the test tools: `OMEGI_TOOLS_DIR`, or
/// `~/.local/share/omegi-tools` (kept in step with xtask's `setup::tools_dir`).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("OMEGI_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share/omegi-tools")
        })
}

/// The workspace's target directory (`CARGO_TARGET_DIR` is honoured).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tests_dir().join("../target"))
}

/// How many times longer than on the host the harness waits for a run to
/// end: `OMEGI_TEST_TIME_SCALE` (a whole number, default 1). `cargo xtask
/// test --kernel` sets it, since everything in a VM under software emulation
/// takes 10 to 50 times longer.
pub fn time_scale() -> u32 {
    std::env::var("OMEGI_TEST_TIME_SCALE")
        .ok()
        .and_then(|text| text.parse().ok())
        .filter(|&scale| scale >= 1)
        .unwrap_or(1)
}

/// `timeout` stretched by [`time_scale`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout * time_scale()
}

/// A fresh scratch directory under the target directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = target_dir().join("omegi-tests").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Panics with a clear message unless the tests run as root: they attach
/// real uprobes in the real kernel.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc_geteuid() };
    assert_eq!(
        euid, 0,
        "omegi's end-to-end tests attach real uprobes and must run as root (sudo cargo xtask test)"
    );
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
