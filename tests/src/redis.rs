//! A real `redis-server` for the fleet tests: listens only on a UNIX
//! socket in its own temp dir (no port races), no persistence, killed by
//! PID on drop.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::process::ChildGuard;

#[derive(Debug)]
pub struct RedisServer {
    _child: ChildGuard,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers PING.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cg-redis-").tempdir()?;
        let socket = dir.path().join("redis.sock");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--dir"])
            .arg(dir.path());
        let child = ChildGuard::spawn("redis-server", cmd)
            .context("redis-server is needed (cargo xtask setup installs it)")?;
        let me = Self {
            _child: child,
            socket,
            _dir: dir,
        };
        crate::within("redis-server answers PING", async {
            loop {
                if let Ok(r) = me.cmd(&["PING"]).await
                    && r == "+PONG"
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await?;
        Ok(me)
    }

    /// The URL consolegate's `[tokens.redis] url` takes.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Sends one command and returns the first line of the reply
    /// (`+OK`, `:1`, `$-1`, ...), or for a bulk string `$<n>` + its value.
    pub async fn cmd(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut s = UnixStream::connect(&self.socket).await?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                bail!("redis closed the connection");
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((first, rest)) = text.split_once("\r\n") {
                if let Some(len) = first.strip_prefix('$')
                    && let Ok(len) = len.parse::<usize>()
                {
                    if rest.len() >= len + 2 {
                        return Ok(rest[..len].to_owned());
                    }
                    continue;
                }
                return Ok(first.to_owned());
            }
        }
    }
}
