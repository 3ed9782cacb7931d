//! The kTLS guest driver: runs as root inside the QEMU guest that
//! `tests/tests/ktls_guest.rs` boots with Debian's kernel (kTLS as a
//! module), started by the initramfs' `/init`. It
//!
//! 1. checks that the `tls` module is loaded and that the kernel takes kTLS
//!    keys (`TCP_ULP "tls"` + `TLS_TX` on connected sockets, through the
//!    `ktls` crate), and moves bytes over a rustls pair handed to kTLS on
//!    both ends, TLS 1.3 and 1.2 (`direct.rs`): the guest itself is proven;
//! 2. runs the real consolegate binary (`$CONSOLEGATE_BIN`) with a TLS
//!    tenant front end, a CONNECT listener and a compute profile with a
//!    private CA and client certificate, in front of scripted TLS consoles
//!    (our stand-in for QEMU's TLS serial chardev, which cannot run in this
//!    guest), and pushes random payloads both ways over a TLS WebSocket and
//!    a CONNECT tunnel with a half-close, byte for byte (`sessions.rs`);
//! 3. reads from the proxy's log which data path each session ran on, and
//!    fails unless it is `ktls+splice`;
//! 4. runs two sessions in which the tenant and the console send TLS 1.3
//!    KeyUpdates (`rekey.rs`): followed on a kernel that renews kTLS keys
//!    (6.14 and later), ending just that session on one that cannot;
//! 5. runs a VNC session whose console sends a KeyUpdate inside its
//!    VeNCrypt SecurityResult, so that the proxy holds the answer at the
//!    hand-over (`handover.rs`): carried byte for byte on every kernel;
//! 6. runs two sessions through a proxy that renews kTLS transmit keys
//!    every few dozen records (`limit.rs`): renewed where the kernel takes
//!    new keys, each session ended at the limit where it cannot;
//! 7. holds a few hundred idle TLS WebSocket sessions (TLS on the compute
//!    leg too) through a proxy with kTLS and one without, and reports the
//!    proxy's memory per session for each (`idle.rs`).
//!
//! Every line meant for the test starts with `GUEST-KTLS`; the last one is
//! `GUEST-KTLS-RESULT: PASS` or `GUEST-KTLS-RESULT: FAIL <reason>`.

mod direct;
mod handover;
mod idle;
mod limit;
mod rekey;
mod sessions;

use std::process::ExitCode;

use anyhow::Context as _;

/// A measurement or fact for the test to print.
fn report(key: &str, value: impl std::fmt::Display) {
    println!("GUEST-KTLS: {key} {value}");
}

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("GUEST-KTLS-RESULT: FAIL tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => {
            println!("GUEST-KTLS-RESULT: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("GUEST-KTLS-RESULT: FAIL {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease (is /proc mounted?)")?;
    report("kernel", release.trim());
    anyhow::ensure!(
        std::path::Path::new("/sys/module/tls").exists(),
        "the tls module is not loaded (no /sys/module/tls): see the insmod lines above"
    );
    let renews = renews_keys(release.trim())?;
    report(
        "kernel-rekey",
        if renews {
            "expected (6.14 or later): KeyUpdates must be followed"
        } else {
            "not expected (before 6.14): a KeyUpdate must end the session"
        },
    );
    doctor()?;
    direct::probe().await?;
    direct::transfer().await?;
    sessions::through_proxy(renews).await
}

/// Whether a kernel of this release renews kTLS keys (TLS 1.3 KeyUpdate
/// support came in Linux 6.14).
fn renews_keys(release: &str) -> anyhow::Result<bool> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || -> anyhow::Result<u32> {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("kernel release {release:?} is not MAJOR.MINOR..."))
    };
    let (major, minor) = (next()?, next()?);
    Ok((major, minor) >= (6, 14))
}

/// `consolegate doctor` in the guest: its kTLS lines, for the record.
fn doctor() -> anyhow::Result<()> {
    let bin = std::env::var_os("CONSOLEGATE_BIN").context("CONSOLEGATE_BIN is not set")?;
    let out = std::process::Command::new(bin)
        .arg("doctor")
        .output()
        .context("running consolegate doctor")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| l.contains("kTLS")) {
        report("doctor", line.trim());
    }
    Ok(())
}
