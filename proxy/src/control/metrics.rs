//! Prometheus metrics, served at `GET /metrics` on the admin listener.
//!
//! The families live in one process-wide registry. Front ends report a
//! session's establishment and end through [`SessionMetrics`] (a guard that
//! keeps the active gauge right on every exit path); refusals, resolve
//! latency and kernel features are recorded where they happen.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    // 100 us .. ~13 s: a loopback handshake to a TLS console is a few ms.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 18,
    ))
}

struct Metrics {
    registry: Registry,
    active: Family<Labels, Gauge>,
    sessions: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    handshake: Family<Labels, Histogram, fn() -> Histogram>,
    resolve: Family<Labels, Histogram, fn() -> Histogram>,
    refusals: Family<Labels, Counter>,
    features: Family<Labels, Gauge>,
    available: Family<Labels, Gauge>,
    connections: Gauge,
    resolvers: Family<Labels, Gauge>,
    resolver_up: Family<Labels, Gauge>,
    ktls_renewals: Family<Labels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("consolegate");
    let active = Family::<Labels, Gauge>::default();
    registry.register(
        "sessions_active",
        "Established console sessions now, by front end and console kind",
        active.clone(),
    );
    let sessions = Family::<Labels, Counter>::default();
    registry.register(
        "sessions",
        "Console sessions ended, by front end, console kind, data path and how they ended",
        sessions.clone(),
    );
    let bytes = Family::<Labels, Counter>::default();
    registry.register(
        "bytes",
        "Console bytes moved, by front end and direction (up = tenant to compute)",
        bytes.clone(),
    );
    let handshake =
        Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
    registry.register(
        "handshake_seconds",
        "Time from the tenant's connection to an established console (TLS, HTTP, token, dial, console security)",
        handshake.clone(),
    );
    let resolve =
        Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
    registry.register(
        "resolve_seconds",
        "Token resolution time, by front end and outcome",
        resolve.clone(),
    );
    let refusals = Family::<Labels, Counter>::default();
    registry.register(
        "refusals",
        "Tenant requests refused before a session, by reason",
        refusals.clone(),
    );
    let features = Family::<Labels, Gauge>::default();
    registry.register(
        "kernel_feature",
        "Kernel accelerations: 1 in use, 0 not (ebpf_allowlist, splice, ktls)",
        features.clone(),
    );
    let available = Family::<Labels, Gauge>::default();
    registry.register(
        "kernel_feature_available",
        "Kernel features this host and these privileges allow: 1 yes, 0 no",
        available.clone(),
    );
    let connections = Gauge::default();
    registry.register(
        "connections",
        "Tenant connections open now (sessions and handshakes in progress)",
        connections.clone(),
    );
    let resolvers = Family::<Labels, Gauge>::default();
    registry.register(
        "token_resolvers",
        "Configured token resolvers; the value is the lookup order",
        resolvers.clone(),
    );
    let resolver_up = Family::<Labels, Gauge>::default();
    registry.register(
        "token_resolver_up",
        "Token store health: 1 if the resolver answered its last request, 0 if it was unreachable",
        resolver_up.clone(),
    );
    let ktls_renewals = Family::<Labels, Counter>::default();
    registry.register(
        "ktls_key_renewals",
        "kTLS keys renewed, by leg, direction and reason (a TLS 1.3 KeyUpdate of the peer, or our send key at its record limit)",
        ktls_renewals.clone(),
    );
    Metrics {
        registry,
        ktls_renewals,
        resolver_up,
        available,
        connections,
        resolvers,
        active,
        sessions,
        bytes,
        handshake,
        resolve,
        refusals,
        features,
    }
});

/// The registry in the Prometheus/OpenMetrics text format.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &METRICS.registry);
    out
}

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counts a refusal by its stable reason.
pub fn refusal(reason: &'static str) {
    METRICS
        .refusals
        .get_or_create(&vec![("reason", reason.to_owned())])
        .inc();
}

/// Records how long a token resolution took and whether it admitted.
pub fn resolved(front: &'static str, admitted: bool, took: Duration) {
    let outcome = if admitted { "admitted" } else { "refused" };
    METRICS
        .resolve
        .get_or_create(&vec![
            ("front", front.to_owned()),
            ("outcome", outcome.to_owned()),
        ])
        .observe(took.as_secs_f64());
}

