//! The peers: each a service (one or more processes with generated config
//! files on loopback ports) and the rows it contributes to the report. A
//! row is one way through one service: e.g. haproxy serves `haproxy-tcp`
//! and `haproxy-tls` from one process.
//!
//! Every service forwards to the same two backends: the flood server (bulk)
//! and the echo server (latency, idle). A row therefore has two ways in,
//! one for each backend, as loadgen tenant arguments.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::proc::{Proc, free_port, nofile, pinned, wait_listening, which};
use super::{Pki, Settings};

mod consolegate;
use consolegate::{
    start_consolegate_copy, start_consolegate_sockmap, start_consolegate_splice,
    start_consolegate_tls, start_consolegate_tls2, start_consolegate_uring,
};

/// Who a row stands for, in ratios and colours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// No proxy: the loopback ceiling.
    Direct,
    /// A proxy people use today.
    Peer,
    /// consolegate itself.
    Consolegate,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Direct => "direct",
            Family::Peer => "peer",
            Family::Consolegate => "consolegate",
        }
    }
}

/// One way through one service.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub label: String,
    pub family: Family,
    /// raw, connect or ws.
    pub front: &'static str,
    /// TLS between the tenant and the proxy.
    pub tls: bool,
    /// TLS between the proxy and the backend too (as consolegate to QEMU).
    pub tls_compute: bool,
    /// loadgen tenant arguments reaching the flood backend.
    pub to_flood: Vec<String>,
    /// loadgen tenant arguments reaching the echo backend.
    pub to_echo: Vec<String>,
}

/// What a started service is made of.
#[derive(Debug)]
pub struct Started {
    pub procs: Vec<Proc>,
    pub rows: Vec<Row>,
}

/// Where everything lives for one compare invocation.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub settings: &'a Settings,
    pub flood: SocketAddr,
    pub echo: SocketAddr,
    /// The same backends speaking TLS (the server certificate of [`Pki`]).
    pub flood_tls: SocketAddr,
    pub echo_tls: SocketAddr,
    /// Every listener of each echo backend (the first is `echo` /
    /// `echo_tls`): a proxy spreads idle sessions over them so that it does
    /// not run out of ephemeral ports to one address.
    pub echo_all: Vec<SocketAddr>,
    pub echo_tls_all: Vec<SocketAddr>,
    pub pki: &'a Pki,
    pub work: &'a Path,
}

impl Ctx<'_> {
    fn log(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.log"))
    }

    fn proxy_cmd(&self, program: &Path, args: &[String]) -> Command {
        pinned(self.settings.proxy_cpus.as_deref(), program, args)
    }

    fn tls_args(&self) -> Vec<String> {
        vec![
            "--tls".into(),
            "--ca".into(),
            self.pki.ca.display().to_string(),
            "--server-name".into(),
            "localhost".into(),
        ]
    }
}

/// Starts one service for the run.
type StartFn = fn(&Ctx<'_>, &Path) -> Result<Started>;

/// A kind of service: how to find it and start it.
#[derive(Debug, Clone)]
pub struct Kind {
    pub name: &'static str,
    /// What the report says about it (version, mode).
    pub program: Option<&'static str>,
    /// Debian package(s) that provide it (`cargo xtask bench` installs them).
    pub debian: &'static str,
    start: StartFn,
}

impl Kind {
    /// The program path, or why the service cannot run here.
    pub fn locate(&self, settings: &Settings) -> Result<PathBuf, String> {
        match self.program {
            None => Ok(PathBuf::new()),
            Some("consolegate") => {
                let p = settings.consolegate.clone();
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!(
                        "{} not found (cargo build --release -p consolegate, or --consolegate PATH)",
                        p.display()
                    ))
                }
            }
            Some(prog) => which(prog).ok_or_else(|| {
                format!(
                    "{prog} not installed (apt-get install {}, or cargo xtask bench)",
                    self.debian
                )
            }),
        }
    }

    pub fn start(&self, ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
        (self.start)(ctx, program)
    }
}

