//! The HTTP client of the chat path: hyper's pooled client over rustls.
//!
//! reqwest served this path before and cost ~12% of the gateway's CPU at
//! 3,000 calls a second: its redirect layer parses the URL again (with IDNA
//! mapping) on every call even when redirects are off, and every response
//! carries a copy of the URL. A chat call needs none of that: one POST to a
//! URL parsed at start, the head within a deadline, the body whole or as a
//! stream. reqwest still serves the rare calls (batches, files, webhooks).

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{ByteStream, ProviderError};

/// One upstream API's connection pool and deadline.
pub(crate) struct UpstreamHttp {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl UpstreamHttp {
    /// Pooled connections kept 90 s (at most `max_idle` of them idle:
    /// without a bound, the connections an overload opened stayed resident
    /// with their buffers, ~400 MiB after a burst of 5,000 calls in flight),
    /// no Nagle delay, and no redirects: a redirected POST would be re-sent
    /// as a GET (or with the body and key to another host), so a 3xx is
    /// returned as the upstream's error.
    pub(crate) fn new(
        connect_timeout_ms: u64,
        max_idle: usize,
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(Duration::from_millis(connect_timeout_ms)));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS setup: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(max_idle)
            .pool_timer(TokioTimer::new())
            .build(tls);
        Ok(Self { client, timeout })
    }

    /// POSTs a JSON body. The deadline covers the response head: a stream's
    /// body may take as long as the model needs. A non-success status is
    /// the upstream's error, with its message and `Retry-After`.
    pub(crate) async fn post_json(
        &self,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<Response<Incoming>, ProviderError> {
        let mut req = Request::post(uri.clone());
        if let Some(h) = req.headers_mut() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            for (name, value) in headers {
                h.insert(name, value.clone());
            }
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| {
                if e.is_connect() {
                    ProviderError::Connect(chain(&e))
                } else {
                    ProviderError::Protocol(chain(&e))
                }
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let retry_after_s = super::retry_after(resp.headers());
        // The error body is best effort: the status already says it failed.
        let body = self.body(resp).await.unwrap_or_default();
        Err(ProviderError::Status {
            status,
            message: super::error_message(&body),
            retry_after_s,
        })
    }

    /// The whole body, within the deadline.
    pub(crate) async fn body(&self, resp: Response<Incoming>) -> Result<Bytes, ProviderError> {
        let collected = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| ProviderError::Protocol(chain(&e)))?;
        Ok(collected.to_bytes())
    }

    fn timed_out(&self) -> ProviderError {
        ProviderError::Timeout(self.timeout.as_millis() as u64)
    }
}

/// The body as it arrives.
pub(crate) fn stream(resp: Response<Incoming>) -> ByteStream {
    Box::pin(
        resp.into_body().into_data_stream().map(|r| {
            r.map_err(|e| ProviderError::Protocol(format!("stream broke: {}", chain(&e))))
        }),
    )
}

/// An error with its causes: hyper's own message is only the kind
/// ("client error (Connect)"); the cause says what happened.
fn chain(e: &dyn StdError) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A header value made once at start (an API key, a version).
pub(crate) fn header_value(value: &str, secret: bool) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| "contains characters a header cannot carry".to_string())?;
    v.set_sensitive(secret);
    Ok(v)
}

/// The URL of an endpoint under `base_url`, parsed at start.
pub(crate) fn endpoint(base_url: &str, path: &str) -> Result<Uri, String> {
    let url = format!("{}/{path}", base_url.trim_end_matches('/'));
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("base_url {base_url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!(
            "base_url {base_url:?}: must be an http:// or https:// URL"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_at_start() {
        let u = endpoint("https://api.openai.com/v1/", "chat/completions").unwrap();
        assert_eq!(u.to_string(), "https://api.openai.com/v1/chat/completions");
        assert!(endpoint("api.openai.com/v1", "chat/completions").is_err());
        assert!(endpoint("ftp://x/v1", "chat/completions").is_err());
        assert!(endpoint("http://exa mple/v1", "chat/completions").is_err());
    }

    #[test]
    fn keys_that_cannot_be_headers_are_refused() {
        assert!(header_value("Bearer sk-abc", true).unwrap().is_sensitive());
        assert!(header_value("sk-\nabc", true).is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_with_its_cause() {
        let http = UpstreamHttp::new(500, 4, Duration::from_secs(2)).unwrap();
        let uri = endpoint("http://127.0.0.1:9/v1", "chat/completions").unwrap();
        match http.post_json(&uri, &[], b"{}".to_vec()).await {
            Err(ProviderError::Connect(m)) => assert!(m.contains("refused"), "{m}"),
            other => panic!("{:?}", other.map(|r| r.status())),
        }
    }
}
