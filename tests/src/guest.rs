//! A QEMU guest running Debian's own kernel, for what this machine's kernel
//! lacks (kTLS: `TCP_ULP "tls"` gives ENOENT here).
//!
//! * [`GuestKernel`]: the kernel, its modules and busybox-static that
//!   `cargo xtask setup` unpacked into `target/guest-kernel/`
//!   (`xtask/src/guest.rs`).
//! * [`Initramfs`]: a newc cpio archive written in Rust (uncompressed: the
//!   kernel unpacks it faster than gzip under TCG), with host binaries
//!   copied in together with the shared libraries and ELF interpreter
//!   `ldd` lists for them (Debian 12's glibc runs on the 6.1 guest kernel),
//!   debug info stripped (`objcopy --strip-debug`) to keep it small.
//! * [`boot`]: `qemu-system-x86_64 -accel tcg` (never KVM), serial console
//!   on stdio, bounded by a timeout; the QEMU is killed by its PID.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::process::ChildGuard;

/// What to tell whoever sees a missing guest kernel or QEMU.
pub const SETUP_HINT: &str = "run `cargo xtask setup` (it fetches Debian's kernel package and \
     busybox-static into target/guest-kernel/ and installs qemu-system-x86)";

/// Debian's kernel, unpacked by `cargo xtask setup`.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    /// e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// Where the packages were unpacked (`boot/`, `lib/modules/`, `bin/`).
    pub root: PathBuf,
}

/// A module to load: its file name and uncompressed bytes.
pub type Module = (String, Vec<u8>);

impl GuestKernel {
    /// `$CONSOLEGATE_GUEST_DIR`, else `<workspace>/target/guest-kernel`.
    pub fn dir() -> PathBuf {
        match std::env::var_os("CONSOLEGATE_GUEST_DIR") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kernel"),
        }
    }

    /// Where `cargo xtask setup` unpacks Debian 13 backports' newest
    /// kernel (one that renews kTLS keys).
    pub fn backports_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kernel-backports")
    }

    /// The unpacked Debian 12 kernel, or an error that says to run `cargo
    /// xtask setup`.
    pub fn locate() -> anyhow::Result<Self> {
        Self::locate_in(&Self::dir())
    }

    /// The unpacked backports kernel, or an error that says to run `cargo
    /// xtask setup`.
    pub fn locate_backports() -> anyhow::Result<Self> {
        Self::locate_in(&Self::backports_dir())
    }

    fn locate_in(dir: &Path) -> anyhow::Result<Self> {
        let release = std::fs::read_to_string(dir.join("release")).with_context(|| {
            format!(
                "no guest kernel in {} (reading its `release` file); {SETUP_HINT}",
                dir.display()
            )
        })?;
        let k = Self {
            release: release.trim().to_owned(),
            root: dir.join("root"),
        };
        for p in [k.vmlinuz(), k.busybox()] {
            anyhow::ensure!(p.exists(), "{} is missing; {SETUP_HINT}", p.display());
        }
        Ok(k)
    }

    /// Debian 12's packages put the image in `boot/`; newer ones beside
    /// the modules in `usr/lib/modules/<release>/`.
    pub fn vmlinuz(&self) -> PathBuf {
        let old = self.root.join(format!("boot/vmlinuz-{}", self.release));
        if old.exists() {
            return old;
        }
        self.modules_root().join("vmlinuz")
    }

    /// `lib/modules/<release>` (Debian 12) or `usr/lib/modules/<release>`.
    fn modules_root(&self) -> PathBuf {
        let old = self.root.join(format!("lib/modules/{}", self.release));
        if old.exists() {
            return old;
        }
        self.root.join(format!("usr/lib/modules/{}", self.release))
    }

    pub fn busybox(&self) -> PathBuf {
        self.root.join("bin/busybox")
    }

    fn module_dir(&self) -> PathBuf {
        self.modules_root().join("kernel")
    }

    /// Every module file of the package by module name (`-` read as `_`,
    /// as the kernel does).
    fn module_index(&self) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        fn walk(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> std::io::Result<()> {
            for e in std::fs::read_dir(dir)? {
                let p = e?.path();
                if p.is_dir() {
                    walk(&p, out)?;
                } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                    let stem = name
                        .strip_suffix(".ko")
                        .or_else(|| name.strip_suffix(".ko.xz"));
                    if let Some(stem) = stem {
                        out.insert(stem.replace('-', "_"), p.clone());
                    }
                }
            }
            Ok(())
        }
        let mut index = BTreeMap::new();
        walk(&self.module_dir(), &mut index)
            .with_context(|| format!("listing {}", self.module_dir().display()))?;
        Ok(index)
    }

    /// `wanted` and every module they depend on (the `depends=` field of each
    /// module's `.modinfo`; the package has no modules.dep, depmod makes it
    /// at install time), dependencies first, each once, as
    /// (file name, uncompressed bytes). A wanted name that is no module of
    /// this kernel (built in, or merged into another in a newer release)
    /// is left out and named in the second value; what the guest then
    /// lacks shows in its own checks. A missing dependency is an error.
    pub fn modules(&self, wanted: &[&str]) -> anyhow::Result<(Vec<Module>, Vec<String>)> {
        let index = self.module_index()?;
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        let mut absent = Vec::new();
        for w in wanted {
            let name = w.replace('-', "_");
            if !index.contains_key(&name) {
                absent.push(name);
                continue;
            }
            self.visit(&index, &name, &mut seen, &mut order, 0)?;
        }
        Ok((order, absent))
    }

    fn visit(
        &self,
        index: &BTreeMap<String, PathBuf>,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(depth < 32, "module dependency loop at {name}");
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let path = index.get(name).with_context(|| {
            format!(
                "module {name} is not in {} (built in, or a different kernel?)",
                self.module_dir().display()
            )
        })?;
        let bytes = read_module(path)?;
        for dep in modinfo_depends(&bytes) {
            self.visit(index, &dep, seen, order, depth + 1)?;
        }
        order.push((format!("{name}.ko"), bytes));
        Ok(())
    }
}

