//! `loadgen compare`: consolegate side by side with the proxies people use
//! today, in one invocation.
//!
//! 1. Generates a CA and a server certificate (rcgen) for the TLS rows.
//! 2. Starts the backends pinned to the load CPUs: a flood server (bulk)
//!    and an echo server (latency, idle), each plain and with TLS, all
//!    serving every run.
//! 3. Starts every service ([`peers`]) pinned to the proxy CPUs: direct,
//!    socat, haproxy (tcp and TLS-terminating), nginx stream (both),
//!    websockify (ws, wss), consolegate with each data path and with TLS. A
//!    service whose program is missing or does not start is skipped, and
//!    the report says why.
//! 4. Runs `runs` rounds; each round runs every scenario through every row
//!    (interleaved, so slow drift of a noisy machine hits every row alike).
//!    The idle scenario restarts the service first, so its memory growth is
//!    measured from a fresh process.
//!    Each run is a `loadgen bulk|latency|idle` child on the load CPUs; the
//!    runner samples the proxy's process tree CPU, the backends' CPU and
//!    `/proc/stat` around it.
//! 5. Summarises each metric as median, min and max over the runs, and
//!    writes `report.json`, `report.md` and SVG plots ([`report`], [`svg`]).

mod peers;
mod probe;
mod proc;
mod report;
mod svg;
mod tcpcc;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use clap::ValueEnum;
use serde_json::{Value, json};

use peers::{Ctx, Kind, Row, Started};
use probe::{Probe, headline};
use proc::{Proc, pinned};

/// The scenarios, in run order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Compute-to-tenant flood: Gbit/s and CPU seconds per GB.
    Bulk,
    /// Keystroke-sized ping-pong: HDR percentiles.
    Latency,
    /// Many idle sessions: proxy memory per session, set-up rate.
    Idle,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Bulk => "bulk",
            Scenario::Latency => "latency",
            Scenario::Idle => "idle",
        }
    }
}

/// `loadgen compare` flags.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// The quick run (the default): 3 runs of short transfers, a few
    /// minutes on 2 cores.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The full run: 5 runs, 2 GiB bulk, 20,000 round trips, 1,000 idle sessions.
    #[arg(long)]
    full: bool,
    /// Directory for report.json, report.md, the SVG plots and work/ (logs, configs).
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Only these services or rows (comma-separated names or prefixes):
    /// direct, socat, haproxy, nginx, websockify, consolegate, ...
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    peers: Vec<String>,
    /// Only these scenarios.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    scenarios: Vec<Scenario>,
    /// Runs of each scenario through each row.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: Option<u32>,
    /// Bytes read per bulk run.
    #[arg(long, value_name = "BYTES")]
    bulk_bytes: Option<u64>,
    /// Bulk clients discard plaintext payload in the kernel (MSG_TRUNC)
    /// instead of copying it: on a small machine the client's copy
    /// otherwise saturates the load CPU and limits every row alike.
    #[arg(long)]
    discard: bool,
    /// Timed round trips per latency run.
    #[arg(long, value_name = "N")]
    latency_messages: Option<u64>,
    /// Round-trip payload size.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    latency_size: u64,
    /// Sessions held per idle run.
    #[arg(long, value_name = "N")]
    idle_sessions: Option<u64>,
    /// Tenant source addresses and echo listeners to spread idle sessions
    /// over (default: enough for --idle-sessions, three quarters of the
    /// ephemeral port range each; 1 = no spreading).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=250))]
    spread: Option<u64>,
    /// The consolegate binary (default: `consolegate` beside this loadgen).
    #[arg(long, value_name = "PATH")]
    consolegate: Option<PathBuf>,
    /// CPUs for the proxies (taskset list; default 0 when there are 2+ CPUs).
    #[arg(long, value_name = "LIST")]
    proxy_cpus: Option<String>,
    /// CPUs for the load generator and backends (default: all the others).
    #[arg(long, value_name = "LIST")]
    load_cpus: Option<String>,
    /// Do not pin anything to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Run with this TCP congestion control (net.ipv4.tcp_congestion_control,
    /// e.g. cubic) for every peer alike, and restore the machine's own at
    /// the end. Needs root. On loopback BBR can limit the bulk rows more
    /// than the proxies do (docs/benchmarking.md).
    #[arg(long, value_name = "NAME")]
    tcp_cc: Option<String>,
    /// Only render report.md and the plots again from this report.json.
    #[arg(long, value_name = "FILE")]
    render: Option<PathBuf>,
}

