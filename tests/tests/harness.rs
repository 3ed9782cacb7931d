//! Self-tests of the harness against real peers, without the proxy: if
//! these fail, the proxy tests cannot be trusted.

use consolegate_tests::qemu::{Qemu, QemuOptions, SERIAL_BANNER, Sock, read_until};
use consolegate_tests::{fake, rfb};
use tokio::io::AsyncWriteExt as _;

#[tokio::test]
async fn rfb_client_against_qemu_vnc_over_tcp() {
    let qemu = Qemu::start(QemuOptions::default()).await.unwrap();
    let mut io = qemu.vnc.connect().await.unwrap();
    let (init, fb) = rfb::check_session(&mut io).await.unwrap();
    // SeaBIOS leaves the VGA in 80x25 text mode: 720x400.
    assert_eq!((init.width, init.height), (720, 400), "{init:?}");
    assert_eq!((fb.width, fb.height), (init.width, init.height));
    assert!(fb.pixel_bytes >= 720 * 400 * 4);
}

#[tokio::test]
async fn rfb_client_against_qemu_vnc_over_unix_socket() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let mut io = qemu.vnc.connect().await.unwrap();
    let (init, fb) = rfb::check_session(&mut io).await.unwrap();
    assert_eq!((fb.width, fb.height), (init.width, init.height));
}

#[tokio::test]
async fn guest_serial_banner_and_echo_over_tcp_chardev() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Tcp,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let mut s = qemu.serial.connect().await.unwrap();
    read_until(&mut s, SERIAL_BANNER).await.unwrap();
    let probe = format!("echo-{:08x}", rand::random::<u32>());
    s.write_all(probe.as_bytes()).await.unwrap();
    read_until(&mut s, probe.as_bytes()).await.unwrap();
}

#[test]
fn blackhole_swallows_dials() {
    let b = fake::Blackhole::new().unwrap();
    b.verify().unwrap();
}

/// QEMU serves several shared RFB clients at once; the bad-input tests rely
/// on it (hostile sessions next to a healthy one on the same VM).
#[tokio::test]
async fn qemu_serves_concurrent_shared_vnc_clients() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Tcp,
        serial: Sock::Unix,
        ..QemuOptions::default()
    })
    .await
    .unwrap();
    let mut idle = qemu.vnc.connect().await.unwrap();
    let mut version = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut idle, &mut version)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        async {
            let mut io = qemu.vnc.connect().await?;
            rfb::check_session(&mut io).await
        },
        async {
            let mut io = qemu.vnc.connect().await?;
            rfb::check_session(&mut io).await
        }
    );
    a.unwrap();
    b.unwrap();
    drop(idle);
}

#[tokio::test]
async fn spice_link_handshake_against_qemu() {
    let qemu = Qemu::start(QemuOptions {
        vnc: Sock::Unix,
        serial: Sock::Unix,
        spice: true,
    })
    .await
    .unwrap();
    let mut io = consolegate_tests::net::tcp(qemu.spice.unwrap())
        .await
        .unwrap();
    let reply = consolegate_tests::within(
        "SPICE link",
        consolegate_tests::spice::link_main_channel(&mut io),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(reply.error, 0, "{reply:?}");
}

/// The 3.3 and 3.7 handshake forms, against QEMU itself.
#[tokio::test]
async fn rfb_client_old_versions_against_qemu() {
    let qemu = Qemu::start(QemuOptions::default()).await.unwrap();
    for minor in [3, 7] {
        let mut io = qemu.vnc.connect().await.unwrap();
        let mut init = consolegate_tests::within("handshake", rfb::handshake_as(&mut io, minor))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("RFB 3.{minor}: {e:#}"));
        rfb::full_update(&mut io, &mut init).await.unwrap();
    }
}
