//! The eBPF connect allow-list: loads `ebpf/programs/allowlist.bpf.c`
//! (connect4 + connect6) with aya, attaches it to the proxy's cgroup v2 and
//! keeps its maps equal to the set of compute endpoints the proxy may dial.
//!
//! The set is the union of
//! - the static TCP targets of the token table (IP literals), replaced at
//!   start and on every reload ([`AllowList::sync_static`]);
//! - endpoints being dialled right now ([`AllowList::dialling`]): names are
//!   resolved and each address is inserted just before the dial and
//!   removed when the dial is over, unless a token still names it;
//! - fixed extras (e.g. a resolver's own server, [`AllowList::allow_always`]).
//!
//! A TCP connect from the proxy to anything else fails with EPERM in the
//! kernel, even from a code path that forgot to check the token table.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use consolegate_ebpf::{AllowV4, AllowV6};

use super::cgroup::{Attached, CgroupError};
use crate::auth::TokenStore;
use crate::config::kernel::{AllowListMode, CgroupMode};
use crate::console::{self, ComputeStream, DialError, Host, Target};

/// Why the allow-list is not active.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("{}", consolegate_ebpf::NOT_BUILT)]
    NotBuilt,
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("loading program {program}: {error} (needs CAP_BPF/CAP_SYS_ADMIN or root)")]
    Program {
        program: &'static str,
        error: String,
    },
    #[error("attaching {program} to {cgroup}: {error}")]
    Attach {
        program: &'static str,
        cgroup: String,
        error: String,
    },
    #[error("map {map}: {error}")]
    Map { map: &'static str, error: String },
}

impl AllowListError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AllowListError::NotBuilt => "not_built",
            AllowListError::Cgroup(_) => "cgroup",
            AllowListError::Load(_) => "load",
            AllowListError::Program { .. } => "program",
            AllowListError::Attach { .. } => "attach",
            AllowListError::Map { .. } => "map",
        }
    }
}

type V4Map = BpfHashMap<MapData, [u8; 8], u8>;
type V6Map = BpfHashMap<MapData, [u8; 20], u8>;

/// The loaded programs and their maps. Dropping it detaches the programs
/// (the links go with the program objects), then leaves and removes the
/// own cgroup.
struct Loaded {
    v4: V4Map,
    v6: V6Map,
    // Field order is drop order: detach before leaving the cgroup.
    _ebpf: Ebpf,
    cgroup: Attached,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    loaded: Option<Loaded>,
    /// From the token table.
    statics: HashSet<SocketAddr>,
    /// Never removed.
    always: HashSet<SocketAddr>,
    /// Dials in progress per address.
    dialling: HashMap<SocketAddr, usize>,
    /// What the maps hold.
    installed: HashSet<SocketAddr>,
}

/// A live allow-list; shared by the sessions and the reload loop.
#[derive(Debug)]
pub struct AllowList {
    state: Mutex<State>,
    cgroup: String,
}

/// Normalises an address: v4-mapped IPv6 goes to the v4 table, as the
/// connect6 program does.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

impl Loaded {
    fn insert(&mut self, a: SocketAddr) -> Result<(), AllowListError> {
        match a.ip() {
            IpAddr::V4(ip) => self
                .v4
                .insert(AllowV4::new(ip.octets(), a.port()).to_bytes(), 1, 0)
                .map_err(|e| map_err(consolegate_ebpf::MAP_V4, e)),
            IpAddr::V6(ip) => self
                .v6
                .insert(AllowV6::new(ip.octets(), a.port()).to_bytes(), 1, 0)
                .map_err(|e| map_err(consolegate_ebpf::MAP_V6, e)),
        }
    }

    fn remove(&mut self, a: SocketAddr) -> Result<(), AllowListError> {
        match a.ip() {
            IpAddr::V4(ip) => self
                .v4
                .remove(&AllowV4::new(ip.octets(), a.port()).to_bytes())
                .map_err(|e| map_err(consolegate_ebpf::MAP_V4, e)),
            IpAddr::V6(ip) => self
                .v6
                .remove(&AllowV6::new(ip.octets(), a.port()).to_bytes())
                .map_err(|e| map_err(consolegate_ebpf::MAP_V6, e)),
        }
    }
}

