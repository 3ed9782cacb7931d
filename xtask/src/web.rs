//! `cargo xtask web-assets`: installs the web console's browser libraries
//! (noVNC and xterm.js, exact versions in `web/package.json`, integrity
//! hashes in `web/package-lock.json`) into `web/node_modules` with
//! `npm ci --ignore-scripts`, only when they are missing or at another
//! version. `proxy/build.rs` embeds them into the binary; a proxy built
//! without them serves a page that says to run this.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::steps::{Steps, display};

const STEP: &str = "setup: web console assets (npm ci in web/)";

/// Installs the pinned packages if needed; recorded as one step.
pub fn assets(root: &Path, steps: &mut Steps) -> Result<()> {
    steps.header(STEP);
    let started = Instant::now();
    match install(root, steps) {
        Ok(note) => {
            println!("xtask: {note}");
            steps.record(STEP, started.elapsed(), None, Some(note));
            Ok(())
        }
        Err(err) => {
            steps.record(STEP, started.elapsed(), Some(format!("{err:#}")), None);
            Err(err.context(format!("`{STEP}` failed")))
        }
    }
}

fn install(root: &Path, steps: &Steps) -> Result<String> {
    let web = root.join("web");
    let pinned = pinned(&web)?;
    let missing = stale(&web, &pinned);
    if missing.is_empty() {
        return Ok(format!("present: {}", list(&pinned)));
    }
    println!(
        "xtask: web console packages to install: {}",
        missing.join(", ")
    );
    let npm_present = Command::new("npm")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !npm_present {
        bail!(
            "npm not found on PATH: install Node.js with npm (e.g. Debian's `npm` package), \
             then run `cargo xtask web-assets`"
        );
    }
    let mut cmd = Command::new("npm");
    cmd.current_dir(&web)
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"]);
    println!("$ (cd web && {})", display(&cmd));
    steps.status(&mut cmd).map_err(|why| {
        anyhow::anyhow!(
            "`npm ci` in web/ failed: {why} (needs Node.js and npm on PATH and the npm registry)"
        )
    })?;
    let still = stale(&web, &pinned);
    if !still.is_empty() {
        bail!("npm ci left these missing: {}", still.join(", "));
    }
    Ok(format!("installed {}", list(&pinned)))
}

/// `(name, version)` of web/package.json's dependencies (exact versions).
fn pinned(web: &Path) -> Result<Vec<(String, String)>> {
    let path = web.join("package.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let deps = v["dependencies"]
        .as_object()
        .with_context(|| format!("{}: no dependencies", path.display()))?;
    deps.iter()
        .map(|(k, v)| {
            let ver = v.as_str().unwrap_or("");
            if ver.is_empty()
                || !ver
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
            {
                bail!(
                    "{}: {k} must be pinned to an exact version, not {v}",
                    path.display()
                );
            }
            Ok((k.clone(), ver.to_owned()))
        })
        .collect()
}

/// The pinned packages that are not installed at their version.
fn stale(web: &Path, pinned: &[(String, String)]) -> Vec<String> {
    pinned
        .iter()
        .filter(|(name, ver)| installed(web, name).as_deref() != Some(ver.as_str()))
        .map(|(name, ver)| format!("{name}@{ver}"))
        .collect()
}

fn installed(web: &Path, name: &str) -> Option<String> {
    let text =
        std::fs::read_to_string(web.join("node_modules").join(name).join("package.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["version"].as_str().map(str::to_owned)
}

fn list(pinned: &[(String, String)]) -> String {
    pinned
        .iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect::<Vec<_>>()
        .join(" ")
}
