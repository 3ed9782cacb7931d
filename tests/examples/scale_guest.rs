//! 50,000 idle sessions held at once by one consolegate process, measured
//! in a QEMU guest (Debian's kernel under TCG) because the development VM
//! cannot: its hard open-file limit is 20,000 and its root lacks
//! `CAP_SYS_RESOURCE` to raise it, while one proxy holding 50,000 sessions
//! needs 100,000 descriptors. Inside the guest we are root of our own
//! kernel: the init script raises the limits and widens the ephemeral port
//! range, then runs the release `consolegate` (CONNECT or WebSocket front, plain HTTP,
//! the default data path) in front of `loadgen echo-server`, and `loadgen
//! idle` opens the sessions one after another (spread over source
//! addresses and echo ports, one token each), proves each with a one-byte
//! round trip, holds them all and reads the proxy's PSS.
//!
//! A measurement, not a test (it takes minutes under TCG):
//!
//! ```sh
//! cargo build --release -p consolegate -p consolegate-bench
//! cargo run --release -p consolegate-tests --example scale_guest -- 50000
//! cargo run --release -p consolegate-tests --example scale_guest -- 50000 ws
//! ```
//!
//! The second argument picks the front: `connect` (the default) or `ws`
//! (WebSocket upgrade, binary frames, the spliced WebSocket pump).
//! Keepalive pings are off (`--ping-interval 0`): the idle client does
//! not read while it holds its sessions, so it never answers them (a
//! browser does), and opening 50,000 under TCG takes minutes, longer than
//! the keepalive gives an unanswering tenant.
//!
//! Prints the guest's `SCALE` lines and `loadgen idle`'s JSON report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use consolegate_tests::guest::{self, GuestKernel, Initramfs};

const DONE: &str = "SCALE-EXIT";

/// The guest's `/init` after [`guest::init_script`]'s start.
const INIT: &str = r#"export PATH=/bin HOME=/tmp TMPDIR=/tmp LD_LIBRARY_PATH=@LIBS@
echo 1024 65535 > /proc/sys/net/ipv4/ip_local_port_range
echo 4096 > /proc/sys/net/core/somaxconn
ulimit -n 400000
echo "SCALE: kernel $(cat /proc/sys/kernel/osrelease) nofile $(ulimit -n) mem $(grep MemTotal /proc/meminfo)"
loadgen echo-server @LISTEN@ --timeout 3600 > /tmp/echo.out 2>&1 &
: > /tmp/tokens.toml
for p in @PORTS@; do
    printf '[[token]]\ntoken = "scale-%s"\nkind = "serial"\ntarget = "127.0.0.1:%s"\n\n' $p $p >> /tmp/tokens.toml
done
consolegate serve --plain-http --connect-listen 127.0.0.1:6081 --ws-listen 127.0.0.1:6080 \
    --token-file /tmp/tokens.toml --ready-file /tmp/ready --state-dir /tmp/state \
    --allowlist off --ping-interval 0 --max-sessions @N2@ --max-sessions-per-token @N2@ \
    --max-sessions-per-source @N2@ > /tmp/proxy.log 2>&1 &
PROXY=$!
for i in $(seq 100); do [ -f /tmp/ready ] && break; sleep 0.2; done
echo "SCALE: proxy $(grep -m1 'open-file limit' /tmp/proxy.log)"
loadgen idle @FRONT@ @TARGETS@ --source-addrs @WAYS@ \
    --sessions @N@ --hold 5 --proxy-pid $PROXY --timeout 60 > /tmp/idle.json 2> /tmp/idle.err
echo "SCALE: loadgen exit $?"
echo "SCALE-JSON $(cat /tmp/idle.json)"
tail -n 3 /tmp/idle.err | sed 's/^/SCALE: loadgen: /'
grep -c 'session established' /tmp/proxy.log | sed 's/^/SCALE: established /'
grep -cE 'session closed end=(keepalive_timeout|idle_timeout)' /tmp/proxy.log | sed 's/^/SCALE: timed out while held (must be 0) /'
grep -m3 -E 'WARN|ERROR' /tmp/proxy.log | sed 's/^/SCALE: proxy: /'
echo "SCALE-EXIT"
poweroff -f
"#;

