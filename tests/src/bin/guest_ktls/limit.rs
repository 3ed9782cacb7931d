//! The record limit of kTLS transmit keys, through a proxy configured to
//! renew them after [`RECORDS`] records (`kernel.ktls_records_per_key`;
//! AES-GCM's own limit, 2^24 records, is out of reach of a test).
//!
//! Two sessions run [`SMALL_ROUNDS`] small exchanges (one record each way
//! per round), then one large one (spliced, many records):
//! - a TLS WebSocket session, both legs on kTLS (the tenant leg written by
//!   the WebSocket pump: frames, spliced payloads; the compute leg by the
//!   tenant's input);
//! - a CONNECT session, the compute leg on kTLS (written by the splice
//!   rung: small copies and splices).
//!
//! On a kernel that renews kTLS keys, every byte must arrive (so the
//! peers, rustls on both sides, followed each KeyUpdate of ours) and the
//! proxy must have renewed each kTLS leg's transmit key at least
//! [`MIN_RENEWALS`] times. On one that cannot, each session must end at
//! the limit with the proxy's error saying so.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use consolegate_tests::admin;
use consolegate_tests::net::Transport;
use consolegate_tests::proxy::Proxy;
use consolegate_tests::within_for;

use crate::direct::random;
use crate::rekey::{Console, Round, connect_session, tenant_rounds, wss};
use crate::report;

/// Records per transmit key in this proxy's configuration.
pub const RECORDS: u64 = 48;
/// Small exchanges per session: each puts at least one record on every
/// kTLS leg, so the legs pass the limit several times over.
const SMALL_ROUNDS: usize = 150;
/// Renewals each kTLS leg must show (it seals well over `3 * RECORDS`
/// records).
const MIN_RENEWALS: usize = 2;
/// The proxy's log line of a key renewed at the limit.
const AT_LIMIT: &str = "kTLS key renewed at the record limit";
/// Its error where keys cannot be renewed.
const CANNOT: &str = "its limit, and cannot be renewed";

const SESSION_LIMIT: Duration = Duration::from_secs(120);

/// The two consoles, bound before the proxy's token file is written.
pub struct Consoles {
    pub websocket: Console,
    pub connect: Console,
}

impl Consoles {
    pub async fn bind(config: &Arc<rustls::ServerConfig>) -> anyhow::Result<Self> {
        Ok(Self {
            websocket: Console::bind(Arc::clone(config)).await?,
            connect: Console::bind(Arc::clone(config)).await?,
        })
    }
}

/// Small rounds, then one of 1 MiB down and 256 KiB up.
fn rounds() -> Vec<Round> {
    let mut v: Vec<Round> = (0..SMALL_ROUNDS)
        .map(|_| Round {
            up: random(100),
            down: random(300),
            tenant_rekeys: false,
            console_rekeys: false,
        })
        .collect();
    v.push(Round {
        up: random(256 << 10),
        down: random(1 << 20),
        tenant_rekeys: false,
        console_rekeys: false,
    });
    v
}

/// Renewals at the limit logged so far, per leg: (tenant, compute).
fn renewals(proxy: &Proxy) -> (usize, usize) {
    let logs = proxy.logs();
    let at = |leg: &str| {
        logs.lines()
            .filter(|l| l.contains(AT_LIMIT) && l.contains(&format!("leg=\"{leg}\"")))
            .count()
    };
    (at("tenant"), at("compute"))
}

