//! `cargo xtask bench`: the side-by-side benchmark in one command. Installs
//! the peers it compares against (Debian packages, each only when missing),
//! builds consolegate and the load generator in release mode, and runs
//! `loadgen compare` (quick by default), which writes
//! `target/bench/report.{json,md}` and SVG plots. See docs/benchmarking.md.
//!
//! Unless told otherwise (`-- --tcp-cc NAME`), the comparison runs with
//! cubic where the machine uses another TCP congestion control and this
//! process may switch it: on loopback a pacing sender (BBR) sends part of
//! a flow from its timer on the other CPU, the segments overtake each
//! other, and every relay is capped alike, haproxy included, so the bulk
//! rows would measure that rather than the proxies. `loadgen compare`
//! restores the machine's own at the end, also on a signal.
//!
//! The bulk client discards plaintext payload in the kernel (`--discard`):
//! on a 2-CPU machine its copy otherwise fills the load CPU before the
//! fastest proxies are at their limit (the report's `load busy` at 100%),
//! and the bulk table measures the client. Every row gets the same client.

use std::fs;
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
    if !extra.iter().any(|a| a == "--discard") {
        compare.arg("--discard");
    }
    let sysctl = |name: &str| fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok();
    let current = sysctl("tcp_congestion_control");
    let may_switch = fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/net/ipv4/tcp_congestion_control")
        .is_ok();
    if let Some(cc) = loopback_cc(
        extra,
        current.as_deref(),
        sysctl("tcp_available_congestion_control").as_deref(),
        may_switch,
    ) {
        println!(
            "xtask: bench runs with TCP congestion control {cc}, not the machine's {} \
             (restored after; `-- --tcp-cc {}` keeps it)",
            current.as_deref().unwrap_or("?").trim(),
            current.as_deref().unwrap_or("NAME").trim(),
        );
        compare.args(["--tcp-cc", cc]);
    }
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

/// The congestion control to run the comparison with when `extra` names
/// none: cubic, if the machine's `current` one is another, cubic is
/// `available` and this process `may_switch` the setting (else the
/// machine's, and the report says which it was).
fn loopback_cc(
    extra: &[String],
    current: Option<&str>,
    available: Option<&str>,
    may_switch: bool,
) -> Option<&'static str> {
    let named = extra
        .iter()
        .any(|a| a == "--tcp-cc" || a.starts_with("--tcp-cc="));
    let current = current?.trim();
    let has_cubic = available?.split_whitespace().any(|c| c == "cubic");
    (!named && may_switch && has_cubic && current != "cubic").then_some("cubic")
}

#[cfg(test)]
mod tests {
    use super::loopback_cc;

    #[test]
    fn cubic_unless_named_already_in_use_unavailable_or_not_switchable() {
        let none: Vec<String> = Vec::new();
        let avail = Some("reno cubic bbr\n");
        assert_eq!(
            loopback_cc(&none, Some("bbr\n"), avail, true),
            Some("cubic")
        );
        assert_eq!(loopback_cc(&none, Some("cubic\n"), avail, true), None);
        assert_eq!(loopback_cc(&none, Some("bbr\n"), avail, false), None);
        assert_eq!(
            loopback_cc(&none, Some("bbr"), Some("reno bbr"), true),
            None
        );
        assert_eq!(loopback_cc(&none, None, avail, true), None);
        assert_eq!(loopback_cc(&none, Some("bbr"), None, true), None);
        for named in [
            vec!["--tcp-cc".to_owned(), "bbr".to_owned()],
            vec![
                "--runs".to_owned(),
                "1".to_owned(),
                "--tcp-cc=bbr".to_owned(),
            ],
        ] {
            assert_eq!(
                loopback_cc(&named, Some("bbr"), avail, true),
                None,
                "{named:?}"
            );
        }
    }
}