/// Everything a compare invocation runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mode: &'static str,
    pub out: PathBuf,
    pub runs: u32,
    pub bulk_bytes: u64,
    pub discard: bool,
    pub latency_messages: u64,
    pub latency_warmup: u64,
    pub latency_size: u64,
    pub idle_sessions: u64,
    pub scenarios: Vec<Scenario>,
    pub peers: Vec<String>,
    pub consolegate: PathBuf,
    pub loadgen: PathBuf,
    pub proxy_cpus: Option<String>,
    pub load_cpus: Option<String>,
    /// Upper bound for one client run (against hangs, not a measurement).
    pub run_timeout: Duration,
    /// Tenant source addresses an idle client spreads over (0: the
    /// kernel's choice) and listeners of each echo backend, so that no
    /// (source, destination) pair needs more ephemeral ports than it has
    /// ([`crate::scale`]).
    pub source_addrs: u64,
    pub echo_listeners: u64,
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Settings {
    fn from_args(a: &CompareArgs) -> Result<Self> {
        let full = a.full;
        let loadgen = std::env::current_exe().context("locating loadgen itself")?;
        let consolegate = a.consolegate.clone().unwrap_or_else(|| {
            loadgen
                .parent()
                .unwrap_or(Path::new("."))
                .join("consolegate")
        });
        let n = cpu_count();
        let (proxy_cpus, load_cpus) = if a.no_pin || n < 2 {
            (None, None)
        } else {
            (
                Some(a.proxy_cpus.clone().unwrap_or_else(|| "0".into())),
                Some(a.load_cpus.clone().unwrap_or_else(|| {
                    if n == 2 {
                        "1".into()
                    } else {
                        format!("1-{}", n - 1)
                    }
                })),
            )
        };
        let scenarios = if a.scenarios.is_empty() {
            vec![Scenario::Bulk, Scenario::Latency, Scenario::Idle]
        } else {
            a.scenarios.clone()
        };
        let idle_sessions = a.idle_sessions.unwrap_or(if full { 1_000 } else { 100 });
        let per_address = crate::scale::per_address();
        let spread = a
            .spread
            .unwrap_or_else(|| crate::scale::addresses_for(idle_sessions, per_address));
        // Sequential set-ups of thousands of sessions (a TLS handshake each)
        // take a while: the hang guard grows with the count.
        let base = if full { 300 } else { 120 };
        let run_timeout = Duration::from_secs(base.max(60 + idle_sessions / 100));
        Ok(Self {
            mode: if full { "full" } else { "quick" },
            out: a.out.clone(),
            runs: a.runs.unwrap_or(if full { 5 } else { 3 }),
            bulk_bytes: a
                .bulk_bytes
                .unwrap_or(if full { 2 << 30 } else { 512 << 20 }),
            discard: a.discard,
            latency_messages: a
                .latency_messages
                .unwrap_or(if full { 20_000 } else { 5_000 }),
            latency_warmup: if full { 1_000 } else { 200 },
            latency_size: a.latency_size.max(1),
            idle_sessions,
            scenarios,
            peers: a.peers.clone(),
            consolegate,
            loadgen,
            proxy_cpus,
            load_cpus,
            run_timeout,
            source_addrs: if spread > 1 { spread } else { 0 },
            echo_listeners: spread,
        })
    }

    fn json(&self) -> Value {
        json!({
            "mode": self.mode,
            "runs": self.runs,
            "bulk_bytes": self.bulk_bytes,
            "discard": self.discard,
            "latency_messages": self.latency_messages,
            "latency_warmup": self.latency_warmup,
            "latency_size": self.latency_size,
            "idle_sessions": self.idle_sessions,
            "scenarios": self.scenarios.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "proxy_cpus": self.proxy_cpus,
            "load_cpus": self.load_cpus,
            "consolegate": self.consolegate.display().to_string(),
            "source_addrs": self.source_addrs,
            "echo_listeners": self.echo_listeners,
            "nofile": proc::nofile(),
        })
    }

    /// Whether a service may hold a row that was asked for (all when no
    /// filter): `haproxy-tls` needs the `haproxy` service, `consolegate-ws`
    /// one of the `consolegate-*` services (all are started; rows are
    /// filtered by [`Self::wants_row`]).
    fn wants_service(&self, name: &str) -> bool {
        let family = name.split('-').next().unwrap_or(name);
        self.peers.is_empty()
            || self
                .peers
                .iter()
                .any(|p| name.starts_with(p.as_str()) || p.starts_with(family))
    }

    /// Whether a row was asked for: its id starts with one of the names.
    fn wants_row(&self, id: &str) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|p| id.starts_with(p.as_str()))
    }

    fn cpus(list: Option<&str>) -> Option<Vec<usize>> {
        let list = list?;
        let mut v = Vec::new();
        for part in list.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                    v.extend(a..=b);
                }
                None => v.push(part.trim().parse().ok()?),
            }
        }
        Some(v)
    }
}

