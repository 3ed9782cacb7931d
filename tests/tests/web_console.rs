//! The built-in web console, end to end: headless Chromium (Debian's
//! `chromium`, over the DevTools protocol) opens `/vnc.html` and
//! `/serial.html` from the real proxy, which relays to a real QEMU. The VNC
//! page must reach noVNC's `connected` state and paint the guest's screen
//! (a non-uniform 720x400 VGA text-mode canvas); the serial page must show
//! the guest's banner in xterm.js and echo what is typed. Plus the static
//! responses themselves over raw HTTP: headers, traversal, `--web`.

use std::time::Duration;

use consolegate_tests::browser::{Chromium, chromium_path};
use consolegate_tests::http::{exchange, read_to_close};
use consolegate_tests::net::authority;
use consolegate_tests::proxy::{Proxy, ProxySpec, TomlToken, write_toml_tokens};
use consolegate_tests::qemu::{Endpoint, Qemu, QemuOptions, SERIAL_BANNER, Sock};
use consolegate_tests::random_token;
use consolegate_tests::scenario::{token_dir, vnc_behind_proxy};
use serde_json::Value;

/// Upper bound for a page to connect and paint (TCG QEMU on a loaded 2-core
/// machine); a bound against hangs, not a performance assertion.
const PAGE_LIMIT: Duration = Duration::from_secs(60);

/// Chromium, or why not. A missing browser fails in CI (where `cargo xtask
/// setup` installs it) and is a loudly printed skip elsewhere.
async fn browser(extra: &[&str]) -> Option<Chromium> {
    if chromium_path().is_none() {
        let why = "chromium is not installed (Debian package `chromium`, installed by \
                   `cargo xtask setup`): the browser half of this test cannot run";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
        return None;
    }
    Some(Chromium::launch(extra).await.expect("launching chromium"))
}

/// Fails with a clear message when the binary was built without the
/// noVNC/xterm.js assets.
async fn assert_assets_installed(proxy: &Proxy) {
    let raw = format!(
        "GET /vnc.html HTTP/1.1\r\nHost: {}\r\n\r\n",
        authority(proxy.ws_addr())
    );
    let (resp, _) = exchange(proxy.ws_addr(), &proxy.transport(), raw.as_bytes())
        .await
        .unwrap();
    assert_ne!(
        resp.status, 503,
        "the proxy was built without the web console assets: run `cargo xtask web-assets` \
         and `cargo build -p consolegate`"
    );
    assert_eq!(resp.status, 200);
}

fn serial_token(token: &str, ep: &Endpoint) -> TomlToken {
    let mut t = TomlToken {
        token: token.to_owned(),
        kind: Some("serial".into()),
        ..TomlToken::default()
    };
    match ep {
        Endpoint::Tcp(a) => t.target = Some(authority(*a)),
        Endpoint::Unix(p) => t.unix = Some(p.clone()),
    }
    t
}

/// Where screenshots go, for a person to look at after a run.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// The state the console pages expose (`window.consolegate.state`); an
/// `error` or `disconnected` ends the wait with the page's reason.
fn connected(v: &Value) -> Result<bool, String> {
    match v["state"].as_str() {
        Some("connected") => Ok(true),
        Some(s @ ("error" | "disconnected")) => Err(format!(
            "the page says {s}: {}",
            v["detail"].as_str().unwrap_or("")
        )),
        _ => Ok(false),
    }
}

const STATE_JS: &str = "window.consolegate ? {state: window.consolegate.state, detail: window.consolegate.detail} : null";

/// Samples noVNC's canvas: size and how many distinct colours it shows.
const CANVAS_JS: &str = r#"(() => {
    const c = document.querySelector('#screen canvas');
    if (!c || !c.width || !c.height) return null;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const colours = new Set();
    let lit = 0;
    for (let i = 0; i < d.length; i += 4) {
        colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        if (d[i] + d[i + 1] + d[i + 2] > 96) lit++;
    }
    return {width: c.width, height: c.height, colours: colours.size, lit: lit};
})()"#;