/// The proxy's count of keys renewed at the record limit, per leg, from
/// its metrics: (tenant, compute).
async fn metric_renewals(proxy: &Proxy) -> anyhow::Result<(usize, usize)> {
    let addr = proxy.admin.context("the proxy has no admin listener")?;
    let got = admin::request(
        addr,
        &Transport::Plain,
        "GET",
        "/metrics",
        Some(admin::TEST_KEY),
        None,
    )
    .await?;
    anyhow::ensure!(got.status == 200, "GET /metrics: {}", got.status);
    let count = |leg: &str| -> usize {
        let prefix = format!(
            "consolegate_ktls_key_renewals_total{{leg=\"{leg}\",direction=\"send\",reason=\"record_limit\"}} "
        );
        got.body
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((count("tenant"), count("compute")))
}

/// Starts the proxy with `config` plus the limit, runs both sessions and
/// checks the outcome the kernel calls for (`renews`).
pub async fn sessions(
    config: &Path,
    consoles: Consoles,
    tenant_tls: Arc<rustls::ClientConfig>,
    (ws_token, connect_token): (&str, &str),
    renews: bool,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let limited = config.with_file_name("consolegate-limit.toml");
    std::fs::write(config.with_file_name("admin.key"), admin::TEST_KEY)?;
    // The limit goes at the end of the `[kernel]` table the file ends with;
    // an admin listener serves the metrics.
    std::fs::write(
        &limited,
        format!(
            "{text}ktls_records_per_key = {RECORDS}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             plain_http = true\nkey_file = \"admin.key\"\n"
        ),
    )?;
    let proxy_dir = tempfile::Builder::new().prefix("cg-proxy-").tempdir()?;
    let args = [
        "serve".to_owned(),
        "--config".to_owned(),
        limited.display().to_string(),
    ];
    let proxy = Proxy::start_args(proxy_dir, &args).await?;

    let ws_rounds = rounds();
    let console = consoles.websocket.serve(ws_rounds.clone());
    let tenant = within_for(SESSION_LIMIT, "record-limit WebSocket session", async {
        let (mut bytes, _) = wss(proxy.ws_addr(), Arc::clone(&tenant_tls), ws_token).await?;
        let done = tenant_rounds(&mut bytes.io, &ws_rounds, None).await?;
        let closed = bytes.closed.await??;
        anyhow::ensure!(
            closed.code == Some(1000),
            "WebSocket closed with {closed:?}, expected 1000 when the console closed"
        );
        Ok(done)
    })
    .await?;
    let console = within_for(SESSION_LIMIT, "record-limit WebSocket console", console).await??;
    let ws_outcome = (tenant, console);
    let after_ws = renewals(&proxy);

    let connect_rounds = rounds();
    let console_addr: SocketAddr = consoles.connect.addr;
    let console = consoles.connect.serve(connect_rounds.clone());
    let tenant = within_for(
        SESSION_LIMIT,
        "record-limit CONNECT session",
        connect_session(
            proxy.connect_addr(),
            connect_token,
            console_addr,
            &connect_rounds,
        ),
    )
    .await?;
    let console = within_for(SESSION_LIMIT, "record-limit CONNECT console", console).await??;
    let connect_outcome = (tenant, console);

    if renews {
        ws_outcome
            .0
            .context("record-limit WebSocket session, tenant")?;
        ws_outcome
            .1
            .context("record-limit WebSocket session, console")?;
        connect_outcome
            .0
            .context("record-limit CONNECT session, tenant")?;
        connect_outcome
            .1
            .context("record-limit CONNECT session, console")?;
        let total = renewals(&proxy);
        let connect_compute = total.1 - after_ws.1;
        let metrics = metric_renewals(&proxy).await?;
        anyhow::ensure!(
            metrics == total,
            "the metrics count {metrics:?} renewals at the limit (tenant, compute), the log {total:?}"
        );
        anyhow::ensure!(
            after_ws.0 >= MIN_RENEWALS && after_ws.1 >= MIN_RENEWALS,
            "WebSocket session: the proxy renewed the tenant leg's key {} and the compute \
             leg's {} times at the limit of {RECORDS} records, expected at least \
             {MIN_RENEWALS} each",
            after_ws.0,
            after_ws.1
        );
        anyhow::ensure!(
            total.0 == after_ws.0,
            "the CONNECT session's tenant leg is plain, yet {} tenant keys were renewed",
            total.0 - after_ws.0
        );
        anyhow::ensure!(
            connect_compute >= MIN_RENEWALS,
            "CONNECT session: the compute leg's key was renewed {connect_compute} times \
             at the limit of {RECORDS} records, expected at least {MIN_RENEWALS}"
        );
        report(
            "record-limit",
            format!(
                "renewed at {RECORDS} records per key: WebSocket tenant leg {} and compute \
                 leg {} times, CONNECT compute leg {connect_compute} times (log and metrics \
                 agree); {} rounds each carried byte for byte",
                after_ws.0,
                after_ws.1,
                SMALL_ROUNDS + 1
            ),
        );
    } else {
        for (what, got) in [
            ("WebSocket tenant", &ws_outcome.0),
            ("WebSocket console", &ws_outcome.1),
            ("CONNECT tenant", &connect_outcome.0),
            ("CONNECT console", &connect_outcome.1),
        ] {
            if let Ok(n) = got {
                anyhow::bail!(
                    "{what}: all {n} rounds completed although this kernel cannot renew \
                     kTLS keys past the limit of {RECORDS} records"
                );
            }
        }
        proxy
            .wait_log_count(&[CANNOT], 2)
            .await
            .context("the proxy should end both sessions at the record limit, saying why")?;
        report(
            "record-limit",
            format!(
                "not renewable (kernel cannot renew kTLS keys): both sessions ended at the \
                 limit of {RECORDS} records with the proxy's error"
            ),
        );
    }
    Ok(())
}
