//! The same stream over a blocking transport (`std::io::Read + Write`),
//! for the load generator's threads: rustls's buffered connection reads
//! at most 4 KiB per call and grows and shrinks its buffer for every
//! record, which made the client, not the proxy, the limit of TLS bulk
//! runs.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use tokio::io::ReadBuf;

use super::{ClientTls, Side, Stop, TlsStream, tls_error};

impl<IO: Read + Write> ClientTls<IO> {
    /// Connects as a TLS client to `name` over a blocking `io`.
    pub fn connect_blocking(
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
        io: IO,
    ) -> io::Result<Self> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        let mut s = Self::new(io, conn);
        loop {
            let stop = s.process(None, None, false);
            s.write_out_blocking()?;
            match stop? {
                Stop::Open(_) => return Ok(s),
                Stop::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS connection closed during the handshake",
                    ));
                }
                Stop::Read => {
                    if s.fill_blocking()? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection during the TLS handshake",
                        ));
                    }
                }
            }
        }
    }
}

impl<IO: Read + Write, C: Side> TlsStream<IO, C> {
    fn fill_blocking(&mut self) -> io::Result<usize> {
        self.make_room()?;
        let n = self.io.read(&mut self.incoming[self.in_len..])?;
        self.in_len += n;
        Ok(n)
    }

    fn write_out_blocking(&mut self) -> io::Result<()> {
        while !self.pending_out().is_empty() {
            let n = self.io.write(&self.outgoing[self.out_at..])?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wrote_out(n);
        }
        Ok(())
    }
}

impl<IO: Read + Write, C: Side> Read for TlsStream<IO, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        if rb.remaining() == 0 {
            return Ok(0);
        }
        loop {
            if self.take_plain(&mut rb) {
                return Ok(rb.filled().len());
            }
            let stop = self.process(Some(&mut rb), None, false);
            // Key update answers and alerts go out at once.
            self.write_out_blocking()?;
            let stop = stop?;
            if !rb.filled().is_empty() {
                return Ok(rb.filled().len());
            }
            if self.plain_at < self.plain.len() {
                continue;
            }
            if matches!(stop, Stop::Closed) || self.peer_closed {
                return Ok(0);
            }
            if self.eof {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without sending TLS close_notify",
                ));
            }
            if self.fill_blocking()? == 0 {
                self.eof = true;
            }
        }
    }
}

impl<IO: Read + Write, C: Side> Write for TlsStream<IO, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let stop = self.process(None, Some(buf), false);
        self.write_out_blocking()?;
        match stop? {
            Stop::Open(n) => Ok(n),
            Stop::Read | Stop::Closed => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection can no longer carry data",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_out_blocking()?;
        self.io.flush()
    }
}