#[tokio::test]
async fn vnc_page_connects_and_renders_qemu_screen_over_tls() {
    let s = vnc_behind_proxy(Sock::Tcp, ProxySpec::tls_ws(&[]))
        .await
        .unwrap();
    assert_assets_installed(&s.proxy).await;
    // The test CA is not in Chromium's store; the page is still https and
    // the console WebSocket wss, as in production.
    let Some(mut chrome) = browser(&["--ignore-certificate-errors"]).await else {
        return;
    };
    let url = format!(
        "https://{}/vnc.html#token={}",
        authority(s.proxy.ws_addr()),
        s.token
    );
    let page = chrome.open(&url).await.unwrap();
    chrome
        .wait_for(&page, "noVNC connected", STATE_JS, PAGE_LIMIT, connected)
        .await
        .unwrap();
    // VGA text mode after SeaBIOS: 720x400, dark background with lit text.
    let canvas = chrome
        .wait_for(&page, "the console painted", CANVAS_JS, PAGE_LIMIT, |v| {
            Ok(v["width"] == 720
                && v["height"] == 400
                && v["colours"].as_u64().unwrap_or(0) >= 2
                && v["lit"].as_u64().unwrap_or(0) > 100)
        })
        .await
        .unwrap();
    eprintln!("noVNC canvas: {canvas}");
    let shot = screenshot_path("web_console_vnc.png");
    chrome.screenshot(&page, &shot).await.unwrap();
    eprintln!("screenshot: {}", shot.display());

    let established = s
        .proxy
        .wait_log(&["session established", "console.kind=\"vnc\""])
        .await
        .unwrap();
    assert!(established.contains("token.id="), "{established}");
    let page_line = s
        .proxy
        .wait_log(&["static file", "path=vnc.html", "status=200"])
        .await
        .unwrap();
    assert!(!page_line.contains("token"), "{page_line}");
    let csp = chrome.csp_violations();
    assert!(csp.is_empty(), "CSP violations on vnc.html: {csp:?}");
    // Every request of the page (scripts, styles, icon) was served.
    let logs = s.proxy.logs();
    assert!(!logs.contains("session refused"), "{logs}");

    // A wrong token: the WebSocket is refused (403) and the page says so.
    let wrong = random_token();
    let bad = format!(
        "https://{}/vnc.html#token={wrong}",
        authority(s.proxy.ws_addr())
    );
    let page = chrome.open(&bad).await.unwrap();
    let state = chrome
        .wait_for(&page, "the refusal shown", STATE_JS, PAGE_LIMIT, |v| {
            Ok(matches!(
                v["state"].as_str(),
                Some("disconnected" | "error")
            ))
        })
        .await
        .unwrap();
    assert_eq!(state["state"], "disconnected", "{state}");
    s.proxy
        .wait_log(&["session refused", "reason=token_unknown"])
        .await
        .unwrap();
    s.proxy.assert_secrets_not_logged(&[&s.token, &wrong]);
}

#[tokio::test]
async fn serial_page_shows_banner_and_echoes_typing() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Tcp,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("consoles.toml");
    write_toml_tokens(&file, &[serial_token(&tok, &qemu.serial)]).unwrap();
    // Plain HTTP on loopback (a secure context for the browser all the same).
    let proxy = Proxy::start(ProxySpec::plain_ws(&[&file])).await.unwrap();
    assert_assets_installed(&proxy).await;
    let Some(mut chrome) = browser(&[]).await else {
        return;
    };
    // The query form of the token this time.
    let url = format!(
        "http://{}/serial.html?token={tok}",
        authority(proxy.ws_addr())
    );
    let page = chrome.open(&url).await.unwrap();
    chrome
        .wait_for(&page, "serial connected", STATE_JS, PAGE_LIMIT, connected)
        .await
        .unwrap();

    let banner = std::str::from_utf8(SERIAL_BANNER).unwrap().trim();
    // xterm.js's buffer, and the rows its DOM renderer painted.
    let screen_js = r#"(() => {
        const t = window.consolegate.term;
        const b = t.buffer.active;
        const lines = [];
        for (let i = 0; i < b.length; i++) {
            const l = b.getLine(i);
            if (l) lines.push(l.translateToString(true));
        }
        const rows = document.querySelector('#terminal .xterm-rows');
        return {buffer: lines.join('\n'), painted: rows ? rows.textContent : ''};
    })()"#;
    chrome
        .wait_for(&page, "the guest's banner", screen_js, PAGE_LIMIT, |v| {
            Ok(v["buffer"].as_str().unwrap_or("").contains(banner)
                && v["painted"].as_str().unwrap_or("").contains(banner))
        })
        .await
        .unwrap();

    // Type into the terminal as a keyboard would; the guest echoes it.
    let probe = format!("typed-{:08x}", rand::random::<u32>());
    chrome
        .eval(&page, "window.consolegate.term.focus(); true")
        .await
        .unwrap();
    chrome.insert_text(&page, &probe).await.unwrap();
    chrome.press_enter(&page).await.unwrap();
    chrome
        .wait_for(
            &page,
            "the echo of typed text",
            screen_js,
            PAGE_LIMIT,
            |v| Ok(v["buffer"].as_str().unwrap_or("").contains(&probe)),
        )
        .await
        .unwrap();
    let shot = screenshot_path("web_console_serial.png");
    chrome.screenshot(&page, &shot).await.unwrap();
    eprintln!("screenshot: {}", shot.display());

    proxy
        .wait_log(&["session established", "console.kind=\"serial\""])
        .await
        .unwrap();
    let page_line = proxy
        .wait_log(&["static file", "path=serial.html", "status=200"])
        .await
        .unwrap();
    assert!(!page_line.contains("token"), "{page_line}");
    proxy.assert_secrets_not_logged(&[&tok]);
    let csp = chrome.csp_violations();
    assert!(csp.is_empty(), "CSP violations on serial.html: {csp:?}");
    let logs = proxy.logs();
    assert!(!logs.contains("session refused"), "{logs}");
}

