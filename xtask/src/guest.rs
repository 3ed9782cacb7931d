//! The guest kernels for the kTLS test (`tests/tests/ktls_guest.rs`): this
//! machine's kernel has no kTLS, so that test boots Debian's own kernels
//! (kTLS as a module) in QEMU. Two of them, because they differ where it
//! matters:
//! - Debian 12's kernel (6.1), from this machine's apt sources: kTLS that
//!   cannot take new keys, so a TLS 1.3 KeyUpdate must end the session;
//! - the newest kernel of Debian 13's backports (6.14 or later), from a
//!   private apt configuration (its own sources list, lists and cache under
//!   the download directory, signatures checked against
//!   `debian-archive-keyring`; the host's apt state is not touched): kTLS
//!   that renews keys, so a KeyUpdate is followed.
//!
//! This step fetches each kernel's packages (and busybox-static) with
//! `apt-get download` and unpacks them with `dpkg-deb -x` (nothing is
//! installed on the host). A kernel already unpacked is skipped without
//! touching the network.
//!
//! Layout of each directory (read by `tests/src/guest.rs`):
//! - `root/`: the packages unpacked (the image in `boot/vmlinuz-<release>`
//!   or, in newer packages, `usr/lib/modules/<release>/vmlinuz`; the
//!   modules beside it; `bin/busybox`);
//! - `release`: the kernel release, e.g. `6.1.0-57-amd64`, written last, so
//!   its presence means the tree is complete.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::setup::{output, run, step};
use crate::steps::Steps;

/// Where Debian 12's kernel is unpacked, under the workspace root (or
/// `CONSOLEGATE_GUEST_DIR`; the tests read the same).
pub fn dir(root: &Path) -> PathBuf {
    match std::env::var_os("CONSOLEGATE_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => root.join("target/guest-kernel"),
    }
}

/// Where the backports kernel is unpacked.
pub fn backports_dir(root: &Path) -> PathBuf {
    root.join("target/guest-kernel-backports")
}

/// The metapackage that names Debian's current kernel image package.
const KERNEL_META: &str = "linux-image-amd64";

/// The sources list of the backports kernel's private apt configuration.
const BACKPORTS_SOURCES: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
     http://deb.debian.org/debian trixie-backports main\n";

/// `setup: guest kernels`.
pub fn kernel(root: &Path, steps: &mut Steps) -> Result<()> {
    step(steps, "setup: guest kernels", || {
        if !crate::setup::succeeds(Command::new("dpkg-deb").arg("--version")) {
            bail!(
                "the kTLS guest test needs Debian's kernel packages, fetched with \
                 apt-get download and dpkg-deb: not a Debian system"
            );
        }
        let stable_dir = dir(root);
        let stable = fetch(&stable_dir, &Apt::Host, None)?;
        let backports_dir = backports_dir(root);
        let apt = Apt::Private(backports_dir.join("apt"));
        let busybox = stable_dir.join("root/bin/busybox");
        let backports = fetch(&backports_dir, &apt, Some(&busybox))?;
        Ok(format!("{stable}; {backports}"))
    })
}

/// Which apt configuration a kernel comes from.
enum Apt {
    /// This machine's sources (Debian 12).
    Host,
    /// A private configuration in this directory (Debian 13 backports).
    Private(PathBuf),
}

impl Apt {
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        if let Apt::Private(d) = self {
            for (key, value) in [
                ("Dir::Etc::SourceList", d.join("sources.list")),
                ("Dir::Etc::SourceParts", d.join("sources.list.d")),
                ("Dir::State::Lists", d.join("lists")),
                ("Dir::Cache", d.join("cache")),
                ("Dir::State::status", PathBuf::from("/dev/null")),
            ] {
                cmd.arg("-o").arg(format!("{key}={}", value.display()));
            }
        }
        cmd
    }

    /// Package lists: the host's may be missing on a fresh machine; the
    /// private ones always are.
    fn update(&self) -> Result<()> {
        match self {
            Apt::Host => run(crate::setup::apt()?.args(["-q", "update"])),
            Apt::Private(d) => {
                for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
                    std::fs::create_dir_all(d.join(sub))?;
                }
                std::fs::write(d.join("sources.list"), BACKPORTS_SOURCES)?;
                run(self.command("apt-get").args(["-q", "update"]))
            }
        }
    }
}

