//! The first step of the SPICE protocol (spice-protocol `protocol.h`): the
//! client's SpiceLinkHeader + SpiceLinkMess for the main channel, and the
//! server's SpiceLinkHeader + SpiceLinkReply. Enough to prove a real SPICE
//! server answered through the proxy.

use anyhow::{Context as _, ensure};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const MAGIC: &[u8; 4] = b"REDQ";
const MAJOR: u32 = 2;
const MINOR: u32 = 2;
const CHANNEL_MAIN: u8 = 1;

#[derive(Clone, Debug)]
pub struct LinkReply {
    pub major: u32,
    pub minor: u32,
    pub error: u32,
    pub num_common_caps: u32,
    pub num_channel_caps: u32,
}

/// Sends a main-channel link request and reads the server's link reply.
pub async fn link_main_channel<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> anyhow::Result<LinkReply> {
    let mut mess = Vec::new();
    mess.extend_from_slice(&0u32.to_le_bytes()); // connection_id: new session
    mess.push(CHANNEL_MAIN);
    mess.push(0); // channel_id
    mess.extend_from_slice(&0u32.to_le_bytes()); // num_common_caps
    mess.extend_from_slice(&0u32.to_le_bytes()); // num_channel_caps
    mess.extend_from_slice(&18u32.to_le_bytes()); // caps_offset (= size of this struct)
    let mut msg = Vec::new();
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(&MAJOR.to_le_bytes());
    msg.extend_from_slice(&MINOR.to_le_bytes());
    msg.extend_from_slice(&(mess.len() as u32).to_le_bytes());
    msg.extend_from_slice(&mess);
    s.write_all(&msg).await?;
    s.flush().await?;

    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr)
        .await
        .context("reading SpiceLinkHeader")?;
    ensure!(
        &hdr[0..4] == MAGIC,
        "not a SPICE server: {:02x?}",
        &hdr[0..4]
    );
    let le = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let (major, minor, size) = (le(&hdr[4..8]), le(&hdr[8..12]), le(&hdr[12..16]));
    ensure!(major == MAJOR, "SPICE major version {major}");
    ensure!(
        (4 + 162 + 12..1 << 16).contains(&size),
        "absurd link reply size {size}"
    );
    let mut body = vec![0u8; size as usize];
    s.read_exact(&mut body)
        .await
        .context("reading SpiceLinkReply")?;
    Ok(LinkReply {
        major,
        minor,
        error: le(&body[0..4]),
        num_common_caps: le(&body[166..170]),
        num_channel_caps: le(&body[170..174]),
    })
}
