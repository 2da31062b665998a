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