fn map_err(map: &'static str, e: aya::maps::MapError) -> AllowListError {
    AllowListError::Map {
        map,
        error: chain(&e),
    }
}

/// An error with its sources (aya puts the errno in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Loads the programs and attaches them to `cgroup`.
fn load(cgroup: Attached) -> Result<Loaded, AllowListError> {
    let obj = consolegate_ebpf::ALLOWLIST_OBJ.ok_or(AllowListError::NotBuilt)?;
    let mut ebpf = EbpfLoader::new()
        .load(obj)
        .map_err(|e| AllowListError::Load(chain(&e)))?;
    let dir = File::open(&cgroup.dir).map_err(|e| AllowListError::Attach {
        program: consolegate_ebpf::PROG_CONNECT4,
        cgroup: cgroup.dir.display().to_string(),
        error: e.to_string(),
    })?;
    for program in [
        consolegate_ebpf::PROG_CONNECT4,
        consolegate_ebpf::PROG_CONNECT6,
    ] {
        let perr = |error: String| AllowListError::Program { program, error };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(program)
            .ok_or_else(|| perr("missing from the object".to_owned()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| perr(e.to_string()))?;
        prog.load().map_err(|e| perr(chain(&e)))?;
        // With bpf_link (kernel 5.7+) the flags must be 0 and links
        // always stack with other programs; aya maps Single to 0.
        prog.attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| AllowListError::Attach {
                program,
                cgroup: cgroup.dir.display().to_string(),
                error: chain(&e),
            })?;
    }
    let take = |ebpf: &mut Ebpf, name: &'static str| {
        ebpf.take_map(name).ok_or(AllowListError::Map {
            map: name,
            error: "missing from the object".to_owned(),
        })
    };
    let v4 = V4Map::try_from(take(&mut ebpf, consolegate_ebpf::MAP_V4)?)
        .map_err(|e| map_err(consolegate_ebpf::MAP_V4, e))?;
    let v6 = V6Map::try_from(take(&mut ebpf, consolegate_ebpf::MAP_V6)?)
        .map_err(|e| map_err(consolegate_ebpf::MAP_V6, e))?;
    Ok(Loaded {
        v4,
        v6,
        _ebpf: ebpf,
        cgroup,
    })
}

impl AllowList {
    /// Sets up the cgroup (`mode`), loads and attaches the programs. The
    /// maps start empty: call [`AllowList::sync_static`] right after.
    pub fn start(mode: CgroupMode) -> Result<Arc<Self>, AllowListError> {
        if consolegate_ebpf::ALLOWLIST_OBJ.is_none() {
            return Err(AllowListError::NotBuilt);
        }
        // A failed load drops `cgroup`, which moves us back and removes it.
        let cgroup = match mode {
            CgroupMode::Own => Attached::own()?,
            CgroupMode::Current => Attached::current()?,
        };
        Self::with_cgroup(cgroup)
    }

    /// Attaches to an already chosen cgroup (tests use a scratch cgroup).
    pub fn with_cgroup(cgroup: Attached) -> Result<Arc<Self>, AllowListError> {
        let name = cgroup.dir.display().to_string();
        let loaded = load(cgroup)?;
        Ok(Arc::new(Self {
            state: Mutex::new(State {
                loaded: Some(loaded),
                ..State::default()
            }),
            cgroup: name,
        }))
    }

    /// The cgroup directory the programs are attached to.
    pub fn cgroup(&self) -> &str {
        &self.cgroup
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        match self.state.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Replaces the static set with the IP-literal TCP targets of the token
    /// table. Returns how many entries the maps hold afterwards.
    pub fn sync_static(&self, targets: impl IntoIterator<Item = (Host, u16)>) -> usize {
        let statics: HashSet<SocketAddr> = targets
            .into_iter()
            .filter_map(|(h, p)| match h {
                Host::Ip(ip) => Some(canonical(SocketAddr::new(ip, p))),
                Host::Name(_) => None,
            })
            .collect();
        self.with_state(|s| {
            s.statics = statics;
            reconcile(s)
        })
    }

    /// Allows `addr` for as long as the proxy runs.
    pub fn allow_always(&self, addr: SocketAddr) {
        self.with_state(|s| {
            s.always.insert(canonical(addr));
            reconcile(s);
        });
    }

    /// Allows `addr` until the returned guard is dropped (after the dial).
    pub fn dialling(self: &Arc<Self>, addr: SocketAddr) -> DialGuard {
        let addr = canonical(addr);
        self.with_state(|s| {
            *s.dialling.entry(addr).or_insert(0) += 1;
            reconcile(s);
        });
        DialGuard {
            list: Arc::clone(self),
            addr,
        }
    }

    /// Whether `addr` is in the maps now.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.with_state(|s| s.installed.contains(&canonical(addr)))
    }

