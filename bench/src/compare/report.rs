//! Summaries (median, min, max over the runs) and the report files:
//! `report.json` (everything, including every run), `report.md` (tables
//! with ratios to direct and to the best peer) and SVG plots.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{Map, Value, json};

use super::Scenario;
use super::svg;

/// The metrics summarised per scenario: (summary name, dotted path in a run).
pub fn metrics(scenario: Scenario) -> &'static [(&'static str, &'static str)] {
    match scenario {
        Scenario::Bulk => &[
            ("gbit_per_s", "gbit_per_s"),
            ("proxy_cpu_s_per_gb", "proxy_cpu_s_per_gb"),
            ("system_cpu_s_per_gb", "system_cpu_s_per_gb"),
            ("loadgen_cpu_s_per_gb", "loadgen_cpu_s_per_gb"),
            ("proxy_cpu_busy", "proxy_cpu_busy"),
            ("load_cpu_busy", "load_cpu_busy"),
        ],
        Scenario::Latency => &[
            ("p50_us", "us.p50"),
            ("p90_us", "us.p90"),
            ("p99_us", "us.p99"),
            ("p99_9_us", "us.p99_9"),
            ("max_us", "us.max"),
            ("proxy_cpu_us_per_round_trip", "proxy_cpu_us_per_round_trip"),
            ("load_cpu_busy", "load_cpu_busy"),
        ],
        Scenario::Idle => &[
            ("sessions", "sessions"),
            ("proxy_kib_per_session", "proxy_kib_per_session"),
            ("setup_per_s", "setup_per_s"),
            ("setup_p99_ms", "setup_ms.p99"),
        ],
    }
}