/// Sends one raw request and returns the status, headers and body.
async fn get(proxy: &Proxy, method: &str, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\n\r\n",
        authority(proxy.ws_addr())
    );
    let (resp, mut io) = exchange(proxy.ws_addr(), &proxy.transport(), raw.as_bytes())
        .await
        .unwrap();
    let body = consolegate_tests::within("response body", read_to_close(&mut io))
        .await
        .unwrap();
    (resp.status, resp.headers, body)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn static_responses_headers_traversal_and_web_dir() {
    // A --web directory with a page, a symlink to a secret outside it, and
    // a vnc.html that overrides the built-in one.
    let base = tempfile::Builder::new()
        .prefix("cg-web-")
        .tempdir()
        .unwrap();
    let root = base.path().join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("hello.txt"), "hello from --web\n").unwrap();
    std::fs::write(root.join("sub/index.html"), "<p>sub</p>").unwrap();
    std::fs::write(base.path().join("secret.txt"), "outside-the-root").unwrap();
    std::os::unix::fs::symlink(base.path().join("secret.txt"), root.join("leak.txt")).unwrap();
    let dir = token_dir();
    let tok = random_token();
    let file = dir.path().join("t.toml");
    write_toml_tokens(
        &file,
        &[serial_token(
            &tok,
            &Endpoint::Tcp("127.0.0.1:9".parse().unwrap()),
        )],
    )
    .unwrap();
    let mut spec = ProxySpec::tls_ws(&[&file]);
    spec.extra = vec!["--web".into(), root.display().to_string()];
    let proxy = Proxy::start(spec).await.unwrap();

    // Built-in page: headers.
    let (status, h, body) = get(&proxy, "GET", &format!("/vnc.html?token={tok}")).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(header(&h, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&h, "cache-control"), Some("no-cache"));
    assert_eq!(header(&h, "referrer-policy"), Some("no-referrer"));
    let csp = header(&h, "content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self';"),
        "{csp}"
    );
    assert!(
        !csp.contains("unsafe-eval") && !csp.contains("http"),
        "{csp}"
    );
    assert!(String::from_utf8_lossy(&body).contains("/console/vnc.js"));
    assert_eq!(
        header(&h, "content-length").and_then(|l| l.parse().ok()),
        Some(body.len())
    );

    // Library files and their licences.
    let (status, h, body) = get(&proxy, "GET", "/novnc/core/rfb.js").await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&h, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(String::from_utf8_lossy(&body).contains("export default class RFB"));
    let (status, _, body) = get(&proxy, "GET", "/novnc/LICENSE.txt").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("MPL 2.0"));
    let (status, _, body) = get(&proxy, "GET", "/xterm/LICENSE").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("MIT"));

    // Every link of the licence page and the index resolves.
    for page in ["/licenses.html", "/"] {
        let (status, _, body) = get(&proxy, "GET", page).await;
        assert_eq!(status, 200, "{page}");
        let body = String::from_utf8_lossy(&body).into_owned();
        let links: Vec<&str> = body
            .split("href=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .filter(|l| l.starts_with('/'))
            .collect();
        assert!(!links.is_empty(), "{page}");
        for l in links {
            let (status, _, body) = get(&proxy, "GET", l).await;
            assert_eq!(status, 200, "{l} (linked from {page})");
            assert!(!body.is_empty(), "{l}");
        }
    }

    // HEAD: headers only.
    let (status, h, body) = get(&proxy, "HEAD", "/serial.html").await;
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert!(header(&h, "content-length").is_some_and(|l| l != "0"));

    // --web files, a directory's index.html.
    let (status, h, body) = get(&proxy, "GET", "/hello.txt").await;
    assert_eq!((status, body.as_slice()), (200, &b"hello from --web\n"[..]));
    assert_eq!(
        header(&h, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    let (status, _, body) = get(&proxy, "GET", "/sub/").await;
    assert_eq!((status, body.as_slice()), (200, &b"<p>sub</p>"[..]));

    // Traversal, encoded traversal, NUL, a symlink out of the root: 404,
    // and the secret never appears.
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/sub/%2E%2E/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/hello.txt%00.html",
        "/leak.txt",
        "/.hidden",
    ] {
        let (status, _, body) = get(&proxy, "GET", path).await;
        assert_eq!(status, 404, "{path}");
        assert!(
            !String::from_utf8_lossy(&body).contains("outside-the-root"),
            "{path}"
        );
    }

    // Not a file: the WebSocket front end's refusals, as before.
    let (status, _, _) = get(&proxy, "GET", &format!("/websockify?token={tok}")).await;
    assert_eq!(status, 426);
    let (status, _, _) = get(&proxy, "POST", "/vnc.html").await;
    assert_eq!(status, 405);

    proxy
        .wait_log(&["static file", "path=vnc.html", "status=200"])
        .await
        .unwrap();
    proxy.assert_secrets_not_logged(&[&tok]);
}
