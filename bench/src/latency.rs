//! Small-message round trips: keystroke-sized ping-pong through the proxy
//! to an echo backend ([`crate::echo`]). Each session sends `size` bytes,
//! waits for the same bytes back, and records the round trip in an HDR
//! histogram (nanoseconds, 3 significant digits). Closed loop: one message
//! in flight per session.

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;

use crate::procstat;
use crate::tenant::Dial;

/// What the latency client does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Timed round trips per session.
    pub messages: u64,
    /// Untimed round trips first, per session.
    pub warmup: u64,
    /// Payload bytes per message.
    pub size: usize,
    /// Parallel sessions.
    pub connections: u64,
}

/// Percentiles reported in every summary, and the points of the curve.
pub const PERCENTILES: [f64; 4] = [50.0, 90.0, 99.0, 99.9];
pub const CURVE: [f64; 10] = [0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0];

/// One run's outcome over all sessions.
#[derive(Debug)]
pub struct Report {
    pub front: &'static str,
    pub tls_suite: Option<String>,
    pub connections: u64,
    pub size: usize,
    pub expected: u64,
    pub hist: Histogram<u64>,
    pub took: Duration,
    pub cpu_s: f64,
    pub error: Option<String>,
}

impl Report {
    pub fn complete(&self) -> bool {
        self.error.is_none() && self.hist.len() == self.expected
    }

    fn us(&self, q: f64) -> f64 {
        if self.hist.is_empty() {
            return 0.0;
        }
        self.hist.value_at_percentile(q) as f64 / 1000.0
    }

    pub fn json(&self) -> serde_json::Value {
        let curve: Vec<_> = CURVE.iter().map(|&q| [q, self.us(q)]).collect();
        serde_json::json!({
            "mode": "latency",
            "front": self.front,
            "tls": self.tls_suite.is_some(),
            "tls_suite": self.tls_suite,
            "connections": self.connections,
            "size": self.size,
            "messages_expected": self.expected,
            "messages": self.hist.len(),
            "seconds": self.took.as_secs_f64(),
            "us": {
                "min": self.us(0.0),
                "p50": self.us(50.0),
                "p90": self.us(90.0),
                "p99": self.us(99.0),
                "p99_9": self.us(99.9),
                "max": if self.hist.is_empty() { 0.0 } else { self.hist.max() as f64 / 1000.0 },
                "mean": self.hist.mean() / 1000.0,
            },
            "curve_us": curve,
            "client_cpu_s": self.cpu_s,
            "complete": self.complete(),
            "error": self.error,
        })
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 us .. 60 s at 3 significant digits; values above are clamped.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub fn run(dial: &Dial, opts: &Options) -> Result<Report> {
    let cpu0 = procstat::self_cpu();
    let started = Instant::now();
    let results: Vec<(Histogram<u64>, Option<String>, Option<io::Error>)> =
        thread::scope(|scope| {
            let workers: Vec<_> = (0..opts.connections)
                .map(|i| scope.spawn(move || ping_pong(dial, opts, i)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("latency worker panicked"))
                .collect()
        });
    let took = started.elapsed();
    let mut hist = new_hist();
    let mut error = None;
    let mut tls_suite = None;
    for (h, suite, e) in results {
        hist.add(&h).context("merging histograms")?;
        if tls_suite.is_none() {
            tls_suite = suite;
        }
        if error.is_none() {
            error = e.map(|e| e.to_string());
        }
    }
    Ok(Report {
        front: dial.front.name(),
        tls_suite,
        connections: opts.connections,
        size: opts.size,
        expected: opts.messages * opts.connections,
        hist,
        took,
        cpu_s: procstat::self_cpu() - cpu0,
        error,
    })
}

fn ping_pong(
    dial: &Dial,
    opts: &Options,
    worker: u64,
) -> (Histogram<u64>, Option<String>, Option<io::Error>) {
    let mut hist = new_hist();
    let mut suite = None;
    let result = (|| -> io::Result<()> {
        let mut session = dial.open()?;
        suite.clone_from(&session.tls_suite);
        let mut msg = vec![0u8; opts.size];
        let mut back = vec![0u8; opts.size];
        for i in 0..opts.warmup + opts.messages {
            // A different pattern each time, so a stale echo is caught.
            let seed = (i as u8).wrapping_add(worker as u8);
            for (j, b) in msg.iter_mut().enumerate() {
                *b = seed.wrapping_add(j as u8);
            }
            let t = Instant::now();
            session.send(&msg)?;
            session.read_payload_exact(&mut back)?;
            let rtt = t.elapsed();
            if back != msg {
                return Err(io::Error::other(format!(
                    "round trip {i}: the echo differs from what was sent"
                )));
            }
            if i >= opts.warmup {
                let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1));
            }
        }
        Ok(())
    })();
    (hist, suite, result.err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo;
    use crate::tenant::Front;

    #[test]
    fn round_trips_fill_the_histogram_in_order() {
        let server = echo::Server::bind("127.0.0.1:0", Duration::from_millis(300)).unwrap();
        let addr = server.local_addr().unwrap().to_string();
        let serving = thread::spawn(move || server.serve());
        let dial = Dial::new(&addr, Front::Raw, None, Duration::from_secs(10)).unwrap();
        let opts = Options {
            messages: 200,
            warmup: 10,
            size: 64,
            connections: 2,
        };
        let report = run(&dial, &opts).unwrap();
        assert!(report.complete(), "{report:?}");
        let json = report.json();
        assert_eq!(json["messages"], 400);
        let us = &json["us"];
        let order = ["min", "p50", "p90", "p99", "p99_9", "max"];
        let values: Vec<f64> = order.iter().map(|k| us[k].as_f64().unwrap()).collect();
        assert!(values[0] > 0.0, "{us}");
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{us}");
        assert_eq!(json["curve_us"].as_array().unwrap().len(), CURVE.len());
        let totals = serving.join().unwrap().unwrap();
        assert_eq!(totals.bytes, 2 * 210 * 64);
    }
}
