//! Control plane: what runs beside the sessions and never in the data path:
//! systemd integration ([`systemd`]), the eBPF connect allow-list kept in
//! sync with the token table ([`allowlist`]), the cgroup v2 it attaches to
//! ([`cgroup`]) and the capability report of `consolegate doctor`
//! ([`doctor`]). `datapath/` never imports this module.

pub mod allowlist;
pub mod audit;
pub mod cgroup;
pub mod doctor;
pub mod metrics;
pub mod sockmap;
pub mod systemd;
