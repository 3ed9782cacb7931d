//! Token lifecycle against real peers: a real `redis-server` shared by two
//! consolegate processes, signed stateless
//! tokens and an external HTTP resolver (a tiny HTTP server in the test).
//! Consoles are the scripted echo server behind `serial` tokens: what is
//! tested here is admission, not a console protocol.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use consolegate_tests::admin::{TEST_KEY, call, create_token, refusals};
use consolegate_tests::fake::{EchoServer, echo_ok};
use consolegate_tests::http::{connect_bearer_from, read_to_close};
use consolegate_tests::net::authority;
use consolegate_tests::proxy::{Proxy, ProxySpec};
use consolegate_tests::redis::RedisServer;
use consolegate_tests::{random_token, within};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A proxy with a CONNECT listener, an admin API on loopback (plain HTTP,
/// bearer key) and `tokens_toml` appended to its config file.
async fn proxy_with(tokens_toml: &str) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("cg-tok-")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("admin.key"), TEST_KEY).unwrap();
    let cfg = dir.path().join("consolegate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\nplain_http = true\nkey_file = \"admin.key\"\n\n{tokens_toml}"
        ),
    )
    .unwrap();
    let spec = ProxySpec {
        connect_listen: vec!["127.0.0.1:0".into()],
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    };
    (Proxy::start(spec).await.unwrap(), dir)
}