/// A module file's bytes, decompressed when the package ships `.ko.xz`.
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("running xz -dc (xz-utils)")?;
        anyhow::ensure!(out.status.success(), "xz -dc {} failed", path.display());
        return Ok(out.stdout);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The `depends=a,b` entry of a module's `.modinfo` strings.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|s| s.trim().replace('-', "_"))
        .filter(|s| !s.is_empty())
        .collect()
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as its
/// initramfs. Parent directories are added as needed.
#[derive(Debug, Default)]
pub struct Initramfs {
    buf: Vec<u8>,
    next_ino: u32,
    dirs: HashSet<String>,
    files: HashSet<String>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        let name = path.trim_start_matches('/');
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len()).expect("initramfs file over 4 GiB"),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).expect("name length"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            prefix.push('/');
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let p = prefix.clone();
                self.entry(&p, 0o040755, &[]);
            }
        }
    }

    /// An (empty) directory, with its parents.
    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        let p = format!("/{}", path.trim_matches('/'));
        if self.dirs.insert(p.clone()) {
            self.entry(&p, 0o040755, &[]);
        }
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parents(path);
        self.files.insert(path.to_owned());
        self.entry(path, 0o100000 | (perm & 0o7777), data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, 0o120777, target.as_bytes());
    }

    /// Copies the host executable `host` to `guest_path` (debug info
    /// stripped) plus every shared library and the ELF interpreter it needs,
    /// each at the path `ldd` names. Returns the directories of those
    /// libraries (for `LD_LIBRARY_PATH`).
    pub fn executable(&mut self, guest_path: &str, host: &Path) -> anyhow::Result<Vec<String>> {
        let bytes = stripped(host)?;
        self.file(guest_path, 0o755, &bytes);
        let mut dirs = Vec::new();
        for lib in shared_libraries(host)? {
            let text = lib.display().to_string();
            if self.files.contains(&text) {
                continue;
            }
            let data = std::fs::read(&lib).with_context(|| format!("reading {text}"))?;
            self.file(&text, 0o755, &data);
            if let Some(d) = lib.parent().map(|d| d.display().to_string())
                && !dirs.contains(&d)
            {
                dirs.push(d);
            }
        }
        Ok(dirs)
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        // The kernel reads the archive in 512-byte blocks, like cpio writes it.
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

/// `host`'s bytes without debug info (`objcopy --strip-debug`; binutils,
/// which setup installs), or as they are if objcopy is missing.
fn stripped(host: &Path) -> anyhow::Result<Vec<u8>> {
    let tmp = tempfile::Builder::new().prefix("cg-strip-").tempdir()?;
    let out = tmp.path().join("bin");
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(host)
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    let from = if ok { out.as_path() } else { host };
    std::fs::read(from).with_context(|| format!("reading {}", from.display()))
}

/// The shared libraries and ELF interpreter `ldd` lists for `bin` (empty for
/// a static executable), symlinks resolved to the files behind them.
pub fn shared_libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {text}", bin.display());
    }
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The start of every guest's `/init`: busybox installed, /proc, /sys,
/// /dev and a tmpfs /tmp mounted, loopback up, and the kernel's console
/// messages cut to emergencies (the boot log before it stays on the serial
/// console; later messages could land inside a line the host parses).
/// `body` runs after it.
pub fn init_script(body: &str) -> String {
    format!(
        "#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox dmesg -n 1
/bin/busybox --install -s /bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
{body}"
    )
}

