//! The sockmap data path's kernel side: loads `ebpf/programs/sockmap.bpf.c`
//! (stream parser + stream verdict) with aya once at start, attaches both
//! to the FORWARD map and puts the sockets of each session into the maps
//! for [`crate::datapath::sockmap`].
//!
//! Per session: PEER[cookie of tenant] = compute, PEER[cookie of compute]
//! = tenant, and only then FORWARD[cookie] = the socket itself for both,
//! which starts the forwarding; removal goes the other way round.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use consolegate_ebpf::SockKey;

use crate::datapath::sockmap::{Pair, Redirect};
use crate::sys::tcpinfo;

/// Why the sockmap path is not available.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("{}", consolegate_ebpf::NOT_BUILT)]
    NotBuilt,
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("loading program {program}: {error} (needs CAP_BPF/CAP_NET_ADMIN or root)")]
    Program {
        program: &'static str,
        error: String,
    },
    #[error("attaching {program} to the {map} map: {error}")]
    Attach {
        program: &'static str,
        map: &'static str,
        error: String,
    },
    #[error("map {map}: {error}")]
    Map { map: &'static str, error: String },
}

impl SockmapError {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SockmapError::NotBuilt => "not_built",
            SockmapError::Load(_) => "load",
            SockmapError::Program { .. } => "program",
            SockmapError::Attach { .. } => "attach",
            SockmapError::Map { .. } => "map",
        }
    }
}

type Sockets = SockHash<MapData, [u8; 8]>;

struct Maps {
    peer: Sockets,
    forward: Sockets,
}

/// The loaded programs and maps, shared by all sessions. Dropping it
/// unloads everything (sockets still in the maps leave them).
pub struct Sockmap {
    maps: Mutex<Maps>,
    // Keeps the programs loaded and attached.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap").finish_non_exhaustive()
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

impl Sockmap {
    /// Loads the object, the programs, and attaches them to FORWARD.
    pub fn load() -> Result<Arc<Self>, SockmapError> {
        let obj = consolegate_ebpf::SOCKMAP_OBJ.ok_or(SockmapError::NotBuilt)?;
        let mut ebpf = EbpfLoader::new()
            .load(obj)
            .map_err(|e| SockmapError::Load(chain(&e)))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| -> Result<Sockets, SockmapError> {
            let map = ebpf.take_map(name).ok_or(SockmapError::Map {
                map: name,
                error: "missing from the object".to_owned(),
            })?;
            Sockets::try_from(map).map_err(|e| SockmapError::Map {
                map: name,
                error: chain(&e),
            })
        };
        let peer = take(&mut ebpf, consolegate_ebpf::MAP_PEER)?;
        let forward = take(&mut ebpf, consolegate_ebpf::MAP_FORWARD)?;
        let forward_fd = forward.fd().try_clone().map_err(|e| SockmapError::Map {
            map: consolegate_ebpf::MAP_FORWARD,
            error: e.to_string(),
        })?;
        for program in [
            consolegate_ebpf::PROG_PARSER,
            consolegate_ebpf::PROG_VERDICT,
        ] {
            let perr = |error: String| SockmapError::Program { program, error };
            let prog: &mut SkSkb = ebpf
                .program_mut(program)
                .ok_or_else(|| perr("missing from the object".to_owned()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| perr(e.to_string()))?;
            prog.load().map_err(|e| perr(chain(&e)))?;
            prog.attach(&forward_fd).map_err(|e| SockmapError::Attach {
                program,
                map: consolegate_ebpf::MAP_FORWARD,
                error: chain(&e),
            })?;
        }
        Ok(Arc::new(Self {
            maps: Mutex::new(Maps { peer, forward }),
            _ebpf: ebpf,
        }))
    }

    fn with_maps<R>(&self, f: impl FnOnce(&mut Maps) -> R) -> R {
        match self.maps.lock() {
            Ok(mut m) => f(&mut m),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

fn map_io(map: &'static str, e: aya::maps::MapError) -> io::Error {
    io::Error::other(format!("map {map}: {}", chain(&e)))
}

impl Redirect for Sockmap {
    fn pair(&self, tenant: BorrowedFd<'_>, compute: BorrowedFd<'_>) -> io::Result<Pair> {
        let pair = Pair {
            tenant: tcpinfo::cookie(tenant)?,
            compute: tcpinfo::cookie(compute)?,
        };
        let key = |cookie| SockKey { cookie }.to_bytes();
        self.with_maps(|m| {
            let peer = consolegate_ebpf::MAP_PEER;
            let fwd = consolegate_ebpf::MAP_FORWARD;
            let r = (|| {
                // Both targets first: no byte can meet a missing peer.
                m.peer
                    .insert(key(pair.tenant), compute.as_raw_fd(), 0)
                    .map_err(|e| map_io(peer, e))?;
                m.peer
                    .insert(key(pair.compute), tenant.as_raw_fd(), 0)
                    .map_err(|e| map_io(peer, e))?;
                m.forward
                    .insert(key(pair.tenant), tenant.as_raw_fd(), 0)
                    .map_err(|e| map_io(fwd, e))?;
                m.forward
                    .insert(key(pair.compute), compute.as_raw_fd(), 0)
                    .map_err(|e| map_io(fwd, e))
            })();
            if r.is_err() {
                remove(m, pair);
            }
            r.map(|()| pair)
        })
    }

    fn unpair(&self, pair: Pair) {
        self.with_maps(|m| remove(m, pair));
    }
}

/// Forwarding off first, then the targets. Missing keys (a closed socket
/// leaves the maps by itself, a failed pair never got there) are fine.
fn remove(m: &mut Maps, pair: Pair) {
    for k in [pair.tenant, pair.compute] {
        let _ = m.forward.remove(&SockKey { cookie: k }.to_bytes());
    }
    for k in [pair.tenant, pair.compute] {
        let _ = m.peer.remove(&SockKey { cookie: k }.to_bytes());
    }
}

/// Loads the sockmap path for `kernel.datapath = "sockmap"`: `Err` carries
/// the reason after a loud warning; sessions then use splice.
pub fn start() -> Result<Arc<Sockmap>, String> {
    match Sockmap::load() {
        Ok(s) => {
            tracing::info!(
                datapath = "sockmap",
                "sockmap data path loaded: plain TCP sessions are forwarded by an sk_skb verdict in the kernel"
            );
            Ok(s)
        }
        Err(e) => {
            tracing::warn!(
                datapath = "sockmap",
                reason = e.kind(),
                error = %e,
                "WARNING: kernel.datapath = \"sockmap\" but the sockmap program cannot load: \
                 sessions use splice instead (see consolegate doctor)"
            );
            Err(e.to_string())
        }
    }
}

/// `doctor`'s probe: loads and attaches the programs, then sends one byte
/// through a redirected pair of loopback connections.
pub fn probe() -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsFd as _;
    let sm = Sockmap::load().map_err(|e| e.to_string())?;
    let run = || -> io::Result<()> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut a = std::net::TcpStream::connect(l.local_addr()?)?;
        let (b, _) = l.accept()?;
        let c = std::net::TcpStream::connect(l.local_addr()?)?;
        let (mut d, _) = l.accept()?;
        d.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        let pair = sm.pair(b.as_fd(), c.as_fd())?;
        a.write_all(b"x")?;
        let mut got = [0u8; 1];
        let r = d.read_exact(&mut got);
        sm.unpair(pair);
        r
    };
    run()
        .map(|()| {
            "parser + verdict load, attach and redirect a socket's bytes to its peer".to_owned()
        })
        .map_err(|e| format!("sockmap loaded but a redirected byte did not arrive: {e}"))
}
