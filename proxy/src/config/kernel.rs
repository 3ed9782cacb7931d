//! The `[kernel]` section: data path choice and the eBPF allow-list.

use serde::Deserialize;

/// Which data path established sessions use (`--datapath`, `kernel.datapath`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// The fastest path each session allows (splice when both legs are
    /// plain sockets), the userspace copy otherwise.
    #[default]
    Auto,
    /// Always the userspace copy.
    Copy,
    /// splice(2) where both legs are plain sockets; the copy elsewhere
    /// (TLS legs cannot be spliced without kTLS).
    Splice,
    /// io_uring (IORING_OP_SPLICE through a pipe, or recv/send) where both
    /// legs of a raw (CONNECT) session are plain sockets; splice, then the
    /// copy, where io_uring or the leg does not allow it.
    Uring,
    /// Opt-in: plain CONNECT sessions whose legs are both TCP are forwarded
    /// in the kernel by an sk_skb verdict redirect (SOCKHASH); UNIX legs
    /// and WebSocket sessions use splice, TLS legs the copy. If the program
    /// cannot load, a warning at start and splice instead.
    Sockmap,
}

impl DatapathMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DatapathMode::Auto => "auto",
            DatapathMode::Copy => "copy",
            DatapathMode::Splice => "splice",
            DatapathMode::Uring => "uring",
            DatapathMode::Sockmap => "sockmap",
        }
    }
}

/// Whether TLS legs are handed to kernel TLS after the handshake phase
/// (`--ktls`, `kernel.ktls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KtlsMode {
    /// When the kernel has kTLS for the negotiated cipher and the data path
    /// may splice: the session runs on `ktls+splice`. Otherwise rustls.
    #[default]
    Auto,
    /// Never: TLS legs stay on rustls and the userspace copy.
    Off,
}

impl KtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KtlsMode::Auto => "auto",
            KtlsMode::Off => "off",
        }
    }
}

/// Whether the eBPF connect allow-list is used (`--allowlist`, `kernel.allowlist`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowListMode {
    /// Not used.
    Off,
    /// Used when the kernel and privileges allow; otherwise a loud warning.
    #[default]
    Auto,
    /// The proxy refuses to start without it.
    Required,
}

/// Which cgroup v2 the allow-list programs attach to (`kernel.cgroup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// A child `consolegate-<pid>` of the current cgroup, created at start,
    /// the proxy moves itself in, removed at exit.
    #[default]
    Own,
    /// The cgroup the proxy was started in (e.g. the one systemd gives the
    /// service); never the root cgroup.
    Current,
}

/// `[kernel]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    pub datapath: Option<DatapathMode>,
    pub allowlist: Option<AllowListMode>,
    pub cgroup: Option<CgroupMode>,
    pub ktls: Option<KtlsMode>,
    /// Most records a kTLS leg sends under one key before it renews the
    /// key (TLS 1.3, Linux 6.14+) or ends the session; default and
    /// ceiling: the cipher's confidentiality limit less a margin.
    #[serde(default, deserialize_with = "records_per_key")]
    pub ktls_records_per_key: Option<std::num::NonZeroU64>,
}

/// `ktls_records_per_key`: a count of at least 1, the key named if not.
fn records_per_key<'de, D>(d: D) -> Result<Option<std::num::NonZeroU64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let v = <i64 as Deserialize>::deserialize(d).map_err(|e| {
        serde::de::Error::custom(format!("ktls_records_per_key must be a whole number: {e}"))
    })?;
    u64::try_from(v)
        .ok()
        .and_then(std::num::NonZeroU64::new)
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("ktls_records_per_key must be at least 1, not {v}"))
        })
}