    /// Detaches the programs and leaves the own cgroup. Connects are no
    /// longer filtered afterwards.
    pub fn close(&self) {
        let loaded = self.with_state(|s| s.loaded.take());
        drop(loaded);
    }
}

/// Brings the maps to `statics ∪ always ∪ dialling`.
fn reconcile(s: &mut State) -> usize {
    let want: HashSet<SocketAddr> = s
        .statics
        .iter()
        .chain(s.always.iter())
        .chain(s.dialling.keys())
        .copied()
        .collect();
    let Some(loaded) = s.loaded.as_mut() else {
        return 0;
    };
    for a in s.installed.difference(&want).copied().collect::<Vec<_>>() {
        match loaded.remove(a) {
            Ok(()) => {
                s.installed.remove(&a);
            }
            Err(e) => tracing::error!(addr = %a, error = %e, "allow-list: removing failed"),
        }
    }
    for a in want.difference(&s.installed).copied().collect::<Vec<_>>() {
        match loaded.insert(a) {
            Ok(()) => {
                s.installed.insert(a);
            }
            Err(e) => tracing::error!(addr = %a, error = %e, "allow-list: inserting failed"),
        }
    }
    s.installed.len()
}

/// Keeps one address allowed while a dial is in progress.
#[derive(Debug)]
pub struct DialGuard {
    list: Arc<AllowList>,
    addr: SocketAddr,
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        let addr = self.addr;
        self.list.with_state(|s| {
            if let Some(n) = s.dialling.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    s.dialling.remove(&addr);
                }
            }
            reconcile(s);
        });
    }
}

