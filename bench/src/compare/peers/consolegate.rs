//! consolegate's rows of `loadgen compare`: one service per data path
//! (copy, splice, sockmap) and the TLS services (tenant TLS, both legs),
//! with their token files and configuration.

use super::*;

/// Token names in consolegate's token file: `serial` tokens are raw byte
/// streams, so no RFB handshake happens.
const FLOOD_TOKEN: &str = "bench-flood";
const ECHO_TOKEN: &str = "bench-echo";

/// One echo token per echo listener: `bench-echo`, `bench-echo-2`, ...
pub(super) fn echo_token_names(n: usize) -> Vec<String> {
    (0..n.max(1))
        .map(|i| match i {
            0 => ECHO_TOKEN.to_owned(),
            i => format!("{ECHO_TOKEN}-{}", i + 1),
        })
        .collect()
}

/// Starts consolegate with `datapath` (None: the binary has no such flag)
/// and a plain (ws + CONNECT) or TLS (wss) front; with `tls_compute`, TLS
/// to the backends too (`--compute-ca`, the server identity checked), as
/// to QEMU's TLS chardevs.
fn consolegate(
    ctx: &Ctx<'_>,
    program: &Path,
    datapath: Option<&str>,
    tls: bool,
    tls_compute: bool,
) -> Result<Started> {
    let dp = datapath.unwrap_or("copy");
    let name = match (tls, tls_compute) {
        (_, true) => format!("consolegate-tls2-{dp}"),
        (true, false) => format!("consolegate-tls-{dp}"),
        (false, false) => format!("consolegate-{dp}"),
    };
    let tls = tls || tls_compute;
    let (flood, echo_all) = if tls_compute {
        (ctx.flood_tls, &ctx.echo_tls_all)
    } else {
        (ctx.flood, &ctx.echo_all)
    };
    let tokens = ctx.work.join(format!("{name}.tokens.toml"));
    let echo_tokens = echo_token_names(echo_all.len());
    let mut table =
        format!("[[token]]\ntoken = \"{FLOOD_TOKEN}\"\nkind = \"serial\"\ntarget = \"{flood}\"\n");
    for (token, echo) in echo_tokens.iter().zip(echo_all.iter()) {
        let _ = write!(
            table,
            "\n[[token]]\ntoken = \"{token}\"\nkind = \"serial\"\ntarget = \"{echo}\"\n"
        );
    }
    fs::write(&tokens, table)?;
    let ready = ctx.work.join(format!("{name}.ready.json"));
    let _ = fs::remove_file(&ready);
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--ws-listen".into(),
        "127.0.0.1:0".into(),
        "--token-file".into(),
        tokens.display().to_string(),
        "--ready-file".into(),
        ready.display().to_string(),
        "--state-dir".into(),
        ctx.work.join(format!("{name}.state")).display().to_string(),
    ];
    if tls {
        args.extend([
            "--tls-cert".into(),
            ctx.pki.cert.display().to_string(),
            "--tls-key".into(),
            ctx.pki.key.display().to_string(),
        ]);
    } else {
        args.extend([
            "--plain-http".into(),
            "--connect-listen".into(),
            "127.0.0.1:0".into(),
        ]);
    }
    if tls_compute {
        args.extend(["--compute-ca".into(), ctx.pki.ca.display().to_string()]);
    }
    if let Some(dp) = datapath {
        args.extend(["--datapath".into(), dp.into()]);
    }
    // Idle sessions share a few tokens and addresses, and may be more than
    // the default total (20,000): lift the total, per-token and per-source
    // limits (when the binary has them) so they measure memory, not the
    // limits.
    let help = Command::new(program).args(["serve", "--help"]).output();
    let help = help
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for flag in [
        "--max-sessions",
        "--max-sessions-per-token",
        "--max-sessions-per-source",
    ] {
        if help.contains(flag) {
            args.extend([flag.into(), "0".into()]);
        }
    }
    let mut proc = Proc::spawn(&name, ctx.proxy_cmd(program, &args), &ctx.log(&name))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let ready: serde_json::Value = loop {
        if let Ok(text) = fs::read_to_string(&ready)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        if !proc.alive() {
            bail!("{name} exited: {}", proc.log_tail());
        }
        if Instant::now() > deadline {
            bail!("{name} wrote no ready file in 15 s: {}", proc.log_tail());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let first = |key: &str| -> Result<String> {
        ready[key][0]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("ready file has no {key} listener: {ready}"))
    };
    let ws = first("websocket")?;
    let ws_to = |tokens: &[String]| {
        let mut a = vec![
            "--connect".into(),
            ws.clone(),
            "--front".into(),
            "ws".into(),
        ];
        for token in tokens {
            a.extend(["--path".into(), format!("/websockify?token={token}")]);
        }
        if tls {
            a.extend(ctx.tls_args());
        }
        a
    };
    let suffix = datapath.map(|d| format!(", {d}")).unwrap_or_default();
    let (id, label) = match (tls, tls_compute) {
        (_, true) => (
            format!("consolegate-wss-tls2-{dp}"),
            format!("consolegate wss (TLS both legs{suffix})"),
        ),
        (true, false) => (
            format!("consolegate-wss-{dp}"),
            format!("consolegate wss (TLS-terminating{suffix})"),
        ),
        (false, false) => (
            format!("consolegate-ws-{dp}"),
            format!("consolegate ws{suffix}"),
        ),
    };
    let mut rows = vec![Row {
        id,
        label,
        family: Family::Consolegate,
        front: "ws",
        tls,
        tls_compute,
        to_flood: ws_to(&[FLOOD_TOKEN.to_owned()]),
        to_echo: ws_to(&echo_tokens),
    }];
    if !tls {
        let connect = first("connect")?;
        let connect_to = |ways: &[(SocketAddr, &str)]| {
            let mut a = vec![
                "--connect".into(),
                connect.clone(),
                "--front".into(),
                "connect".into(),
            ];
            for (target, token) in ways {
                a.extend([
                    "--target".into(),
                    target.to_string(),
                    "--token".into(),
                    (*token).into(),
                ]);
            }
            a
        };
        let echo_ways: Vec<(SocketAddr, &str)> = echo_all
            .iter()
            .copied()
            .zip(echo_tokens.iter().map(String::as_str))
            .collect();
        rows.push(Row {
            id: format!("consolegate-connect-{dp}"),
            label: format!("consolegate CONNECT{suffix}"),
            family: Family::Consolegate,
            front: "connect",
            tls: false,
            tls_compute: false,
            to_flood: connect_to(&[(ctx.flood, FLOOD_TOKEN)]),
            to_echo: connect_to(&echo_ways),
        });
    }
    Ok(Started {
        procs: vec![proc],
        rows,
    })
}

