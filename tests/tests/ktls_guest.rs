//! The kTLS data path, end to end, in QEMU guests running Debian's kernels.
//!
//! This machine's kernel has no kTLS (`TCP_ULP "tls"` gives ENOENT), so the
//! proxy's `ktls+splice` path cannot run here. Debian's kernels have kTLS
//! as a module: `cargo xtask setup` unpacks two of them (and
//! busybox-static) under `target/`, Debian 12's 6.1 (kTLS that cannot take
//! new keys) and the newest of Debian 13's backports (which can). Each
//! test builds an initramfs with busybox, the `tls` and AES-GCM modules,
//! the `consolegate` binary cargo built and the `guest_ktls` driver (plus
//! the glibc they link), boots it under TCG and reads the driver's verdict
//! from the serial console. What the driver checks:
//! `tests/src/bin/guest_ktls/main.rs`; it tells from the guest's kernel
//! release whether a TLS 1.3 KeyUpdate must be followed or must end the
//! session, and checks that the proxy's probe agrees.
//!
//! Without a guest kernel or QEMU these tests fail (they do not skip): CI
//! always runs `cargo xtask setup`, so a skip would hide a broken test.

use std::path::PathBuf;
use std::time::Duration;

use consolegate_tests::guest::{self, GuestKernel, Initramfs};

/// Modules the driver needs; their dependencies come along
/// (aesni_intel -> crypto_simd -> cryptd, ghash_generic -> gf128mul).
const MODULES: &[&str] = &["tls", "gcm", "ghash_generic", "ctr", "aesni_intel"];

/// Upper bound for the whole guest run (boot about 11 s; the sessions
/// under TCG take longer). Never a performance assertion.
const GUEST_LIMIT: Duration = Duration::from_secs(300);

const DONE: &str = "GUEST-KTLS-EXIT";

/// The guest's `/init` after [`guest::init_script`]'s start.
const INIT: &str = r#"for m in $(cat /modules/order); do
    if ! out=$(insmod /modules/$m 2>&1); then
        echo "GUEST-KTLS: insmod-failed $m: $out"
        dmesg | tail -n 5
    fi
done
echo "GUEST-KTLS: modules $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
# Descriptors for the idle runs (each session: four sockets in the guest).
ulimit -n 65536
export PATH=/bin HOME=/tmp TMPDIR=/tmp CONSOLEGATE_BIN=/bin/consolegate
export LD_LIBRARY_PATH=@LIBS@ CONSOLEGATE_GUEST_IDLE_SESSIONS=@IDLE@
/bin/guest_ktls
echo "GUEST-KTLS-EXIT $?"
poweroff -f
"#;

/// Idle sessions the driver holds per run: `CONSOLEGATE_GUEST_IDLE_SESSIONS`
/// for a closer memory figure by hand (the guest has 1 GiB), else its
/// default.
fn idle_sessions() -> String {
    std::env::var("CONSOLEGATE_GUEST_IDLE_SESSIONS")
        .ok()
        .filter(|n| n.parse::<u32>().is_ok())
        .unwrap_or_else(|| "default".to_owned())
}

fn initramfs(kernel: &GuestKernel) -> anyhow::Result<Vec<u8>> {
    let mut fs = Initramfs::new();
    fs.file("/bin/busybox", 0o755, &std::fs::read(kernel.busybox())?);
    let mut order = String::new();
    let (modules, absent) = kernel.modules(MODULES)?;
    if !absent.is_empty() {
        eprintln!(
            "guest: no module {} in kernel {} (built in there, or merged)",
            absent.join(", "),
            kernel.release
        );
    }
    for (name, bytes) in modules {
        fs.file(&format!("/modules/{name}"), 0o644, &bytes);
        order.push_str(&name);
        order.push('\n');
    }
    fs.file("/modules/order", 0o644, order.as_bytes());
    let mut libs = fs.executable("/bin/consolegate", &consolegate_tests::proxy::binary()?)?;
    let driver = PathBuf::from(env!("CARGO_BIN_EXE_guest_ktls"));
    for d in fs.executable("/bin/guest_ktls", &driver)? {
        if !libs.contains(&d) {
            libs.push(d);
        }
    }
    fs.file(
        "/init",
        0o755,
        guest::init_script(INIT)
            .replace("@LIBS@", &libs.join(":"))
            .replace("@IDLE@", &idle_sessions())
            .as_bytes(),
    );
    fs.dir("/etc");
    Ok(fs.finish())
}

/// Debian 12's kernel: kTLS without key renewal.
#[test]
fn ktls_splice_in_a_debian_12_guest() {
    run(GuestKernel::locate());
}

/// Debian 13 backports' kernel: kTLS that follows KeyUpdates.
#[test]
fn ktls_splice_and_rekey_in_a_debian_13_backports_guest() {
    run(GuestKernel::locate_backports());
}

fn run(kernel: anyhow::Result<GuestKernel>) {
    let kernel = kernel.unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::Builder::new()
        .prefix("cg-guest-")
        .tempdir()
        .unwrap();
    let initrd = dir.path().join("initramfs.cpio");
    let image = initramfs(&kernel).unwrap();
    eprintln!(
        "guest: Debian kernel {}, initramfs {} MiB, proxy {} (CONSOLEGATE_BIN picks another)",
        kernel.release,
        image.len() >> 20,
        consolegate_tests::proxy::binary()
            .map_or_else(|e| e.to_string(), |p| p.display().to_string())
    );
    std::fs::write(&initrd, image).unwrap();
    // More idle sessions by hand: a quarter second more for each.
    let extra = idle_sessions().parse::<u64>().map_or(0, |n| n / 4);
    let limit = GUEST_LIMIT + Duration::from_secs(extra);
    let run = guest::boot(&kernel, &initrd, "", DONE, limit).unwrap();
    println!(
        "guest: ran {:.1} s, QEMU {:?}",
        run.elapsed.as_secs_f64(),
        run.exited
    );
    let lines: Vec<&str> = run
        .serial
        .lines()
        .filter(|l| l.contains("GUEST-KTLS"))
        .collect();
    for l in &lines {
        println!("{l}");
    }
    let result = lines
        .iter()
        .find_map(|l| l.split_once("GUEST-KTLS-RESULT: ").map(|(_, r)| r.trim()));
    match result {
        Some("PASS") => {}
        Some(fail) => panic!(
            "the guest driver failed: {fail}\nserial console:\n{}",
            run.serial
        ),
        None => panic!(
            "the guest gave no result (QEMU {:?} after {:.0} s)\nserial console:\n{}",
            run.exited,
            run.elapsed.as_secs_f64(),
            run.serial
        ),
    }
    assert!(
        lines.iter().any(|l| l.contains(&format!("{DONE} 0"))),
        "the driver passed but did not exit 0"
    );
}