/// Starts the allow-list as configured: `Ok(None)` when it is off, or
/// unavailable in `auto` mode (after a loud warning); an error only in
/// `required` mode. The static targets of `tokens` are installed.
pub fn start_configured(
    mode: AllowListMode,
    cgroup: CgroupMode,
    tokens: &TokenStore,
) -> Result<Option<Arc<AllowList>>, AllowListError> {
    if mode == AllowListMode::Off {
        tracing::info!(
            allowlist = "off",
            "eBPF connect allow-list disabled by configuration"
        );
        return Ok(None);
    }
    match AllowList::start(cgroup) {
        Ok(list) => {
            let n = list.sync_static(tokens.tcp_targets());
            tracing::info!(
                allowlist = "on",
                cgroup = list.cgroup(),
                entries = n,
                "eBPF connect allow-list active: connects to endpoints no token names fail with EPERM"
            );
            Ok(Some(list))
        }
        Err(e) if mode == AllowListMode::Auto => {
            tracing::warn!(
                allowlist = "unavailable",
                reason = e.kind(),
                error = %e,
                "WARNING: eBPF connect allow-list NOT active: the proxy relies on its userspace \
                 checks alone (set kernel.allowlist = \"required\" to refuse to start instead)"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Dials `target` with the addresses it resolves to allowed just for the
/// dial. Names are resolved here and each address dialled in turn, so the
/// address in the map is the address connected to.
pub async fn dial(
    list: &Arc<AllowList>,
    target: &Target,
    timeout: std::time::Duration,
) -> Result<ComputeStream, DialError> {
    let Target::Tcp { host, port } = target else {
        return console::dial(target, timeout).await;
    };
    let addrs: Vec<SocketAddr> = match host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, *port)],
        Host::Name(n) => {
            match tokio::time::timeout(timeout, tokio::net::lookup_host((n.as_str(), *port))).await
            {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(source)) => {
                    return Err(DialError::Io {
                        target: target.to_string(),
                        source,
                    });
                }
                Err(_) => {
                    return Err(DialError::Timeout {
                        target: target.to_string(),
                        after: timeout,
                    });
                }
            }
        }
    };
    let _guards: Vec<DialGuard> = addrs.iter().map(|a| list.dialling(*a)).collect();
    let mut last = None;
    for a in addrs {
        let t = Target::Tcp {
            host: Host::Ip(a.ip()),
            port: a.port(),
        };
        match console::dial(&t, timeout).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| DialError::Io {
        target: target.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::control::cgroup;

    /// Runs `bash` inside the cgroup at `dir` and opens a TCP connection to
    /// `host`:`port` with bash's /dev/tcp; returns bash's stderr/stdout.
    fn connect_from(dir: &std::path::Path, host: &str, port: u16) -> (bool, String) {
        let script = format!(
            "echo $$ > {}/cgroup.procs || exit 3; exec 3<>/dev/tcp/{host}/{port} && echo connected",
            dir.display()
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .expect("bash runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success() && text.contains("connected"), text)
    }

    /// The kernel enforces the list: a process in the attached cgroup gets
    /// EPERM for a listening loopback port not in the map, and connects once
    /// the key is added (v4, v6, and v4-mapped v6 through connect6).
    #[test]
    fn kernel_refuses_unlisted_connects_with_eperm() {
        let Some(parent) = cgroup::current_dir().ok() else {
            println!("skipped: no cgroup v2 here; the proxy starts without the allow-list");
            return;
        };
        let dir = parent.join(format!("consolegate-unit-{}", std::process::id()));
        let scratch = match cgroup::Attached::scratch(&dir) {
            Ok(s) => s,
            Err(e) => {
                println!("skipped: cannot create a test cgroup ({e}): not root?");
                return;
            }
        };
        let list = match AllowList::with_cgroup(scratch) {
            Ok(l) => l,
            Err(e) => {
                println!(
                    "skipped: the allow-list cannot load here ({e}); fallback tested in tests/tests/ebpf.rs"
                );
                return;
            }
        };
        let l4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a4 = l4.local_addr().unwrap();
        let (ok, text) = connect_from(&dir, "127.0.0.1", a4.port());
        assert!(!ok && text.contains("Operation not permitted"), "{text}");
        let (ok, text) = connect_from(&dir, "::ffff:127.0.0.1", a4.port());
        assert!(!ok && text.contains("Operation not permitted"), "{text}");

        list.sync_static([(Host::Ip(a4.ip()), a4.port())]);
        assert!(list.contains(a4));
        let (ok, text) = connect_from(&dir, "127.0.0.1", a4.port());
        assert!(ok, "{text}");
        // A dual-stack socket to ::ffff:127.0.0.1 goes through connect6 and
        // is looked up in the v4 table.
        let (ok, text) = connect_from(&dir, "::ffff:127.0.0.1", a4.port());
        assert!(ok, "{text}");
        // Another port on the same host stays refused.
        let (ok, text) = connect_from(&dir, "127.0.0.1", a4.port().wrapping_add(1).max(1));
        assert!(!ok && text.contains("Operation not permitted"), "{text}");

        if let Ok(l6) = std::net::TcpListener::bind("[::1]:0") {
            let a6 = l6.local_addr().unwrap();
            let (ok, text) = connect_from(&dir, "::1", a6.port());
            assert!(!ok && text.contains("Operation not permitted"), "{text}");
            {
                let _g = list.dialling(a6);
                let (ok, text) = connect_from(&dir, "::1", a6.port());
                assert!(ok, "{text}");
            }
            // The dial guard is gone: refused again.
            assert!(!list.contains(a6));
            let (ok, text) = connect_from(&dir, "::1", a6.port());
            assert!(!ok && text.contains("Operation not permitted"), "{text}");
        }

        // A reload that drops the target removes it from the map.
        list.sync_static(std::iter::empty());
        let (ok, text) = connect_from(&dir, "127.0.0.1", a4.port());
        assert!(!ok && text.contains("Operation not permitted"), "{text}");
        list.close();
        // Programs detached: the scratch cgroup is gone, nothing filtered.
        assert!(!dir.exists());
    }

    #[test]
    fn v4_mapped_goes_to_the_v4_table() {
        let m: SocketAddr = "[::ffff:127.0.0.1]:5900".parse().unwrap();
        assert_eq!(canonical(m), "127.0.0.1:5900".parse().unwrap());
        let v6: SocketAddr = "[::1]:5900".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