fn pick(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// Median, min, max and spread ((max - min) / median, percent) of `xs`.
pub fn stats(xs: &mut [f64]) -> Value {
    if xs.is_empty() {
        return Value::Null;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    let (min, max) = (xs[0], xs[n - 1]);
    let spread = if median.abs() > 0.0 {
        (max - min) / median.abs() * 100.0
    } else {
        0.0
    };
    json!({ "median": median, "min": min, "max": max, "spread_pct": spread, "n": n })
}

/// Per row and scenario: the number of runs and good runs, each metric's
/// stats over the good runs, and for latency the median percentile curve.
pub fn summarise(rows: &[Value], records: &[Value], scenarios: &[Scenario]) -> Value {
    let mut out = Map::new();
    for row in rows {
        let id = row["id"].as_str().unwrap_or_default();
        let mut per = Map::new();
        for &scenario in scenarios {
            let runs: Vec<&Value> = records
                .iter()
                .filter(|r| r["row"] == id && r["scenario"] == scenario.as_str())
                .collect();
            let good: Vec<&Value> = runs
                .iter()
                .copied()
                .filter(|r| r["ok"].as_bool().unwrap_or(false))
                .collect();
            let mut s = Map::new();
            s.insert("runs".into(), json!(runs.len()));
            s.insert("ok_runs".into(), json!(good.len()));
            if let Some(e) = runs.iter().find_map(|r| r["error"].as_str()) {
                s.insert("first_error".into(), json!(e));
            }
            for (name, path) in metrics(scenario) {
                let mut xs: Vec<f64> = good.iter().filter_map(|r| pick(r, path)).collect();
                s.insert((*name).into(), stats(&mut xs));
            }
            if scenario == Scenario::Latency && !good.is_empty() {
                let points = good[0]["curve_us"].as_array().map_or(0, Vec::len);
                let curve: Vec<Value> = (0..points)
                    .map(|i| {
                        let q = good[0]["curve_us"][i][0].as_f64().unwrap_or(0.0);
                        let mut xs: Vec<f64> = good
                            .iter()
                            .filter_map(|r| r["curve_us"][i][1].as_f64())
                            .collect();
                        json!([q, stats(&mut xs)["median"]])
                    })
                    .collect();
                s.insert("curve_us".into(), json!(curve));
            }
            per.insert(scenario.as_str().into(), Value::Object(s));
        }
        out.insert(id.into(), Value::Object(per));
    }
    Value::Object(out)
}

/// The median of one metric of one row, if measured.
pub fn median(report: &Value, row: &str, scenario: &str, metric: &str) -> Option<f64> {
    report["summary"][row][scenario][metric]["median"].as_f64()
}

/// Writes report.json, report.md and the plots into `out`.
pub fn write(out: &Path, report: &Value) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    let plots = svg::plots(report);
    for (name, text) in &plots {
        fs::write(out.join(name), text)?;
    }
    let names: Vec<&str> = plots.iter().map(|(n, _)| n.as_str()).collect();
    fs::write(out.join("report.md"), markdown(report, &names))?;
    Ok(())
}

fn rows(report: &Value) -> Vec<&Value> {
    report["rows"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default()
}

/// Which legs speak TLS: none, tenant (TLS-terminating) or both.
fn tls_class(row: &Value) -> &'static str {
    match (
        row["tls"].as_bool().unwrap_or(false),
        row["tls_compute"].as_bool().unwrap_or(false),
    ) {
        (_, true) => "both",
        (true, false) => "tenant",
        (false, false) => "no",
    }
}

/// The best median among the peers (not direct, not consolegate) of the
/// same TLS class as `row`: the highest if `higher_is_better`, else the lowest.
fn best_peer(
    report: &Value,
    row: &Value,
    scenario: &str,
    metric: &str,
    higher_is_better: bool,
) -> Option<(String, f64)> {
    let class = tls_class(row);
    rows(report)
        .into_iter()
        .filter(|r| r["family"] == "peer" && tls_class(r) == class)
        .filter_map(|r| {
            let id = r["id"].as_str()?;
            Some((id.to_owned(), median(report, id, scenario, metric)?))
        })
        .filter(|(_, v)| *v > 0.0)
        .reduce(|a, b| {
            let better = if higher_is_better {
                b.1 > a.1
            } else {
                b.1 < a.1
            };
            if better { b } else { a }
        })
}

fn ratio(x: Option<f64>, base: Option<f64>) -> String {
    match (x, base) {
        (Some(x), Some(b)) if b > 0.0 => format!("{:.2}x", x / b),
        _ => "-".into(),
    }
}

/// Ratio to the best peer; not for the direct row, which is no proxy.
fn peer_ratio(row: &Value, x: Option<f64>, best: Option<(String, f64)>) -> String {
    if row["family"] == "direct" {
        "-".into()
    } else {
        ratio(x, best.map(|b| b.1))
    }
}

fn fmt(x: Option<f64>, digits: usize) -> String {
    x.map_or("-".into(), |v| format!("{v:.digits$}"))
}

fn cell<'a>(report: &'a Value, row: &str, scenario: &str, metric: &str) -> &'a Value {
    &report["summary"][row][scenario][metric]
}

/// "median (min-max)".
fn spread(report: &Value, row: &str, scenario: &str, metric: &str, digits: usize) -> String {
    let c = cell(report, row, scenario, metric);
    match (c["median"].as_f64(), c["min"].as_f64(), c["max"].as_f64()) {
        (Some(m), Some(lo), Some(hi)) if c["n"].as_u64().unwrap_or(0) > 1 => {
            format!("{m:.digits$} ({lo:.digits$}-{hi:.digits$})")
        }
        (Some(m), _, _) => format!("{m:.digits$}"),
        _ => "-".into(),
    }
}

fn status(report: &Value, row: &str, scenario: &str) -> Option<String> {
    let s = &report["summary"][row][scenario];
    let ok = s["ok_runs"].as_u64().unwrap_or(0);
    let runs = s["runs"].as_u64().unwrap_or(0);
    (ok < runs).then(|| {
        format!(
            "{ok}/{runs} runs ok; first error: {}",
            s["first_error"].as_str().unwrap_or("?")
        )
    })
}

