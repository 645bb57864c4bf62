//! fedward's one QUIC transport shell, used by the agent and the coordinator alike:
//! endpoints and their transport settings, framed messages over quinn streams, and raw
//! tensor bytes streamed straight into their final buffers.
//!
//! Thin: the frame format and every check on what a peer declares live in
//! `fedward_shared::wire` (pure); this crate only moves bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedward_shared::codec::UpdateEncoding;
use fedward_shared::config::{Admission, Pace, Transport};
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
    #[error("reading a local file: {0}")]
    File(String),
    #[error("too slow: {what} took longer than {limit:?}")]
    TooSlow { what: &'static str, limit: Duration },
}

/// Runs `io` for at most `limit`; past it the exchange is [`StreamError::TooSlow`] (and
/// dropping `io` stops it).
pub async fn within<T>(limit: Duration, what: &'static str, io: impl Future<Output = Result<T, StreamError>>) -> Result<T, StreamError> {
    tokio::time::timeout(limit, io).await.unwrap_or(Err(StreamError::TooSlow { what, limit }))
}

/// [`within`] the time `pace` gives `bytes`.
pub async fn paced<T>(
    pace: Pace,
    bytes: usize,
    what: &'static str,
    io: impl Future<Output = Result<T, StreamError>>,
) -> Result<T, StreamError> {
    within(pace.time_for(bytes as u64), what, io).await
}

/// Reads one framed message. The declared length is checked against the limit first, and
/// the buffer grows only as bytes arrive, so a peer that declares a large frame and sends
/// nothing holds no memory for it.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Message, StreamError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await.map_err(finished_is_closed)?;
    let len = wire::frame_len(header)?;
    let mut payload = Vec::with_capacity(len.min(FIRST_READ));
    while payload.len() < len {
        match recv.read_chunk(len - payload.len(), true).await.map_err(|e| StreamError::Read(quinn::ReadExactError::ReadError(e)))? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => return Err(StreamError::Closed),
        }
    }
    Ok(wire::decode_payload(&payload)?)
}

/// What a frame buffer starts at: most frames (everything but an offer's manifest) fit.
const FIRST_READ: usize = 16 << 10;

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

/// Reads an update's tensors sent in `encoding`: raw f32 straight into place
/// ([`read_tensors`]), a quantized encoding one tensor's bytes at a time into a reused
/// buffer, decoded into place; digests checked either way.
pub async fn read_update_tensors(
    recv: &mut quinn::RecvStream,
    specs: &[TensorSpec],
    encoding: UpdateEncoding,
) -> Result<TensorSet, StreamError> {
    if encoding == UpdateEncoding::F32 {
        return read_tensors(recv, specs).await;
    }
    let mut set = TensorSet::new();
    let mut bytes = Vec::new();
    for spec in specs {
        let mut t = wire::alloc_tensor(spec);
        bytes.resize(encoding.encoded_len(&spec.shape), 0);
        recv.read_exact(&mut bytes).await.map_err(finished_is_closed)?;
        wire::decode_tensor(spec, encoding, &bytes, &mut t)?;
        set.insert(spec.name.clone(), t);
    }
    Ok(set)
}

/// Writes an update's tensors in `encoding`, in the given order. The tensors must already
/// hold what the encoding carries ([`UpdateEncoding::quantize`]) for the digests to match.
pub async fn write_update_tensors(
    send: &mut quinn::SendStream,
    set: &TensorSet,
    specs: &[TensorSpec],
    encoding: UpdateEncoding,
) -> Result<(), StreamError> {
    if encoding == UpdateEncoding::F32 {
        return write_tensors(send, set, specs).await;
    }
    let mut bytes = Vec::new();
    for spec in specs {
        if let Some(t) = set.get(&spec.name) {
            bytes.clear();
            encoding.encode(&spec.name, t, &mut bytes).map_err(TensorStreamError::from)?;
            send.write_all(&bytes).await?;
        }
    }
    Ok(())
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

/// A future that resolves on the first SIGINT or SIGTERM (what systemd and Kubernetes
/// send to stop a service): the daemons' cue to stop taking work, finish what must be
/// durable and exit 0. The handlers are installed when this is called, not when the future
/// is first polled, so a signal that comes during start-up is not lost (the default
/// action would kill the process). Call it inside the runtime, first thing.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let interrupt = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = interrupt => {}
                _ = term.recv() => {}
            }
            return;
        }
        // No SIGTERM handler could be installed: Ctrl-C still works.
        let _ = interrupt.await;
    }
}

