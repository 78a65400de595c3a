//! A minimal NBD client for tests on the Unix socket, negotiating with
//! `proto`'s sans-IO [`ClientHandshake`]: `NBD_OPT_GO`, simple replies, one
//! request at a time, so the outcome of every request is known exactly.
//! (The protocol abuse tests write raw bytes on purpose.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::{BufMut, BytesMut};
use proto::client::{ClientHandshake, ClientStep};
use proto::consts::{tflags, SIMPLE_REPLY_MAGIC};

/// One negotiated connection.
pub struct NbdConn {
    s: UnixStream,
    cookie: u64,
    /// Export size from the negotiation.
    pub size: u64,
    /// Transmission flags from the negotiation.
    pub flags: u16,
}

impl NbdConn {
    /// Connects to `socket` and opens `export` (replies wait at most 90 s).
    pub fn connect(socket: &Path, export: &str) -> Result<NbdConn> {
        let mut s = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(90)))?;
        let mut handshake = ClientHandshake::new(export, false, false);
        let (mut input, mut out) = (BytesMut::new(), BytesMut::new());
        loop {
            let step = handshake.handle(&mut input, &mut out).with_context(|| format!("open export {export}"))?;
            s.write_all(&out)?;
            out.clear();
            match step {
                ClientStep::Done(n) => return Ok(NbdConn { s, cookie: 1, size: n.size, flags: n.flags }),
                ClientStep::StartTls => bail!("the test client speaks no TLS"),
                ClientStep::NeedMore => {
                    let mut buf = [0u8; 4096];
                    let got = s.read(&mut buf)?;
                    ensure!(got > 0, "the server closed the connection during negotiation");
                    input.extend_from_slice(&buf[..got]);
                }
            }
        }
    }

    /// The export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & tflags::READ_ONLY != 0
    }

    /// Sends one request; returns the reply's NBD errno.
    pub fn request(&mut self, command: proto::Command, offset: u64, length: u32, payload: &[u8]) -> Result<u32> {
        self.cookie += 1;
        let mut out = BytesMut::with_capacity(28 + payload.len());
        proto::Request { cookie: self.cookie, command, flags: 0, offset, length }.encode(&mut out);
        out.put_slice(payload);
        self.s.write_all(&out)?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[0..4].try_into()?);
        let err = u32::from_be_bytes(reply[4..8].try_into()?);
        let cookie = u64::from_be_bytes(reply[8..16].try_into()?);
        ensure!(magic == SIMPLE_REPLY_MAGIC && cookie == self.cookie, "bad reply {reply:?}");
        Ok(err)
    }

    /// Writes; returns the NBD errno (0 = acknowledged).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<u32> {
        let length = u32::try_from(data.len()).context("write too large")?;
        self.request(proto::Command::Write, offset, length, data)
    }

    /// Writes; fails unless acknowledged.
    pub fn write_ok(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let err = self.write(offset, data)?;
        ensure!(err == 0, "write of {} bytes at {offset} failed: NBD errno {err}", data.len());
        Ok(())
    }

    /// Reads; the data, or the NBD errno.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<std::result::Result<Vec<u8>, u32>> {
        let err = self.request(proto::Command::Read, offset, length, &[])?;
        if err != 0 {
            return Ok(Err(err));
        }
        let mut buf = vec![0u8; length as usize];
        self.s.read_exact(&mut buf)?;
        Ok(Ok(buf))
    }

    /// Flushes; fails unless acknowledged.
    pub fn flush(&mut self) -> Result<()> {
        let err = self.request(proto::Command::Flush, 0, 0, &[])?;
        ensure!(err == 0, "flush failed: NBD errno {err}");
        Ok(())
    }
}
