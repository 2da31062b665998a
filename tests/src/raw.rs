//! TLS and MQTT at the byte level, for refusals a client library would not
//! let a test provoke (plaintext on the TLS port, a TLS 1.2-only client, ...).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{WAIT, loopback_name};

/// How an attempt to open an MQTT session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The TLS handshake failed (or the server's alert arrived first).
    Refused(String),
    /// A CONNACK with this return (v3.1.1) or reason (v5) code.
    ConnAck(u8),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        *self == Outcome::ConnAck(0)
    }
}

fn remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn connect_packet(client_id: &str, level: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 30];
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(&body);
    packet
}

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 30 s).
pub fn connect_v4(client_id: &str) -> Vec<u8> {
    connect_packet(client_id, 4)
}

/// An MQTT 5 CONNECT with no properties.
pub fn connect_v5(client_id: &str) -> Vec<u8> {
    connect_packet(client_id, 5)
}

/// Sends `connect` and reads the CONNACK's code, or how the connection ended.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, connect: &[u8]) -> Outcome {
    if let Err(e) = s.write_all(connect).await {
        return Outcome::Refused(format!("write: {e}"));
    }
    let _ = s.flush().await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if buf.len() >= 4 && buf[0] == 0x20 {
            return Outcome::ConnAck(buf[3]);
        }
        if !buf.is_empty() && buf[0] != 0x20 {
            return Outcome::Refused(format!("not a CONNACK: {:02x?}", &buf[..buf.len().min(8)]));
        }
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(0)) => return Outcome::Refused("closed without CONNACK".into()),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Outcome::Refused(format!("read: {e}")),
            Err(_) => return Outcome::Refused("no answer in time".into()),
        }
    }
}

/// TLS with `config`, then `connect`.
pub async fn try_connect(addr: SocketAddr, config: Arc<ClientConfig>, connect: &[u8]) -> Outcome {
    let tcp = match TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return Outcome::Refused(format!("tcp: {e}")),
    };
    match TlsConnector::from(config)
        .connect(loopback_name(), tcp)
        .await
    {
        Ok(tls) => exchange(tls, connect).await,
        Err(e) => Outcome::Refused(format!("tls: {e}")),
    }
}

/// Plain TCP, no TLS, then `connect`.
pub async fn try_plaintext(addr: SocketAddr, connect: &[u8]) -> Outcome {
    match TcpStream::connect(addr).await {
        Ok(tcp) => exchange(tcp, connect).await,
        Err(e) => Outcome::Refused(format!("tcp: {e}")),
    }
}

/// An MQTT CONNECT at `level` (4 or 5) with the given keep-alive.
pub fn connect_with_keepalive(client_id: &str, level: u8, keep_alive: u16) -> Vec<u8> {
    let mut packet = connect_packet(client_id, level);
    // Keep-alive sits after the 2-byte remaining length (short packets), the
    // protocol name (6), level (1) and flags (1).
    packet[10..12].copy_from_slice(&keep_alive.to_be_bytes());
    packet
}

fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut packet = vec![byte1];
    remaining_length(body.len(), &mut packet);
    packet.extend_from_slice(body);
    packet
}

/// A PUBLISH; `pkid` is used for QoS 1 and 2.
pub fn publish_packet(topic: &str, payload: &[u8], qos: u8, pkid: u16, v5: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

/// A SUBSCRIBE for one filter.
pub fn subscribe_packet(pkid: u16, filter: &str, qos: u8, v5: bool) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    frame(0x82, &body)
}

/// A live session after a successful CONNACK, at the byte level.
pub struct Session {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Session {
    /// TLS, CONNECT, and a successful CONNACK, or an error saying what happened.
    pub async fn open(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
        connect: &[u8],
    ) -> anyhow::Result<Session> {
        let tcp = TcpStream::connect(addr).await?;
        let stream = TlsConnector::from(config)
            .connect(loopback_name(), tcp)
            .await?;
        let mut session = Session {
            stream,
            buf: Vec::new(),
        };
        session.stream.write_all(connect).await?;
        let (byte1, body) = session
            .read()
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed before CONNACK"))?;
        anyhow::ensure!(
            byte1 == 0x20 && body.get(1) == Some(&0),
            "not a successful CONNACK: {byte1:02x} {body:02x?}"
        );
        Ok(session)
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next packet as (first byte, body), or None when the server closed.
    pub async fn read(&mut self) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
        loop {
            if let Some((len, header)) = parse_header(&self.buf)
                && self.buf.len() >= header + len
            {
                let byte1 = self.buf[0];
                let body = self.buf[header..header + len].to_vec();
                self.buf.drain(..header + len);
                return Ok(Some((byte1, body)));
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => anyhow::bail!("nothing from the server within {WAIT:?}"),
            }
        }
    }
}

/// (remaining length, header length) of the packet at the start of `buf`.
fn parse_header(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for i in 1..5 {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Some((len, i + 1));
        }
    }
    None
}