/// Every service, in report order. consolegate's splice variant is listed
/// only if the binary offers `--datapath splice`.
pub fn kinds(settings: &Settings) -> Vec<Kind> {
    let mut v = vec![
        Kind {
            name: "direct",
            program: None,
            debian: "",
            start: start_direct,
        },
        Kind {
            name: "socat",
            program: Some("socat"),
            debian: "socat",
            start: start_socat,
        },
        Kind {
            name: "haproxy",
            program: Some("haproxy"),
            debian: "haproxy",
            start: start_haproxy,
        },
        Kind {
            name: "nginx",
            program: Some("nginx"),
            debian: "nginx libnginx-mod-stream",
            start: start_nginx,
        },
        Kind {
            name: "websockify",
            program: Some("websockify"),
            debian: "websockify",
            start: start_websockify,
        },
        Kind {
            name: "websockify-tls",
            program: Some("websockify"),
            debian: "websockify",
            start: start_websockify_tls,
        },
        Kind {
            name: "websockify-tls2",
            program: Some("websockify"),
            debian: "websockify",
            start: start_websockify_tls2,
        },
        Kind {
            name: "consolegate-copy",
            program: Some("consolegate"),
            debian: "",
            start: start_consolegate_copy,
        },
    ];
    // The rungs this binary offers beyond the copy, each a service.
    let offered = datapaths(&settings.consolegate);
    let rungs: [(&'static str, StartFn); 3] = [
        ("consolegate-splice", start_consolegate_splice),
        ("consolegate-sockmap", start_consolegate_sockmap),
        ("consolegate-uring", start_consolegate_uring),
    ];
    for (name, start) in rungs {
        if offered
            .iter()
            .any(|d| Some(d.as_str()) == name.strip_prefix("consolegate-"))
        {
            v.push(Kind {
                name,
                program: Some("consolegate"),
                debian: "",
                start,
            });
        }
    }
    v.push(Kind {
        name: "consolegate-tls",
        program: Some("consolegate"),
        debian: "",
        start: start_consolegate_tls,
    });
    v.push(Kind {
        name: "consolegate-tls2",
        program: Some("consolegate"),
        debian: "",
        start: start_consolegate_tls2,
    });
    v
}

/// The `--datapath` values `consolegate serve --help` lists (empty when the
/// binary has no such flag: it only has the userspace copy).
pub fn datapaths(consolegate: &Path) -> Vec<String> {
    match Command::new(consolegate).args(["serve", "--help"]).output() {
        Ok(out) => parse_datapaths(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => Vec::new(),
    }
}

/// The values of `--datapath` in clap's help: either "[possible values:
/// a, b]" (short help) or "- a: ..." lines (long help), up to the next flag.
fn parse_datapaths(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| !l.contains("--datapath"));
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    let is_flag = |l: &str| {
        let t = l.trim_start();
        t.starts_with('-') && !t.starts_with("- ")
    };
    let mut section = vec![first];
    section.extend(lines.take_while(|l| !is_flag(l)));
    let text = section.join("\n");
    if let Some(i) = text.find("[possible values:") {
        return text[i + 17..]
            .split(']')
            .next()
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
    }
    section
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_owned())
        .collect()
}

/// The first line of `program`'s version output.
pub fn version(kind: &Kind, program: &Path) -> String {
    let args: &[&str] = match kind.program {
        None => return String::new(),
        Some("socat") => &["-V"],
        Some("haproxy") => &["-v"],
        Some("nginx") => &["-v"],
        Some("websockify") => {
            // websockify has no --version; Debian knows.
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Version}", "websockify"])
                .output();
            return out
                .ok()
                .map(|o| format!("websockify {}", String::from_utf8_lossy(&o.stdout).trim()))
                .unwrap_or_default();
        }
        Some(_) => &["--version"],
    };
    let Ok(out) = Command::new(program).args(args).output() else {
        return String::new();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|l| l.contains("version") || l.starts_with("consolegate"))
        .unwrap_or_default()
        .to_owned()
}

fn raw_to(addr: impl std::fmt::Display) -> Vec<String> {
    vec!["--connect".into(), addr.to_string()]
}

fn with(mut a: Vec<String>, more: Vec<String>) -> Vec<String> {
    a.extend(more);
    a
}

