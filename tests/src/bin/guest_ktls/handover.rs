//! A TLS 1.3 KeyUpdate that rustls in the proxy holds an answer for at the
//! kTLS hand-over, through the real proxy in the guest.
//!
//! rustls seals its answer to a peer's KeyUpdate (one asking for ours) at
//! once but sends it only ahead of our next application data, and the
//! secrets it gives up for kTLS count it as sent. The proxy must send it
//! before the socket is the kernel's. From outside, the one place a
//! KeyUpdate can sit after our last write on a leg is inside a console's
//! handshake: a scripted VNC console (VeNCrypt X509None, requiring the
//! proxy's client certificate) sends the SecurityResult in two records
//! with its KeyUpdate between them. That is fault injection: QEMU does not
//! do it, but TLS allows it. The proxy reads the KeyUpdate while waiting
//! for the rest of the SecurityResult, writes nothing more to the console
//! (from ClientInit on, bytes pass through), and hands the leg to kTLS.
//!
//! No key renewal in the kernel is involved, so on every kernel the
//! console must open our ClientInit and the rounds after it under the keys
//! that follow the answer, and the proxy must log the answer once.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use consolegate_tests::net::authority;
use consolegate_tests::proxy::{Proxy, TomlToken};
use consolegate_tests::{http, rfb, within_for};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::direct::random;
use crate::report;

/// Upper bound for the session under TCG (never a performance assertion).
const SESSION_LIMIT: Duration = Duration::from_secs(120);
/// The proxy's log line of a KeyUpdate answered at the hand-over.
const ANSWERED: &str = "KeyUpdate arrived at the kTLS hand-over: answered before it";
/// Tenant to console and console to tenant, per round.
const UP: usize = 64 << 10;
const DOWN: usize = 256 << 10;
const ROUNDS: usize = 3;
/// VeNCrypt and its X509None subtype.
const VENCRYPT: u8 = 19;
const X509_NONE: u32 = 260;

/// The scripted VNC console, bound before the proxy's token file is
/// written: a listener and a TLS acceptor, as the KeyUpdate consoles.
pub struct Console(crate::rekey::Console);

impl Console {
    pub async fn bind(config: Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        Ok(Self(crate::rekey::Console::bind(config).await?))
    }

    /// The token for it: kind `vnc`, so the proxy runs the RFB security
    /// phase with it.
    pub fn token(&self, token: &str) -> TomlToken {
        TomlToken {
            token: token.to_owned(),
            kind: Some("vnc".into()),
            target: Some(authority(self.0.addr)),
            ..TomlToken::default()
        }
    }

    fn serve(self, rounds: Vec<(Vec<u8>, Vec<u8>)>) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tokio::spawn(async move {
            let (mut tcp, _) = self.0.listener.accept().await?;
            tcp.set_nodelay(true)?;
            tcp.write_all(b"RFB 003.008\n").await?;
            let mut version = [0u8; 12];
            tcp.read_exact(&mut version)
                .await
                .context("client version")?;
            anyhow::ensure!(&version == b"RFB 003.008\n", "client version {version:?}");
            tcp.write_all(&[1, VENCRYPT]).await?;
            anyhow::ensure!(tcp.read_u8().await? == VENCRYPT, "VeNCrypt not chosen");
            tcp.write_all(&[0, 2]).await?;
            let mut vv = [0u8; 2];
            tcp.read_exact(&mut vv).await?;
            anyhow::ensure!(vv == [0, 2], "VeNCrypt version {vv:?}");
            tcp.write_all(&[0, 1]).await?;
            tcp.write_all(&X509_NONE.to_be_bytes()).await?;
            anyhow::ensure!(tcp.read_u32().await? == X509_NONE, "X509None not chosen");
            tcp.write_all(&[1]).await?;
            let mut tls = self
                .0
                .acceptor
                .accept(tcp)
                .await
                .context("console TLS handshake")?;
            // SecurityResult (OK) in two records, our KeyUpdate between.
            tls.write_all(&[0, 0]).await?;
            tls.flush().await?;
            tls.get_mut().1.refresh_traffic_keys()?;
            tls.write_all(&[0, 0]).await?;
            tls.flush().await?;
            let shared = tls.read_u8().await.context("console reading ClientInit")?;
            anyhow::ensure!(shared <= 1, "ClientInit {shared}");
            let mut init = Vec::new();
            init.extend_from_slice(&640u16.to_be_bytes());
            init.extend_from_slice(&480u16.to_be_bytes());
            init.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
            init.extend_from_slice(&4u32.to_be_bytes());
            init.extend_from_slice(b"held");
            tls.write_all(&init).await?;
            tls.flush().await?;
            for (i, (up, down)) in rounds.iter().enumerate() {
                let mut got = vec![0u8; up.len()];
                tls.read_exact(&mut got)
                    .await
                    .with_context(|| format!("console reading round {i}"))?;
                anyhow::ensure!(&got == up, "console: round {i} arrived altered");
                tls.write_all(down).await?;
                tls.flush().await?;
            }
            crate::rekey::close(tls).await?;
            Ok(())
        })
    }
}

/// Runs the session through `proxy`'s CONNECT listener and checks it.
pub async fn session(proxy: &Proxy, console: Console, token: &str) -> anyhow::Result<()> {
    let target = authority(console.0.addr);
    let rounds: Vec<(Vec<u8>, Vec<u8>)> = (0..ROUNDS).map(|_| (random(UP), random(DOWN))).collect();
    let console_run = console.serve(rounds.clone());
    let tenant = async {
        let mut tunnel =
            http::connect_tunnel(proxy.connect_addr(), &target, Some(&http::bearer(token)))
                .await?
                .tunnel()?;
        let init = rfb::handshake(&mut tunnel).await?;
        anyhow::ensure!(
            (init.width, init.height, init.name.as_str()) == (640, 480, "held"),
            "ServerInit {init:?}"
        );
        for (i, (up, down)) in rounds.iter().enumerate() {
            tunnel.write_all(up).await?;
            tunnel.flush().await?;
            let mut got = vec![0u8; down.len()];
            tunnel
                .read_exact(&mut got)
                .await
                .with_context(|| format!("tenant reading round {i}"))?;
            anyhow::ensure!(&got == down, "tenant: round {i} arrived altered");
        }
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await?;
        anyhow::ensure!(
            rest.is_empty(),
            "tenant: {} bytes after the end",
            rest.len()
        );
        Ok(())
    };
    within_for(SESSION_LIMIT, "KeyUpdate-at-the-hand-over session", tenant)
        .await?
        .context("KeyUpdate-at-the-hand-over session, tenant")?;
    within_for(
        SESSION_LIMIT,
        "KeyUpdate-at-the-hand-over console",
        console_run,
    )
    .await??
    .context("KeyUpdate-at-the-hand-over session, console")?;
    let line = proxy
        .wait_log(&[ANSWERED])
        .await
        .context("the proxy should log the KeyUpdate it answered at the hand-over")?;
    let answered = proxy
        .logs()
        .lines()
        .filter(|l| l.contains(ANSWERED))
        .count();
    anyhow::ensure!(
        answered == 1,
        "{answered} answers at the hand-over logged, expected 1"
    );
    anyhow::ensure!(
        line.contains("console.kind=\"vnc\""),
        "the answer was logged outside the VNC session: {line}"
    );
    report(
        "rekey-at-handover",
        format!(
            "a console's KeyUpdate inside its VeNCrypt SecurityResult was answered at the kTLS \
             hand-over; ClientInit, ServerInit and {ROUNDS} rounds carried byte for byte"
        ),
    );
    Ok(())
}
