//! The tenant-side TLS accept (`tls_stream::ServerTls`, rustls's unbuffered
//! connection with our buffers) over bytes from a hostile client. The
//! first byte picks how the rest arrives: in pieces of 1 to 64 bytes, with
//! a `Pending` between pieces or not. What the proxy sends back is
//! discarded.
//!
//! Invariants: no panic (rustls panics if the buffer it is handed breaks
//! its rules, so this checks our discard and growth handling); the accept
//! ends (error, or end of input) once the input is used up.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use consolegate::tls_stream::ServerTls;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

struct Script<'a> {
    rest: &'a [u8],
    piece: usize,
    stall: bool,
    stalled: bool,
}

impl AsyncRead for Script<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.stall && !self.stalled && !self.rest.is_empty() {
            self.stalled = true;
            return Poll::Pending;
        }
        self.stalled = false;
        let n = self.piece.min(self.rest.len()).min(buf.remaining());
        buf.put_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .unwrap();
        Arc::new(cfg)
    }))
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, input)) = data.split_first() else {
        return;
    };
    let io = Script {
        rest: input,
        piece: usize::from(how & 63) + 1,
        stall: how & 64 != 0,
        stalled: false,
    };
    let mut accept = Box::pin(ServerTls::accept(config(), io));
    let mut cx = Context::from_waker(Waker::noop());
    // Every poll takes a piece or stalls once, so the input runs out.
    for _ in 0..=2 * input.len() + 2 {
        if accept.as_mut().poll(&mut cx).is_ready() {
            return;
        }
    }
    panic!("the accept neither ended nor failed once the input ran out");
});
