//! The audit trail against a real QEMU VNC console: one JSON line per
//! session (WebSocket and CONNECT) in `--audit-log`, naming the tenant, the
//! token id (never the secret), the console, the backend, when, how long,
//! the bytes and how it ended; and the same record in the log.

use consolegate_tests::http::{bearer, connect_tunnel};
use consolegate_tests::proxy::ProxySpec;
use consolegate_tests::qemu::Sock;
use consolegate_tests::rfb;
use consolegate_tests::scenario::vnc_behind_proxy;
use consolegate_tests::ws::{self, Mode, WsRequest};

#[tokio::test]
async fn one_audit_record_per_session_without_secrets() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let mut spec = ProxySpec::connect(&[]);
    spec.extra = vec!["--audit-log".into(), audit.display().to_string()];
    let s = vnc_behind_proxy(Sock::Tcp, spec).await.unwrap();
    let p = &s.proxy;

    let req = WsRequest::path(format!("/websockify?token={}", s.token)).protocol("binary");
    let (init, _) = ws::rfb_over_ws(p.ws_addr(), &p.transport(), &req, Mode::Binary)
        .await
        .unwrap();
    assert!(init.width > 0);
    let mut io = connect_tunnel(
        p.connect_addr(),
        &format!("{}:0", s.token),
        Some(&bearer(&s.token)),
    )
    .await
    .unwrap()
    .tunnel()
    .unwrap();
    rfb::check_session(&mut io).await.unwrap();
    drop(io);
    p.wait_log_count(&["audit: console session"], 2)
        .await
        .unwrap();

    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(&s.token), "token secret in the audit file");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    let fronts: Vec<&str> = records
        .iter()
        .map(|r| r["front"].as_str().unwrap())
        .collect();
    assert!(
        fronts.contains(&"websocket") && fronts.contains(&"connect"),
        "{fronts:?}"
    );
    for r in &records {
        assert_eq!(r["event"], "console_session");
        assert_eq!(r["tenant_addr"], "127.0.0.1", "{r}");
        assert_eq!(r["console_kind"], "vnc");
        assert_eq!(
            r["compute_addr"],
            consolegate_tests::net::authority(s.qemu.vnc.tcp()),
            "{r}"
        );
        assert_eq!(r["token_id"].as_str().unwrap().len(), 8, "{r}");
        assert!(
            r["security"].as_str().unwrap().starts_with("rfb 3.8"),
            "{r}"
        );
        assert!(
            r["bytes_down"].as_u64().unwrap() > 700_000,
            "a full screen went down: {r}"
        );
        assert!(r["bytes_up"].as_u64().unwrap() > 0, "{r}");
        assert!(r["started"].as_str().unwrap() <= r["ended"].as_str().unwrap());
        assert!(
            ["tenant_closed", "closed"].contains(&r["end"].as_str().unwrap()),
            "{r}"
        );
    }
    p.assert_secrets_not_logged(&[&s.token]);
}
