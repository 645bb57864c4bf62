//! Framed messages and raw tensor bytes over quinn streams (agent side).
//!
//! Thin: the format and every check live in `fedward_shared::wire`; this only moves bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use fedward_shared::tensor::{TensorSet, TensorSpec};
use fedward_shared::wire::{self, DecodeError, Message, TensorStreamError};

/// Why a stream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("peer closed the stream early")]
    Closed,
    #[error("connection: {0}")]
    Connection(String),
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

/// A client endpoint on an ephemeral port of the right address family, with 4 MiB UDP
/// buffers (the default ~208 KB loses packets at speed).
pub fn client_endpoint(
    remote: SocketAddr,
    tls: rustls::ClientConfig,
    idle_timeout: std::time::Duration,
) -> std::io::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("tls config unusable for QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into().map_err(std::io::Error::other)?));
    transport.keep_alive_interval(Some(idle_timeout / 4));
    client.transport_config(Arc::new(transport));
    let local: SocketAddr = if remote.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(std::io::Error::other)?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(local), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel may cap these (net.core.rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&local.into())?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), Arc::new(quinn::TokioRuntime))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