fn start_direct(ctx: &Ctx<'_>, _: &Path) -> Result<Started> {
    Ok(Started {
        procs: Vec::new(),
        rows: vec![
            Row {
                id: "direct".into(),
                label: "direct (no proxy)".into(),
                family: Family::Direct,
                front: "raw",
                tls: false,
                tls_compute: false,
                to_flood: raw_to(ctx.flood),
                to_echo: raw_to(ctx.echo),
            },
            Row {
                id: "direct-tls".into(),
                label: "direct TLS (no proxy)".into(),
                family: Family::Direct,
                front: "raw",
                tls: true,
                tls_compute: true,
                to_flood: with(raw_to(ctx.flood_tls), ctx.tls_args()),
                to_echo: with(raw_to(ctx.echo_tls), ctx.tls_args()),
            },
        ],
    })
}

fn start_socat(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for (name, backend) in [("socat-flood", ctx.flood), ("socat-echo", ctx.echo)] {
        let port = free_port()?;
        let args = vec![
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay"),
            format!("TCP:{backend},nodelay"),
        ];
        procs.push(Proc::spawn(
            name,
            ctx.proxy_cmd(program, &args),
            &ctx.log(name),
        )?);
        ports.push(port);
    }
    wait_listening(&ports, &mut procs)?;
    Ok(Started {
        procs,
        rows: vec![Row {
            id: "socat".into(),
            label: "socat (fork per connection)".into(),
            family: Family::Peer,
            front: "raw",
            tls: false,
            tls_compute: false,
            to_flood: raw_to(format!("127.0.0.1:{}", ports[0])),
            to_echo: raw_to(format!("127.0.0.1:{}", ports[1])),
        }],
    })
}

/// Six loopback ports, flood and echo for each of: plain, TLS-terminating,
/// TLS on both legs.
fn six_ports() -> Result<[u16; 6]> {
    let mut p = [0u16; 6];
    for i in 0..p.len() {
        // Bound one after another and released: ask until all differ.
        p[i] = loop {
            let candidate = free_port()?;
            if !p[..i].contains(&candidate) {
                break candidate;
            }
        };
    }
    Ok(p)
}

/// Rows for a TCP proxy with a plain, a TLS-terminating and a TLS-both-legs
/// listener pair.
fn tcp_and_tls_rows(ctx: &Ctx<'_>, id: &str, label: &str, p: [u16; 6]) -> Vec<Row> {
    let at = |port: u16| raw_to(format!("127.0.0.1:{port}"));
    vec![
        Row {
            id: format!("{id}-tcp"),
            label: format!("{label} (plain TCP)"),
            family: Family::Peer,
            front: "raw",
            tls: false,
            tls_compute: false,
            to_flood: at(p[0]),
            to_echo: at(p[1]),
        },
        Row {
            id: format!("{id}-tls"),
            label: format!("{label} (TLS-terminating)"),
            family: Family::Peer,
            front: "raw",
            tls: true,
            tls_compute: false,
            to_flood: with(at(p[2]), ctx.tls_args()),
            to_echo: with(at(p[3]), ctx.tls_args()),
        },
        Row {
            id: format!("{id}-tls2"),
            label: format!("{label} (TLS both legs)"),
            family: Family::Peer,
            front: "raw",
            tls: true,
            tls_compute: true,
            to_flood: with(at(p[4]), ctx.tls_args()),
            to_echo: with(at(p[5]), ctx.tls_args()),
        },
    ]
}