fn redis_toml(r: &RedisServer, prefix: &str) -> String {
    format!(
        "[tokens]\nstore = \"redis\"\n[tokens.redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
        r.url()
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn single_use_token_race_between_two_proxies_sharing_redis() {
    let redis = RedisServer::start().await.unwrap();
    let (a, _da) = proxy_with(&redis_toml(&redis, "race:")).await;
    let (b, _db) = proxy_with(&redis_toml(&redis, "race:")).await;
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let rounds = 20;
    let (mut wins_a, mut wins_b) = (0, 0);
    for round in 0..rounds {
        let creator = if round % 2 == 0 { &a } else { &b };
        let (token, _) = create_token(
            creator,
            json!({"kind": "serial", "target": target, "max_uses": 1}),
        )
        .await;
        // Two tenants (different addresses, so neither is inside the
        // other's reconnect window) race through different proxies.
        let (ra, rb) = tokio::join!(
            connect_bearer_from(ip("127.0.0.2"), a.connect_addr(), &target, &token),
            connect_bearer_from(ip("127.0.0.3"), b.connect_addr(), &target, &token),
        );
        let statuses = (ra.0, rb.0);
        assert!(
            statuses == (200, 403) || statuses == (403, 200),
            "round {round}: exactly one proxy must admit the single-use token, got {statuses:?}"
        );
        let mut winner = if ra.0 == 200 {
            wins_a += 1;
            ra.1.unwrap()
        } else {
            wins_b += 1;
            rb.1.unwrap()
        };
        echo_ok(&mut winner).await;
    }
    println!("single-use race: {rounds} rounds, proxy A won {wins_a}, proxy B won {wins_b}");
    let consumed: u64 = refusals(
        &call(&a, "GET", "/metrics", None).await.body,
        "token_consumed",
    ) + refusals(
        &call(&b, "GET", "/metrics", None).await.body,
        "token_consumed",
    );
    assert_eq!(consumed, rounds, "one token_consumed refusal per round");
    a.wait_log(&["session refused", "reason=token_consumed"])
        .await
        .or(b
            .wait_log(&["session refused", "reason=token_consumed"])
            .await)
        .unwrap();
}

#[tokio::test]
async fn single_use_reconnect_window_and_source_restriction() {
    let (p, _d) = proxy_with("[tokens]\nreconnect_window = \"30s\"\n").await;
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let (token, _) = create_token(
        &p,
        json!({"kind": "serial", "target": target, "max_uses": 1,
               "source": ["127.0.0.0/30"]}),
    )
    .await;
    let (st, s1) = connect_bearer_from(ip("127.0.0.2"), p.connect_addr(), &target, &token).await;
    assert_eq!(st, 200);
    let mut s1 = s1.unwrap();
    echo_ok(&mut s1).await;
    // Another tenant: the use is gone.
    let (st, _) = connect_bearer_from(ip("127.0.0.3"), p.connect_addr(), &target, &token).await;
    assert_eq!(st, 403);
    // Outside the allowed prefix.
    let (st, _) = connect_bearer_from(ip("127.0.0.9"), p.connect_addr(), &target, &token).await;
    assert_eq!(st, 403);
    p.wait_log(&["reason=source_not_allowed"]).await.unwrap();
    // The same tenant reconnects after its session drops (VM migration).
    drop(s1);
    let (st, s2) = connect_bearer_from(ip("127.0.0.2"), p.connect_addr(), &target, &token).await;
    assert_eq!(st, 200, "reconnect inside the window");
    echo_ok(&mut s2.unwrap()).await;
    let m = call(&p, "GET", "/metrics", None).await.body;
    assert_eq!(refusals(&m, "token_consumed"), 1, "{m}");
    assert_eq!(refusals(&m, "source_not_allowed"), 1, "{m}");
    p.assert_secrets_not_logged(&[&token]);
}

#[tokio::test]
async fn redis_expiry_revocation_across_the_fleet_and_repoint() {
    let redis = RedisServer::start().await.unwrap();
    let (a, _da) = proxy_with(&redis_toml(&redis, "fleet:")).await;
    let (b, _db) = proxy_with(&redis_toml(&redis, "fleet:")).await;
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let lo = ip("127.0.0.1");

    // Expiry is a Redis TTL on the token key.
    let soon = SystemTime::now() + Duration::from_secs(3);
    let (token, digest) = create_token(
        &a,
        json!({"kind": "serial", "target": target,
               "not_after": humantime_rfc3339(soon)}),
    )
    .await;
    let key = format!("fleet:tok:{digest}");
    let pttl: i64 = redis.cmd(&["PTTL", &key]).await.unwrap()[1..]
        .parse()
        .unwrap();
    assert!(pttl > 0 && pttl <= 3000, "PTTL {pttl}");
    assert!(
        !redis.cmd(&["GET", &key]).await.unwrap().contains(&token),
        "keys and values hold digests, never the secret"
    );
    let (st, _) = connect_bearer_from(lo, b.connect_addr(), &target, &token).await;
    assert_eq!(st, 200, "B resolves a token A created");
    tokio::time::sleep(Duration::from_millis(3300)).await;
    assert_eq!(redis.cmd(&["EXISTS", &key]).await.unwrap(), ":0");
    let (st, _) = connect_bearer_from(lo, b.connect_addr(), &target, &token).await;
    assert_eq!(st, 403, "expired");

    // Revoking through A stops a live session on B.
    let (token, digest) = create_token(&a, json!({"kind": "serial", "target": target})).await;
    let (st, s) = connect_bearer_from(lo, b.connect_addr(), &target, &token).await;
    assert_eq!(st, 200);
    let mut s = s.unwrap();
    echo_ok(&mut s).await;
    let r = call(&a, "DELETE", &format!("/v1/tokens/{digest}"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    within("B closes the revoked session", read_to_close(&mut s))
        .await
        .unwrap();
    b.wait_log(&["token revoked in the fleet", "sessions_killed=1"])
        .await
        .unwrap();
    let (st, _) = connect_bearer_from(lo, a.connect_addr(), &target, &token).await;
    assert_eq!(st, 403);
    let r = call(&a, "DELETE", &format!("/v1/tokens/{digest}"), None).await;
    assert_eq!(r.status, 404);

    // Re-pointing (migration) is atomic and keeps the TTL.
    let echo2 = EchoServer::start().await.unwrap();
    let (token, digest) = create_token(
        &a,
        json!({"kind": "serial", "target": target, "not_after": "2999-01-01T00:00:00Z"}),
    )
    .await;
    let r = call(
        &b,
        "PATCH",
        &format!("/v1/tokens/{digest}"),
        Some(&json!({"target": authority(echo2.addr)})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pttl: i64 = redis
        .cmd(&["PTTL", &format!("fleet:tok:{digest}")])
        .await
        .unwrap()[1..]
        .parse()
        .unwrap();
    assert!(pttl > 0, "TTL kept: {pttl}");
    let (st, s) = connect_bearer_from(lo, a.connect_addr(), &authority(echo2.addr), &token).await;
    assert_eq!(st, 200);
    echo_ok(&mut s.unwrap()).await;
    assert_eq!(echo2.accepted(), 1);
    let list = call(&a, "GET", "/v1/tokens", None).await.json().unwrap();
    let listed = list["tokens"].as_array().unwrap();
    assert!(listed.iter().any(|t| t["digest"] == digest.as_str()));
    assert!(
        !list.to_string().contains(&token),
        "listing never shows secrets"
    );
    a.assert_secrets_not_logged(&[&token]);
}

fn humantime_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    // Civil-from-days (Howard Hinnant), UTC.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Mints `cg1.` tokens the way a control plane would (independently of
/// the proxy's code).
fn sign(claims: &Value, key: &[u8]) -> String {
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut t = format!("cg1.{}", b64.encode(claims.to_string()));
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    m.update(t.as_bytes());
    t.push('.');
    t.push_str(&b64.encode(m.finalize().into_bytes()));
    t
}

#[tokio::test]
async fn signed_stateless_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let key = b"signing-key-signing-key-signing-key-0123";
    std::fs::write(dir.path().join("k1"), key).unwrap();
    let (p, _d) = proxy_with(&format!(
        "[tokens.signed]\nhmac_key_files = [\"{}\"]\n",
        dir.path().join("k1").display()
    ))
    .await;
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let lo = ip("127.0.0.1");
    let claims = |nb: &str, na: &str| json!({"kind": "serial", "target": target, "not_before": nb, "not_after": na});
    let good = sign(&claims("2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z"), key);
    let (st, s) = connect_bearer_from(lo, p.connect_addr(), &target, &good).await;
    assert_eq!(st, 200);
    echo_ok(&mut s.unwrap()).await;

    let forged = sign(
        &claims("2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z"),
        b"another-key-another-key-another-key-0123",
    );
    let mut tampered = good.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let expired = sign(&claims("2000-01-01T00:00:00Z", "2001-01-01T00:00:00Z"), key);
    let not_yet = sign(&claims("2998-01-01T00:00:00Z", "2999-01-01T00:00:00Z"), key);
    for t in [&forged, &tampered, &expired, &not_yet] {
        let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, t).await;
        assert_eq!(st, 403);
    }
    let m = call(&p, "GET", "/metrics", None).await.body;
    assert_eq!(refusals(&m, "token_invalid"), 2, "{m}");
    assert_eq!(refusals(&m, "token_expired"), 2, "{m}");
    p.wait_log(&["signed token rejected", "reason=bad_signature"])
        .await
        .unwrap();

    // A single-use signed token is counted by digest with no store.
    let mut once = claims("2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z");
    once["max_uses"] = json!(1);
    let once = sign(&once, key);
    let (st, _) = connect_bearer_from(ip("127.0.0.2"), p.connect_addr(), &target, &once).await;
    assert_eq!(st, 200);
    let (st, _) = connect_bearer_from(ip("127.0.0.3"), p.connect_addr(), &target, &once).await;
    assert_eq!(st, 403);
    p.assert_secrets_not_logged(&[&good, &once]);
}

/// A tiny external resolver: answers `{"token": T}` with a grant for
/// tokens in its table and 404 otherwise; counts the requests.
struct TestResolver {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestResolver {
    async fn start(table: Vec<(String, Value)>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let table = Arc::new(table);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let h = Arc::clone(&h);
                let table = Arc::clone(&table);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let body = loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let mut headers = [httparse::EMPTY_HEADER; 32];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(used)) = req.parse(&buf) {
                            let len = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                                .unwrap_or(0usize);
                            if buf.len() >= used + len {
                                break buf[used..used + len].to_vec();
                            }
                        }
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let q: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let found = table
                        .iter()
                        .find(|(t, _)| q["token"] == t.as_str() || q["target"] == t.as_str())
                        .map(|(_, g)| g.clone());
                    let (status, body) = match found {
                        Some(g) => ("200 OK", g.to_string()),
                        None => ("404 Not Found", "{}".to_owned()),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self { addr, hits, task }
    }
}

#[tokio::test]
async fn external_http_resolver_cache_and_circuit_breaker() {
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let known = random_token();
    let resolver = TestResolver::start(vec![(
        known.clone(),
        json!({"kind": "serial", "target": target}),
    )])
    .await;
    let (p, _d) = proxy_with(&format!(
        "[tokens.http]\nurl = \"http://{}/resolve\"\ntimeout = \"1s\"\ncache_ttl = \"60s\"\n\
         failure_threshold = 2\nopen_for = \"60s\"\n",
        resolver.addr
    ))
    .await;
    let lo = ip("127.0.0.1");
    let (st, s) = connect_bearer_from(lo, p.connect_addr(), &target, &known).await;
    assert_eq!(st, 200);
    echo_ok(&mut s.unwrap()).await;
    let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, &known).await;
    assert_eq!(st, 200);
    assert_eq!(
        resolver.hits.load(Ordering::SeqCst),
        1,
        "second lookup from the cache"
    );
    let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, &random_token()).await;
    assert_eq!(st, 403, "unknown to the resolver");

    // The resolver goes away: 503s, then the circuit opens.
    resolver.task.abort();
    let _ = resolver.task.await;
    for _ in 0..3 {
        let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, &random_token()).await;
        assert_eq!(st, 503);
    }
    p.wait_log(&["HTTP resolver failing: circuit open"])
        .await
        .unwrap();
    // Cached answers still work while the circuit is open.
    let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, &known).await;
    assert_eq!(st, 200);
    let m = call(&p, "GET", "/metrics", None).await.body;
    assert_eq!(refusals(&m, "resolver_unavailable"), 3, "{m}");
    p.assert_secrets_not_logged(&[&known]);
}

/// With `connect.auth = "none"` a CONNECT target is validated by the
/// external resolver (`{"target": "host:port"}`): never an open relay.
#[tokio::test]
async fn external_http_resolver_validates_connect_targets() {
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let resolver = TestResolver::start(vec![(target.clone(), json!({"kind": "serial"}))]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[connect]\nauth = \"none\"\n[tokens.http]\nurl = \"http://{}/resolve\"\n",
            resolver.addr
        ),
    )
    .unwrap();
    let p = Proxy::start(ProxySpec {
        connect_listen: vec!["127.0.0.1:0".into()],
        extra: vec!["--config".into(), cfg.display().to_string()],
        ..ProxySpec::default()
    })
    .await
    .unwrap();
    let mut s = consolegate_tests::http::connect_tunnel(p.connect_addr(), &target, None)
        .await
        .unwrap()
        .tunnel()
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    within("echo", s.read_exact(&mut b)).await.unwrap().unwrap();
    let other = authority(consolegate_tests::fake::dead_port().unwrap());
    let o = consolegate_tests::http::connect_tunnel(p.connect_addr(), &other, None)
        .await
        .unwrap();
    assert_eq!(o.status(), 403);
    assert_eq!(resolver.hits.load(Ordering::SeqCst), 2);
}

