//! The kTLS data path, end to end, in a QEMU guest running Debian's kernel.
//!
//! This machine's kernel has no kTLS (`TCP_ULP "tls"` gives ENOENT), so the
//! proxy's `ktls+splice` path cannot run here. Debian's 6.1 kernel has kTLS
//! as a module: `cargo xtask setup` unpacks its package (and busybox-static)
//! into `target/guest-kernel/`, and this test builds an initramfs with
//! busybox, the `tls` and AES-GCM modules, the `consolegate` binary cargo
//! built and the `guest_ktls` driver (plus the glibc they link), boots it
//! under TCG and reads the driver's verdict from the serial console. What
//! the driver checks: `tests/src/bin/guest_ktls/main.rs`.
//!
//! Without the guest kernel or QEMU this test fails (it does not skip):
//! CI always runs `cargo xtask setup`, so a skip would hide a broken test.

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
export PATH=/bin HOME=/tmp TMPDIR=/tmp CONSOLEGATE_BIN=/bin/consolegate
export LD_LIBRARY_PATH=@LIBS@
/bin/guest_ktls
echo "GUEST-KTLS-EXIT $?"
poweroff -f
"#;

fn initramfs(kernel: &GuestKernel) -> anyhow::Result<Vec<u8>> {
    let mut fs = Initramfs::new();
    fs.file("/bin/busybox", 0o755, &std::fs::read(kernel.busybox())?);
    let mut order = String::new();
    for (name, bytes) in kernel.modules(MODULES)? {
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
            .as_bytes(),
    );
    fs.dir("/etc");
    Ok(fs.finish())
}

#[test]
fn ktls_splice_in_a_debian_guest() {
    let kernel = GuestKernel::locate().unwrap_or_else(|e| panic!("{e:#}"));
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
    let run = guest::boot(&kernel, &initrd, "", DONE, GUEST_LIMIT).unwrap();
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
