//! QEMU launcher: `qemu-system-x86_64 -accel tcg` (never KVM) with a VNC
//! server on loopback TCP or a UNIX socket, and a serial chardev server
//! (TCP or UNIX) attached to COM1 of a guest that boots our own 512-byte
//! boot sector ([`BOOT_CODE`]): it prints [`SERIAL_BANNER`] every few timer
//! ticks until the first byte arrives, then echoes every received byte.
//!
//! `start` returns once the VNC socket accepts and the banner has been seen
//! on the serial port, which also means SeaBIOS has finished and the VGA
//! text mode (and so the VNC framebuffer size) is stable.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncReadExt as _;

use crate::net::{BoxIo, free_port, free_port_on};
use crate::process::ChildGuard;

pub const SERIAL_BANNER: &[u8] = b"consolegate-serial-ready\r\n";

/// Machine code of the boot sector (source: `tests/src/boot.S`, assembled
/// with `as --32` + `objcopy -O binary`; this listing is
/// `objdump -D -b binary -m i8086 -M intel` of it). The banner text follows
/// the code (at 0x81); [`boot_image`] pads to 510 bytes and appends the 0x55AA mark.
#[rustfmt::skip]
pub const BOOT_CODE: &[u8] = &[
    0xfa,                            // 0000: cli
    0xfc,                            // 0001: cld
    0x31, 0xc0,                      // 0002: xor ax,ax
    0x8e, 0xd8,                      // 0004: mov ds,ax
    0x8e, 0xd0,                      // 0006: mov ss,ax
    0xbc, 0x00, 0x7c,                // 0008: mov sp,0x7c00
    0xfb,                            // 000b: sti
    0xba, 0xf9, 0x03,                // 000c: mov dx,0x3f9
    0x30, 0xc0,                      // 000f: xor al,al
    0xee,                            // 0011: out dx,al
    0xba, 0xfb, 0x03,                // 0012: mov dx,0x3fb
    0xb0, 0x80,                      // 0015: mov al,0x80
    0xee,                            // 0017: out dx,al
    0xba, 0xf8, 0x03,                // 0018: mov dx,0x3f8
    0xb0, 0x01,                      // 001b: mov al,0x1
    0xee,                            // 001d: out dx,al
    0xba, 0xf9, 0x03,                // 001e: mov dx,0x3f9
    0x30, 0xc0,                      // 0021: xor al,al
    0xee,                            // 0023: out dx,al
    0xba, 0xfb, 0x03,                // 0024: mov dx,0x3fb
    0xb0, 0x03,                      // 0027: mov al,0x3
    0xee,                            // 0029: out dx,al
    0xba, 0xfa, 0x03,                // 002a: mov dx,0x3fa
    0xb0, 0xc7,                      // 002d: mov al,0xc7
    0xee,                            // 002f: out dx,al
    0xba, 0xfc, 0x03,                // 0030: mov dx,0x3fc
    0xb0, 0x03,                      // 0033: mov al,0x3
    0xee,                            // 0035: out dx,al
    0xbe, 0x81, 0x7c,                // 0036: mov si,0x7c81
    0xac,                            // 0039: lods al,BYTE PTR ds:[si]
    0x84, 0xc0,                      // 003a: test al,al
    0x74, 0x05,                      // 003c: je 0x43
    0xe8, 0x2f, 0x00,                // 003e: call 0x70
    0xeb, 0xf6,                      // 0041: jmp 0x39
    0x8b, 0x1e, 0x6c, 0x04,          // 0043: mov bx,WORD PTR ds:0x46c
    0xba, 0xfd, 0x03,                // 0047: mov dx,0x3fd
    0xec,                            // 004a: in al,dx
    0xa8, 0x01,                      // 004b: test al,0x1
    0x75, 0x0d,                      // 004d: jne 0x5c
    0xf4,                            // 004f: hlt
    0xa1, 0x6c, 0x04,                // 0050: mov ax,ds:0x46c
    0x29, 0xd8,                      // 0053: sub ax,bx
    0x83, 0xf8, 0x04,                // 0055: cmp ax,0x4
    0x72, 0xed,                      // 0058: jb 0x47
    0xeb, 0xda,                      // 005a: jmp 0x36
    0xba, 0xfd, 0x03,                // 005c: mov dx,0x3fd
    0xec,                            // 005f: in al,dx
    0xa8, 0x01,                      // 0060: test al,0x1
    0x75, 0x03,                      // 0062: jne 0x67
    0xf4,                            // 0064: hlt
    0xeb, 0xf5,                      // 0065: jmp 0x5c
    0xba, 0xf8, 0x03,                // 0067: mov dx,0x3f8
    0xec,                            // 006a: in al,dx
    0xe8, 0x02, 0x00,                // 006b: call 0x70
    0xeb, 0xec,                      // 006e: jmp 0x5c
    0x88, 0xc4,                      // 0070: mov ah,al
    0xba, 0xfd, 0x03,                // 0072: mov dx,0x3fd
    0xec,                            // 0075: in al,dx
    0xa8, 0x20,                      // 0076: test al,0x20
    0x74, 0xfb,                      // 0078: je 0x75
    0xba, 0xf8, 0x03,                // 007a: mov dx,0x3f8
    0x88, 0xe0,                      // 007d: mov al,ah
    0xee,                            // 007f: out dx,al
    0xc3,                            // 0080: ret
];