/// Fetches and unpacks one kernel into `dir` unless it is there already;
/// busybox-static comes along, or is copied from `busybox`.
fn fetch(dir: &Path, apt: &Apt, busybox: Option<&Path>) -> Result<String> {
    if let Ok(release) = std::fs::read_to_string(dir.join("release")) {
        return Ok(format!(
            "present: Debian kernel {} in {}",
            release.trim(),
            dir.display()
        ));
    }
    let packages = match (apt, image_packages(apt)) {
        (Apt::Host, Ok(p)) => p,
        _ => {
            apt.update()?;
            image_packages(apt)?
        }
    };
    let release = packages[0]
        .strip_prefix("linux-image-")
        .context("unexpected kernel package name")?
        .to_owned();
    std::fs::create_dir_all(dir)?;
    let work = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut download = apt.command("apt-get");
    // Root runs the download unsandboxed (apt's _apt user cannot write
    // into target/); apt says so in a warning.
    download.current_dir(&work).args(["-q", "download"]);
    download.args(&packages);
    if busybox.is_none() {
        download.arg("busybox-static");
    }
    run(&mut download)?;
    let tree = work.join("root");
    for deb in std::fs::read_dir(&work)? {
        let deb = deb?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        }
    }
    if let Some(from) = busybox {
        std::fs::create_dir_all(tree.join("bin"))?;
        std::fs::copy(from, tree.join("bin/busybox"))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| tree.join(m).join(&release))
        .find(|p| p.exists())
        .with_context(|| format!("no modules directory for {release} in the packages"))?;
    for needed in [
        moddir.join("kernel/net/tls/tls.ko"),
        tree.join("bin/busybox"),
    ] {
        let xz = PathBuf::from(format!("{}.xz", needed.display()));
        if !needed.exists() && !xz.exists() {
            bail!("{} is not in the unpacked packages", needed.display());
        }
    }
    if !tree.join(format!("boot/vmlinuz-{release}")).exists() && !moddir.join("vmlinuz").exists() {
        bail!("no kernel image for {release} in the unpacked packages");
    }
    let _ = std::fs::remove_dir_all(dir.join("root"));
    std::fs::rename(&tree, dir.join("root"))?;
    std::fs::write(dir.join("release"), format!("{release}\n"))?;
    std::fs::remove_dir_all(&work)?;
    Ok(format!(
        "fetched {} into {}",
        packages.join(", "),
        dir.display()
    ))
}

/// The image package the metapackage depends on now
/// (`linux-image-6.1.0-N-amd64`), first, then the packages of the same
/// release it depends on (newer kernels split the image and the modules
/// into `linux-binary-*` and `linux-modules-*`).
fn image_packages(apt: &Apt) -> Result<Vec<String>> {
    let image = depends(apt, KERNEL_META)?
        .into_iter()
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| format!("`apt-cache depends {KERNEL_META}` names no kernel image"))?;
    let release = image.trim_start_matches("linux-image-").to_owned();
    let mut packages = vec![image.clone()];
    for dep in depends(apt, &image)? {
        let split = ["linux-binary-", "linux-modules-"]
            .iter()
            .any(|prefix| dep.strip_prefix(prefix) == Some(release.as_str()));
        if split {
            packages.push(dep);
        }
    }
    Ok(packages)
}

/// The packages `package` depends on, as `apt-cache depends` names them.
fn depends(apt: &Apt, package: &str) -> Result<Vec<String>> {
    let text = output(apt.command("apt-cache").args(["depends", package]))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|p| p.trim().to_owned())
        .collect())
}
