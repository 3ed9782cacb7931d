//! The cargo-fuzz targets in `fuzz/`: build them once, then run each for a
//! bounded time. Each target starts from its committed seed corpus
//! (`fuzz/corpus/<target>/`, read only) plus a working corpus that libFuzzer
//! grows under `fuzz/target/xtask-corpus/<target>/` (not committed), so a run
//! never dirties the work tree. libFuzzer's chatter goes to a log file whose
//! tail is printed; a crash prints more and leaves the input in
//! `fuzz/artifacts/<target>/`.

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::setup::FUZZ_TOOLCHAIN;
use crate::steps::{Steps, display};

/// Seconds one input may take before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;

/// Run `only` (or every target) for `seconds` each; 0 only replays the corpus.
pub fn run(root: &Path, steps: &mut Steps, seconds: u64, only: Option<&str>) -> Result<()> {
    let all = targets(root)?;
    let selected: Vec<String> = match only {
        None => all,
        Some(t) if all.iter().any(|known| known == t) => vec![t.to_owned()],
        Some(t) => bail!("no fuzz target `{t}`; there are: {}", all.join(", ")),
    };
    let mut build = nightly_cargo(root);
    build.args(["fuzz", "build"]);
    if let Some(t) = only {
        build.arg(t);
    }
    if !steps.run("fuzz: build", &mut build) {
        // Every run would fail the same way; the build failure is recorded.
        return Ok(());
    }
    for target in &selected {
        run_target(root, steps, target, seconds)?;
    }
    Ok(())
}

/// The fuzz targets: the file stems in `fuzz/fuzz_targets/`, sorted.
fn targets(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    if names.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    names.sort();
    Ok(names)
}

fn run_target(root: &Path, steps: &mut Steps, target: &str, seconds: u64) -> Result<()> {
    let name = if seconds == 0 {
        format!("fuzz: {target} (corpus replay)")
    } else {
        format!("fuzz: {target} ({seconds} s)")
    };
    steps.header(&name);
    let seeds = root.join("fuzz/corpus").join(target);
    let work = root.join("fuzz/target/xtask-corpus").join(target);
    let logs = root.join("fuzz/target/xtask-logs");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let started = Instant::now();
    if !seeds.is_dir() {
        let why = format!("no seed corpus at {}", seeds.display());
        steps.record(&name, started.elapsed(), Some(why), None);
        return Ok(());
    }

    let mut cmd = nightly_cargo(root);
    cmd.args(["fuzz", "run", target])
        .arg(&work)
        .arg(&seeds)
        .arg("--");
    if seconds == 0 {
        cmd.arg("-runs=0");
    } else {
        cmd.arg(format!("-max_total_time={seconds}"));
    }
    cmd.arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-rss_limit_mb=2048");
    println!("$ {}", display(&cmd));
    println!("xtask: libFuzzer output goes to {}", log_path.display());

    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let status = steps.status(cmd.stdout(log.try_clone()?).stderr(log));
    let took = started.elapsed();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let failure = status
        .err()
        .map(|why| format!("{why}; log {}", log_path.display()));
    if failure.is_some() {
        print_tail(&text, 80);
    } else {
        print_stats(&text);
    }
    let note = runs(&text).map(|n| format!("{n} runs"));
    steps.record(&name, took, failure, note);
    Ok(())
}

/// `cargo +nightly` in the repository root, with the variables the stable
/// cargo that started xtask set removed so they cannot pin the toolchain.
fn nightly_cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{FUZZ_TOOLCHAIN}"))
        .current_dir(root)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    cmd
}

fn print_tail(text: &str, lines: usize) {
    let all: Vec<&str> = text.lines().collect();
    for line in &all[all.len().saturating_sub(lines)..] {
        println!("  | {line}");
    }
}

/// libFuzzer's coverage at start and end, and its closing line.
fn print_stats(text: &str) {
    let interesting = |l: &&str| {
        let stat = l.starts_with('#') && (l.contains("\tINITED ") || l.contains("\tDONE "));
        stat || l.starts_with("Done ")
    };
    for line in text.lines().filter(interesting) {
        println!("  | {line}");
    }
}

/// libFuzzer's closing "Done N runs in S second(s)".
fn runs(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_run_count_from_libfuzzers_last_line() {
        let log = "#2\tINITED cov: 5\n#99\tDONE   cov: 9\nDone 99 runs in 2 second(s)\n";
        assert_eq!(runs(log), Some(99));
        assert_eq!(runs("==123==ERROR: AddressSanitizer\n"), None);
    }

    #[test]
    fn finds_the_committed_targets_with_seed_corpora() {
        let root = crate::repo_root();
        let targets = targets(&root).unwrap();
        for t in ["http_head", "token_file", "ws_frame"] {
            assert!(targets.iter().any(|have| have == t), "{targets:?}");
        }
        for t in &targets {
            let seeds = root.join("fuzz/corpus").join(t);
            assert!(
                fs::read_dir(&seeds).is_ok_and(|mut d| d.next().is_some()),
                "{t}: no seeds"
            );
        }
    }
}
