//! `consolegate doctor`: which kernel accelerations this kernel and these
//! privileges allow, and which the configuration would use.

use std::fmt;

use super::allowlist::AllowList;
use super::cgroup::{self, Attached};
use crate::config::kernel::{AllowListMode, DatapathMode, KtlsMode};
use crate::sys::probe;

/// One probe's answer.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, r: Result<String, String>) -> Check {
    match r {
        Ok(detail) => Check {
            name,
            ok: true,
            detail,
        },
        Err(detail) => Check {
            name,
            ok: false,
            detail,
        },
    }
}

/// Everything `doctor` found.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
    pub datapath: DatapathMode,
    pub allowlist: AllowListMode,
    pub ktls: KtlsMode,
    /// What kernel TLS would offload here (`TLS1.3/AES-128-GCM`, ...).
    pub ktls_ciphers: Vec<String>,
}

impl Report {
    fn ok(&self, name: &str) -> bool {
        self.checks.iter().any(|c| c.name == name && c.ok)
    }

    /// Whether the configuration asks for something this host lacks
    /// (a required allow-list that cannot attach).
    pub fn config_unsatisfied(&self) -> bool {
        self.allowlist == AllowListMode::Required && !self.ok("cgroup attach")
    }
}

/// Runs every probe. The cgroup-attach probe loads the allow-list into a
/// scratch cgroup (no process in it) and removes it again.
pub fn run(datapath: DatapathMode, allowlist: AllowListMode, ktls: KtlsMode) -> Report {
    let mut checks = Vec::new();
    checks.push(check(
        "bpf",
        probe::bpf_map(probe::MAP_HASH)
            .map(|()| "bpf(2) creates maps".to_owned())
            .map_err(|e| format!("bpf(2): {e} (needs CAP_BPF or root)")),
    ));
    checks.push(check(
        "ebpf object",
        consolegate_ebpf::ALLOWLIST_OBJ
            .map(|o| format!("allow-list program embedded ({} bytes)", o.len()))
            .ok_or_else(|| consolegate_ebpf::NOT_BUILT.to_owned()),
    ));
    let mount = cgroup::cgroup2_mount();
    checks.push(check(
        "cgroup v2",
        match (&mount, cgroup::current_dir()) {
            (Some(m), Ok(cur)) => Ok(format!(
                "mounted at {}, we are in {}",
                m.display(),
                cur.display()
            )),
            (None, _) => Err("no cgroup2 mount in /proc/self/mountinfo".to_owned()),
            (Some(_), Err(e)) => Err(e.to_string()),
        },
    ));
    checks.push(check("cgroup attach", attach_probe()));
    checks.push(check(
        "sockmap",
        probe::bpf_map(probe::MAP_SOCKHASH)
            .map_err(|e| format!("SOCKHASH: {e}"))
            .and_then(|()| super::sockmap::probe()),
    ));
    checks.push(check(
        "io_uring",
        probe::io_uring()
            .map(|()| "io_uring_setup works".to_owned())
            .map_err(|e| format!("io_uring_setup: {e}")),
    ));
    checks.push(check("uring splice", uring_probe()));
    // Probed whatever kernel.ktls says: doctor tells what the host allows.
    let (offload, _) = crate::offload::Offload::probe(KtlsMode::Auto);
    let ktls_ciphers = offload.ciphers();
    checks.push(check(
        "kTLS",
        probe::ktls()
            .map(|()| {
                if ktls_ciphers.is_empty() {
                    "TCP_ULP \"tls\" accepted, but no cipher is offloaded".to_owned()
                } else {
                    format!("offloads {}", ktls_ciphers.join(", "))
                }
            })
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => {
                    "TCP_ULP \"tls\": ENOENT (the tls module is absent)".to_owned()
                }
                _ => format!("TCP_ULP \"tls\": {e}"),
            }),
    ));
    checks.push(check(
        "kTLS rekey",
        if !offload.enabled() {
            Err("no kTLS here".to_owned())
        } else if offload.rekey() {
            Ok("takes new TLS 1.3 keys: a peer's KeyUpdate is followed in the kernel".to_owned())
        } else {
            Err(match crate::sys::ktls::probe_rekey() {
                Ok(()) => "no TLS 1.3 AES-128-GCM offload to renew keys of".to_owned(),
                Err(e) => format!(
                    "a second TLS_TX key: {e}: a TLS 1.3 KeyUpdate ends a kTLS session \
                     (Linux 6.14 and later renew keys)"
                ),
            })
        },
    ));
    checks.push(check("splice", splice_probe()));
    Report {
        checks,
        datapath,
        allowlist,
        ktls,
        ktls_ciphers,
    }
}

fn attach_probe() -> Result<String, String> {
    let parent = cgroup::current_dir().map_err(|e| e.to_string())?;
    let dir = parent.join(format!("consolegate-doctor-{}", std::process::id()));
    let scratch = Attached::scratch(&dir).map_err(|e| e.to_string())?;
    let list = AllowList::with_cgroup(scratch).map_err(|e| e.to_string())?;
    list.close();
    Ok(format!(
        "connect4/connect6 load and attach (tried on {})",
        dir.display()
    ))
}

