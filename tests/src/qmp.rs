//! A minimal QMP client (QEMU Machine Protocol, JSON lines over a UNIX
//! socket): capabilities negotiation, commands, and live migration.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug)]
pub struct Qmp {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves
    /// capabilities negotiation mode.
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let s = crate::within("QMP socket", async {
            loop {
                if let Ok(s) = UnixStream::connect(path).await {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await?;
        let (r, w) = s.into_split();
        let mut q = Self {
            r: BufReader::new(r),
            w,
        };
        let greeting = q.line().await?;
        anyhow::ensure!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> anyhow::Result<Value> {
        let mut l = String::new();
        let n = crate::within("QMP answer", self.r.read_line(&mut l)).await??;
        if n == 0 {
            bail!("QMP socket closed");
        }
        serde_json::from_str(&l).with_context(|| format!("QMP line {l:?}"))
    }

    /// Runs a command and returns its `return` value (events are skipped).
    pub async fn execute(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        self.w.write_all(format!("{msg}\n").as_bytes()).await?;
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Migrates the guest to `uri` and waits until QEMU reports it done.
    pub async fn migrate(&mut self, uri: &str) -> anyhow::Result<()> {
        self.execute("migrate", json!({"uri": uri})).await?;
        crate::within("migration completes", async {
            loop {
                let st = self.execute("query-migrate", json!({})).await?;
                match st.get("status").and_then(Value::as_str) {
                    Some("completed") => return anyhow::Ok(()),
                    Some("failed" | "cancelled") => bail!("migration failed: {st}"),
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await?
    }
}
