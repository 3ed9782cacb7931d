//! Child processes of the compare runner: started pinned to a CPU set with a
//! raised file limit, output into a log file, and killed (with everything
//! they forked) by pid when dropped.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::procstat;

/// Every child started here and not yet ended: what [`end_all`] ends when
/// the runner is stopped by a signal (no `Drop` runs then).
static LIVE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends every child still running and what it forked, by pid.
pub fn end_all() {
    let roots: Vec<u32> = live().iter().copied().collect();
    kill_pids(&procstat::tree(&roots));
}

fn kill_pids(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// Open files wanted for every child at least (sessions x 2 sockets, with
/// room).
pub const NOFILE: u64 = 65_536;

/// Open files wanted for every child: [`NOFILE`], or more for a large idle
/// run (see [`want_nofile`]).
static WANTED: AtomicU64 = AtomicU64::new(NOFILE);

/// Descriptors a proxy may hold per idle session: two sockets, and room for
/// a spliced session's pipes while bytes are in flight.
const FILES_PER_SESSION: u64 = 6;

/// Asks for enough open files for `sessions` held at once (never fewer
/// than [`NOFILE`]), raising this process's own limits toward it (root may
/// raise the hard limit up to `fs.nr_open`); returns what children get.
pub fn want_nofile(sessions: u64) -> u64 {
    let want = NOFILE.max(sessions.saturating_mul(FILES_PER_SESSION) + 4096);
    WANTED.store(want, Ordering::Relaxed);
    crate::scale::raise_nofile_toward(want);
    nofile()
}

/// What [`want_nofile`] asked for, or this process's hard limit if that is
/// lower (raising a hard limit needs privileges a container may not have).
pub fn nofile() -> u64 {
    let want = WANTED.load(Ordering::Relaxed);
    let hard = fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .and_then(|v| v.parse::<u64>().ok());
    hard.map_or(want, |h| h.min(want))
}

/// `program args` under `prlimit --nofile` and `taskset -c cpus` when those
/// tools exist (both exec, so the child's pid is the program's).
pub fn pinned(cpus: Option<&str>, program: &Path, args: &[String]) -> Command {
    let mut argv: Vec<String> = Vec::new();
    if tool_exists("prlimit") {
        let n = nofile();
        argv.extend(["prlimit".into(), format!("--nofile={n}:{n}")]);
    }
    if let Some(cpus) = cpus.filter(|_| tool_exists("taskset")) {
        argv.extend(["taskset".into(), "-c".into(), cpus.to_owned()]);
    }
    let mut cmd = match argv.first() {
        Some(first) => {
            let mut c = Command::new(first);
            c.args(&argv[1..]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args);
    cmd.stdin(Stdio::null());
    cmd
}

/// Whether `name` is on PATH (or in the usual sbin directories).
pub fn tool_exists(name: &str) -> bool {
    which(name).is_some()
}

/// Full path of a program on PATH, /usr/sbin or /sbin.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A running child, killed with its descendants on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        live().insert(child.id());
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// Starts a loadgen server and waits for its `{"event":"listening"}`
    /// line; later lines go to `log`. Returns its addresses (`addrs`, or
    /// the one `addr`).
    pub fn spawn_server(name: &str, mut cmd: Command, log: &Path) -> Result<(Self, Vec<String>)> {
        let mut file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(file.try_clone()?)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        live().insert(child.id());
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(t) = tx.take() {
                    let addr = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| listening_addrs(&v));
                    let _ = t.send(addr);
                }
                let _ = writeln!(file, "{line}");
            }
        });
        let proc = Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(addr)) => Ok((proc, addr)),
            _ => bail!("{name} did not report its address: {}", proc.log_tail()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 6)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Descendants first (nginx workers, websockify's per-connection
        // processes), by pid: only what this child started.
        let pid = self.child.id();
        let tree: Vec<u32> = procstat::tree(&[pid])
            .into_iter()
            .filter(|p| *p != pid)
            .collect();
        kill_pids(&tree);
        let _ = self.child.kill();
        let _ = self.child.wait();
        live().remove(&pid);
    }
}

/// The addresses of a server's "listening" line.
fn listening_addrs(v: &serde_json::Value) -> Option<Vec<String>> {
    let all: Vec<String> = v["addrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if !all.is_empty() {
        return Some(all);
    }
    v["addr"].as_str().map(|a| vec![a.to_owned()])
}

/// The last `n` lines of a text file, joined with " | ".
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// What a finished client printed.
#[derive(Debug)]
pub struct Finished {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// Runs `cmd` to its end, or kills it after `timeout`.
pub fn run_to_end(mut cmd: Command, timeout: Duration) -> Result<Finished> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    live().insert(pid);
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let (tx, rx) = mpsc::channel();
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(());
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let timed_out = rx.recv_timeout(timeout).is_err();
    if timed_out {
        let _ = child.kill();
    }
    let status = child.wait().ok();
    live().remove(&pid);
    Ok(Finished {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        timed_out,
    })
}

/// Whether a TCP listener is bound at `port` on loopback (from
/// /proc/net/tcp{,6}; connecting to find out would start a session).
pub fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).unwrap_or_default().lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
        })
    })
}

/// Waits until every port listens, or a process dies, or 15 s pass.
pub fn wait_listening(ports: &[u16], procs: &mut [Proc]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ports.iter().all(|p| listening(*p)) {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if !p.alive() {
                bail!("{} exited: {}", p.name, p.log_tail());
            }
        }
        if Instant::now() > deadline {
            let names: Vec<&str> = procs.iter().map(|p| p.name.as_str()).collect();
            bail!(
                "{} not listening on {ports:?} after 15 s: {}",
                names.join(", "),
                procs.first().map(Proc::log_tail).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_is_at_most_the_hard_limit() {
        let n = nofile();
        assert!(n > 0 && n <= WANTED.load(Ordering::Relaxed));
        let mut c = pinned(None, Path::new("sh"), &["-c".into(), "ulimit -n".into()]);
        let out = c.output().unwrap();
        assert!(out.status.success());
        let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        if tool_exists("prlimit") {
            assert_eq!(got, n);
        }
    }

    #[test]
    fn listening_sees_a_bound_port_and_not_a_free_one() {
        // One socket holds the port throughout, so no other test can
        // listen on it between the two checks: bound first, then listening.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        assert!(!listening(port), "bound, not listening");
        s.listen(1).unwrap();
        assert!(listening(port));
    }

    #[test]
    fn run_to_end_captures_output_and_kills_on_timeout() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2"]);
        let f = run_to_end(c, Duration::from_secs(10)).unwrap();
        assert_eq!(f.stdout, "out\n");
        assert_eq!(f.stderr, "err\n");
        assert!(f.status.unwrap().success());
        let mut c = Command::new("sleep");
        c.arg("30");
        let f = run_to_end(c, Duration::from_millis(100)).unwrap();
        assert!(f.timed_out);
        assert!(!f.status.unwrap().success());
    }
}