/// The 512-byte boot sector: code, NUL-terminated banner, zero padding, 55 AA.
pub fn boot_image() -> Vec<u8> {
    let mut img = Vec::with_capacity(512);
    img.extend_from_slice(BOOT_CODE);
    img.extend_from_slice(SERIAL_BANNER);
    img.push(0);
    img.resize(510, 0);
    img.extend_from_slice(&[0x55, 0xaa]);
    img
}

/// Where a QEMU socket listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    pub async fn connect(&self) -> anyhow::Result<BoxIo> {
        Ok(match self {
            Endpoint::Tcp(a) => Box::new(crate::net::tcp(*a).await?),
            Endpoint::Unix(p) => Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .with_context(|| format!("connecting to {}", p.display()))?,
            ),
        })
    }

    /// The target as written in a websockify token file.
    pub fn websockify_target(&self) -> String {
        match self {
            Endpoint::Tcp(a) => crate::net::authority(*a),
            Endpoint::Unix(p) => format!("unix_socket:{}", p.display()),
        }
    }

    pub fn tcp(&self) -> SocketAddr {
        match self {
            Endpoint::Tcp(a) => *a,
            Endpoint::Unix(p) => panic!("endpoint {} is not TCP", p.display()),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sock {
    /// Loopback TCP on 127.0.0.1.
    #[default]
    Tcp,
    /// Loopback TCP on [::1] (VNC only).
    Tcp6,
    Unix,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct QemuOptions {
    pub vnc: Sock,
    /// The serial chardev always exists (it tells us the guest is up); this
    /// chooses whether it listens on loopback TCP or a UNIX socket.
    pub serial: Sock,
    /// Also run a SPICE server (no ticketing) on loopback TCP.
    pub spice: bool,
}

#[derive(Debug)]
pub struct Qemu {
    child: ChildGuard,
    pub vnc: Endpoint,
    pub serial: Endpoint,
    pub spice: Option<SocketAddr>,
    dir: tempfile::TempDir,
}

impl Qemu {
    pub async fn start(opts: QemuOptions) -> anyhow::Result<Self> {
        Self::start_ext(opts, None).await
    }

    /// A guest with a QMP socket ([`Qemu::qmp`]) that can be migrated; with
    /// `incoming`, a paused migration destination listening on
    /// `tcp:127.0.0.1:<port>` (its guest runs once a migration arrives, so
    /// no serial banner is awaited).
    pub async fn start_migratable(
        opts: QemuOptions,
        incoming: Option<u16>,
    ) -> anyhow::Result<Self> {
        Self::start_ext(opts, Some(incoming)).await
    }

    /// The QMP socket (only for [`Qemu::start_migratable`] guests).
    pub fn qmp(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    async fn start_ext(opts: QemuOptions, migratable: Option<Option<u16>>) -> anyhow::Result<Self> {
        let mut last_err = None;
        for _attempt in 0..5 {
            match Self::try_start(opts, migratable).await {
                Ok(q) => return Ok(q),
                Err(e) => {
                    eprintln!("QEMU start attempt failed: {e:#}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("QEMU did not start")))
    }

    async fn try_start(opts: QemuOptions, migratable: Option<Option<u16>>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cg-qemu-").tempdir()?;
        let img = dir.path().join("boot.img");
        std::fs::write(&img, boot_image())?;

        let (vnc, vnc_arg) = match opts.vnc {
            Sock::Tcp => {
                let port = free_port()?;
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                (Endpoint::Tcp(addr), format!("127.0.0.1:{}", port - 5900))
            }
            Sock::Tcp6 => {
                let port = free_port_on(Ipv6Addr::LOCALHOST.into())?;
                let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
                (Endpoint::Tcp(addr), format!("[::1]:{}", port - 5900))
            }
            Sock::Unix => {
                let p = dir.path().join("vnc.sock");
                let arg = format!("unix:{}", p.display());
                (Endpoint::Unix(p), arg)
            }
        };
        let (serial, chardev) = match opts.serial {
            Sock::Tcp | Sock::Tcp6 => {
                let port = free_port()?;
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                (
                    Endpoint::Tcp(addr),
                    format!("socket,id=ser0,host=127.0.0.1,port={port},server=on,wait=off"),
                )
            }
            Sock::Unix => {
                let p = dir.path().join("serial.sock");
                let arg = format!("socket,id=ser0,path={},server=on,wait=off", p.display());
                (Endpoint::Unix(p), arg)
            }
        };

        let spice = if opts.spice {
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)))
        } else {
            None
        };

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-vga",
            "std",
            "-display",
            "none",
        ])
        .args(["-vnc", &vnc_arg])
        .args(["-m", "64", "-smp", "1", "-no-reboot"])
        .args(["-chardev", &chardev, "-serial", "chardev:ser0"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=floppy", img.display()));
        if let Some(a) = spice {
            cmd.arg("-spice").arg(format!(
                "port={},addr=127.0.0.1,disable-ticketing=on",
                a.port()
            ));
        }
        let incoming = migratable.flatten();
        if migratable.is_some() {
            let qmp = dir.path().join("qmp.sock");
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        if let Some(port) = incoming {
            cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        let mut child = ChildGuard::spawn("qemu", cmd)?;

        let ready = async {
            if incoming.is_some() {
                wait_accepting(&vnc, &mut child).await?;
                return anyhow::Ok(());
            }
            wait_accepting(&vnc, &mut child).await?;
            wait_accepting(&serial, &mut child).await?;
            if let Some(a) = spice {
                wait_accepting(&Endpoint::Tcp(a), &mut child).await?;
            }
            let mut s = serial.connect().await?;
            read_until(&mut s, SERIAL_BANNER).await?;
            anyhow::Ok(())
        };
        crate::within("QEMU boot (VNC socket + serial banner)", ready).await??;
        Ok(Self {
            child,
            vnc,
            serial,
            spice,
            dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

async fn wait_accepting(ep: &Endpoint, child: &mut ChildGuard) -> anyhow::Result<()> {
    loop {
        if let Some(st) = child.exited() {
            child.drain_output();
            anyhow::bail!(
                "QEMU exited ({st}) before {ep:?} accepted: {}",
                child.output()
            );
        }
        let ok = match ep {
            Endpoint::Tcp(a) => tokio::net::TcpStream::connect(a).await.is_ok(),
            Endpoint::Unix(p) => tokio::net::UnixStream::connect(p).await.is_ok(),
        };
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads from `s` until `needle` has been seen; returns everything read.
pub async fn read_until<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    needle: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let fut = async {
        loop {
            if crate::contains(&buf, needle) {
                return anyhow::Ok(());
            }
            let n = s.read(&mut chunk).await?;
            anyhow::ensure!(
                n > 0,
                "EOF before {:?}; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    crate::within("reading serial data", fut).await??;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed machine code is what `boot.S` assembles to.
    #[test]
    fn boot_code_matches_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/boot.S");
        let obj = dir.path().join("boot.o");
        let bin = dir.path().join("boot.bin");
        let st = Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
            .expect("binutils `as` is required to check the boot sector");
        assert!(st.success());
        let st = Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .expect("binutils `objcopy` is required");
        assert!(st.success());
        let assembled = std::fs::read(&bin).unwrap();
        assert_eq!(assembled, boot_image());
    }
}