/// How a connection ended, as the side that sees it must act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The peer refused us (its application closed with [`wire::CLOSE_REFUSED`], or TLS
    /// refused the handshake): final, retrying cannot help. Carries the reason, with a hint
    /// for an operator where a TLS failure has a usual cause.
    Refused(String),
    /// Our own side refused the peer during the handshake (its certificate is not from the
    /// CA we trust, or not for the name we expect), or the peer replaced this connection
    /// with a newer one under the same identity: a setting here is wrong, and retrying
    /// cannot help.
    Misconfigured(String),
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
            // Our own stale connections are dropped before we reconnect, so a replaced one
            // that is still ours means another process holds this identity.
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == wire::CLOSE_REPLACED.into() => {
                Self::Misconfigured(format!(
                    "the coordinator closed this connection ({}): another agent connected with this site's certificate; \
                     a site runs one agent, so this one stops",
                    String::from_utf8_lossy(&close.reason)
                ))
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
            // Raised here, not sent by the peer: our own TLS check of its certificate.
            quinn::ConnectionError::TransportError(t) => {
                let text = t.to_string();
                match fedward_shared::tls::explain_handshake_error(&text) {
                    Some(hint) => Self::Misconfigured(format!("TLS handshake failed: {text} ({hint})")),
                    None => Self::Lost(e.to_string()),
                }
            }
            other => Self::Lost(other.to_string()),
        }
    }
}

/// The QUIC server side of `tls` with the transport settings below: what an endpoint
/// starts with, and what replaces it when the coordinator reloads its access rules.
pub fn server_config(tls: rustls::ServerConfig, transport: &Transport, admission: &Admission) -> std::io::Result<quinn::ServerConfig> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("tls config unusable for QUIC: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut settings = transport_config(transport)?;
    // The agent opens request streams; the coordinator never reads a unidirectional one.
    settings.max_concurrent_bidi_streams(admission.max_streams_per_connection.into());
    server.transport_config(Arc::new(settings));
    server.max_incoming(admission.max_handshakes.max(1));
    server.incoming_buffer_size(64 << 10);
    server.incoming_buffer_size_total(4 << 20);
    Ok(server)
}

/// A quinn server endpoint on `addr`, with 4 MiB UDP buffers and the transport settings
/// below.
///
/// Before authentication a peer gets little: at most `max_handshakes` connections may be
/// in their handshake at once (the shell also counts per address and asks for address
/// validation under load), each buffering at most 64 KiB of early data, 4 MiB in all.
///
/// `reset_secret` keys QUIC's stateless resets. Kept across restarts (the coordinator keeps
/// it in its state directory), it lets a restarted coordinator answer packets of the
/// connections its predecessor held with a reset, so agents learn of the restart at once
/// instead of after their idle timeout.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    transport: &Transport,
    admission: &Admission,
    reset_secret: &[u8; 32],
) -> std::io::Result<quinn::Endpoint> {
    let server = server_config(tls, transport, admission)?;
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_secret);
    // The endpoint drops, without a reset, packets whose connection ID its generator does
    // not recognise; the default generator is keyed at random per process, so a restarted
    // coordinator would not recognise its predecessor's IDs. Key it from the same secret
    // (under its own label, so the two keys stay independent).
    let tag = ring::hmac::sign(&reset_key, b"fedward connection id key");
    let cid_key = u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("HMAC-SHA256 tag is 32 bytes"));
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    endpoint_config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(std::io::Error::other)?;
    quinn::Endpoint::new(endpoint_config, Some(server), udp_socket(addr)?, Arc::new(quinn::TokioRuntime))
}

