//! Developer tasks for consolegate, run as `cargo xtask <command>`.
//!
//! `cargo xtask test` is the one command that runs the whole suite on a fresh
//! Debian 12 machine, and the only thing `.ci/run` does. It installs what is
//! missing (`setup`), then runs rustfmt, clippy, `cargo test --workspace` and
//! every fuzz target for a bounded time, keeps going past a failed step so one
//! run shows every failure, and ends with a summary and a nonzero exit code if
//! any step failed.
//!
//! # Layout
//! - `setup`: Debian packages, rustup components, the nightly toolchain and
//!   cargo-fuzz; each installed only when missing.
//! - `guest`: Debian's kernel and busybox-static for the kTLS test's QEMU
//!   guest (`target/guest-kernel/`), fetched once.
//! - `fuzz`: builds the cargo-fuzz targets in `fuzz/` and runs each one for a
//!   bounded time from its committed seed corpus.
//! - `bench`: `cargo xtask bench`, the side-by-side benchmark (installs the
//!   peers, builds release binaries, runs `loadgen compare`).
//! - `steps`: running a command as a named step, section headers, the summary.
//! - `web`: the web console's npm packages (noVNC, xterm.js) in `web/`.

mod bench;
mod fuzz;
mod guest;
mod install;
mod setup;
mod steps;
mod web;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::steps::Steps;