fn has_datapath_flag(program: &Path) -> bool {
    !datapaths(program).is_empty()
}

pub(super) fn start_consolegate_copy(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    let dp = has_datapath_flag(program).then_some("copy");
    consolegate(ctx, program, dp, false, false)
}

pub(super) fn start_consolegate_splice(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    consolegate(ctx, program, Some("splice"), false, false)
}

/// sockmap forwards plain TCP only (the CONNECT row): the kernel's sk_skb
/// verdict moves the bytes, no proxy wake-up per message.
pub(super) fn start_consolegate_sockmap(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    connect_only(ctx, program, "sockmap", "sockmap data path loaded")
}

/// io_uring (opt-in) carries raw sessions whose legs are both plain
/// sockets: the CONNECT row.
pub(super) fn start_consolegate_uring(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    connect_only(ctx, program, "uring", "io_uring data path ready")
}

/// An opt-in rung for plain CONNECT sessions only, refused unless the
/// proxy's log says it is `ready` (else the proxy would fall back, and the
/// row would measure another rung).
fn connect_only(ctx: &Ctx<'_>, program: &Path, dp: &str, ready: &str) -> Result<Started> {
    let mut started = consolegate(ctx, program, Some(dp), false, false)?;
    let log = fs::read_to_string(ctx.log(&format!("consolegate-{dp}"))).unwrap_or_default();
    if !log.contains(ready) {
        bail!("the {dp} data path is not available here (see its log): no {dp} row");
    }
    started.rows.retain(|r| r.front == "connect");
    Ok(started)
}

pub(super) fn start_consolegate_tls(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    let dp = has_datapath_flag(program).then_some("copy");
    consolegate(ctx, program, dp, true, false)
}

pub(super) fn start_consolegate_tls2(ctx: &Ctx<'_>, program: &Path) -> Result<Started> {
    let dp = has_datapath_flag(program).then_some("copy");
    consolegate(ctx, program, dp, true, true)
}
