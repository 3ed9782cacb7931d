//! Common set-ups: a QEMU guest behind a freshly started proxy with a token
//! file naming it.

use std::path::PathBuf;

use crate::proxy::{Proxy, ProxySpec, write_websockify_tokens};
use crate::qemu::{Qemu, QemuOptions, Sock};

#[derive(Debug)]
pub struct VncBehindProxy {
    pub qemu: Qemu,
    pub proxy: Proxy,
    pub token: String,
    pub token_file: PathBuf,
    pub dir: tempfile::TempDir,
}

/// A temp dir for token files.
pub fn token_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cg-tokens-")
        .tempdir()
        .expect("temp dir")
}

/// QEMU (VNC on `vnc`) + a websockify token file with one random token for
/// it + a proxy started from `spec` (its token files replaced by ours).
pub async fn vnc_behind_proxy(vnc: Sock, mut spec: ProxySpec) -> anyhow::Result<VncBehindProxy> {
    let qemu = Qemu::start(QemuOptions {
        vnc,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await?;
    let dir = token_dir();
    let token = crate::random_token();
    let token_file = dir.path().join("tokens");
    write_websockify_tokens(&token_file, &[(&token, qemu.vnc.websockify_target())])?;
    spec.token_files = vec![token_file.clone()];
    let proxy = Proxy::start(spec).await?;
    Ok(VncBehindProxy {
        qemu,
        proxy,
        token,
        token_file,
        dir,
    })
}
