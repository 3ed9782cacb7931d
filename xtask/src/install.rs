//! `cargo xtask install`: installs consolegate as a systemd service.
//!
//! - the release binary to `<prefix>/bin/consolegate`;
//! - the unit to `/etc/systemd/system/consolegate.service` (ExecStart
//!   pointing at that binary);
//! - `/etc/consolegate/consolegate.toml` and `tokens.toml` from
//!   `proxy/dist/`, only when they do not exist (an operator's files are
//!   never overwritten);
//! - the `consolegate` system user, when installing to the real root;
//! - `systemctl daemon-reload` when systemd runs the machine.
//!
//! `--destdir` stages everything under another root (packaging, tests).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// What to install where.
#[derive(Debug)]
pub struct Plan {
    pub repo: PathBuf,
    pub binary: PathBuf,
    pub prefix: PathBuf,
    pub destdir: PathBuf,
}

/// One installed (or kept) file, for the summary.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Installed(PathBuf),
    Kept(PathBuf),
}

fn under(destdir: &Path, abs: &Path) -> PathBuf {
    destdir.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// The unit text with ExecStart/ExecStartPre pointing at `bin`.
pub fn unit_text(template: &str, bin: &Path) -> String {
    template.replace("/usr/local/bin/consolegate", &bin.display().to_string())
}

fn copy_mode(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Write a sibling then rename: replacing a running binary in place
    // would fail with ETXTBSY.
    let tmp = to.with_extension("xtask-new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(())
}

fn write_mode(to: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Installs the files of `plan`; returns what happened to each.
pub fn files(plan: &Plan) -> Result<Vec<Outcome>> {
    let dist = plan.repo.join("proxy/dist");
    let mut done = Vec::new();
    let bin_abs = plan.prefix.join("bin/consolegate");
    let bin = under(&plan.destdir, &bin_abs);
    copy_mode(&plan.binary, &bin, 0o755)?;
    done.push(Outcome::Installed(bin));

    let template = std::fs::read_to_string(dist.join("consolegate.service"))
        .context("reading proxy/dist/consolegate.service")?;
    let unit = under(
        &plan.destdir,
        Path::new("/etc/systemd/system/consolegate.service"),
    );
    write_mode(&unit, &unit_text(&template, &bin_abs), 0o644)?;
    done.push(Outcome::Installed(unit));

    for name in ["consolegate.toml", "tokens.toml"] {
        let to = under(&plan.destdir, &Path::new("/etc/consolegate").join(name));
        if to.exists() {
            done.push(Outcome::Kept(to));
            continue;
        }
        let text = std::fs::read_to_string(dist.join(name))
            .with_context(|| format!("reading proxy/dist/{name}"))?;
        // Readable by the service's group only: tokens are secrets.
        write_mode(&to, &text, 0o640)?;
        done.push(Outcome::Installed(to));
    }
    Ok(done)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The `consolegate` system user and group, and group ownership of the
/// config directory (the service reads it as that user).
fn system_user() -> Result<()> {
    let exists = Command::new("id")
        .arg("consolegate")
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        println!("xtask: user consolegate exists");
    } else {
        run(Command::new("useradd").args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/var/lib/consolegate",
            "--shell",
            "/usr/sbin/nologin",
            "consolegate",
        ]))?;
        println!("xtask: created system user consolegate");
    }
    run(Command::new("chgrp").args(["-R", "consolegate", "/etc/consolegate"]))?;
    run(Command::new("chmod").args(["0750", "/etc/consolegate"]))
}

/// `cargo xtask install`.
pub fn install(plan: &Plan) -> Result<()> {
    let real_root = plan.destdir == Path::new("/");
    if real_root && !is_root() {
        bail!("installing to / needs root (or use --destdir DIR to stage)");
    }
    for o in files(plan)? {
        match o {
            Outcome::Installed(p) => println!("xtask: installed {}", p.display()),
            Outcome::Kept(p) => println!("xtask: kept existing {}", p.display()),
        }
    }
    if !real_root {
        return Ok(());
    }
    system_user()?;
    if Path::new("/run/systemd/system").is_dir() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        println!(
            "xtask: next: edit /etc/consolegate/consolegate.toml and tokens.toml, then\n  \
             systemctl enable --now consolegate && systemctl status consolegate"
        );
    } else {
        println!(
            "xtask: systemd does not run this machine: the unit is installed but not \
             loaded; start the proxy by hand with\n  \
             sudo -u consolegate {} serve --config /etc/consolegate/consolegate.toml",
            plan.prefix.join("bin/consolegate").display()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    #[test]
    fn stages_binary_unit_and_config_and_keeps_existing_config() {
        let dest = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dest);
        let fake_bin = dest.join("built-consolegate");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(&fake_bin, b"#!/bin/sh\n").unwrap();
        let plan = Plan {
            repo: repo(),
            binary: fake_bin,
            prefix: PathBuf::from("/opt/cg"),
            destdir: dest.clone(),
        };
        let first = files(&plan).unwrap();
        assert!(first.iter().all(|o| matches!(o, Outcome::Installed(_))));
        let unit =
            std::fs::read_to_string(dest.join("etc/systemd/system/consolegate.service")).unwrap();
        assert!(unit.contains("ExecStart=/opt/cg/bin/consolegate serve"));
        assert!(!unit.contains("/usr/local/bin"));
        assert!(dest.join("opt/cg/bin/consolegate").is_file());

        // An operator's edited config survives a second install.
        let cfg = dest.join("etc/consolegate/consolegate.toml");
        std::fs::write(&cfg, "# mine\n").unwrap();
        let second = files(&plan).unwrap();
        assert!(second.contains(&Outcome::Kept(cfg.clone())));
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# mine\n");
        std::fs::remove_dir_all(&dest).unwrap();
    }
}
