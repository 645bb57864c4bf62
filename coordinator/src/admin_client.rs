//! The client side of the admin endpoints, for `fedward-coordinator admin ...`: one HTTP/1.1
//! request per call, over HTTPS (trusting the consortium CA only) or, on loopback, HTTP.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;

/// Where the admin endpoints are and how to prove who is calling.
pub struct AdminClient {
    uri: Uri,
    token: Option<String>,
    /// For `https://` URLs: the consortium CA.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// What the coordinator answered.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl AdminClient {
    pub fn new(url: &str, token: Option<String>, ca_pem: Option<&[u8]>) -> Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("the admin URL {url:?}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => {
                let ca = ca_pem.context("an https:// admin URL needs the consortium CA (--ca-cert)")?;
                Some(Arc::new(fedward_shared::tls::admin_client_config(ca)?))
            }
            Some("http") => None,
            _ => bail!("the admin URL must start with http:// or https://"),
        };
        if uri.host().is_none() {
            bail!("the admin URL {url:?} names no host");
        }
        Ok(Self { uri, token, tls })
    }

    /// Sends one request; a JSON `body` makes it a POST.
    pub async fn call(&self, path: &str, body: Option<serde_json::Value>) -> Result<Answer> {
        let host = self.uri.host().expect("checked in new").trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let authority = self.uri.authority().expect("checked in new").to_string();
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.with_context(|| format!("connecting to {authority}"))?;
        let mut request = Request::builder()
            .method(if body.is_some() { Method::POST } else { Method::GET })
            .uri(path)
            .header(hyper::header::HOST, &authority);
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match &body {
            Some(b) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes))?;
        match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).with_context(|| format!("server name {host:?}"))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS with {authority} (is --ca-cert the consortium CA?)"))?;
                send(TokioIo::new(stream), request).await
            }
            None => send(TokioIo::new(tcp), request).await,
        }
    }
}

async fn send<I>(io: I, request: Request<Full<Bytes>>) -> Result<Answer>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned() })
}