/// A client endpoint on an ephemeral port of `remote`'s address family, with 4 MiB UDP
/// buffers. The coordinator may open no stream towards it.
pub fn client_endpoint(remote: SocketAddr, tls: rustls::ClientConfig, transport: &Transport) -> std::io::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| std::io::Error::other(format!("tls config unusable for QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut settings = transport_config(transport)?;
    settings.max_concurrent_bidi_streams(0u32.into());
    client.transport_config(Arc::new(settings));
    let local: SocketAddr = if remote.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(std::io::Error::other)?;
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.max_udp_payload_size(MAX_UDP_PAYLOAD).map_err(std::io::Error::other)?;
    let mut endpoint = quinn::Endpoint::new(endpoint_config, None, udp_socket(local)?, Arc::new(quinn::TokioRuntime))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The settings both sides share: the idle timeout and keep-alive from the config, no
/// unidirectional streams (fedward never uses them, so a peer may not park data in them),
/// the receive windows below, and MTU discovery up to [`MAX_UDP_PAYLOAD`].
fn transport_config(transport: &Transport) -> std::io::Result<quinn::TransportConfig> {
    let mut settings = quinn::TransportConfig::default();
    settings.max_idle_timeout(Some(transport.idle_timeout.try_into().map_err(std::io::Error::other)?));
    settings.keep_alive_interval(Some(transport.keep_alive));
    settings.max_concurrent_uni_streams(0u32.into());
    settings.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    settings.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    settings.mtu_discovery_config(Some(mtu));
    Ok(settings)
}

/// What one stream may have in flight towards us, unread (quinn's default is 1.25 MB,
/// sized for 100 Mbit/s at 100 ms). A stream moves at most one window per round trip: 4 MiB
/// is 40 MB/s at 100 ms and 160 MB/s at 25 ms between hospital and consortium. On loopback
/// a larger window only fills the cache with buffered bytes (8 MiB measured no faster).
const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

/// What one connection may have in flight towards us, unread, over all its streams: the
/// bound on what a peer can make us buffer. quinn's default is unlimited (each stream's
/// window times the streams allowed: 4 x 1.25 MB = 5 MB here before); one stream's window
/// plus 1 MiB for the small request streams keeps that bound about where it was (5 MiB)
/// while a bulk stream gets 3.4x the window. Peers only reach this after a handshake with a certificate
/// of our CA (no 0-RTT), and the coordinator holds one connection per site.
const CONNECTION_RECEIVE_WINDOW: u32 = STREAM_RECEIVE_WINDOW + (1 << 20);

/// The largest UDP payload an endpoint accepts (its `max_udp_payload_size` transport
/// parameter) and the upper bound of MTU discovery (quinn's defaults: 1472 and 1452).
/// QUIC's cost is per packet (encryption, header protection, acknowledgement, loss
/// bookkeeping), so where the path allows larger datagrams (loopback, jumbo frames),
/// discovery finds them: 1.5x the MB per CPU-second on loopback. On a 1500-byte path the
/// larger probes are lost (or refused locally with EMSGSIZE, which quinn-udp treats as a
/// loss) and the MTU stays at 1452. Not above 6500: quinn sends up to 10 datagrams in one
/// GSO call, and the kernel takes at most 64 KiB in one; with 9000 the large datagrams
/// were lost, quinn's black-hole detection fell back to 1200 bytes and the transfer ran
/// slower than with the defaults. Costs receive-buffer address space (payload x 64 GRO
/// segments x 32 per batch: 12 MB per endpoint instead of 3 MB; the coordinator's peak RSS
/// in the transfer bench did not move).
const MAX_UDP_PAYLOAD: u16 = 6000;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_or_timeout_is_a_lost_connection_worth_retrying() {
        for e in [quinn::ConnectionError::Reset, quinn::ConnectionError::TimedOut, quinn::ConnectionError::LocallyClosed] {
            assert!(matches!(ConnectionEnd::of(&e), ConnectionEnd::Lost(_)), "{e}");
        }
    }
}
