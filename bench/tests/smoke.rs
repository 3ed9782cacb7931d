//! Smoke test of the harness itself: `loadgen compare` runs every scenario
//! (bulk, latency, idle) through every front the direct connection and
//! consolegate offer (raw, CONNECT, WebSocket, WebSocket over TLS, TLS to
//! the backend too; each data path the binary has), plus socat when it is
//! installed, with tiny amounts of data, and the report parses with
//! plausible fields. No timing assertions: numbers only have to exist and
//! be ordered.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `$CONSOLEGATE_BIN`, else `<target>/debug/consolegate` (built if missing).
fn consolegate() -> PathBuf {
    if let Some(p) = std::env::var_os("CONSOLEGATE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("consolegate");
    if !bin.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .args(["build", "-p", "consolegate", "--bin", "consolegate"])
            .status()
            .expect("running cargo build -p consolegate");
        assert!(st.success(), "cargo build -p consolegate failed");
    }
    bin
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Runs `loadgen compare --quick --runs 1 <args>` against [`consolegate`],
/// writing into `out`; asserts it succeeded and returns report.json and
/// the runner's stderr.
fn compare(args: &[&str], out: &Path) -> (Value, String) {
    let run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["compare", "--quick", "--runs", "1"])
        .args(args)
        .arg("--consolegate")
        .arg(consolegate())
        .arg("--out")
        .arg(out)
        .output()
        .expect("running loadgen compare");
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "compare failed: {stderr}");
    let report =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    (report, stderr)
}

