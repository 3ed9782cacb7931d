//! One measurement of `loadgen compare`: the client child's arguments, the
//! CPU and memory sampled around it, the figures derived from them, and
//! the progress line.

use std::time::Instant;

use serde_json::{Value, json};

use super::peers::Row;
use super::proc::{self, pinned};
use super::{Scenario, Settings};
use crate::procstat::{self, CpuTimes};

/// One line for the progress log.
pub(super) fn headline(scenario: Scenario, rec: &Value) -> String {
    if !rec["ok"].as_bool().unwrap_or(false) {
        return format!("FAILED: {}", rec["error"].as_str().unwrap_or("?"));
    }
    match scenario {
        Scenario::Bulk => format!(
            "{:.2} Gbit/s, proxy {:.2} CPU-s/GB",
            rec["gbit_per_s"].as_f64().unwrap_or(0.0),
            rec["proxy_cpu_s_per_gb"].as_f64().unwrap_or(0.0)
        ),
        Scenario::Latency => format!(
            "p50 {:.1} us, p99 {:.1} us",
            rec["us"]["p50"].as_f64().unwrap_or(0.0),
            rec["us"]["p99"].as_f64().unwrap_or(0.0)
        ),
        Scenario::Idle => format!(
            "{} sessions, {} KiB/session, {:.0} set-ups/s",
            rec["sessions"],
            rec["proxy_kib_per_session"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.1}")),
            rec["setup_per_s"].as_f64().unwrap_or(0.0)
        ),
    }
}

/// Seconds the idle scenario holds its sessions before reading memory.
const IDLE_HOLD_SECS: u64 = 2;

/// The clients' connect and read timeout, seconds.
const CLIENT_IO_TIMEOUT_SECS: u64 = 5;

/// What one measurement samples around its client.
pub(super) struct Probe<'a> {
    pub(super) settings: &'a Settings,
    pub(super) proxy_pids: Vec<u32>,
    pub(super) backend_pids: &'a [u32],
    pub(super) proxy_cpus: Option<&'a [usize]>,
    pub(super) load_cpus: Option<&'a [usize]>,
}

impl Probe<'_> {
    fn client_args(&self, row: &Row, scenario: Scenario) -> Vec<String> {
        let s = self.settings;
        let mut a: Vec<String> = vec![scenario.as_str().into()];
        // A proxy that stalls fails the run after this, not after minutes.
        a.extend(["--timeout".into(), CLIENT_IO_TIMEOUT_SECS.to_string()]);
        match scenario {
            Scenario::Bulk => {
                a.extend(row.to_flood.iter().cloned());
                a.extend(["--bytes".into(), s.bulk_bytes.to_string()]);
                if s.discard {
                    a.push("--discard".into());
                }
            }
            Scenario::Latency => {
                a.extend(row.to_echo.iter().cloned());
                a.extend([
                    "--messages".into(),
                    s.latency_messages.to_string(),
                    "--warmup".into(),
                    s.latency_warmup.to_string(),
                    "--size".into(),
                    s.latency_size.to_string(),
                ]);
            }
            Scenario::Idle => {
                a.extend(row.to_echo.iter().cloned());
                a.extend(["--sessions".into(), s.idle_sessions.to_string()]);
                if s.source_addrs > 0 {
                    a.extend(["--source-addrs".into(), s.source_addrs.to_string()]);
                }
                // Memory is read once every session has been idle this
                // long, so proxies that free idle buffers are credited.
                a.extend(["--hold".into(), IDLE_HOLD_SECS.to_string()]);
                for p in &self.proxy_pids {
                    a.extend(["--proxy-pid".into(), p.to_string()]);
                }
            }
        }
        a
    }

    /// Runs one client and returns its JSON with the runner's samples and
    /// derived figures added; `ok` says whether it counts.
    pub(super) fn measure(&self, row: &Row, scenario: Scenario) -> Value {
        let args = self.client_args(row, scenario);
        let cmd = pinned(
            self.settings.load_cpus.as_deref(),
            &self.settings.loadgen,
            &args,
        );
        let proxy0 = procstat::tree_cpu_seconds(&self.proxy_pids);
        let back0 = procstat::tree_cpu_seconds(self.backend_pids);
        let sys0 = CpuTimes::now();
        let t0 = Instant::now();
        let finished = proc::run_to_end(cmd, self.settings.run_timeout);
        let sys1 = CpuTimes::now();
        let wall = t0.elapsed().as_secs_f64();
        let proxy_cpu = procstat::tree_cpu_seconds(&self.proxy_pids) - proxy0;
        let backend_cpu = procstat::tree_cpu_seconds(self.backend_pids) - back0;
        let finished = match finished {
            Ok(f) => f,
            Err(e) => {
                return json!({ "scenario": scenario.as_str(), "ok": false, "error": format!("{e:#}") });
            }
        };
        let mut rec = finished
            .stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        rec["scenario"] = json!(scenario.as_str());
        rec["wall_s"] = json!(wall);
        rec["proxy_cpu_s"] = json!(proxy_cpu.max(0.0));
        rec["backend_cpu_s"] = json!(backend_cpu.max(0.0));
        rec["system_cpu_s"] = json!(sys1.busy_since(&sys0));
        rec["proxy_cpu_busy"] = json!(sys1.utilisation_since(&sys0, self.proxy_cpus));
        rec["load_cpu_busy"] = json!(sys1.utilisation_since(&sys0, self.load_cpus));
        let exit_ok = finished.status.is_some_and(|s| s.success());
        let complete = rec["complete"].as_bool().unwrap_or(false);
        // An idle run that stopped short found the service's limit: a result.
        let partial_idle = scenario == Scenario::Idle && rec["sessions"].as_u64().unwrap_or(0) > 0;
        let ok = !finished.timed_out && (exit_ok && complete || partial_idle);
        rec["ok"] = json!(ok);
        if !ok && rec["error"].is_null() {
            let why = if finished.timed_out {
                format!("timed out after {:?}", self.settings.run_timeout)
            } else {
                // anyhow's "Error: ..." line (a backtrace may follow it).
                let err = finished.stderr.trim();
                let err = err
                    .lines()
                    .find(|l| l.starts_with("Error: "))
                    .unwrap_or(&err[err.len().saturating_sub(400)..]);
                format!("loadgen exited {:?}: {err}", finished.status)
            };
            rec["error"] = json!(why);
        }
        derive(scenario, &mut rec, self.settings);
        rec
    }
}

/// Per-byte and per-message figures from the raw samples.
pub(super) fn derive(scenario: Scenario, rec: &mut Value, settings: &Settings) {
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    match scenario {
        Scenario::Bulk => {
            let gb = num(rec, "bytes") / 1e9;
            if gb > 0.0 {
                let loadgen = num(rec, "client_cpu_s") + num(rec, "backend_cpu_s");
                rec["proxy_cpu_s_per_gb"] = json!(num(rec, "proxy_cpu_s") / gb);
                rec["system_cpu_s_per_gb"] = json!(num(rec, "system_cpu_s") / gb);
                rec["loadgen_cpu_s_per_gb"] = json!(loadgen / gb);
            }
        }
        Scenario::Latency => {
            let trips = (settings.latency_messages + settings.latency_warmup) as f64;
            if trips > 0.0 {
                rec["proxy_cpu_us_per_round_trip"] = json!(num(rec, "proxy_cpu_s") * 1e6 / trips);
            }
        }
        Scenario::Idle => {}
    }
}
