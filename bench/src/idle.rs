//! Connection scale: open `sessions` sessions one after another, each
//! proven end to end by a one-byte round trip through the proxy to an echo
//! backend, hold them all, and read the proxy's memory (PSS summed over
//! the process trees of `proxy_pids`, see [`procstat::tree_pss_kib`])
//! before the first, after the last, and again after the hold (every
//! session idle by then; the figure reported when there is a hold). Gives
//! memory per idle session and the session set-up rate (sequential:
//! connect, TLS, CONNECT or upgrade, first byte back).

use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;

use crate::procstat;
use crate::tenant::{Dial, Session};

/// What the idle client does.
#[derive(Clone, Debug)]
pub struct Options {
    pub sessions: u64,
    /// Process trees whose memory is the proxy's (none: no memory figures).
    pub proxy_pids: Vec<u32>,
    /// How long to hold the sessions once all are open.
    pub hold: Duration,
}

/// One run's outcome.
#[derive(Debug)]
pub struct Report {
    pub front: &'static str,
    pub tls: bool,
    pub requested: u64,
    pub established: u64,
    pub setup: Histogram<u64>,
    pub setup_took: Duration,
    pub pss_before_kib: Option<u64>,
    pub pss_after_kib: Option<u64>,
    /// After holding the sessions for `hold` (None without a hold): what an
    /// idle session costs once the proxy has released its buffers.
    pub pss_held_kib: Option<u64>,
    pub cpu_s: f64,
    /// Tenant source addresses the sessions were spread over (0: one, the
    /// kernel's choice).
    pub source_addrs: usize,
    /// Ways in (CONNECT targets or WebSocket paths) spread over.
    pub ways: usize,
    /// The open-file limit the client ran with.
    pub nofile: u64,
    pub error: Option<String>,
}

impl Report {
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.established == self.requested
    }

    /// Proxy memory growth per established session, KiB: after the hold
    /// when there was one (the sessions idle), else right after opening.
    pub fn kib_per_session(&self) -> Option<f64> {
        self.kib_per_session_held()
            .or_else(|| self.kib_per_session_open())
    }

    /// Proxy memory growth per session right after the last one opened, KiB.
    pub fn kib_per_session_open(&self) -> Option<f64> {
        match (self.pss_before_kib, self.pss_after_kib) {
            (Some(b), Some(a)) if self.established > 0 => {
                Some((a as f64 - b as f64) / self.established as f64)
            }
            _ => None,
        }
    }

    /// Proxy memory growth per session after the hold, KiB.
    pub fn kib_per_session_held(&self) -> Option<f64> {
        match (self.pss_before_kib, self.pss_held_kib) {
            (Some(b), Some(a)) if self.established > 0 => {
                Some((a as f64 - b as f64) / self.established as f64)
            }
            _ => None,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let ms = |q: f64| {
            if self.setup.is_empty() {
                0.0
            } else {
                self.setup.value_at_percentile(q) as f64 / 1e6
            }
        };
        let secs = self.setup_took.as_secs_f64();
        serde_json::json!({
            "mode": "idle",
            "front": self.front,
            "tls": self.tls,
            "sessions_requested": self.requested,
            "sessions": self.established,
            "setup_seconds": secs,
            "setup_per_s": if secs > 0.0 { self.established as f64 / secs } else { 0.0 },
            "setup_ms": { "p50": ms(50.0), "p99": ms(99.0), "max": ms(100.0) },
            "proxy_pss_before_kib": self.pss_before_kib,
            "proxy_pss_after_kib": self.pss_after_kib,
            "proxy_kib_per_session": self.kib_per_session(),
            "proxy_kib_per_session_open": self.kib_per_session_open(),
            "proxy_pss_held_kib": self.pss_held_kib,
            "proxy_kib_per_session_held": self.kib_per_session_held(),
            "client_cpu_s": self.cpu_s,
            "source_addrs": self.source_addrs,
            "ways": self.ways,
            "client_nofile": self.nofile,
            "complete": self.complete(),
            "error": self.error,
        })
    }
}

fn pss(pids: &[u32]) -> Option<u64> {
    (!pids.is_empty()).then(|| procstat::tree_pss_kib(pids))
}

/// A held session's first receive buffer: one byte comes back per session,
/// so a large buffer would only be address space (it grows for a long
/// response head).
const IDLE_BUF: usize = 4096;

/// Open files the client needs besides one per session.
const SPARE_FILES: u64 = 256;

pub fn run(dial: &Dial, opts: &Options) -> Result<Report> {
    crate::scale::ensure_nofile(opts.sessions + SPARE_FILES)
        .map_err(|e| anyhow::anyhow!("holding {} sessions: {e:#}", opts.sessions))?;
    let mut dial = dial.clone();
    dial.buf_size = IDLE_BUF;
    let dial = &dial;
    let cpu0 = procstat::self_cpu();
    let pss_before_kib = pss(&opts.proxy_pids);
    let mut setup = Histogram::new_with_bounds(1, 600_000_000_000, 3)?;
    let mut held: Vec<Session> = Vec::with_capacity(opts.sessions as usize);
    let mut error = None;
    let started = Instant::now();
    for i in 0..opts.sessions {
        let t = Instant::now();
        let opened = dial.open_nth(i).and_then(|mut s| {
            s.send(&[i as u8])?;
            let mut b = [0u8; 1];
            s.read_payload_exact(&mut b)?;
            if b[0] != i as u8 {
                return Err(std::io::Error::other("wrong byte echoed"));
            }
            Ok(s)
        });
        match opened {
            Ok(s) => {
                setup.saturating_record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                held.push(s);
            }
            Err(e) => {
                error = Some(format!("session {} of {}: {e}", i + 1, opts.sessions));
                break;
            }
        }
    }
    let setup_took = started.elapsed();
    let pss_after_kib = pss(&opts.proxy_pids);
    thread::sleep(opts.hold);
    let pss_held_kib = if opts.hold.is_zero() {
        None
    } else {
        pss(&opts.proxy_pids)
    };
    let established = held.len() as u64;
    drop(held);
    Ok(Report {
        front: dial.front.name(),
        tls: dial.tls.is_some(),
        requested: opts.sessions,
        established,
        setup,
        setup_took,
        pss_before_kib,
        pss_after_kib,
        pss_held_kib,
        cpu_s: procstat::self_cpu() - cpu0,
        source_addrs: dial.sources.len(),
        ways: dial.fronts().count(),
        nofile: crate::scale::nofile_limits().0,
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo;
    use crate::tenant::Front;

    #[test]
    fn holds_sessions_and_reads_memory_of_the_given_process() {
        let server = echo::Server::bind("127.0.0.1:0", Duration::from_millis(300)).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve());
        let dial = Dial::new(&addr, Front::Raw, None, Duration::from_secs(10)).unwrap();
        let opts = Options {
            sessions: 20,
            // This test process stands in for the proxy.
            proxy_pids: vec![std::process::id()],
            hold: Duration::ZERO,
        };
        let report = run(&dial, &opts).unwrap();
        assert!(report.complete(), "{report:?}");
        let json = report.json();
        assert_eq!(json["sessions"], 20);
        assert!(json["proxy_pss_before_kib"].as_u64().unwrap() > 0);
        assert!(json["proxy_kib_per_session"].is_f64());
        assert!(json["setup_per_s"].as_f64().unwrap() > 0.0);
        let totals = serving.join().unwrap().unwrap();
        assert_eq!(totals.clients, 20);
        assert_eq!(totals.peak, 20);
    }
}
