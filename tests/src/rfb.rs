//! A minimal RFB (RFC 6143) client: version 3.8, security None, shared
//! ClientInit, 32 bpp true-colour, Raw encoding, and one full non-incremental
//! framebuffer update that must cover the whole ServerInit-sized screen.
//! Works over any `AsyncRead + AsyncWrite` (direct to QEMU, a CONNECT
//! tunnel, or a WebSocket byte adapter).

use std::collections::HashSet;

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

#[derive(Clone, Debug)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub pixel_format: [u8; 16],
    pub name: String,
    /// The security types the server offered (3.7/3.8), or the one it chose (3.3).
    pub security_types: Vec<u8>,
}

/// What one full framebuffer update looked like.
#[derive(Clone, Debug)]
pub struct Framebuffer {
    pub width: u16,
    pub height: u16,
    pub rects: usize,
    /// Sum over Raw rectangles of w*h*4 (exactly what was read).
    pub pixel_bytes: usize,
    /// Distinct 32-bit pixel values seen (capped at 4096).
    pub distinct_colours: usize,
    /// FNV-1a hash of each pixel row as last drawn (to compare screens).
    pub row_hashes: Vec<u64>,
}

impl Framebuffer {
    /// Rows whose pixels differ between two screens of the same size.
    pub fn rows_differing(&self, other: &Framebuffer) -> usize {
        self.row_hashes
            .iter()
            .zip(&other.row_hashes)
            .filter(|(a, b)| a != b)
            .count()
            + self.row_hashes.len().abs_diff(other.row_hashes.len())
    }
}

/// The DesktopSize pseudo-encoding (RFC 6143 7.8.2).
const DESKTOP_SIZE: i32 = -223;

/// Pixel format we ask for: 32 bpp, depth 24, little-endian, true colour,
/// 8 bits per channel, red at bit 16.
pub const PIXEL_FORMAT_32: [u8; 16] = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];

/// RFB 3.8 handshake up to and including ServerInit.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> anyhow::Result<ServerInit> {
    handshake_as(s, 8).await
}

/// Handshake as an RFB 3.`minor` client (3, 7 or 8), security None, up to
/// and including ServerInit.
pub async fn handshake_as<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    minor: u32,
) -> anyhow::Result<ServerInit> {
    ensure!([3, 7, 8].contains(&minor), "RFB 3.{minor} is not a version");
    let mut version = [0u8; 12];
    s.read_exact(&mut version)
        .await
        .context("reading ProtocolVersion")?;
    ensure!(
        version.starts_with(b"RFB 003.") && version[11] == b'\n',
        "not an RFB server: {:?}",
        String::from_utf8_lossy(&version)
    );
    let server_minor: u32 = std::str::from_utf8(&version[8..11])?.parse()?;
    ensure!(
        server_minor >= 8,
        "server speaks RFB 3.{server_minor}, want 3.8"
    );
    s.write_all(format!("RFB 003.{minor:03}\n").as_bytes())
        .await?;

    let security_types = if minor == 3 {
        // 3.3: the server decides and sends one u32 type.
        let t = s.read_u32().await.context("reading 3.3 security type")?;
        if t == 0 {
            bail!("server refused: {}", read_reason(s).await?);
        }
        ensure!(t == 1, "3.3 security type {t}, expected None (1)");
        vec![1]
    } else {
        let n = s.read_u8().await.context("reading security types")?;
        if n == 0 {
            bail!("server refused: {}", read_reason(s).await?);
        }
        let mut types = vec![0u8; usize::from(n)];
        s.read_exact(&mut types).await?;
        ensure!(
            types.contains(&1),
            "security type None not offered: {types:?}"
        );
        s.write_all(&[1]).await?;
        // 3.7 sends no SecurityResult for None; 3.8 always does.
        if minor == 8 {
            let result = s.read_u32().await.context("reading SecurityResult")?;
            if result != 0 {
                bail!("security handshake failed: {}", read_reason(s).await?);
            }
        }
        types
    };

    s.write_all(&[1]).await?; // ClientInit, shared
    let width = s.read_u16().await.context("reading ServerInit")?;
    let height = s.read_u16().await?;
    let mut pixel_format = [0u8; 16];
    s.read_exact(&mut pixel_format).await?;
    let name_len = s.read_u32().await?;
    ensure!(name_len < 4096, "absurd desktop name length {name_len}");
    let mut name = vec![0u8; name_len as usize];
    s.read_exact(&mut name).await?;
    ensure!(width > 0 && height > 0, "empty screen {width}x{height}");
    Ok(ServerInit {
        width,
        height,
        pixel_format,
        name: String::from_utf8_lossy(&name).into_owned(),
        security_types,
    })
}

async fn read_reason<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let len = s.read_u32().await?;
    ensure!(len < 65536, "absurd reason length");
    let mut r = vec![0u8; len as usize];
    s.read_exact(&mut r).await?;
    Ok(String::from_utf8_lossy(&r).into_owned())
}

