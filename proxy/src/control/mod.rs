//! Control plane: what runs beside the sessions and never in the data path
//! (systemd integration today; admin API, metrics, eBPF map sync and
//! capability probes join here).

pub mod audit;
pub mod systemd;