fn start_haproxy(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    let p = six_ports()?;
    let combined = ctx.pki.combined.display();
    // haproxy wants two descriptors per connection and refuses to start
    // when maxconn needs more than the file limit allows.
    let maxconn = (nofile() / 2).saturating_sub(100).max(100);
    let mut cfg = format!(
        "global\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 1h\n  timeout server 1h\n  maxconn {maxconn}\n",
    );
    let to_tls = format!(
        " ssl verify required ca-file {} verifyhost localhost",
        ctx.pki.ca.display()
    );
    let (flood, flood_tls) = (vec![ctx.flood], vec![ctx.flood_tls]);
    let listeners = [
        ("flood_tcp", p[0], false, &flood, ""),
        ("echo_tcp", p[1], false, &ctx.echo_all, ""),
        ("flood_tls", p[2], true, &flood, ""),
        ("echo_tls", p[3], true, &ctx.echo_all, ""),
        ("flood_tls2", p[4], true, &flood_tls, to_tls.as_str()),
        ("echo_tls2", p[5], true, &ctx.echo_tls_all, to_tls.as_str()),
    ];
    for (name, port, ssl, backends, server_tls) in listeners {
        let crt = if ssl {
            format!(" ssl crt {combined}")
        } else {
            String::new()
        };
        let _ = write!(
            cfg,
            "\nlisten {name}\n  bind 127.0.0.1:{port}{crt}\n  balance roundrobin\n"
        );
        for (i, backend) in backends.iter().enumerate() {
            let _ = writeln!(cfg, "  server s{} {backend}{server_tls}", i + 1);
        }
    }
    let path = ctx.work.join("haproxy.cfg");
    fs::write(&path, cfg)?;
    let args = vec!["-f".into(), path.display().to_string(), "-db".into()];
    let mut procs = vec![Proc::spawn(
        "haproxy",
        ctx.proxy_cmd(program, &args),
        &ctx.log("haproxy"),
    )?];
    wait_listening(&p, &mut procs)?;
    Ok(Started {
        procs,
        rows: tcp_and_tls_rows(ctx, "haproxy", "haproxy, mode tcp", p),
    })
}

/// Where Debian's libnginx-mod-stream puts the stream module.
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