fn has(report: &Value, scenario: &str) -> bool {
    report["settings"]["scenarios"]
        .as_array()
        .is_some_and(|v| v.iter().any(|s| s == scenario))
}

/// The Markdown report.
/// How idle CPUs wait, when the machine says: it decides what a wake-up
/// across CPUs costs, and so every proxied round trip.
fn cpuidle_line(m: &Value) -> Option<String> {
    let driver = m["cpuidle_driver"].as_str()?;
    Some(match m["guest_halt_poll_ns"].as_u64() {
        Some(0) => format!(
            "CPU idle driver: {driver}, guest halt-polling off (guest_halt_poll_ns = 0): an \
             idle vCPU halts at once, so waking it costs a VM exit; latency across CPUs \
             and throughput limited by wake-ups are a property of this VM as much as of \
             the proxies."
        ),
        Some(ns) => format!("CPU idle driver: {driver}, guest halt-polling up to {ns} ns."),
        None => format!("CPU idle driver: {driver}."),
    })
}

/// The congestion control every loopback sender ran with: on loopback BBR
/// can limit the bulk rows more than the proxies do.
fn tcp_cc_line(m: &Value) -> Option<String> {
    let cc = m["tcp_congestion_control"].as_str()?;
    let how = match m["tcp_congestion_control_own"].as_str() {
        Some(own) => format!(
            "{cc} for this run (`--tcp-cc`; the machine's own, {own}, was restored after it)"
        ),
        None => format!("{cc} (the machine's)"),
    };
    Some(if cc == "bbr" {
        format!(
            "TCP congestion control: {how}. On loopback BBR can limit the bulk rows before the \
             proxies do (neither CPU saturated, direct loopback well below what cubic gets): \
             run again with `--tcp-cc cubic` to measure the proxies; see \
             docs/benchmarking.md."
        )
    } else {
        format!("TCP congestion control: {how}.")
    })
}

pub fn markdown(report: &Value, plots: &[&str]) -> String {
    let mut md = String::new();
    let set = &report["settings"];
    let m = &report["machine"];
    let _ = writeln!(md, "# consolegate side-by-side benchmark\n");
    let _ = writeln!(
        md,
        "{} run: {} runs per scenario and row, medians with (min-max) over the runs. \
         Machine: {} CPUs ({}), kernel {}, {:.1} GiB RAM. Proxies pinned to CPU {}, \
         load generator and backends to CPU {}. Load average before the run: {} \
         (anything above 0 is other work sharing the machine). Took {:.0} s; {} failed runs \
         (failures of a peer are findings, listed under its table).\n",
        set["mode"].as_str().unwrap_or("?"),
        set["runs"],
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("unknown model"),
        m["kernel"].as_str().unwrap_or("?"),
        m["mem_total_kib"].as_f64().unwrap_or(0.0) / 1048576.0,
        set["proxy_cpus"].as_str().unwrap_or("(not pinned)"),
        set["load_cpus"].as_str().unwrap_or("(not pinned)"),
        m["loadavg"].as_str().unwrap_or("?"),
        report["took_s"].as_f64().unwrap_or(0.0),
        report["failed_runs"],
    );
    for line in [cpuidle_line(m), tcp_cc_line(m)].into_iter().flatten() {
        let _ = writeln!(md, "{line}\n");
    }
    md.push_str("Peers:\n\n");
    for s in report["services"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or("?");
        match s["skipped"].as_str() {
            Some(why) => {
                let _ = writeln!(md, "- {name}: **skipped**: {why}");
            }
            None => {
                let v = match s["version"].as_str() {
                    Some(v) if !v.is_empty() => v,
                    _ if name == "direct" => "no proxy: client and backend on loopback",
                    _ => "version unknown",
                };
                let restarts = s["restarts"].as_u64().unwrap_or(0);
                let r = if restarts > 0 {
                    format!(" (died and was restarted {restarts} times)")
                } else {
                    String::new()
                };
                let _ = writeln!(md, "- {name}: {v}{r}");
            }
        }
    }
    md.push('\n');
    if has(report, "bulk") {
        bulk_table(&mut md, report);
    }
    if has(report, "latency") {
        latency_table(&mut md, report);
    }
    if has(report, "idle") {
        idle_table(&mut md, report);
    }
    if !plots.is_empty() {
        md.push_str("## Plots\n\n");
        for p in plots {
            let _ = writeln!(md, "![{p}]({p})\n");
        }
    }
    md.push_str(
        "## Reading this report\n\n\
         - TLS says which legs are encrypted: `no`, `tenant` (the proxy terminates TLS and \
         talks plain TCP to the backend) or `both` (TLS to the backend too, as consolegate \
         speaks to QEMU). Each row is compared with the best peer of its own TLS class. \"x direct\" divides by the direct connection, the \
         loopback ceiling. Its client and backend share the load CPU, so its round trips \
         have no wake-up across CPUs; every proxied round trip has at least two.\n\
         - CPU-s/GB is CPU seconds per 10^9 payload bytes: `proxy` is the proxy's process \
         tree (workers and forked children included), `system` is every CPU's busy time \
         (kernel work such as loopback TCP is charged there; on a shared machine it also \
         counts other tenants' work, see the load average above), `loadgen` is the client \
         plus the backend. Proxy CPU-s/GB is steadier than Gbit/s on a shared machine.\n\
         - `load busy` is the load CPUs' utilisation during the run. Near 100% while the \
         proxy CPU is not busy means the load generator limited the run, not the proxy.\n\
         - Spreads above 30% mean the machine was noisy: compare rows of one run only. \
         See docs/benchmarking.md for the noise checklist.\n",
    );
    md
}