/// What a guest printed on its serial console, and how it ended.
#[derive(Debug)]
pub struct GuestRun {
    pub serial: String,
    /// `None` when the timeout ended it (QEMU killed).
    pub exited: Option<std::process::ExitStatus>,
    pub elapsed: Duration,
}

/// Boots `kernel` with `initrd` under TCG (`-accel tcg,thread=single -cpu max
/// -m 1024 -smp 2`; never KVM, which hangs on this machine kind), the serial
/// console on QEMU's stdout (streamed to the test's stderr line by line),
/// until QEMU exits (the guest powers off, or panics: `panic=-1` with
/// `-no-reboot`), the serial output holds `done_marker` (then QEMU gets a
/// few seconds to exit) or `limit` passes. The QEMU is killed by its PID.
pub fn boot(
    kernel: &GuestKernel,
    initrd: &Path,
    append: &str,
    done_marker: &str,
    limit: Duration,
) -> anyhow::Result<GuestRun> {
    boot_with_memory(kernel, initrd, append, done_marker, limit, 1024)
}

/// [`boot`] with `mem_mib` MiB of guest memory.
pub fn boot_with_memory(
    kernel: &GuestKernel,
    initrd: &Path,
    append: &str,
    done_marker: &str,
    limit: Duration,
    mem_mib: u32,
) -> anyhow::Result<GuestRun> {
    let qemu = which("qemu-system-x86_64")
        .with_context(|| format!("qemu-system-x86_64 is not on PATH; {SETUP_HINT}"))?;
    let mut cmd = Command::new(qemu);
    // One host thread for both vCPUs: with `thread=multi` QEMU 7.2 lets a
    // vCPU run code the other is patching (static keys, `int3` first),
    // which crashed or hung about 1 boot in 45 of Debian's 7.3 kernel
    // (docs/datapath.md, "How the kTLS path is tested"). Not `quiet`: a
    // failed test prints the serial output, and the boot log then shows
    // where a guest stopped.
    cmd.args(["-accel", "tcg,thread=single", "-cpu", "max", "-m"])
        .arg(mem_mib.to_string())
        .args(["-smp", "2", "-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {append}"));
    let started = Instant::now();
    let mut child = ChildGuard::spawn("guest", cmd)?;
    let mut exited = None;
    let mut done_at = None;
    while started.elapsed() < limit {
        if let Some(st) = child.exited() {
            exited = Some(st);
            break;
        }
        if done_at.is_none() && child.output().contains(done_marker) {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(20)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if exited.is_none() {
        let _ = child.signal("KILL");
        let _ = child.wait_exit(Duration::from_secs(10));
    } else {
        child.drain_output();
    }
    Ok(GuestRun {
        serial: child.output(),
        exited,
        elapsed: started.elapsed(),
    })
}

/// `name` found on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f8e)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8e)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f8e)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn modinfo_depends_is_read() {
        let ko = b"\x7fELF...\0license=GPL\0depends=crypto_simd,cryptd\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["crypto_simd", "cryptd"]);
        assert!(modinfo_depends(b"\0depends=\0name=tls\0").is_empty());
    }

    #[test]
    fn newc_archive_has_parents_aligned_entries_and_a_trailer() {
        let mut a = Initramfs::new();
        a.file("/bin/x", 0o755, b"abc");
        a.symlink("/bin/sh", "busybox");
        let bytes = a.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        // Directory first, then the file, the link and the trailer.
        let at = |s: &str| text.find(s).unwrap_or_else(|| panic!("{s} missing"));
        assert!(at("bin\0") < at("bin/x\0"));
        assert!(at("bin/x\0") < at("bin/sh\0"));
        assert!(at("bin/sh\0") < at("TRAILER!!!\0"));
        // Mode of the file entry: 0100755.
        assert!(text.contains("000081ED"));
    }
}
