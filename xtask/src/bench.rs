//! `cargo xtask bench`: the side-by-side benchmark in one command. Installs
//! the peers it compares against (Debian packages, each only when missing),
//! builds consolegate and the load generator in release mode, and runs
//! `loadgen compare` (quick by default), which writes
//! `target/bench/report.{json,md}` and SVG plots. See docs/benchmarking.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::setup;
use crate::steps::Steps;

/// What the comparison runs against, one a line with what it provides. Not
/// in the test suite's list: only this command needs them.
pub const PEER_PACKAGES: &[&str] = &[
    "haproxy",             // mode tcp and TLS-terminating
    "nginx",               // the stream proxy, plain and TLS-terminating
    "libnginx-mod-stream", // nginx's stream module (a separate package in Debian)
    "websockify",          // the WebSocket proxy noVNC ships with
    "socat",               // the simplest fork-per-connection relay
];

/// The target directory cargo builds into.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
}

/// Install, build, compare. `extra` goes to `loadgen compare` as is.
pub fn run(
    root: &Path,
    steps: &mut Steps,
    full: bool,
    install: bool,
    extra: &[String],
) -> Result<()> {
    if install {
        // A failed install is recorded; compare then skips (and names) the
        // peers that are missing and still measures the rest.
        let _ = setup::install_debian(steps, "bench: peer packages", PEER_PACKAGES);
    }
    let built = steps.run(
        "bench: release build",
        crate::cargo(root).args([
            "build",
            "--release",
            "-p",
            "consolegate",
            "-p",
            "consolegate-bench",
        ]),
    );
    if !built {
        return Ok(());
    }
    let target = target_dir(root);
    let out = target.join("bench");
    let mut compare = Command::new(target.join("release").join("loadgen"));
    compare
        .current_dir(root)
        .arg("compare")
        .arg(if full { "--full" } else { "--quick" })
        .arg("--consolegate")
        .arg(target.join("release").join("consolegate"))
        .arg("--out")
        .arg(&out)
        .args(extra);
    if steps.run(
        if full {
            "bench: compare (full)"
        } else {
            "bench: compare (quick)"
        },
        &mut compare,
    ) {
        println!("xtask: report in {}", out.join("report.md").display());
    }
    Ok(())
}