/// The certificate files for the TLS rows.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    /// Leaf then CA.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Chain and key in one file (haproxy's `crt`).
    pub combined: PathBuf,
}

impl Pki {
    /// A throw-away CA and a server certificate for localhost and 127.0.0.1.
    pub fn generate(dir: &Path) -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "consolegate bench CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "consolegate bench server");
        let cert = params.signed_by(&key, &issuer)?;
        let pki = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            combined: dir.join("server-combined.pem"),
        };
        let chain = format!("{}{}", cert.pem(), ca_cert.pem());
        fs::write(&pki.ca, ca_cert.pem())?;
        fs::write(&pki.cert, &chain)?;
        fs::write(&pki.key, key.serialize_pem())?;
        fs::write(&pki.combined, format!("{chain}{}", key.serialize_pem()))?;
        Ok(pki)
    }
}

/// A started service and its rows.
struct Service {
    kind: Kind,
    program: PathBuf,
    started: Started,
    restarts: u32,
}

impl Service {
    fn pids(&self) -> Vec<u32> {
        self.started.procs.iter().map(Proc::pid).collect()
    }

    fn alive(&mut self) -> bool {
        self.started.procs.iter_mut().all(Proc::alive)
    }
}

/// The machine, for the report header.
fn machine() -> Value {
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem_kib = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    let loadavg = fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let read = |p: &str| fs::read_to_string(p).ok().map(|v| v.trim().to_owned());
    json!({
        "loadavg": loadavg,
        "cpus": cpu_count(),
        "cpu_model": cpu_model,
        "kernel": kernel,
        "mem_total_kib": mem_kib,
        // How an idle CPU waits: on a VM guest without halt-polling every
        // wake-up of an idle vCPU is a VM exit (tens of microseconds).
        "cpuidle_driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
        "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
            .and_then(|v| v.parse::<u64>().ok()),
        // The congestion control every loopback sender ran with.
        "tcp_congestion_control": tcpcc::current(),
    })
}

