//! How long does opening a VNC console take through consolegate, with the
//! compute leg in plain VNC versus VeNCrypt X509None (TLS 1.3 with a client
//! certificate, QEMU `verify-peer=on`)?
//!
//! Starts two real QEMU VNC servers (TCG), one plain and one with
//! `tls-creds-x509`, and one consolegate per server (plain-HTTP WebSocket and
//! CONNECT listeners on loopback, so the tenant side costs the same in both
//! modes). Each sample is a fresh session, timed from the tenant's TCP
//! connect to ServerInit: WebSocket upgrade or CONNECT, token lookup, dial,
//! the compute-side security phase, the tenant RFB handshake. A direct RFB
//! handshake to the plain server is the baseline. Samples are interleaved
//! so machine noise hits every mode alike.
//!
//! ```sh
//! cargo build --release -p consolegate
//! CONSOLEGATE_BIN=$PWD/target/release/consolegate \
//!     cargo run --release -p consolegate-tests --example handshake_latency -- 200
//! ```
//!
//! Prints one Markdown table (milliseconds) and one JSON line per mode.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use consolegate_tests::compute::{Ca, Pki, VncServer};
use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::net::Transport;
use consolegate_tests::proxy::{Proxy, ProxySpec};
use consolegate_tests::rfb;
use consolegate_tests::ws::{self, Mode, WsRequest};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Direct,
    WebSocket,
    Connect,
}

struct Case {
    name: &'static str,
    path: Path,
    proxy: Option<usize>,
    target: String,
    samples: Vec<Duration>,
}

async fn one(case: &Case, proxies: &[Proxy]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    match (case.path, case.proxy) {
        (Path::Direct, _) => {
            let mut s = tokio::net::TcpStream::connect(&case.target).await?;
            s.set_nodelay(true)?;
            rfb::handshake(&mut s).await?;
        }
        (Path::WebSocket, Some(i)) => {
            let req = WsRequest::path("/websockify?token=tok").protocol("binary");
            let (socket, _) = ws::connect(proxies[i].ws_addr(), &Transport::Plain, &req)
                .await?
                .upgraded()?;
            let mut b = ws::into_bytes(socket, Mode::Binary);
            rfb::handshake(&mut b.io).await?;
        }
        (Path::Connect, Some(i)) => {
            let mut io = connect_tunnel(proxies[i].connect_addr(), "tok:0", Some(&bearer("tok")))
                .await?
                .tunnel()?;
            rfb::handshake(&mut io).await?;
        }
        _ => anyhow::bail!("case without a proxy"),
    }
    Ok(started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().context("the argument is the number of samples")?,
        None => 100,
    };
    let ca = Ca::new("compute CA");
    let pki = Pki::new(&ca, &ca, &["127.0.0.1"], false);
    let plain = VncServer::default().start().await;
    let tls = VncServer {
        x509: Some(pki.path("qemu-x509")),
        ..Default::default()
    }
    .start()
    .await;
    let ca_file = pki.proxy_trusts(&ca);

    let mut proxies = Vec::new();
    for (target, compute) in [
        (&plain.target, Vec::new()),
        (
            &tls.target,
            vec![
                "--compute-ca".to_owned(),
                ca_file.display().to_string(),
                "--compute-cert".to_owned(),
                pki.path("client-cert.pem").display().to_string(),
                "--compute-key".to_owned(),
                pki.path("client-key.pem").display().to_string(),
            ],
        ),
    ] {
        let file = pki.path(&format!("tokens-{}.toml", proxies.len()));
        std::fs::write(
            &file,
            format!("[[token]]\ntoken = \"tok\"\nkind = \"vnc\"\ntarget = \"{target}\"\n"),
        )?;
        let mut spec = ProxySpec::connect(&[&file]);
        spec.extra = compute;
        proxies.push(Proxy::start(spec).await?);
    }

    let mut cases = vec![
        Case {
            name: "direct, plain VNC (no proxy)",
            path: Path::Direct,
            proxy: None,
            target: plain.target.clone(),
            samples: Vec::new(),
        },
        Case {
            name: "WebSocket, compute plain VNC",
            path: Path::WebSocket,
            proxy: Some(0),
            target: plain.target.clone(),
            samples: Vec::new(),
        },
        Case {
            name: "WebSocket, compute VeNCrypt X509None",
            path: Path::WebSocket,
            proxy: Some(1),
            target: tls.target.clone(),
            samples: Vec::new(),
        },
        Case {
            name: "CONNECT, compute plain VNC",
            path: Path::Connect,
            proxy: Some(0),
            target: plain.target.clone(),
            samples: Vec::new(),
        },
        Case {
            name: "CONNECT, compute VeNCrypt X509None",
            path: Path::Connect,
            proxy: Some(1),
            target: tls.target.clone(),
            samples: Vec::new(),
        },
    ];
    // Warm-up: one session each (page cache, QEMU's first VNC client).
    for c in &cases {
        one(c, &proxies).await.with_context(|| c.name)?;
    }
    for _ in 0..n {
        for c in cases.iter_mut() {
            let d = one(c, &proxies).await.with_context(|| c.name)?;
            c.samples.push(d);
        }
    }

    println!("| path | n | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for c in cases.iter_mut() {
        c.samples.sort();
        let s = &c.samples;
        let (p50, p90, p99, max) = (
            percentile(s, 0.5),
            percentile(s, 0.9),
            percentile(s, 0.99),
            percentile(s, 1.0),
        );
        println!(
            "| {} | {} | {p50:.2} | {p90:.2} | {p99:.2} | {max:.2} |",
            c.name,
            s.len()
        );
        json.push(serde_json::json!({
            "case": c.name, "n": s.len(),
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
        }));
    }
    for j in json {
        println!("{j}");
    }
    Ok(())
}