/// SetPixelFormat (32 bpp), SetEncodings [Raw], then non-incremental
/// full-screen FramebufferUpdateRequests until Raw rectangles have covered
/// every pixel of the ServerInit-sized screen.
///
/// The client also announces the DesktopSize pseudo-encoding, as noVNC does:
/// a guest that is still switching video modes (SeaBIOS at boot, slowed by a
/// loaded machine) resizes the screen mid-update, and the client then starts
/// over at the new size, which it records in `init`.
pub async fn full_update<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    init: &mut ServerInit,
) -> anyhow::Result<Framebuffer> {
    let (mut w, mut h) = (init.width, init.height);
    let mut msg = vec![0u8, 0, 0, 0];
    msg.extend_from_slice(&PIXEL_FORMAT_32);
    s.write_all(&msg).await?;
    // SetEncodings: [Raw, DesktopSize (-223)]
    let mut enc = vec![2u8, 0, 0, 2];
    enc.extend_from_slice(&0i32.to_be_bytes());
    enc.extend_from_slice(&DESKTOP_SIZE.to_be_bytes());
    s.write_all(&enc).await?;
    request(s, w, h).await?;

    let mut covered = vec![false; usize::from(w) * usize::from(h)];
    let mut uncovered = covered.len();
    let mut rects = 0usize;
    let mut pixel_bytes = 0usize;
    let mut colours: HashSet<u32> = HashSet::new();
    let mut pixels = vec![0u32; covered.len()];
    let mut row = Vec::new();
    while uncovered > 0 {
        let kind = s.read_u8().await.context("reading server message")?;
        match kind {
            0 => {
                let _pad = s.read_u8().await?;
                let n = s.read_u16().await?;
                for _ in 0..n {
                    let rx = s.read_u16().await?;
                    let ry = s.read_u16().await?;
                    let rw = s.read_u16().await?;
                    let rh = s.read_u16().await?;
                    let enc = s.read_i32().await?;
                    if enc == DESKTOP_SIZE {
                        eprintln!("rfb: the screen was resized from {w}x{h} to {rw}x{rh}");
                        ensure!(rw > 0 && rh > 0, "resized to an empty screen");
                        (w, h) = (rw, rh);
                        (init.width, init.height) = (w, h);
                        covered = vec![false; usize::from(w) * usize::from(h)];
                        uncovered = covered.len();
                        (rects, pixel_bytes) = (0, 0);
                        colours.clear();
                        continue;
                    }
                    ensure!(
                        enc == 0,
                        "rectangle with encoding {enc}, only Raw was asked for"
                    );
                    ensure!(
                        u32::from(rx) + u32::from(rw) <= u32::from(w)
                            && u32::from(ry) + u32::from(rh) <= u32::from(h),
                        "rectangle {rw}x{rh}+{rx}+{ry} outside the {w}x{h} screen"
                    );
                    rects += 1;
                    row.resize(usize::from(rw) * 4, 0);
                    for y in ry..ry + rh {
                        s.read_exact(&mut row).await.context("reading Raw pixels")?;
                        pixel_bytes += row.len();
                        for (i, px) in row.chunks_exact(4).enumerate() {
                            let idx = usize::from(y) * usize::from(w) + usize::from(rx) + i;
                            pixels[idx] =
                                u32::from_le_bytes([px[0], px[1], px[2], px[3]]) & 0xff_ffff;
                            if !covered[idx] {
                                covered[idx] = true;
                                uncovered -= 1;
                            }
                            if colours.len() < 4096 {
                                colours.insert(u32::from_le_bytes([px[0], px[1], px[2], px[3]]));
                            }
                        }
                    }
                }
                if uncovered > 0 {
                    request(s, w, h).await?;
                }
            }
            1 => {
                let mut hdr = [0u8; 5];
                s.read_exact(&mut hdr).await?;
                let count = u16::from_be_bytes([hdr[3], hdr[4]]);
                let mut entries = vec![0u8; usize::from(count) * 6];
                s.read_exact(&mut entries).await?;
            }
            2 => {} // Bell
            3 => {
                let mut pad = [0u8; 3];
                s.read_exact(&mut pad).await?;
                let len = s.read_u32().await?;
                ensure!(len < 1 << 20, "absurd cut text length");
                let mut text = vec![0u8; len as usize];
                s.read_exact(&mut text).await?;
            }
            other => bail!("unexpected server message type {other}"),
        }
    }
    ensure!(rects > 0, "no rectangles");
    ensure!(
        pixel_bytes >= usize::from(w) * usize::from(h) * 4,
        "read {pixel_bytes} pixel bytes for a {w}x{h} screen"
    );
    Ok(Framebuffer {
        width: w,
        height: h,
        rects,
        pixel_bytes,
        distinct_colours: colours.len(),
        row_hashes: pixels
            .chunks(usize::from(w).max(1))
            .map(|r| {
                r.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, p| {
                    (h ^ u64::from(*p)).wrapping_mul(0x100_0000_01b3)
                })
            })
            .collect(),
    })
}

async fn request<S: AsyncWrite + Unpin>(s: &mut S, w: u16, h: u16) -> anyhow::Result<()> {
    let mut m = vec![3u8, 0, 0, 0, 0, 0];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    s.write_all(&m).await?;
    s.flush().await?;
    Ok(())
}

/// Handshake + full update, bounded by the step timeout; checks the screen
/// is the SeaBIOS text console (not a single flat colour).
pub async fn check_session<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> anyhow::Result<(ServerInit, Framebuffer)> {
    crate::within("RFB handshake and full framebuffer update", async {
        let mut init = handshake(s).await?;
        let fb = full_update(s, &mut init).await?;
        ensure!(
            fb.distinct_colours > 1,
            "framebuffer is one flat colour; expected the guest's text console"
        );
        anyhow::Ok((init, fb))
    })
    .await?
}
