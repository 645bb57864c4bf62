//! fedward's one QUIC transport shell, used by the agent and the coordinator alike:
//! endpoints and their transport settings, framed messages over quinn streams, and raw
//! tensor bytes streamed straight into their final buffers.
//!
//! Thin: the frame format and every check on what a peer declares live in
//! `fedward_shared::wire` (pure); this crate only moves bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedward_shared::tensor::{TensorSet, TensorSpec};
use fedward_shared::wire::{self, DecodeError, Message, TensorStreamError};

/// Why a stream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("peer closed the stream early")]
    Closed,
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    ClosedStream(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Encode(#[from] wire::EncodeError),
    #[error(transparent)]
    Tensors(#[from] TensorStreamError),
}

/// Reads one framed message; the length is checked before the payload is allocated.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Message, StreamError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(finished_is_closed)?;
    let len = wire::frame_len(header)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(finished_is_closed)?;
    Ok(wire::decode_payload(&payload)?)
}

/// Writes one framed message.
pub async fn write_message(send: &mut quinn::SendStream, msg: &Message) -> Result<(), StreamError> {
    send.write_all(&wire::encode(msg)?).await?;
    Ok(())
}

/// Writes a message and finishes the stream.
pub async fn reply(send: &mut quinn::SendStream, msg: &Message) -> Result<(), StreamError> {
    write_message(send, msg).await?;
    send.finish()?;
    Ok(())
}

/// Reads the raw bytes of the declared tensors straight into their final buffers and
/// checks each digest. The caller has already bounded the total with
/// [`wire::declared_payload_bytes`].
pub async fn read_tensors(recv: &mut quinn::RecvStream, specs: &[TensorSpec]) -> Result<TensorSet, StreamError> {
    let mut set = TensorSet::new();
    for spec in specs {
        let mut t = wire::alloc_tensor(spec);
        recv.read_exact(wire::tensor_bytes_mut(&mut t)).await.map_err(finished_is_closed)?;
        wire::finish_tensor(spec, &mut t)?;
        set.insert(spec.name.clone(), t);
    }
    Ok(set)
}

/// Writes the named tensors' raw bytes in the given order (no copy on little-endian hosts).
pub async fn write_tensors(send: &mut quinn::SendStream, set: &TensorSet, specs: &[TensorSpec]) -> Result<(), StreamError> {
    for spec in specs {
        if let Some(t) = set.get(&spec.name) {
            send.write_all(&t.le_bytes()).await?;
        }
    }
    Ok(())
}

fn finished_is_closed(e: quinn::ReadExactError) -> StreamError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => StreamError::Closed,
        other => StreamError::Read(other),
    }
}

/// How a connection ended, as the side that sees it must act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The peer refused us (its application closed with [`wire::CLOSE_REFUSED`], or TLS
    /// refused the handshake): final, retrying cannot help. Carries the reason, with a hint
    /// for an operator where a TLS failure has a usual cause.
    Refused(String),
    /// Anything else (timeouts, resets, a peer going away): transient.
    Lost(String),
}

impl ConnectionEnd {
    /// Classifies a connection error.
    pub fn of(e: &quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == wire::CLOSE_REFUSED.into() => {
                Self::Refused(String::from_utf8_lossy(&close.reason).into_owned())
            }
            quinn::ConnectionError::ConnectionClosed(close) => {
                let text = close.to_string();
                // TLS alerts surface as CRYPTO_ERROR transport codes (0x100-0x1ff).
                let code = u64::from(close.error_code);
                if (0x100..0x200).contains(&code) {
                    let hint = fedward_shared::tls::explain_handshake_error(&text).map(|h| format!(" ({h})")).unwrap_or_default();
                    Self::Refused(format!("TLS handshake refused: {text}{hint}"))
                } else {
                    Self::Lost(e.to_string())
                }
            }
            quinn::ConnectionError::TransportError(t) => {
                let text = t.to_string();
                match fedward_shared::tls::explain_handshake_error(&text) {
                    Some(hint) => Self::Refused(format!("TLS handshake failed: {text} ({hint})")),
                    None => Self::Lost(e.to_string()),
                }
            }
            other => Self::Lost(other.to_string()),
        }
    }
}

/// A quinn server endpoint on `addr`, with 4 MiB UDP buffers.
pub fn server_endpoint(addr: SocketAddr, tls: rustls::ServerConfig, idle_timeout: Duration) -> std::io::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("tls config unusable for QUIC: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = transport_config(idle_timeout)?;
    transport.max_concurrent_bidi_streams(16u32.into());
    server.transport_config(Arc::new(transport));
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), udp_socket(addr)?, Arc::new(quinn::TokioRuntime))
}

/// A client endpoint on an ephemeral port of `remote`'s address family, with 4 MiB UDP
/// buffers.
pub fn client_endpoint(remote: SocketAddr, tls: rustls::ClientConfig, idle_timeout: Duration) -> std::io::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("tls config unusable for QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(idle_timeout)?));
    let local: SocketAddr = if remote.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(std::io::Error::other)?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp_socket(local)?, Arc::new(quinn::TokioRuntime))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The settings both sides share: the idle timeout, and keep-alives at a quarter of it.
fn transport_config(idle_timeout: Duration) -> std::io::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into().map_err(std::io::Error::other)?));
    transport.keep_alive_interval(Some(idle_timeout / 4));
    Ok(transport)
}

/// A UDP socket bound to `addr` with 4 MiB buffers: the default ~208 KB loses packets at
/// speed.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel may cap these (net.core.rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
