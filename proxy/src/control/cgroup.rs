//! cgroup v2: where it is mounted, which cgroup we are in, and a child
//! cgroup of our own that the proxy moves into at start and leaves at exit.

use std::io;
use std::path::{Path, PathBuf};

/// Why no cgroup could be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (see /proc/self/mountinfo)")]
    NoMount,
    #[error("cannot tell our cgroup v2 from /proc/self/cgroup")]
    Unknown,
    #[error("refusing to attach to the root cgroup: it would filter every process on the host")]
    Root,
    #[error("creating {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("moving the proxy into {path}: {source}")]
    Move { path: PathBuf, source: io::Error },
}

/// The mount point of the cgroup2 file system, from `mountinfo` text.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(char::from(v));
            i += 4;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    out
}

/// Our cgroup v2 path (relative to the mount) from `/proc/self/cgroup` text.
pub fn current_in(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// The cgroup2 mount point of this system.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The absolute directory of the cgroup this process is in.
pub fn current_dir() -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount().ok_or(CgroupError::NoMount)?;
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(|_| CgroupError::Unknown)?;
    let rel = current_in(&text).ok_or(CgroupError::Unknown)?;
    let rel = rel.trim_matches('/');
    Ok(if rel.is_empty() {
        mount
    } else {
        mount.join(rel)
    })
}

/// A cgroup the allow-list attaches to.
#[derive(Debug)]
pub struct Attached {
    /// The directory the programs attach to.
    pub dir: PathBuf,
    /// For an own cgroup: where we came from (we move back there and
    /// remove `dir` when dropped).
    parent: Option<PathBuf>,
    /// Remove `dir` when dropped (own and scratch cgroups).
    remove: bool,
}

impl Attached {
    /// A new child `consolegate-<pid>` of our cgroup; moves this whole
    /// process (all threads) into it.
    pub fn own() -> Result<Self, CgroupError> {
        let parent = current_dir()?;
        remove_stale(&parent);
        let dir = parent.join(format!("consolegate-{}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        if let Err(source) = move_self(&dir) {
            let _ = std::fs::remove_dir(&dir);
            return Err(CgroupError::Move { path: dir, source });
        }
        Ok(Self {
            dir,
            parent: Some(parent),
            remove: true,
        })
    }

    /// The cgroup we are in, unless it is the root.
    pub fn current() -> Result<Self, CgroupError> {
        let mount = cgroup2_mount().ok_or(CgroupError::NoMount)?;
        let dir = current_dir()?;
        if dir == mount {
            return Err(CgroupError::Root);
        }
        Ok(Self {
            dir,
            parent: None,
            remove: false,
        })
    }

    /// A scratch cgroup at `dir` (created; removed when dropped) that we
    /// do not move into: for probes and tests that put other processes
    /// there.
    pub fn scratch(dir: &Path) -> Result<Self, CgroupError> {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(CgroupError::Create {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            parent: None,
            remove: true,
        })
    }
}

/// Removes empty `consolegate-<pid>` children of `parent` whose process is
/// gone (a proxy that was killed could not clean up). rmdir of a cgroup
/// only succeeds when it has no process and no child, so a live cgroup is
/// never touched.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("consolegate-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            tracing::info!(cgroup = %e.path().display(), "removed the cgroup of a proxy that is gone");
        }
    }
}

/// Moves this process (the whole thread group) into the cgroup at `dir`.
pub fn move_self(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(parent) = &self.parent
            && let Err(e) = move_self(parent)
        {
            tracing::warn!(cgroup = %parent.display(), error = %e, "could not leave our cgroup");
        }
        if self.remove
            && let Err(e) = std::fs::remove_dir(&self.dir)
        {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "could not remove a cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let mi = "25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755\n\
                  30 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                  35 25 0:31 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(mi),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            cgroup2_mount_in("30 25 0:27 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_mount_in("garbage\n\n - \n"), None);
    }

    #[test]
    fn stale_cgroups_of_dead_proxies_go_live_ones_stay() {
        let dir = std::env::temp_dir().join(format!("cg-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Above pid_max (at most 2^22): no such process.
        let dead = dir.join("consolegate-4194999");
        let live = dir.join(format!("consolegate-{}", std::process::id()));
        let other = dir.join("consolegate-doctor-1");
        let busy = dir.join("consolegate-4194998");
        for d in [&dead, &live, &other, &busy] {
            std::fs::create_dir(d).unwrap();
        }
        // Not empty: rmdir fails, as it does for a cgroup with processes.
        std::fs::write(busy.join("cgroup.procs"), "1").unwrap();
        remove_stale(&dir);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists() && busy.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_the_v2_line() {
        let pc = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/cg.service\n";
        assert_eq!(current_in(pc).as_deref(), Some("/system.slice/cg.service"));
        assert_eq!(current_in("4:memory:/x\n"), None);
    }
}
