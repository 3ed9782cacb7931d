//! Compiles the C eBPF programs in `programs/` with clang-19 so that a
//! plain `cargo build` embeds them. Without clang-19 the build still
//! succeeds (likewise without libbpf-dev's headers): nothing is embedded
//! and the proxy reports "eBPF program not built" when it tries to load
//! the allow-list.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["allowlist", "sockmap"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(consolegate_bpf_built)");
    println!("cargo::rerun-if-changed=programs");
    println!("cargo::rerun-if-env-changed=CONSOLEGATE_CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CONSOLEGATE_CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    let arch_include = format!(
        "/usr/include/{}-linux-gnu",
        env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned())
    );
    let mut built = true;
    for name in PROGRAMS {
        let src = format!("programs/{name}.bpf.c");
        let obj = out.join(format!("{name}.bpf.o"));
        let output = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{arch_include}"))
            .args(["-Iprograms", "-c", &src, "-o"])
            .arg(&obj)
            .output();
        match output {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let stderr = String::from_utf8_lossy(&o.stderr);
                if stderr.contains("bpf/bpf_helpers.h' file not found")
                    || stderr.contains("bpf/bpf_endian.h' file not found")
                {
                    println!(
                        "cargo::warning=eBPF programs not built: libbpf-dev missing \
                         (no bpf/bpf_helpers.h); install it (cargo xtask setup)"
                    );
                    built = false;
                    break;
                }
                panic!("{clang} failed on {src} ({}):\n{stderr}", o.status);
            }
            Err(e) => {
                println!(
                    "cargo::warning=eBPF programs not built: {clang} missing ({e}); \
                     install clang-19 and libbpf-dev (cargo xtask setup)"
                );
                built = false;
                break;
            }
        }
    }
    if built {
        println!("cargo::rustc-cfg=consolegate_bpf_built");
    }
}