/// The opcodes the uring data path needs (IORING_REGISTER_PROBE).
fn uring_probe() -> Result<String, String> {
    let s = crate::sys::uring::probe().map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    let yes = |b: bool| if b { "yes" } else { "no" };
    let ops = format!(
        "IORING_OP_SPLICE {}, POLL_ADD {}, ASYNC_CANCEL {}, RECV/SEND {}",
        yes(s.splice),
        yes(s.poll_add),
        yes(s.async_cancel),
        yes(s.recv && s.send)
    );
    if s.poll_add && s.async_cancel && s.splice {
        Ok(ops)
    } else if s.poll_add && s.async_cancel && s.recv && s.send {
        Err(format!("{ops}: the uring path would use recv/send"))
    } else {
        Err(format!("{ops}: the uring path is unavailable"))
    }
}

fn splice_probe() -> Result<String, String> {
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    let run = || -> std::io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut a = std::net::TcpStream::connect(l.local_addr()?)?;
        let (b, _) = l.accept()?;
        a.write_all(b"x")?;
        let pipe = crate::sys::pipe::Pipe::new(crate::datapath::splice::PIPE_SIZE)?;
        crate::sys::pipe::splice(b.as_fd(), pipe.writer(), 1)?;
        Ok(())
    };
    run()
        .map(|()| "socket -> pipe -> socket".to_owned())
        .map_err(|e| format!("splice: {e}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "kernel and privileges:")?;
        for c in &self.checks {
            let mark = if c.ok { "yes" } else { "no " };
            writeln!(f, "  {mark} {:<14} {}", c.name, c.detail)?;
        }
        writeln!(f, "this configuration would use:")?;
        let allow = match self.allowlist {
            AllowListMode::Off => "off (kernel.allowlist = \"off\")".to_owned(),
            mode if self.ok("cgroup attach") => format!(
                "on: connect4/connect6 on the proxy's own cgroup (kernel.allowlist = \"{}\")",
                if mode == AllowListMode::Required {
                    "required"
                } else {
                    "auto"
                }
            ),
            AllowListMode::Auto => {
                "OFF with a warning at start: cannot attach here (kernel.allowlist = \"auto\")"
                    .to_owned()
            }
            AllowListMode::Required => {
                "UNAVAILABLE: the proxy would refuse to start (kernel.allowlist = \"required\")"
                    .to_owned()
            }
        };
        writeln!(f, "  allow-list     {allow}")?;
        let uring_ok = self.ok("io_uring")
            && self
                .checks
                .iter()
                .any(|c| c.name == "uring splice" && (c.ok || c.detail.contains("recv/send")));
        let dp = match self.datapath {
            DatapathMode::Copy => "copy for every session (kernel.datapath = \"copy\")".to_owned(),
            DatapathMode::Uring if uring_ok => format!(
                "io_uring ({}) for CONNECT sessions whose legs are plain sockets; splice or copy elsewhere \
                 (kernel.datapath = \"uring\")",
                if self.ok("uring splice") {
                    "IORING_OP_SPLICE"
                } else {
                    "recv/send"
                }
            ),
            DatapathMode::Uring => {
                "splice/copy with a WARN at start: io_uring is unavailable here \
                 (kernel.datapath = \"uring\")"
                    .to_owned()
            }
            DatapathMode::Sockmap if self.ok("sockmap") => {
                "sockmap for CONNECT sessions whose legs are both plain TCP, splice for other \
                 plain sockets, copy where a leg is TLS (kernel.datapath = \"sockmap\")"
                    .to_owned()
            }
            DatapathMode::Sockmap => "splice with a warning at start: the sockmap program cannot \
                 load here (kernel.datapath = \"sockmap\")"
                .to_owned(),
            mode if self.ok("splice") => format!(
                "splice where both legs are plain sockets (CONNECT, plain-HTTP binary WebSocket), copy where a leg is TLS \
                 (kernel.datapath = \"{}\")",
                mode.as_str()
            ),
            mode => format!(
                "copy: splice is unavailable here (kernel.datapath = \"{}\")",
                mode.as_str()
            ),
        };
        writeln!(f, "  data path      {dp}")?;
        let kt = match self.ktls {
            KtlsMode::Off => "off: TLS legs stay on rustls (kernel.ktls = \"off\")".to_owned(),
            KtlsMode::Auto if self.datapath == DatapathMode::Copy => {
                "not used: kernel.datapath = \"copy\"".to_owned()
            }
            KtlsMode::Auto if !self.ktls_ciphers.is_empty() => format!(
                "ktls+splice for TLS sessions negotiating {} (kernel.ktls = \"auto\")",
                self.ktls_ciphers.join(", ")
            ),
            KtlsMode::Auto => {
                "unavailable here: TLS legs stay on rustls (kernel.ktls = \"auto\")".to_owned()
            }
        };
        writeln!(f, "  kTLS           {kt}")
    }
}