fn start_nginx(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    if !Path::new(NGINX_STREAM_MODULE).is_file() {
        bail!("{NGINX_STREAM_MODULE} missing (apt-get install libnginx-mod-stream)");
    }
    let p = six_ports()?;
    let dir = ctx.work.join("nginx");
    fs::create_dir_all(&dir)?;
    let (cert, key) = (ctx.pki.cert.display(), ctx.pki.key.display());
    let mut cfg = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         load_module {NGINX_STREAM_MODULE};\nworker_rlimit_nofile {nofile};\n\
         events {{ worker_connections {conns}; }}\nstream {{\n",
        d = dir.display(),
        nofile = nofile(),
        // Both legs of a session count as connections.
        conns = nofile().saturating_sub(100).max(100),
    );
    let to_tls = format!(
        "\n    proxy_ssl on;\n    proxy_ssl_trusted_certificate {};\n    \
         proxy_ssl_verify on;\n    proxy_ssl_name localhost;",
        ctx.pki.ca.display()
    );
    // Round robin over every echo listener.
    for (name, backends) in [("echo", &ctx.echo_all), ("echo_tls", &ctx.echo_tls_all)] {
        let _ = writeln!(cfg, "  upstream {name} {{");
        for b in backends.iter() {
            let _ = writeln!(cfg, "    server {b};");
        }
        cfg.push_str("  }\n");
    }
    let (flood, flood_tls) = (ctx.flood.to_string(), ctx.flood_tls.to_string());
    let listeners = [
        (p[0], false, flood.as_str(), ""),
        (p[1], false, "echo", ""),
        (p[2], true, flood.as_str(), ""),
        (p[3], true, "echo", ""),
        (p[4], true, flood_tls.as_str(), to_tls.as_str()),
        (p[5], true, "echo_tls", to_tls.as_str()),
    ];
    for (port, tls, backend, upstream_tls) in listeners {
        let ssl = if tls {
            format!(" ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key}")
        } else {
            String::new()
        };
        let _ = writeln!(
            cfg,
            "  server {{\n    listen 127.0.0.1:{port}{ssl};\n    proxy_pass {backend};{upstream_tls}\n  }}"
        );
    }
    cfg.push_str("}\n");
    let path = dir.join("nginx.conf");
    fs::write(&path, cfg)?;
    let args = vec![
        "-c".into(),
        path.display().to_string(),
        "-p".into(),
        dir.display().to_string(),
        "-e".into(),
        "stderr".into(),
    ];
    let mut procs = vec![Proc::spawn(
        "nginx",
        ctx.proxy_cmd(program, &args),
        &ctx.log("nginx"),
    )?];
    wait_listening(&p, &mut procs)?;
    Ok(Started {
        procs,
        rows: tcp_and_tls_rows(ctx, "nginx", "nginx stream", p),
    })
}

/// websockify plain (ws), TLS-terminating (wss) or with TLS to the
/// backend too (`--ssl-target`, which does not verify the backend).
fn websockify(ctx: &Ctx<'_>, program: &Path, tls: bool, tls_compute: bool) -> Result<Started> {
    let name = match (tls, tls_compute) {
        (_, true) => "websockify-tls2",
        (true, false) => "websockify-tls",
        (false, false) => "websockify",
    };
    let (flood, echo) = if tls_compute {
        (ctx.flood_tls, ctx.echo_tls)
    } else {
        (ctx.flood, ctx.echo)
    };
    let tokens = ctx.work.join(format!("{name}.tokens"));
    fs::write(&tokens, format!("flood: {flood}\necho: {echo}\n"))?;
    let port = free_port()?;
    let mut args = vec![
        "--token-plugin".into(),
        "TokenFile".into(),
        "--token-source".into(),
        tokens.display().to_string(),
    ];
    if tls {
        args.extend([
            "--cert".into(),
            ctx.pki.cert.display().to_string(),
            "--key".into(),
            ctx.pki.key.display().to_string(),
            "--ssl-only".into(),
        ]);
    }
    if tls_compute {
        args.push("--ssl-target".into());
    }
    args.push(format!("127.0.0.1:{port}"));
    let mut procs = vec![Proc::spawn(
        name,
        ctx.proxy_cmd(program, &args),
        &ctx.log(name),
    )?];
    wait_listening(&[port], &mut procs)?;
    let at = |token: &str| {
        let mut a = vec![
            "--connect".into(),
            format!("127.0.0.1:{port}"),
            "--front".into(),
            "ws".into(),
            "--path".into(),
            format!("/?token={token}"),
        ];
        if tls {
            a.extend(ctx.tls_args());
        }
        a
    };
    Ok(Started {
        procs,
        rows: vec![Row {
            id: name.into(),
            label: match (tls, tls_compute) {
                (_, true) => "websockify (wss, TLS both legs, backend unverified)".into(),
                (true, false) => "websockify (wss, TLS-terminating)".into(),
                (false, false) => "websockify (ws)".into(),
            },
            family: Family::Peer,
            front: "ws",
            tls,
            tls_compute,
            to_flood: at("flood"),
            to_echo: at("echo"),
        }],
    })
}

fn start_websockify(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    websockify(ctx, program, false, false)
}

fn start_websockify_tls(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    websockify(ctx, program, true, false)
}

fn start_websockify_tls2(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    websockify(ctx, program, true, true)
}

#[cfg(test)]
mod tests {
    use super::consolegate::echo_token_names;
    use super::*;

    #[test]
    fn datapath_values_come_from_long_and_short_help() {
        let long = "Options:\n      --ping-interval <DUR>\n          ping\n\n      \
                    --datapath <DATAPATH>\n          Data path\n\n          Possible values:\n          \
                    - auto:   The fastest\n          - copy:   Always the copy\n          \
                    - splice: splice(2)\n\n      --allowlist <ALLOWLIST>\n          \
                    Possible values:\n          - off: no\n          - required: yes\n  \
                    -h, --help\n";
        assert_eq!(parse_datapaths(long), ["auto", "copy", "splice"]);
        let short = "  --datapath <DATAPATH>  Data path [possible values: auto, copy, splice]\n  \
                     --allowlist <A>  [possible values: off]\n";
        assert_eq!(parse_datapaths(short), ["auto", "copy", "splice"]);
        assert!(parse_datapaths("  --ping-interval <DUR>\n").is_empty());
    }

    #[test]
    fn echo_tokens_name_one_per_listener() {
        assert_eq!(echo_token_names(0), ["bench-echo"]);
        assert_eq!(echo_token_names(1), ["bench-echo"]);
        assert_eq!(
            echo_token_names(3),
            ["bench-echo", "bench-echo-2", "bench-echo-3"]
        );
    }

    #[test]
    fn datapaths_of_a_binary_without_the_flag_is_empty() {
        assert!(datapaths(Path::new("/bin/true")).is_empty());
        assert!(datapaths(Path::new("/nonexistent/consolegate")).is_empty());
    }
}
