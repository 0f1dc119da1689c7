//! A small HTTP/1.1 client over hyper for the load generator and the
//! tests: JSON requests, and server-sent events read as `data:` payloads.
//! One connection per request, so that a dropped stream is a closed
//! connection the server sees at once.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the response is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Result<Value, ClientError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Where requests go, and the key they carry.
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    /// Bounds every wait: connecting, the head, and each body read.
    pub timeout: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Client {
            addr,
            api_key: None,
            timeout: Duration::from_secs(120),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let tcp = tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(self.addr))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        // The connection lives as long as the response body is read.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(key) = &self.api_key {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        tokio::time::timeout(self.timeout, sender.send_request(request))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
            .map_err(ClientError::from)
    }

    /// Sends a request and reads the whole response.
    pub async fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Reply, ClientError> {
        let response = self.send(method, path, body).await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))??
            .to_bytes()
            .to_vec();
        Ok(Reply {
            status,
            content_type,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.request("GET", path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request("POST", path, Some(body.to_string().into_bytes())).await
    }

    /// Posts `body` and opens its event stream; a non-2xx answer is read
    /// whole and returned as `Err(reply)`.
    pub async fn stream(&self, path: &str, body: &Value) -> Result<Result<EventStream, Reply>, ClientError> {
        let response = self.send("POST", path, Some(body.to_string().into_bytes())).await?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let body = response.into_body().collect().await?.to_bytes().to_vec();
            return Ok(Err(Reply {
                status,
                content_type: None,
                body,
            }));
        }
        Ok(Ok(EventStream {
            body: response.into_body(),
            buffer: Vec::new(),
            timeout: self.timeout,
        }))
    }

    /// The current value of an unlabelled series of `/metrics`.
    pub async fn metric(&self, name: &str) -> Result<Option<f64>, ClientError> {
        let reply = self.get("/metrics").await?;
        Ok(super::metrics::scrape_value(&reply.text(), name))
    }
}

/// The `data:` payloads of a server-sent event stream, one at a time.
/// Dropping it closes the connection.
#[derive(Debug)]
pub struct EventStream {
    body: Incoming,
    buffer: Vec<u8>,
    timeout: Duration,
}

impl EventStream {
    /// The next event's data; `None` at the end of the stream. Comments
    /// (keep-alives) are skipped.
    pub async fn next_data(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(end) = find_event_end(&self.buffer) {
                let event: Vec<u8> = self.buffer.drain(..end.0 + end.1).collect();
                let text = String::from_utf8_lossy(&event[..end.0]);
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            let frame = tokio::time::timeout(self.timeout, self.body.frame())
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?;
            match frame {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Where the first event of `buf` ends: its length and the separator's.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}
