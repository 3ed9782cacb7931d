//! Child processes the harness starts: killed by PID and reaped on drop.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A child process that is killed (SIGKILL, by its own PID) and waited for
/// when dropped. Only processes the harness spawned itself are ever killed.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured into one
    /// shared text buffer (also echoed to the test's captured stderr).
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("spawning {name} ({cmd:?}): {e}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let out: Option<Box<dyn Read + Send>> = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let err: Option<Box<dyn Read + Send>> = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for pipe in [out, err].into_iter().flatten() {
            let buf = Arc::clone(&stderr);
            let label = format!("[{name} {}]", child.id());
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line);
                            eprint!("{label} {text}");
                            buf.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push_str(&text);
                        }
                    }
                }
            }));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            stderr,
            readers,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child printed so far (stdout and stderr, interleaved by line).
    pub fn output(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal by PID with the shell's `kill` builtin (no unsafe code
    /// in the harness, no dependency on procps).
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            sig.chars().all(|c| c.is_ascii_alphanumeric()),
            "bad signal {sig:?}"
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{sig} {}", self.child.id()))
            .status()?;
        anyhow::ensure!(status.success(), "kill -{sig} {} failed", self.child.id());
        Ok(())
    }

    /// Waits (blocking, bounded) for the child to exit on its own.
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Joins the output readers (after the child exited) so `output()` is complete.
    pub fn drain_output(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}
