//! `--tcp-cc`: the TCP congestion control every peer runs with.
//!
//! Every row of a comparison sends over loopback with the machine's
//! default congestion control (`net.ipv4.tcp_congestion_control`): the
//! backends, the proxies and the clients alike. Most machines run cubic,
//! Linux's default; some are set to BBR. On loopback BBR, not the proxies,
//! can set the bulk numbers (docs/benchmarking.md has the measurements), so
//! the report names the one in effect, and `--tcp-cc NAME` runs the whole
//! comparison with another for every peer alike.
//!
//! The setting is system-wide (the peers are other programs: their sockets
//! cannot be set one by one), so the switch is undone when the comparison
//! ends: on return, on a panic, and on SIGINT, SIGTERM or SIGHUP (the
//! runner's handler, [`super::on_signals`]).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const SYSCTL: &str = "/proc/sys/net/ipv4/tcp_congestion_control";
const AVAILABLE: &str = "/proc/sys/net/ipv4/tcp_available_congestion_control";

/// The congestion control in effect for new sockets, if the kernel says.
pub fn current() -> Option<String> {
    read(Path::new(SYSCTL))
}

fn read(path: &Path) -> Option<String> {
    let v = fs::read_to_string(path).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// A switched congestion control; dropping it puts the machine's back.
#[derive(Debug)]
pub struct Switched(Restore);

/// What puts the machine's congestion control back: the drop of
/// [`Switched`], or the runner's signal handler ([`super::on_signals`]).
#[derive(Clone, Debug)]
pub struct Restore {
    path: PathBuf,
    previous: String,
}

impl Switched {
    /// The machine's own congestion control, restored on drop.
    pub fn previous(&self) -> &str {
        &self.0.previous
    }

    pub fn restore(&self) -> Restore {
        self.0.clone()
    }
}

impl Drop for Switched {
    fn drop(&mut self) {
        self.0.now();
    }
}

impl Restore {
    pub fn now(&self) {
        match fs::write(&self.path, &self.previous) {
            Ok(()) => eprintln!(
                "compare: TCP congestion control restored to {}",
                self.previous
            ),
            Err(e) => eprintln!(
                "compare: could not restore the TCP congestion control to {} ({e}): set it \
                 back by hand: sysctl -w net.ipv4.tcp_congestion_control={}",
                self.previous, self.previous
            ),
        }
    }
}

/// Switches the machine to `name` for the comparison. `None` when nothing
/// was asked for or `name` is already in effect (nothing to undo).
pub fn switch(name: Option<&str>) -> Result<Option<Switched>> {
    let Some(name) = name else { return Ok(None) };
    let switched = switch_at(Path::new(SYSCTL), Path::new(AVAILABLE), name)?;
    if let Some(s) = &switched {
        eprintln!(
            "compare: TCP congestion control {name} for this run (the machine's own, {}, is \
             restored at the end)",
            s.previous()
        );
    }
    Ok(switched)
}

/// [`switch`] against any pair of files (the tests use temporary ones).
fn switch_at(sysctl: &Path, available: &Path, name: &str) -> Result<Option<Switched>> {
    let previous = read(sysctl).with_context(|| {
        format!(
            "--tcp-cc: reading {}: this kernel does not say its congestion control",
            sysctl.display()
        )
    })?;
    if previous == name {
        return Ok(None);
    }
    let known = read(available).unwrap_or_default();
    if !known.split_whitespace().any(|k| k == name) {
        bail!(
            "--tcp-cc {name}: not a congestion control this kernel has loaded (available: {}); \
             load its module first (modprobe tcp_{name})",
            if known.is_empty() { "unknown" } else { &known }
        );
    }
    fs::write(sysctl, name)
        .with_context(|| format!("--tcp-cc {name}: writing {} (needs root)", sysctl.display()))?;
    Ok(Some(Switched(Restore {
        path: sysctl.to_owned(),
        previous,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(current: &str, available: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sysctl = dir.path().join("tcp_congestion_control");
        let avail = dir.path().join("tcp_available_congestion_control");
        fs::write(&sysctl, format!("{current}\n")).unwrap();
        fs::write(&avail, format!("{available}\n")).unwrap();
        (dir, sysctl, avail)
    }

    #[test]
    fn switches_and_restores_on_drop() {
        let (_dir, sysctl, avail) = files("bbr", "reno bbr cubic");
        let s = switch_at(&sysctl, &avail, "cubic").unwrap().unwrap();
        assert_eq!(s.previous(), "bbr");
        assert_eq!(read(&sysctl).as_deref(), Some("cubic"));
        drop(s);
        assert_eq!(read(&sysctl).as_deref(), Some("bbr"));
    }

    #[test]
    fn the_one_in_effect_is_left_alone() {
        let (_dir, sysctl, avail) = files("cubic", "reno cubic");
        assert!(switch_at(&sysctl, &avail, "cubic").unwrap().is_none());
        assert_eq!(read(&sysctl).as_deref(), Some("cubic"));
    }

    #[test]
    fn an_unloaded_one_is_refused_with_the_list() {
        let (_dir, sysctl, avail) = files("bbr", "reno bbr");
        let e = switch_at(&sysctl, &avail, "cubi").unwrap_err().to_string();
        assert!(e.contains("--tcp-cc cubi"), "{e}");
        assert!(e.contains("available: reno bbr"), "{e}");
        assert_eq!(read(&sysctl).as_deref(), Some("bbr"), "nothing written");
    }

    #[test]
    fn the_kernel_reports_one() {
        // Every Linux kernel with TCP has one in effect; the report names it.
        let cc = current().expect("net.ipv4.tcp_congestion_control is readable");
        assert!(
            cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{cc:?}"
        );
    }
}