fn bulk_table(md: &mut String, report: &Value) {
    let set = &report["settings"];
    let mib = set["bulk_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
    let _ = writeln!(
        md,
        "## Bulk throughput (compute to tenant, {mib:.0} MiB per run)\n"
    );
    if set["discard"].as_bool() == Some(true) {
        md.push_str(
            "The bulk client discarded plaintext payload in the kernel (`--discard`: \
             recv with MSG_TRUNC, no copy), so the load CPU does less per byte than a \
             copying client; TLS rows still decrypt.\n\n",
        );
    }
    md.push_str(
        "| row | front | TLS | Gbit/s | proxy CPU-s/GB | system CPU-s/GB | loadgen CPU-s/GB \
         | proxy busy | load busy | x direct | x best peer |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let direct = median(report, "direct", "bulk", "gbit_per_s");
    let mut notes = Vec::new();
    for r in rows(report) {
        let id = r["id"].as_str().unwrap_or("?");
        let g = median(report, id, "bulk", "gbit_per_s");
        let best = best_peer(report, r, "bulk", "gbit_per_s", true);
        let pct = |k: &str| {
            median(report, id, "bulk", k).map_or("-".into(), |v| format!("{:.0}%", v * 100.0))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["label"].as_str().unwrap_or(id),
            r["front"].as_str().unwrap_or(""),
            tls_class(r),
            spread(report, id, "bulk", "gbit_per_s", 2),
            spread(report, id, "bulk", "proxy_cpu_s_per_gb", 2),
            fmt(median(report, id, "bulk", "system_cpu_s_per_gb"), 2),
            fmt(median(report, id, "bulk", "loadgen_cpu_s_per_gb"), 2),
            if r["family"] == "direct" {
                "-".into()
            } else {
                pct("proxy_cpu_busy")
            },
            pct("load_cpu_busy"),
            ratio(g, direct),
            peer_ratio(r, g, best),
        );
        if let Some(s) = status(report, id, "bulk") {
            notes.push(format!("{id}: {s}"));
        }
    }
    notes_block(md, &notes);
}

fn latency_table(md: &mut String, report: &Value) {
    let set = &report["settings"];
    let _ = writeln!(
        md,
        "## Round-trip latency ({} B ping-pong, {} round trips per run), microseconds\n",
        set["latency_size"], set["latency_messages"]
    );
    md.push_str(
        "| row | front | TLS | p50 | p90 | p99 | p99.9 | max | proxy CPU us/round trip \
         | p99 x direct | p99 x best peer |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let direct = median(report, "direct", "latency", "p99_us");
    let mut notes = Vec::new();
    for r in rows(report) {
        let id = r["id"].as_str().unwrap_or("?");
        let p99 = median(report, id, "latency", "p99_us");
        let best = best_peer(report, r, "latency", "p99_us", false);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["label"].as_str().unwrap_or(id),
            r["front"].as_str().unwrap_or(""),
            tls_class(r),
            spread(report, id, "latency", "p50_us", 1),
            fmt(median(report, id, "latency", "p90_us"), 1),
            spread(report, id, "latency", "p99_us", 1),
            fmt(median(report, id, "latency", "p99_9_us"), 1),
            fmt(median(report, id, "latency", "max_us"), 0),
            if r["family"] == "direct" {
                "-".into()
            } else {
                fmt(
                    median(report, id, "latency", "proxy_cpu_us_per_round_trip"),
                    1,
                )
            },
            ratio(p99, direct),
            peer_ratio(r, p99, best),
        );
        if let Some(s) = status(report, id, "latency") {
            notes.push(format!("{id}: {s}"));
        }
    }
    notes_block(md, &notes);
}

fn idle_table(md: &mut String, report: &Value) {
    let set = &report["settings"];
    let _ = writeln!(
        md,
        "## Idle sessions ({} opened one after another and held)\n",
        set["idle_sessions"]
    );
    md.push_str(
        "| row | front | TLS | sessions held | proxy KiB/session | set-ups/s | set-up p99 ms \
         | KiB/session x best peer |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut notes = Vec::new();
    for r in rows(report) {
        let id = r["id"].as_str().unwrap_or("?");
        let kib = median(report, id, "idle", "proxy_kib_per_session");
        let best = best_peer(report, r, "idle", "proxy_kib_per_session", false);
        let held = cell(report, id, "idle", "sessions");
        let held = match (held["min"].as_f64(), held["max"].as_f64()) {
            (Some(lo), Some(hi)) if lo < hi => format!("{lo:.0}-{hi:.0}"),
            (Some(lo), _) => format!("{lo:.0}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r["label"].as_str().unwrap_or(id),
            r["front"].as_str().unwrap_or(""),
            tls_class(r),
            held,
            if r["family"] == "direct" {
                "-".into()
            } else {
                spread(report, id, "idle", "proxy_kib_per_session", 1)
            },
            spread(report, id, "idle", "setup_per_s", 0),
            fmt(median(report, id, "idle", "setup_p99_ms"), 2),
            if r["family"] == "direct" {
                "-".into()
            } else {
                ratio(kib, best.map(|b| b.1))
            },
        );
        if let Some(s) = status(report, id, "idle") {
            notes.push(format!("{id}: {s}"));
        }
    }
    notes_block(md, &notes);
}

fn notes_block(md: &mut String, notes: &[String]) {
    md.push('\n');
    for n in notes {
        let _ = writeln!(md, "- {n}");
    }
    if !notes.is_empty() {
        md.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_give_median_and_spread() {
        let s = stats(&mut [3.0, 1.0, 2.0]);
        assert_eq!(s["median"], 2.0);
        assert_eq!(s["min"], 1.0);
        assert_eq!(s["max"], 3.0);
        assert_eq!(s["spread_pct"], 100.0);
        assert_eq!(stats(&mut [1.0, 2.0, 3.0, 4.0])["median"], 2.5);
        assert!(stats(&mut []).is_null());
    }

    fn sample() -> Value {
        let rows = vec![
            json!({"id": "direct", "label": "direct", "family": "direct", "front": "raw", "tls": false}),
            json!({"id": "p", "label": "a peer", "family": "peer", "front": "raw", "tls": false}),
            json!({"id": "cg", "label": "consolegate", "family": "consolegate", "front": "ws", "tls": false}),
        ];
        let mut runs = Vec::new();
        for (row, g, p99) in [("direct", 10.0, 10.0), ("p", 6.0, 30.0), ("cg", 3.0, 60.0)] {
            for k in 0..3 {
                let k = f64::from(k);
                runs.push(json!({"row": row, "scenario": "bulk", "ok": true, "gbit_per_s": g + k}));
                runs.push(json!({"row": row, "scenario": "latency", "ok": true,
                    "us": {"p50": 1.0, "p90": 2.0, "p99": p99, "p99_9": p99 + 1.0, "max": p99 + 2.0},
                    "curve_us": [[50.0, 1.0], [100.0, p99 + 2.0]]}));
            }
        }
        runs.push(json!({"row": "cg", "scenario": "bulk", "ok": false, "error": "boom"}));
        let scen = [Scenario::Bulk, Scenario::Latency];
        let summary = summarise(&rows, &runs, &scen);
        json!({
            "settings": {"mode": "quick", "runs": 3, "scenarios": ["bulk", "latency"],
                         "bulk_bytes": 1048576, "latency_size": 64, "latency_messages": 10},
            "machine": {"cpus": 2}, "services": [], "rows": rows, "summary": summary,
            "failed_runs": 1,
        })
    }

    #[test]
    fn markdown_has_ratios_to_direct_and_the_best_peer() {
        let report = sample();
        assert_eq!(median(&report, "p", "bulk", "gbit_per_s"), Some(7.0));
        assert_eq!(report["summary"]["cg"]["bulk"]["ok_runs"], 3);
        assert_eq!(report["summary"]["cg"]["bulk"]["runs"], 4);
        let md = markdown(&report, &["bulk.svg"]);
        // consolegate: 4 / 11 of direct, 4 / 7 of the peer.
        assert!(md.contains("| 0.36x | 0.57x |"), "{md}");
        // p99 60 vs direct 10 and peer 30.
        assert!(md.contains("| 6.00x | 2.00x |"), "{md}");
        assert!(md.contains("cg: 3/4 runs ok; first error: boom"), "{md}");
        assert!(md.contains("![bulk.svg](bulk.svg)"), "{md}");
        assert!(!md.contains("CPU idle driver"), "not known: not said");
    }

    #[test]
    fn the_cpu_idle_line_says_when_halt_polling_is_off() {
        let line = |m: Value| cpuidle_line(&m);
        assert_eq!(line(json!({"cpus": 2})), None);
        let off = line(json!({"cpuidle_driver": "haltpoll", "guest_halt_poll_ns": 0})).unwrap();
        assert!(
            off.contains("halt-polling off") && off.contains("VM exit"),
            "{off}"
        );
        let on = line(json!({"cpuidle_driver": "haltpoll", "guest_halt_poll_ns": 200000})).unwrap();
        assert!(on.contains("up to 200000 ns"), "{on}");
        assert_eq!(
            line(json!({"cpuidle_driver": "intel_idle"})).as_deref(),
            Some("CPU idle driver: intel_idle.")
        );
    }

    #[test]
    fn the_congestion_control_line_says_which_and_warns_of_bbr() {
        let line = |m: Value| tcp_cc_line(&m);
        assert_eq!(line(json!({"cpus": 2})), None);
        let bbr = line(json!({"tcp_congestion_control": "bbr"})).unwrap();
        assert!(
            bbr.contains("bbr (the machine's)") && bbr.contains("--tcp-cc cubic"),
            "{bbr}"
        );
        let switched = line(json!({
            "tcp_congestion_control": "cubic",
            "tcp_congestion_control_own": "bbr",
        }))
        .unwrap();
        assert_eq!(
            switched,
            "TCP congestion control: cubic for this run (`--tcp-cc`; the machine's own, bbr, \
             was restored after it)."
        );
        assert_eq!(
            line(json!({"tcp_congestion_control": "cubic"})).as_deref(),
            Some("TCP congestion control: cubic (the machine's).")
        );
    }
}
