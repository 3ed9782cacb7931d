//! 200 concurrent WebSocket sessions through one proxy. One QEMU is one
//! console, so the compute side here is a scripted TCP echo server; each
//! session checks its own payload comes back intact.

use std::sync::Arc;
use std::time::Duration;

use consolegate_tests::fake::EchoServer;
use consolegate_tests::proxy::{Proxy, ProxySpec, raw_token, write_toml_tokens};
use consolegate_tests::scenario::token_dir;
use consolegate_tests::ws::{self, Mode, WsRequest};
use consolegate_tests::{random_token, within_for};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SESSIONS: usize = 200;
const PAYLOAD: usize = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sessions_echo_their_own_payload() {
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&tok, echo.addr)]).unwrap();
    // One token and one address for all: lift the per-token and
    // per-source limits (tests/tests/limits.rs covers them).
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.extra = unlimited();
    let proxy = Proxy::start(spec).await.unwrap();
    let (addr, t) = (proxy.ws_addr(), proxy.transport());

    // Every session is upgraded before any sends: all 200 are open at once.
    let all_open = Arc::new(tokio::sync::Barrier::new(SESSIONS));
    let mut tasks = Vec::new();
    for i in 0..SESSIONS {
        let (t, tok, all_open) = (t.clone(), tok.clone(), Arc::clone(&all_open));
        let mode = if i % 4 == 3 {
            Mode::Base64
        } else {
            Mode::Binary
        };
        tasks.push(tokio::spawn(async move {
            let proto = if mode == Mode::Base64 {
                "base64"
            } else {
                "binary"
            };
            let req = WsRequest::path(format!("/websockify?token={tok}")).protocol(proto);
            let opened = async { ws::connect(addr, &t, &req).await?.upgraded() }.await;
            // Wait even on failure, so one refusal cannot hang the others.
            all_open.wait().await;
            let (w, _) = opened?;
            let mut b = ws::into_bytes(w, mode);
            let payload: Vec<u8> = (0..PAYLOAD)
                .map(|j| (i as u8).wrapping_mul(31).wrapping_add(j as u8) ^ (j >> 8) as u8)
                .collect();
            let (mut rd, mut wr) = tokio::io::split(&mut b.io);
            let send = async {
                for chunk in payload.chunks(1000 + i) {
                    wr.write_all(chunk).await?;
                }
                wr.flush().await?;
                anyhow::Ok(())
            };
            let mut back = vec![0u8; PAYLOAD];
            let recv = async {
                rd.read_exact(&mut back).await?;
                anyhow::Ok(())
            };
            let (s, r) = tokio::join!(send, recv);
            s?;
            r?;
            anyhow::ensure!(back == payload, "session {i}: echoed payload differs");
            anyhow::Ok(())
        }));
    }
    let results = within_for(
        Duration::from_secs(180),
        "200 sessions",
        futures_util::future::join_all(tasks),
    )
    .await
    .unwrap();
    let failures: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("session {i}: {e:#}")),
            Err(e) => Some(format!("session {i}: task {e}")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(echo.accepted(), SESSIONS);
    proxy.assert_secrets_not_logged(&[&tok]);
}

/// 100 concurrent CONNECT tunnels, each sending its payload, half-closing,
/// and reading exactly its payload back before EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_connect_tunnels_with_half_close() {
    const TUNNELS: usize = 100;
    let echo = EchoServer::start().await.unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("tokens.toml");
    write_toml_tokens(&file, &[raw_token(&tok, echo.addr)]).unwrap();
    let mut spec = ProxySpec::connect(&[&file]);
    spec.extra = unlimited();
    let proxy = Proxy::start(spec).await.unwrap();
    let p = proxy.connect_addr();
    let target = consolegate_tests::net::authority(echo.addr);
    let all_open = Arc::new(tokio::sync::Barrier::new(TUNNELS));
    let mut tasks = Vec::new();
    for i in 0..TUNNELS {
        let (tok, target, all_open) = (tok.clone(), target.clone(), Arc::clone(&all_open));
        tasks.push(tokio::spawn(async move {
            let opened = async {
                consolegate_tests::http::connect_tunnel(
                    p,
                    &target,
                    Some(&consolegate_tests::http::bearer(&tok)),
                )
                .await?
                .tunnel()
            }
            .await;
            all_open.wait().await;
            let mut io = opened?;
            let payload: Vec<u8> = (0..PAYLOAD).map(|j| (i * 7 + j) as u8).collect();
            io.write_all(&payload).await?;
            io.shutdown().await?;
            let back = consolegate_tests::http::read_to_close(&mut io).await;
            anyhow::ensure!(back == payload, "tunnel {i}: got {} bytes back", back.len());
            anyhow::Ok(())
        }));
    }
    let results = within_for(
        Duration::from_secs(180),
        "100 tunnels",
        futures_util::future::join_all(tasks),
    )
    .await
    .unwrap();
    let failures: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("tunnel {i}: {e:#}")),
            Err(e) => Some(format!("tunnel {i}: task {e}")),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(echo.accepted(), TUNNELS);
}

fn unlimited() -> Vec<String> {
    [
        "--max-sessions-per-token",
        "0",
        "--max-sessions-per-source",
        "0",
    ]
    .map(String::from)
    .to_vec()
}