/// Sets whether this kernel offers a feature (probed at start).
pub fn kernel_feature_available(feature: &'static str, available: bool) {
    METRICS
        .available
        .get_or_create(&vec![("feature", feature.to_owned())])
        .set(i64::from(available));
}

/// Connections open now (sessions plus handshakes in progress).
pub fn connections(n: usize) {
    METRICS
        .connections
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// The configured token resolvers, in lookup order.
pub fn token_resolvers(names: &[&str]) {
    for (i, n) in names.iter().enumerate() {
        METRICS
            .resolvers
            .get_or_create(&vec![("resolver", (*n).to_owned())])
            .set(i64::try_from(i + 1).unwrap_or(i64::MAX));
    }
}

/// Whether a token resolver answered its last request (1) or was
/// unreachable (0): Redis or the external HTTP resolver down shows here.
pub fn resolver_up(resolver: &'static str, up: bool) {
    METRICS
        .resolver_up
        .get_or_create(&vec![("resolver", resolver.to_owned())])
        .set(i64::from(up));
}

/// Counts a kTLS key renewed: `leg` tenant or compute, `direction` send or
/// receive, `reason` peer_key_update or record_limit.
pub fn ktls_key_renewed(leg: &'static str, direction: &'static str, reason: &'static str) {
    METRICS
        .ktls_renewals
        .get_or_create(&vec![
            ("leg", leg.to_owned()),
            ("direction", direction.to_owned()),
            ("reason", reason.to_owned()),
        ])
        .inc();
}

/// Sets whether a kernel feature is in use.
pub fn kernel_feature(feature: &'static str, on: bool) {
    METRICS
        .features
        .get_or_create(&vec![("feature", feature.to_owned())])
        .set(i64::from(on));
}

/// An established session, counted in `sessions_active` until dropped.
#[derive(Debug)]
pub struct SessionMetrics {
    front: &'static str,
    kind: &'static str,
}

impl SessionMetrics {
    /// The session is established `handshake` after the tenant connected.
    pub fn established(front: &'static str, kind: &'static str, handshake: Duration) -> Self {
        let labels = vec![("front", front.to_owned()), ("kind", kind.to_owned())];
        METRICS.active.get_or_create(&labels).inc();
        METRICS
            .handshake
            .get_or_create(&labels)
            .observe(handshake.as_secs_f64());
        Self { front, kind }
    }

    /// The session ended: how, on which data path, with how many bytes.
    pub fn ended(&self, datapath: &'static str, end: &'static str, up: u64, down: u64) {
        METRICS
            .sessions
            .get_or_create(&vec![
                ("front", self.front.to_owned()),
                ("kind", self.kind.to_owned()),
                ("datapath", datapath.to_owned()),
                ("end", end.to_owned()),
            ])
            .inc();
        for (direction, n) in [("up", up), ("down", down)] {
            METRICS
                .bytes
                .get_or_create(&vec![
                    ("front", self.front.to_owned()),
                    ("direction", direction.to_owned()),
                ])
                .inc_by(n);
        }
    }
}

impl Drop for SessionMetrics {
    fn drop(&mut self) {
        METRICS
            .active
            .get_or_create(&vec![
                ("front", self.front.to_owned()),
                ("kind", self.kind.to_owned()),
            ])
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_labels() {
        refusal("token_unknown");
        resolved("websocket", true, Duration::from_millis(1));
        kernel_feature("splice", true);
        ktls_key_renewed("tenant", "send", "record_limit");
        {
            let s = SessionMetrics::established("connect", "vnc", Duration::from_millis(3));
            assert!(
                render().contains(r#"consolegate_sessions_active{front="connect",kind="vnc"} 1"#)
            );
            s.ended("splice", "closed", 10, 2000);
        }
        let text = render();
        for want in [
            r#"consolegate_refusals_total{reason="token_unknown"}"#,
            r#"consolegate_sessions_total{front="connect",kind="vnc",datapath="splice",end="closed"} 1"#,
            r#"consolegate_bytes_total{front="connect",direction="down"} 2000"#,
            r#"consolegate_handshake_seconds_count{front="connect",kind="vnc"} 1"#,
            r#"consolegate_resolve_seconds_bucket{"#,
            r#"consolegate_kernel_feature{feature="splice"} 1"#,
            r#"consolegate_sessions_active{front="connect",kind="vnc"} 0"#,
            r#"consolegate_ktls_key_renewals_total{leg="tenant",direction="send",reason="record_limit"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
