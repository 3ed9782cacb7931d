//! The guest kernel for the kTLS test (`tests/tests/ktls_guest.rs`): this
//! machine's kernel has no kTLS, so that test boots Debian's own kernel
//! (kTLS as a module) in QEMU. This step fetches Debian's kernel package
//! and busybox-static with `apt-get download` and unpacks them with
//! `dpkg-deb -x` into `target/guest-kernel/` (nothing is installed on the
//! host). Skipped, without touching the network, once the unpacked tree is
//! there.
//!
//! Layout (read by `tests/src/guest.rs`):
//! - `root/`: both packages unpacked (`boot/vmlinuz-<release>`,
//!   `lib/modules/<release>/kernel/...`, `bin/busybox`);
//! - `release`: the kernel release, e.g. `6.1.0-57-amd64`, written last, so
//!   its presence means the tree is complete.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::setup::{output, run, step};
use crate::steps::Steps;

/// Where the unpacked packages live, under the workspace root. Tests find it
/// there too (or both honour `CONSOLEGATE_GUEST_DIR`).
pub fn dir(root: &Path) -> PathBuf {
    match std::env::var_os("CONSOLEGATE_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => root.join("target/guest-kernel"),
    }
}

/// The metapackage that names Debian's current kernel image package.
const KERNEL_META: &str = "linux-image-amd64";

/// `setup: guest kernel`.
pub fn kernel(root: &Path, steps: &mut Steps) -> Result<()> {
    step(steps, "setup: guest kernel", || {
        let dir = dir(root);
        if let Ok(release) = std::fs::read_to_string(dir.join("release")) {
            return Ok(format!(
                "present: Debian kernel {} in {}",
                release.trim(),
                dir.display()
            ));
        }
        if !crate::setup::succeeds(Command::new("dpkg-deb").arg("--version")) {
            bail!(
                "the kTLS guest test needs Debian's kernel package, fetched with \
                 apt-get download and dpkg-deb: not a Debian system"
            );
        }
        let image = match image_package() {
            Ok(p) => p,
            Err(_) => {
                // A fresh machine may have no package lists yet.
                run(crate::setup::apt()?.args(["-q", "update"]))?;
                image_package()?
            }
        };
        let release = image
            .strip_prefix("linux-image-")
            .context("unexpected kernel package name")?
            .to_owned();
        std::fs::create_dir_all(&dir)?;
        let work = dir.join(format!(".download-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        // Root runs the download unsandboxed (apt's _apt user cannot write
        // into target/); apt says so in a warning.
        run(Command::new("apt-get").current_dir(&work).args([
            "-q",
            "download",
            &image,
            "busybox-static",
        ]))?;
        let tree = work.join("root");
        for deb in std::fs::read_dir(&work)? {
            let deb = deb?.path();
            if deb.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
            }
        }
        for needed in [
            format!("boot/vmlinuz-{release}"),
            format!("lib/modules/{release}/kernel/net/tls/tls.ko"),
            "bin/busybox".to_owned(),
        ] {
            if !tree.join(&needed).exists() && !tree.join(format!("{needed}.xz")).exists() {
                bail!("{needed} is not in the unpacked packages");
            }
        }
        let _ = std::fs::remove_dir_all(dir.join("root"));
        std::fs::rename(&tree, dir.join("root"))?;
        std::fs::write(dir.join("release"), format!("{release}\n"))?;
        std::fs::remove_dir_all(&work)?;
        Ok(format!(
            "fetched {image} and busybox-static into {}",
            dir.display()
        ))
    })
}

/// `linux-image-6.1.0-N-amd64`: what the metapackage depends on now.
fn image_package() -> Result<String> {
    let deps = output(Command::new("apt-cache").args(["depends", KERNEL_META]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_owned)
        .with_context(|| format!("`apt-cache depends {KERNEL_META}` names no kernel image"))
}