/// Redis goes away: tokens only Redis could know are refused with 503
/// (resolver_unavailable), token files keep working.
#[tokio::test]
async fn redis_down_gives_503_and_token_files_keep_working() {
    let redis = RedisServer::start().await.unwrap();
    let echo = EchoServer::start().await.unwrap();
    let target = authority(echo.addr);
    let dir = tempfile::tempdir().unwrap();
    let file_token = random_token();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        format!("[[token]]\ntoken = \"{file_token}\"\nkind = \"serial\"\ntarget = \"{target}\"\n"),
    )
    .unwrap();
    let (p, _d) = proxy_with(&format!(
        "[tokens]\nstore = \"redis\"\nfiles = [\"{}\"]\n[tokens.redis]\nurl = \"{}\"\n\
         prefix = \"down:\"\ntimeout = \"500ms\"\n",
        file.display(),
        redis.url()
    ))
    .await;
    let lo = ip("127.0.0.1");
    let (redis_token, _) = create_token(&p, json!({"kind": "serial", "target": target})).await;
    let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, &redis_token).await;
    assert_eq!(st, 200);
    drop(redis);
    let (st, _) = connect_bearer_from(lo, p.connect_addr(), &target, &redis_token).await;
    assert_eq!(st, 503, "Redis is down");
    let (st, s) = connect_bearer_from(lo, p.connect_addr(), &target, &file_token).await;
    assert_eq!(st, 200, "token files do not need Redis");
    echo_ok(&mut s.unwrap()).await;
    p.wait_log(&["session refused", "reason=resolver_unavailable"])
        .await
        .unwrap();
    let r = call(&p, "GET", "/v1/tokens", None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    // Token-store health in the metrics: Redis down, the files fine.
    let m = call(&p, "GET", "/metrics", None).await.body;
    assert!(
        m.contains("consolegate_token_resolver_up{resolver=\"redis\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("consolegate_token_resolver_up{resolver=\"file\"} 1"),
        "{m}"
    );
}