#[test]
fn compare_runs_every_scenario_and_writes_a_consistent_report() {
    let out = tempfile::tempdir().unwrap();
    let bin = consolegate();
    let socat = Path::new("/usr/bin/socat").exists();
    if !socat {
        println!("socat not installed: the smoke run covers direct and consolegate only");
    }
    let peers = if socat {
        "direct,consolegate,socat"
    } else {
        "direct,consolegate"
    };
    let (bulk, messages, sessions) = (3_000_000u64, 60u64, 6u64);
    let (bulk_s, messages_s, sessions_s) =
        (bulk.to_string(), messages.to_string(), sessions.to_string());
    let (report, stderr) = compare(
        &[
            "--peers",
            peers,
            "--bulk-bytes",
            &bulk_s,
            "--latency-messages",
            &messages_s,
            "--idle-sessions",
            &sessions_s,
        ],
        out.path(),
    );
    assert_eq!(report["schema"], "consolegate-bench/1");
    assert_eq!(report["failed_runs"], 0, "{stderr}");
    let rows: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let mut expected = vec![
        "direct",
        "direct-tls",
        "consolegate-ws-copy",
        "consolegate-connect-copy",
        "consolegate-wss-copy",
        "consolegate-wss-tls2-copy",
    ];
    let help = Command::new(&bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&help.stdout).contains("splice") {
        expected.extend(["consolegate-ws-splice", "consolegate-connect-splice"]);
    }
    if socat {
        expected.push("socat");
    }
    // The sockmap and io_uring rows (CONNECT only) run where the kernel
    // and privileges allow them, and are skipped with a reason elsewhere.
    for dp in ["sockmap", "uring"] {
        if !String::from_utf8_lossy(&help.stdout).contains(dp) {
            continue;
        }
        let ran = rows.contains(&format!("consolegate-connect-{dp}").as_str());
        let skipped = stderr.contains(&format!("skipping consolegate-{dp}"));
        assert!(ran || skipped, "{dp} neither ran nor was skipped: {stderr}");
        assert!(
            !rows.contains(&format!("consolegate-ws-{dp}").as_str()),
            "{dp} carries plain TCP only: {rows:?}"
        );
        if skipped {
            println!("the {dp} row was skipped here (see the stderr of compare)");
        }
    }
    for id in &expected {
        assert!(
            rows.contains(id),
            "row {id} missing from {rows:?}: {stderr}"
        );
    }
    let fronts: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["front"].as_str().unwrap())
        .collect();
    for front in ["raw", "connect", "ws"] {
        assert!(fronts.contains(&front), "{fronts:?}");
    }

    let runs = report["runs"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        rows.len() * 3,
        "one run of each scenario per row"
    );
    for r in runs {
        let id = r["row"].as_str().unwrap();
        assert_eq!(r["ok"], true, "{r}");
        let proxied = !id.starts_with("direct");
        match r["scenario"].as_str().unwrap() {
            "bulk" => {
                assert_eq!(r["bytes"], bulk, "{r}");
                assert!(f(&r["gbit_per_s"]) > 0.0, "{r}");
                assert!(f(&r["proxy_cpu_s_per_gb"]) >= 0.0, "{r}");
                // /proc/stat counts in 10 ms ticks: a 3 MB transfer can
                // finish within one, so zero is a valid reading here.
                assert!(f(&r["system_cpu_s_per_gb"]) >= 0.0, "{r}");
                assert!(f(&r["client_cpu_s"]) >= 0.0, "{r}");
            }
            "latency" => {
                assert_eq!(r["messages"], messages, "{r}");
                let us = &r["us"];
                let v: Vec<f64> = ["min", "p50", "p90", "p99", "p99_9", "max"]
                    .iter()
                    .map(|k| f(&us[*k]))
                    .collect();
                assert!(v[0] > 0.0, "{r}");
                assert!(
                    v.windows(2).all(|w| w[0] <= w[1]),
                    "percentiles out of order: {r}"
                );
            }
            "idle" => {
                assert_eq!(r["sessions"], sessions, "{r}");
                assert!(f(&r["setup_per_s"]) > 0.0, "{r}");
                if proxied {
                    assert!(r["proxy_pss_before_kib"].as_u64().unwrap() > 0, "{r}");
                    assert!(r["proxy_kib_per_session"].is_f64(), "{r}");
                }
            }
            other => panic!("unknown scenario {other}"),
        }
        if r["row"] == "consolegate-wss-copy" || r["row"] == "consolegate-wss-tls2-copy" {
            assert_eq!(r["tls"], true, "{r}");
        }
    }
    let tls2 = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "consolegate-wss-tls2-copy")
        .unwrap();
    assert_eq!(tls2["tls_compute"], true, "{tls2}");
    let summary = &report["summary"]["consolegate-ws-copy"]["bulk"]["gbit_per_s"];
    assert_eq!(summary["n"], 1, "{summary}");

    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    for heading in [
        "## Bulk throughput",
        "## Round-trip latency",
        "## Idle sessions",
    ] {
        assert!(md.contains(heading), "{md}");
    }
    assert!(md.contains("| consolegate ws"), "{md}");
    for svg in ["throughput.svg", "latency.svg", "memory.svg"] {
        let text = std::fs::read_to_string(out.path().join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }
}

/// `--discard`: the bulk client drops plaintext payload in the kernel; every
/// consolegate row (raw CONNECT and WebSocket frames, TLS rows decrypting
/// as before) still counts exactly the bytes asked for.
#[test]
fn compare_with_a_discarding_bulk_client_counts_every_byte() {
    let out = tempfile::tempdir().unwrap();
    // Not a multiple of any buffer or frame size.
    let bulk = 3_333_333u64;
    let bulk_s = bulk.to_string();
    let (report, stderr) = compare(
        &[
            "--scenarios",
            "bulk",
            "--peers",
            "direct,consolegate",
            "--discard",
            "--bulk-bytes",
            &bulk_s,
        ],
        out.path(),
    );
    assert_eq!(
        report["settings"]["discard"], true,
        "{}",
        report["settings"]
    );
    let runs = report["runs"].as_array().unwrap();
    assert!(
        runs.iter().any(|r| r["row"] == "consolegate-ws-splice")
            && runs.iter().any(|r| r["row"] == "consolegate-connect-copy"),
        "{stderr}"
    );
    for r in runs {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["bytes"], bulk, "{r}");
    }
}