/// The runner's entry point.
pub fn main(args: CompareArgs) -> Result<ExitCode> {
    if let Some(json_path) = &args.render {
        let text = fs::read_to_string(json_path)
            .with_context(|| format!("reading {}", json_path.display()))?;
        let report: Value = serde_json::from_str(&text)?;
        let out = json_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        report::write(&out, &report)?;
        println!("compare: rendered {}", out.join("report.md").display());
        return Ok(ExitCode::SUCCESS);
    }
    let settings = Settings::from_args(&args)?;
    let nofile = proc::want_nofile(settings.idle_sessions);
    if nofile < settings.idle_sessions.saturating_mul(2) + 1024 {
        say(format!(
            "warning: children get {nofile} open files, too few for {} idle sessions through \
             a proxy (two sockets each): raising the hard limit needs root with \
             CAP_SYS_RESOURCE (or raise it before starting: ulimit -Hn, LimitNOFILE=)",
            settings.idle_sessions
        ));
    }
    let switched = tcpcc::switch(args.tcp_cc.as_deref())?;
    on_signals(switched.as_ref().map(tcpcc::Switched::restore))?;
    let mut report = run(&settings)?;
    if let Some(s) = &switched {
        report["machine"]["tcp_congestion_control_own"] = json!(s.previous());
    }
    drop(switched);
    report::write(&settings.out, &report)?;
    let failed = report["failed_runs"].as_u64().unwrap_or(0);
    let own = report["failed_runs_own"].as_u64().unwrap_or(0);
    println!(
        "compare: wrote {} and {} ({failed} failed runs, {own} of them direct or consolegate)",
        settings.out.join("report.json").display(),
        settings.out.join("report.md").display(),
    );
    // A peer that fails is a finding, in the report; a failure of the
    // direct path or of consolegate fails the command.
    Ok(if own == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// On SIGINT, SIGTERM or SIGHUP the runner ends its children (by pid,
/// with what they forked) and puts the machine's congestion control back,
/// then dies of the signal: no `Drop` would run otherwise.
fn on_signals(restore: Option<tcpcc::Restore>) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the signal handlers")?;
    std::thread::Builder::new()
        .name("compare-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                say(format!("signal {sig}: ending the peers and backends"));
                proc::end_all();
                if let Some(r) = &restore {
                    r.now();
                }
                let _ = signal_hook::low_level::emulate_default_handler(sig);
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn say(msg: impl AsRef<str>) {
    eprintln!("compare: {}", msg.as_ref());
}

/// Runs everything and returns the report as JSON.
pub fn run(settings: &Settings) -> Result<Value> {
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let clock = Instant::now();
    let work = settings.out.join("work");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cleaning {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // Absolute paths in every generated config: nginx resolves a relative
    // -c against its prefix, others against their working directory.
    let work = fs::canonicalize(&work)?;
    let pki = Pki::generate(&work)?;

    // The backends: flood and echo, plain and TLS (the compute side of
    // rows that speak TLS to it, as consolegate does to QEMU).
    let idle_for = (settings.run_timeout.as_secs() * 4).to_string();
    let mut backends = Vec::new();
    let mut addrs = Vec::new();
    let mut echo_all = Vec::new();
    for (name, mode, tls) in [
        ("flood-server", "flood-server", false),
        ("echo-server", "echo-server", false),
        ("flood-server-tls", "flood-server", true),
        ("echo-server-tls", "echo-server", true),
    ] {
        let mut args: Vec<String> = vec![mode.into(), "--timeout".into(), idle_for.clone()];
        // The echo servers listen on several ports when one would run the
        // proxy out of ephemeral ports to it.
        let listeners = if mode == "echo-server" {
            settings.echo_listeners
        } else {
            1
        };
        for _ in 0..listeners {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if mode == "flood-server" {
            args.extend([
                "--bytes".into(),
                settings.bulk_bytes.to_string(),
                "--clients".into(),
                "0".into(),
            ]);
        }
        if tls {
            args.extend([
                "--tls-cert".into(),
                pki.cert.display().to_string(),
                "--tls-key".into(),
                pki.key.display().to_string(),
            ]);
        }
        let (proc, all) = Proc::spawn_server(
            name,
            pinned(settings.load_cpus.as_deref(), &settings.loadgen, &args),
            &work.join(format!("{name}.log")),
        )?;
        let all = all
            .iter()
            .map(|a| a.parse())
            .collect::<Result<Vec<std::net::SocketAddr>, _>>()?;
        addrs.push(all[0]);
        echo_all.push(all);
        backends.push(proc);
    }
    let ctx = Ctx {
        settings,
        flood: addrs[0],
        echo: addrs[1],
        flood_tls: addrs[2],
        echo_tls: addrs[3],
        echo_all: echo_all[1].clone(),
        echo_tls_all: echo_all[3].clone(),
        pki: &pki,
        work: &work,
    };
    let backend_pids: Vec<u32> = backends.iter().map(Proc::pid).collect();

    let mut services: Vec<Service> = Vec::new();
    let mut service_info: Vec<Value> = Vec::new();
    for kind in peers::kinds(settings) {
        if !settings.wants_service(kind.name) {
            continue;
        }
        let mut info = json!({ "name": kind.name, "debian": kind.debian });
        match kind.locate(settings) {
            Err(why) => {
                say(format!("skipping {}: {why}", kind.name));
                info["skipped"] = json!(why);
            }
            Ok(program) => {
                info["version"] = json!(peers::version(&kind, &program));
                match kind.start(&ctx, &program) {
                    Err(e) => {
                        let why = format!("did not start: {e:#}");
                        say(format!("skipping {}: {why}", kind.name));
                        info["skipped"] = json!(why);
                    }
                    Ok(started) => {
                        say(format!(
                            "started {} ({})",
                            kind.name,
                            info["version"].as_str().unwrap_or("")
                        ));
                        services.push(Service {
                            kind,
                            program,
                            started,
                            restarts: 0,
                        });
                    }
                }
            }
        }
        service_info.push(info);
    }

    let mut rows: Vec<(usize, Row)> = Vec::new();
    for (i, s) in services.iter().enumerate() {
        for r in &s.started.rows {
            if settings.wants_row(&r.id) {
                rows.push((i, r.clone()));
            }
        }
    }
    let mut records = Vec::new();
    let mut failed = 0u64;
    let mut failed_own = 0u64;
    let load_cpus = Settings::cpus(settings.load_cpus.as_deref());
    let proxy_cpus = Settings::cpus(settings.proxy_cpus.as_deref());
    for round in 1..=settings.runs {
        for (si, row) in &rows {
            for &scenario in &settings.scenarios {
                let service = &mut services[*si];
                let died = !service.alive();
                if died {
                    say(format!("{} died; restarting it", service.kind.name));
                }
                // Idle memory is measured in a fresh process: what earlier
                // runs left in the proxy's allocator would hide the growth.
                let fresh = scenario == Scenario::Idle && !service.started.procs.is_empty();
                if died || fresh {
                    // The old processes go first, so nothing is shared.
                    service.started = Started {
                        procs: Vec::new(),
                        rows: Vec::new(),
                    };
                    match service.kind.start(&ctx, &service.program) {
                        Ok(started) => service.started = started,
                        Err(e) => say(format!("restart failed: {e:#}")),
                    }
                    if died {
                        service.restarts += 1;
                    }
                }
                // Ports change on a restart: take this row's current arguments.
                let current = service
                    .started
                    .rows
                    .iter()
                    .find(|r| r.id == row.id)
                    .cloned()
                    .unwrap_or_else(|| row.clone());
                let probe = Probe {
                    settings,
                    proxy_pids: service.pids(),
                    backend_pids: &backend_pids,
                    proxy_cpus: proxy_cpus.as_deref(),
                    load_cpus: load_cpus.as_deref(),
                };
                let mut rec = probe.measure(&current, scenario);
                rec["row"] = json!(row.id);
                rec["round"] = json!(round);
                let ok = rec["ok"].as_bool().unwrap_or(false);
                if !ok {
                    failed += 1;
                    if row.family != peers::Family::Peer {
                        failed_own += 1;
                    }
                }
                say(format!(
                    "run {round}/{} {:<26} {:<8} {}",
                    settings.runs,
                    row.id,
                    scenario.as_str(),
                    headline(scenario, &rec)
                ));
                records.push(rec);
            }
        }
    }
    for (i, s) in services.iter().enumerate() {
        if let Some(info) = service_info.iter_mut().find(|v| v["name"] == s.kind.name) {
            info["restarts"] = json!(s.restarts);
            info["started_index"] = json!(i);
        }
    }
    let row_info: Vec<Value> = rows
        .iter()
        .map(|(si, r)| {
            json!({
                "id": r.id,
                "label": r.label,
                "family": r.family.as_str(),
                "front": r.front,
                "tls": r.tls,
                "tls_compute": r.tls_compute,
                "service": services[*si].kind.name,
            })
        })
        .collect();
    drop(services);
    drop(backends);
    let summary = report::summarise(&row_info, &records, &settings.scenarios);
    Ok(json!({
        "schema": "consolegate-bench/1",
        "started_at_unix": started_at,
        "took_s": clock.elapsed().as_secs_f64(),
        "machine": machine(),
        "settings": settings.json(),
        "services": service_info,
        "rows": row_info,
        "runs": records,
        "failed_runs": failed,
        "failed_runs_own": failed_own,
        "summary": summary,
    }))
}

#[cfg(test)]
mod tests;