/// Seconds each fuzz target runs for in `cargo xtask test`.
const DEFAULT_FUZZ_SECONDS: u64 = 20;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "consolegate developer tasks"
)]
struct Cli {
    /// Kill any step (cargo test, a fuzz run, ...) still running after this
    /// many seconds and count it as failed (0 = no limit; CI sets one).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 0)]
    step_timeout: u64,
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Run the whole suite: setup, rustfmt, clippy, cargo test, every fuzz target.
    Test {
        /// Seconds each fuzz target runs for (0 = only replay the corpus).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_FUZZ_SECONDS)]
        fuzz_seconds: u64,
        /// Do not install anything; assume the machine is already set up.
        #[arg(long)]
        skip_setup: bool,
    },
    /// Install what the suite needs (Debian packages, rustup components,
    /// nightly, cargo-fuzz), each only when missing.
    Setup,
    /// rustfmt --check and clippy -D warnings over the workspace.
    Lint,
    /// Build the release binary and install it as a systemd service (unit,
    /// config in /etc/consolegate unless present, system user).
    Install {
        /// Installation prefix of the binary.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Stage under this directory instead of the real root.
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
        /// Use this binary instead of building target/release/consolegate.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Install the web console's pinned npm packages (noVNC, xterm.js) into
    /// web/node_modules for the proxy build to embed (`npm ci`), if missing.
    WebAssets,
    /// Build the fuzz targets and run each (or one) for a bounded time.
    Fuzz {
        /// Seconds each target runs for (0 = only replay the corpus).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_FUZZ_SECONDS)]
        seconds: u64,
        /// Run only this target (default: all of them).
        target: Option<String>,
    },
    /// Benchmark consolegate side by side with direct, socat, haproxy, nginx
    /// and websockify; report in target/bench (see docs/benchmarking.md).
    Bench {
        /// The full run (5 runs, 2 GiB bulk, 1000 idle sessions) instead of the quick one.
        #[arg(long)]
        full: bool,
        /// Do not install the peers' Debian packages (missing peers are skipped).
        #[arg(long)]
        no_install: bool,
        /// Further `loadgen compare` flags, after `--` (e.g. -- --peers haproxy,consolegate).
        #[arg(last = true, value_name = "COMPARE_ARGS")]
        compare_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = repo_root();
    let timeout = (cli.step_timeout > 0).then(|| Duration::from_secs(cli.step_timeout));
    let mut steps = Steps::new(timeout);
    let outcome = match cli.command {
        Task::Test {
            fuzz_seconds,
            skip_setup,
        } => test(&root, &mut steps, fuzz_seconds, skip_setup),
        Task::Setup => setup::all(&root, &mut steps).and_then(|()| web::assets(&root, &mut steps)),
        Task::WebAssets => web::assets(&root, &mut steps),
        Task::Install {
            prefix,
            destdir,
            binary,
        } => install(&root, &mut steps, prefix, destdir, binary),
        Task::Lint => setup::rust_components(&mut steps).and_then(|()| lint(&root, &mut steps)),
        Task::Fuzz { seconds, target } => setup::fuzz_tools(&mut steps)
            .and_then(|()| fuzz::run(&root, &mut steps, seconds, target.as_deref())),
        Task::Bench {
            full,
            no_install,
            compare_args,
        } => bench::run(&root, &mut steps, full, !no_install, &compare_args),
    };
    if let Err(err) = outcome {
        steps.abort(&err);
    }
    steps.finish()
}

/// `cargo xtask test`: everything, in order, keeping going past failed steps.
fn test(root: &Path, steps: &mut Steps, fuzz_seconds: u64, skip_setup: bool) -> Result<()> {
    // A failed install is recorded (and fails the run), but the steps that do
    // not need it still run, so one CI log shows everything that is wrong.
    let mut fuzz_ready = true;
    if !skip_setup {
        let _ = setup::debian_packages(steps);
        let _ = guest::kernel(root, steps);
        let _ = setup::rust_components(steps);
        fuzz_ready = setup::fuzz_tools(steps).is_ok();
        // Before the first build: the proxy embeds these (proxy/build.rs).
        let _ = web::assets(root, steps);
    }
    lint(root, steps)?;
    steps.run(
        "cargo test",
        cargo(root).args(["test", "--workspace", "--no-fail-fast"]),
    );
    if !fuzz_ready {
        let why = "not run: the fuzz toolchain could not be set up".to_owned();
        steps.record("fuzz", Duration::ZERO, Some(why), None);
        return Ok(());
    }
    fuzz::run(root, steps, fuzz_seconds, None)
}

/// `cargo xtask install`: build (unless a binary is given), then install.
fn install(
    root: &Path,
    steps: &mut Steps,
    prefix: PathBuf,
    destdir: PathBuf,
    binary: Option<PathBuf>,
) -> Result<()> {
    let binary = match binary {
        Some(b) => b,
        None => {
            let built = steps.run(
                "build release binary",
                cargo(root).args(["build", "--release", "-p", "consolegate"]),
            );
            if !built {
                anyhow::bail!("the release build failed");
            }
            root.join("target/release/consolegate")
        }
    };
    steps.header("install");
    let started = std::time::Instant::now();
    let plan = install::Plan {
        repo: root.to_path_buf(),
        binary,
        prefix,
        destdir,
    };
    let failure = install::install(&plan).err().map(|e| format!("{e:#}"));
    steps.record("install", started.elapsed(), failure, None);
    Ok(())
}

/// `cargo xtask lint`: rustfmt over the workspace and the fuzz crate, then clippy.
fn lint(root: &Path, steps: &mut Steps) -> Result<()> {
    // rustfmt colours its diff even into a pipe or a CI log.
    let color = if std::io::stdout().is_terminal() {
        "auto"
    } else {
        "never"
    };
    let check = ["--", "--check", "--color", color];
    steps.run("rustfmt", cargo(root).args(["fmt", "--all"]).args(check));
    let fuzz_manifest = ["fmt", "--manifest-path", "fuzz/Cargo.toml"];
    steps.run(
        "rustfmt (fuzz)",
        cargo(root).args(fuzz_manifest).args(check),
    );
    let deny_warnings = ["--", "-D", "warnings"];
    let clippy = ["clippy", "--workspace", "--all-targets"];
    steps.run("clippy", cargo(root).args(clippy).args(deny_warnings));
    Ok(())
}

/// The cargo that runs this xtask (same toolchain), in the repository root.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// The workspace root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
