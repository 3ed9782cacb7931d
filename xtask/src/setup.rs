//! Installs what the suite needs, each thing only when it is missing and
//! without asking anything (CI has no standard input): Debian packages, the
//! rustup components for linting, the nightly toolchain and cargo-fuzz, and
//! the guest kernel of the kTLS test (`guest.rs`).
//! Run twice, the second run installs nothing and touches no network.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::steps::{Steps, display};

/// Debian packages the suite needs, one a line with the reason beside it. To
/// need another package (`redis-server`, `clang-19`, `libbpf-dev`,
/// `chromium`, ...), add a line; `apt-get update` runs only when one is missing.
/// They are installed without their Recommends (qemu-system-x86's would pull
/// in GTK): the VNC server, SPICE (qemu-system-common) and SeaBIOS the tests
/// use are hard dependencies. Name a recommended package here if one is needed.
const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",     // integration tests run real QEMU VNC and serial consoles
    "libspice-server1",    // QEMU's SPICE server (tests/tests/spice.rs)
    "sasl2-bin",           // saslpasswd2: a sasldb user for QEMU's VNC SASL (X509SASL tests)
    "libsasl2-modules",    // the SCRAM plugin QEMU's SASL server loads (a Recommends, so named)
    "libsasl2-modules-db", // the sasldb auxprop plugin
    "binutils",            // as/objcopy: the boot-sector test reassembles tests/src/boot.S
    "clang-19",            // ebpf/build.rs compiles the C eBPF allow-list programs
    "libbpf-dev",          // bpf/bpf_helpers.h for those programs
    "systemd",             // systemd-analyze verify checks the unit (tests/tests/systemd.rs)
    "haproxy", // a real load balancer: PROXY protocol and X-Forwarded-For (tests/tests/forwarding.rs)
    "redis-server", // the shared token store of a proxy fleet (tests/tests/tokens.rs)
    "chromium", // headless browser: tests/tests/web_console.rs opens the console pages
    "socat",   // bench/tests/smoke.rs runs the compare harness through socat too
];

/// rustup components of the active toolchain, by the cargo subcommand that
/// shows they are there.
const RUST_COMPONENTS: &[(&str, &str)] = &[("clippy", "clippy"), ("rustfmt", "fmt")];

/// The toolchain cargo-fuzz builds with (it needs -Z sanitizer flags).
pub const FUZZ_TOOLCHAIN: &str = "nightly";

/// cargo-fuzz, at the version the fuzz targets were written against.
const CARGO_FUZZ: &str = "cargo-fuzz@0.13.2";

/// Everything: `cargo xtask setup`. Keeps going past a failed install (it is
/// recorded, and fails the run) so one run shows everything that is missing.
pub fn all(root: &std::path::Path, steps: &mut Steps) -> Result<()> {
    let _ = debian_packages(steps);
    let _ = crate::guest::kernel(root, steps);
    let _ = rust_components(steps);
    let _ = fuzz_tools(steps);
    Ok(())
}

/// The Debian packages in [`DEBIAN_PACKAGES`].
pub fn debian_packages(steps: &mut Steps) -> Result<()> {
    install_debian(steps, "setup: debian packages", DEBIAN_PACKAGES)
}

/// Installs the missing ones of `packages` (without Recommends) as one step.
pub fn install_debian(steps: &mut Steps, name: &str, packages: &[&str]) -> Result<()> {
    step(steps, name, || {
        if !succeeds(Command::new("dpkg-query").arg("--version")) {
            println!(
                "xtask: no dpkg here; install these yourself: {}",
                packages.join(" ")
            );
            return Ok("skipped: not a Debian system".to_owned());
        }
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|n| !deb_installed(n))
            .collect();
        if missing.is_empty() {
            return Ok(format!("present: {}", packages.join(" ")));
        }
        println!("xtask: missing Debian packages: {}", missing.join(" "));
        let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
        run(apt()?.arg("-q").args(lock_wait).arg("update"))?;
        run(apt()?
            .args(["-q", "-y", "--no-install-recommends"])
            .args(lock_wait)
            .arg("install")
            .args(&missing))?;
        let still: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|n| !deb_installed(n))
            .collect();
        if !still.is_empty() {
            bail!("apt-get install left these missing: {}", still.join(" "));
        }
        Ok(format!("installed {}", missing.join(" ")))
    })
}

/// clippy and rustfmt for the active toolchain.
pub fn rust_components(steps: &mut Steps) -> Result<()> {
    step(steps, "setup: rustup components", || {
        let missing: Vec<&str> = RUST_COMPONENTS
            .iter()
            .filter(|(_, sub)| !succeeds(Command::new(cargo()).args([sub, "--version"])))
            .map(|(component, _)| *component)
            .collect();
        if missing.is_empty() {
            return Ok("clippy, rustfmt present".to_owned());
        }
        run(Command::new("rustup")
            .args(["component", "add"])
            .args(&missing))
        .context("installing rustup components (is rustup on PATH?)")?;
        Ok(format!("installed {}", missing.join(", ")))
    })
}

/// The nightly toolchain and cargo-fuzz.
pub fn fuzz_tools(steps: &mut Steps) -> Result<()> {
    step(steps, "setup: nightly toolchain", || {
        let list = output(Command::new("rustup").args(["toolchain", "list"]))
            .context("listing rustup toolchains (is rustup on PATH?)")?;
        let prefix = format!("{FUZZ_TOOLCHAIN}-");
        if list
            .lines()
            .any(|l| l.starts_with(&prefix) || l.trim() == FUZZ_TOOLCHAIN)
        {
            return Ok(format!("{FUZZ_TOOLCHAIN} present"));
        }
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            FUZZ_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
        Ok(format!("installed {FUZZ_TOOLCHAIN}"))
    })?;
    step(steps, "setup: cargo-fuzz", || {
        if succeeds(Command::new(cargo()).args(["fuzz", "--version"])) {
            return Ok("present".to_owned());
        }
        run(Command::new(cargo()).args(["install", "--locked", CARGO_FUZZ]))?;
        Ok(format!("installed {CARGO_FUZZ}"))
    })
}

/// Run one setup step: header, time, outcome. A failed setup step stops the run.
pub(crate) fn step(
    steps: &mut Steps,
    name: &str,
    f: impl FnOnce() -> Result<String>,
) -> Result<()> {
    steps.header(name);
    let started = Instant::now();
    match f() {
        Ok(note) => {
            println!("xtask: {note}");
            steps.record(name, started.elapsed(), None, Some(note));
            Ok(())
        }
        Err(err) => {
            steps.record(name, started.elapsed(), Some(format!("{err:#}")), None);
            Err(err.context(format!("`{name}` failed")))
        }
    }
}

/// apt-get, through `sudo -n` when we are not root.
pub(crate) fn apt() -> Result<Command> {
    let uid = output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() == "0" {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        return Ok(cmd);
    }
    if !succeeds(Command::new("sudo").args(["-n", "true"])) {
        bail!("installing Debian packages needs root (or password-less sudo)");
    }
    let mut cmd = Command::new("sudo");
    cmd.args(["-n", "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
    Ok(cmd)
}

fn deb_installed(name: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_ok_and(|status| status.trim() == "install ok installed")
}

/// The cargo that runs this xtask.
fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Run a command, its output going through; an error unless it succeeds.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", display(cmd));
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

/// Whether a command runs and succeeds, with its output hidden.
pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command's standard output, if it succeeds.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", display(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
