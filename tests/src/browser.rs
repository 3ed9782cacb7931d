//! Headless Chromium (Debian's `chromium`) driven over the Chrome DevTools
//! Protocol: a fresh profile per launch, `--remote-debugging-port=0`, one
//! WebSocket to the browser target (tokio-tungstenite), flattened sessions
//! per page. Just what the web-console tests need: open a page, evaluate
//! JavaScript, type text, take a screenshot, and collect the page's console
//! messages, exceptions and CSP violations for failure messages.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::process::ChildGuard;

/// The flags this machine kind needs (no network beyond loopback: without
/// the background-networking ones Chromium keeps dialling Google hosts).
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1024,768",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
];

/// Where Chromium is: `$CHROMIUM`, else `chromium` on PATH.
pub fn chromium_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

/// A running headless Chromium, killed (by PID) on drop.
#[derive(Debug)]
pub struct Chromium {
    child: ChildGuard,
    _profile: tempfile::TempDir,
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    /// Events received so far (console messages, log entries, exceptions).
    events: Vec<Value>,
}

/// A page (a target attached with a flattened session).
#[derive(Clone, Debug)]
pub struct Page {
    pub session: String,
}

impl Chromium {
    /// Starts Chromium with a new empty profile. `extra` flags are added
    /// (e.g. `--ignore-certificate-errors` for a test CA).
    pub async fn launch(extra: &[&str]) -> anyhow::Result<Self> {
        let bin = chromium_path().context(
            "chromium not found (Debian package `chromium`; `cargo xtask setup` installs it)",
        )?;
        let profile = tempfile::Builder::new().prefix("cg-chromium-").tempdir()?;
        let mut cmd = Command::new(&bin);
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg("about:blank");
        let mut child = ChildGuard::spawn("chromium", cmd)?;
        let url = crate::within_for(
            Duration::from_secs(60),
            "chromium DevTools endpoint",
            async {
                loop {
                    if let Some(st) = child.exited() {
                        child.drain_output();
                        bail!("chromium exited early ({st}): {}", child.output());
                    }
                    if let Some(u) = child.output().lines().find_map(|l| {
                        l.split_once("DevTools listening on ")
                            .map(|(_, u)| u.trim().to_owned())
                    }) {
                        return Ok(u);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        )
        .await??;
        let authority = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .with_context(|| format!("unexpected DevTools URL {url}"))?
            .to_owned();
        let tcp = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("connecting to DevTools at {authority}"))?;
        let (ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
            .await
            .context("DevTools WebSocket handshake")?;
        Ok(Self {
            child,
            _profile: profile,
            ws,
            next_id: 0,
            events: Vec::new(),
        })
    }

    /// Sends one command and waits for its result (events that arrive
    /// meanwhile are kept).
    pub async fn call(
        &mut self,
        page: Option<&Page>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(p) = page {
            msg["sessionId"] = Value::String(p.session.clone());
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        let reply = crate::within(method, async {
            loop {
                let m = self
                    .ws
                    .next()
                    .await
                    .context("DevTools connection closed")??;
                let Message::Text(text) = m else { continue };
                let v: Value = serde_json::from_str(text.as_str())?;
                if v.get("id").and_then(Value::as_u64) == Some(id) {
                    return anyhow::Ok(v);
                }
                if v.get("method").is_some() {
                    self.events.push(v);
                }
            }
        })
        .await??;
        if let Some(e) = reply.get("error") {
            bail!("{method}: {e}");
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }

    /// Opens a new tab at `url` and attaches to it, with console messages,
    /// exceptions and log entries (CSP violations) recorded.
    pub async fn open(&mut self, url: &str) -> anyhow::Result<Page> {
        let t = self
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target = t["targetId"].as_str().context("no targetId")?.to_owned();
        let a = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await?;
        let page = Page {
            session: a["sessionId"].as_str().context("no sessionId")?.to_owned(),
        };
        for m in ["Runtime.enable", "Log.enable", "Page.enable"] {
            self.call(Some(&page), m, json!({})).await?;
        }
        let nav = self
            .call(Some(&page), "Page.navigate", json!({ "url": url }))
            .await?;
        if let Some(e) = nav.get("errorText").and_then(Value::as_str) {
            bail!("navigating to the page failed: {e}");
        }
        Ok(page)
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its value.
    pub async fn eval(&mut self, page: &Page, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                Some(page),
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!("evaluating {expr:?} threw: {ex}");
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `expr` every 200 ms until `done` accepts its value; `fail`
    /// may end the wait early with an error. Bounded by `limit` (an upper
    /// bound against hangs, not a performance assertion).
    pub async fn wait_for(
        &mut self,
        page: &Page,
        what: &str,
        expr: &str,
        limit: Duration,
        mut done: impl FnMut(&Value) -> Result<bool, String>,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let last = match self.eval(page, expr).await {
                Ok(v) => {
                    match done(&v) {
                        Ok(true) => return Ok(v),
                        Ok(false) => {}
                        Err(why) => bail!(
                            "{what}: {why} (last value {v}); page messages:\n{}",
                            self.messages()
                        ),
                    }
                    v
                }
                Err(e) => Value::String(format!("{e:#}")),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{what}: not reached within {limit:?} (last value {last}); page messages:\n{}",
                    self.messages()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Types `text` into the focused element, as a keyboard would insert it.
    pub async fn insert_text(&mut self, page: &Page, text: &str) -> anyhow::Result<()> {
        self.call(Some(page), "Input.insertText", json!({ "text": text }))
            .await?;
        Ok(())
    }

    /// Presses and releases Enter (a carriage return for a terminal).
    pub async fn press_enter(&mut self, page: &Page) -> anyhow::Result<()> {
        for kind in ["keyDown", "keyUp"] {
            let mut p = json!({
                "type": kind, "key": "Enter", "code": "Enter",
                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13,
            });
            if kind == "keyDown" {
                p["text"] = Value::String("\r".into());
            }
            self.call(Some(page), "Input.dispatchKeyEvent", p).await?;
        }
        Ok(())
    }

    /// Saves a PNG screenshot of the page.
    pub async fn screenshot(&mut self, page: &Page, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let r = self
            .call(
                Some(page),
                "Page.captureScreenshot",
                json!({ "format": "png" }),
            )
            .await?;
        let data = r["data"].as_str().context("no screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Console messages, uncaught exceptions and log entries (CSP
    /// violations, failed loads) seen so far, one a line.
    pub fn messages(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            let p = &e["params"];
            let line = match e["method"].as_str().unwrap_or("") {
                "Runtime.consoleAPICalled" => {
                    let args: Vec<String> = p["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| {
                                    x.get("value")
                                        .map(|v| v.to_string())
                                        .or_else(|| x["description"].as_str().map(str::to_owned))
                                        .unwrap_or_default()
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    format!(
                        "console.{}: {}",
                        p["type"].as_str().unwrap_or("?"),
                        args.join(" ")
                    )
                }
                "Runtime.exceptionThrown" => format!(
                    "exception: {}",
                    p["exceptionDetails"]["exception"]["description"]
                        .as_str()
                        .or(p["exceptionDetails"]["text"].as_str())
                        .unwrap_or("?")
                ),
                "Log.entryAdded" => format!(
                    "log.{} [{}]: {} {}",
                    p["entry"]["level"].as_str().unwrap_or("?"),
                    p["entry"]["source"].as_str().unwrap_or("?"),
                    p["entry"]["text"].as_str().unwrap_or(""),
                    p["entry"]["url"].as_str().unwrap_or("")
                ),
                _ => continue,
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Log entries about the Content-Security-Policy (violations).
    pub fn csp_violations(&self) -> Vec<String> {
        self.messages()
            .lines()
            .filter(|l| l.contains("Content Security Policy"))
            .map(str::to_owned)
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Chromium {
    /// SIGTERM first, so the browser takes its renderer and utility
    /// processes down with it; the guard's SIGKILL (by PID) is the fallback.
    fn drop(&mut self) {
        if self.child.exited().is_none() && self.child.signal("TERM").is_ok() {
            let _ = self.child.wait_exit(Duration::from_secs(5));
        }
    }
}
