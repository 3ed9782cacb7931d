//! What tens of thousands of loopback sessions need from the machine: open
//! files (`RLIMIT_NOFILE`) and enough distinct TCP 4-tuples.
//!
//! A connect without a bound port takes an ephemeral port from
//! `net.ipv4.ip_local_port_range` (28,232 ports by default), unique per
//! (source address, destination address and port). One client address
//! talking to one proxy listener, or one proxy dialling one backend, runs
//! out near that many sessions. The whole of 127.0.0.0/8 is local on Linux,
//! so the tenant side spreads its connections over several source
//! addresses (bound before connect, with `IP_BIND_ADDRESS_NO_PORT` so the
//! port is still chosen per 4-tuple at connect time), and the echo backend
//! listens on several ports that the proxy's tokens or servers spread over.
//! No sysctl is touched.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Sessions one (source, destination) pair is given at most: the default
/// ephemeral range holds 28,232 ports; the rest stays for other work on
/// the machine and for 4-tuples still in TIME_WAIT from an earlier run.
pub const DEFAULT_PER_ADDRESS: u64 = 20_000;

/// The first tenant source address (127.0.0.1 stays the kernel's choice
/// for everything else, e.g. the proxy dialling its backends).
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Most source addresses `--source-addrs` takes: 127.0.0.2 to 127.0.0.251.
pub const MAX_SOURCES: u16 = 250;

/// The tenant source addresses for `n` (127.0.0.2, 127.0.0.3, ...).
pub fn source_addrs(n: u16) -> Result<Vec<IpAddr>> {
    if n > MAX_SOURCES {
        bail!("--source-addrs {n}: at most {MAX_SOURCES} (127.0.0.2 to 127.0.0.251)");
    }
    let first = u32::from(FIRST_SOURCE);
    Ok((0..u32::from(n))
        .map(|k| IpAddr::V4(Ipv4Addr::from(first + k)))
        .collect())
}

/// The element session `i` uses of a round-robin list (None when empty).
pub fn nth<T>(list: &[T], i: u64) -> Option<&T> {
    if list.is_empty() {
        return None;
    }
    let k = usize::try_from(i % list.len() as u64).unwrap_or(0);
    list.get(k)
}

/// Ports of `net.ipv4.ip_local_port_range` (None when unreadable).
pub fn ephemeral_ports() -> Option<u64> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_port_range(&text)
}

fn parse_port_range(text: &str) -> Option<u64> {
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    (hi >= lo).then(|| hi - lo + 1)
}

/// Sessions to give one (source, destination) pair on this machine: three
/// quarters of the ephemeral range (21,174 with the default range;
/// [`DEFAULT_PER_ADDRESS`] when the range cannot be read).
pub fn per_address() -> u64 {
    ephemeral_ports().map_or(DEFAULT_PER_ADDRESS, |p| (p * 3 / 4).max(1000))
}

/// Addresses (or ports) `sessions` need at `per_address` each: 1 up to one
/// address's share.
pub fn addresses_for(sessions: u64, per_address: u64) -> u64 {
    sessions.div_ceil(per_address.max(1)).max(1)
}

/// `fs.nr_open`: the ceiling of any process's open-file limit.
pub fn nr_open() -> u64 {
    fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// This process's (soft, hard) open-file limits.
pub fn nofile_limits() -> (u64, u64) {
    getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024))
}

/// Raises this process's open-file limit to at least `want` (soft and, if
/// needed, hard: root may go up to `fs.nr_open`); returns the soft limit
/// now in force, or an error saying what to do when `want` is out of reach.
pub fn ensure_nofile(want: u64) -> Result<u64> {
    let (soft, hard) = nofile_limits();
    if soft >= want {
        return Ok(soft);
    }
    if want > nr_open() {
        bail!(
            "{want} open files needed, more than fs.nr_open ({}) allows",
            nr_open()
        );
    }
    let new_hard = hard.max(want);
    match setrlimit(Resource::RLIMIT_NOFILE, want, new_hard) {
        Ok(()) => Ok(want),
        Err(nix::errno::Errno::EPERM) if new_hard > hard => bail!(
            "{want} open files needed, the hard limit is {hard} and raising it needs \
             CAP_SYS_RESOURCE, which this process does not have (root in a container or VM \
             may lack it: see CapBnd in /proc/self/status); raise the hard limit where the \
             load generator and the proxy start (e.g. LimitNOFILE= in a systemd unit, \
             limits.conf), or hold fewer sessions"
        ),
        Err(e) => bail!(
            "{want} open files needed, the limit is {soft} (hard {hard}) and raising it failed \
             ({e}): run as root, or `prlimit --nofile={want}:{want}` / `ulimit -n {want}` first"
        ),
    }
}

/// Raises the open-file limit as far as allowed toward `want` without
/// failing; returns the soft limit now in force.
pub fn raise_nofile_toward(want: u64) -> u64 {
    let want = want.min(nr_open());
    match ensure_nofile(want) {
        Ok(n) => n,
        Err(_) => {
            let (soft, hard) = nofile_limits();
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_start_at_127_0_0_2_and_are_bounded() {
        let v = source_addrs(3).unwrap();
        let want: Vec<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v, want);
        assert!(source_addrs(0).unwrap().is_empty());
        let all = source_addrs(MAX_SOURCES).unwrap();
        assert_eq!(all.last().unwrap().to_string(), "127.0.0.251");
        assert!(source_addrs(MAX_SOURCES + 1).is_err());
    }

    #[test]
    fn sessions_go_round_robin_over_the_list() {
        let list = ["a", "b", "c"];
        let picks: Vec<&str> = (0..7).map(|i| *nth(&list, i).unwrap()).collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c", "a"]);
        assert_eq!(nth::<u8>(&[], 5), None);
        // Every address gets its share, within one.
        let mut counts = [0u64; 3];
        for i in 0..50_000u64 {
            let k = list
                .iter()
                .position(|x| x == nth(&list, i).unwrap())
                .unwrap();
            counts[k] += 1;
        }
        assert!(
            counts.iter().all(|&c| (16_666..=16_667).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn addresses_cover_the_sessions_at_the_per_address_budget() {
        assert_eq!(addresses_for(0, 20_000), 1);
        assert_eq!(addresses_for(100, 20_000), 1);
        assert_eq!(addresses_for(20_000, 20_000), 1);
        assert_eq!(addresses_for(20_001, 20_000), 2);
        assert_eq!(addresses_for(50_000, 20_000), 3);
        assert_eq!(addresses_for(50_000, 0), 50_000);
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28_232));
        assert_eq!(parse_port_range("1024 65535"), Some(64_512));
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(parse_port_range(""), None);
        assert!(per_address() >= 1000);
    }

    #[test]
    fn the_open_file_limit_is_kept_when_already_enough() {
        let (soft, _) = nofile_limits();
        assert_eq!(ensure_nofile(soft.min(64)).unwrap(), soft);
        assert!(ensure_nofile(nr_open() + 1).is_err());
        assert!(raise_nofile_toward(16) >= soft.min(16));
    }
}