fn release(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    if !p.exists() {
        bail!(
            "{} is missing: cargo build --release -p consolegate -p consolegate-bench (or set {env})",
            p.display()
        );
    }
    Ok(p)
}

fn main() -> anyhow::Result<()> {
    let sessions: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(50_000), |a| a.parse())
        .context("usage: scale_guest [SESSIONS] [connect|ws]")?;
    let ws = match std::env::args().nth(2).as_deref() {
        None | Some("connect") => false,
        Some("ws") => true,
        Some(other) => bail!("unknown front {other}: connect or ws"),
    };
    let kernel = GuestKernel::locate()?;
    let mut fs = Initramfs::new();
    fs.file("/bin/busybox", 0o755, &std::fs::read(kernel.busybox())?);
    let mut libs = fs.executable(
        "/bin/consolegate",
        &release("consolegate", "CONSOLEGATE_BIN")?,
    )?;
    for l in fs.executable("/bin/loadgen", &release("loadgen", "LOADGEN_BIN")?)? {
        if !libs.contains(&l) {
            libs.push(l);
        }
    }
    // Connects to one destination take odd ports first and scan all of
    // them before an even one: past about 32,000 sessions per (source,
    // destination) pair each connect scans the whole range. Spread both
    // legs: tenants over source addresses, the proxy over echo ports.
    let ways = sessions.div_ceil(12_000).max(1);
    let ports: Vec<String> = (0..ways).map(|i| (7000 + i).to_string()).collect();
    let listen: Vec<String> = ports
        .iter()
        .map(|p| format!("--listen 127.0.0.1:{p}"))
        .collect();
    let (front, targets): (&str, Vec<String>) = if ws {
        (
            "--connect 127.0.0.1:6080 --front ws",
            ports
                .iter()
                .map(|p| format!("--path '/websockify?token=scale-{p}'"))
                .collect(),
        )
    } else {
        (
            "--connect 127.0.0.1:6081 --front connect",
            ports
                .iter()
                .map(|p| format!("--target 127.0.0.1:{p} --token scale-{p}"))
                .collect(),
        )
    };
    let init = guest::init_script(INIT)
        .replace("@LIBS@", &libs.join(":"))
        .replace("@LISTEN@", &listen.join(" "))
        .replace("@PORTS@", &ports.join(" "))
        .replace("@FRONT@", front)
        .replace("@TARGETS@", &targets.join(" "))
        .replace("@WAYS@", &ways.to_string())
        .replace("@N@", &sessions.to_string())
        .replace("@N2@", &(sessions + 100).to_string());
    fs.file("/init", 0o755, init.as_bytes());
    fs.dir("/etc");
    let dir = tempfile::Builder::new().prefix("cg-scale-").tempdir()?;
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(&initrd, fs.finish())?;
    // Kernel socket memory for four sockets a session, plus the processes.
    let mem_mib = u32::try_from(1024 + sessions / 20)
        .unwrap_or(u32::MAX)
        .min(16_384);
    let run = guest::boot_with_memory(
        &kernel,
        &initrd,
        "",
        DONE,
        Duration::from_secs(3600),
        mem_mib,
    )?;
    println!(
        "guest: {mem_mib} MiB, ran {:.0} s, QEMU {:?}",
        run.elapsed.as_secs_f64(),
        run.exited
    );
    for l in run.serial.lines().filter(|l| l.contains("SCALE")) {
        println!("{l}");
    }
    if !run.serial.contains("SCALE-JSON {") {
        bail!("the guest gave no report:\n{}", run.serial);
    }
    Ok(())
}
