//! The HTTP client of the chat path: hyper's pooled client over rustls.
//!
//! reqwest served this path before and cost ~12% of the gateway's CPU at
//! 3,000 calls a second: its redirect layer parses the URL again (with IDNA
//! mapping) on every call even when redirects are off, and every response
//! carries a copy of the URL. A chat call needs none of that: one POST to a
//! URL parsed at start, the head within a deadline, the body whole or as a
//! stream. When the environment sends the upstream through a proxy
//! (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus `NO_PROXY`), the calls
//! go through reqwest, which speaks to proxies (CONNECT, credentials). It
//! also serves the rare calls (batches, files, webhooks).

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, Request, Response, Uri, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{ByteStream, ProviderError};

type BoxError = Box<dyn StdError + Send + Sync>;

/// An upstream answer's body, whichever way it came.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// One upstream endpoint: its URL, connection pool and deadline.
pub(crate) struct UpstreamHttp {
    /// Parsed once: parsing it per request showed in profiles.
    url: Uri,
    route: Route,
    timeout: Duration,
}

enum Route {
    Direct(Box<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>),
    Proxied(reqwest::Client),
}

impl UpstreamHttp {
    /// The client of `path` under `base_url`, through the proxy the
    /// environment names for it, if any (see [`UpstreamHttp::new`]).
    pub(crate) fn to(
        base_url: &str,
        path: &str,
        connect_timeout_ms: u64,
        max_idle: usize,
        timeout_ms: u64,
    ) -> Result<Self, String> {
        let timeout = Duration::from_millis(timeout_ms);
        let url = endpoint(base_url, path)?;
        Self::new(
            connect_timeout_ms,
            max_idle,
            timeout,
            url,
            &Matcher::from_env(),
        )
    }

    /// Pooled connections kept 90 s (at most `max_idle` of them idle:
    /// without a bound, the connections an overload opened stayed resident
    /// with their buffers, ~400 MiB after a burst of 5,000 calls in flight),
    /// no Nagle delay, and no redirects: a redirected POST would be re-sent
    /// as a GET (or with the body and key to another host), so a 3xx is
    /// returned as the upstream's error. `proxies` says whether calls to
    /// `url` go through a proxy (`Matcher::from_env()` in the gateway).
    pub(crate) fn new(
        connect_timeout_ms: u64,
        max_idle: usize,
        timeout: Duration,
        url: Uri,
        proxies: &Matcher,
    ) -> Result<Self, String> {
        if let Some(proxy) = proxies.intercept(&url) {
            let mut p = reqwest::Proxy::all(proxy.uri().to_string())
                .map_err(|e| format!("proxy {}: {e}", proxy.uri()))?;
            // Credentials in the proxy's URL: an HTTP proxy gets them as a
            // Basic `Proxy-Authorization`, a SOCKS proxy in its handshake.
            if let Some(auth) = proxy.basic_auth() {
                p = p.custom_http_auth(auth.clone());
            } else if let Some((user, pass)) = proxy.raw_auth() {
                p = p.basic_auth(user, pass);
            }
            let client = super::upstream_client(connect_timeout_ms, max_idle, Some(p))?;
            return Ok(Self {
                url,
                route: Route::Proxied(client),
                timeout,
            });
        }
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
        Ok(Self {
            url,
            route: Route::Direct(Box::new(client)),
            timeout,
        })
    }

    /// POSTs a JSON body. The deadline covers the response head: a stream's
    /// body may take as long as the model needs. A non-success status is
    /// the upstream's error, with its message and `Retry-After`.
    pub(crate) async fn post_json(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        body: Vec<u8>,
    ) -> Result<Response<Body>, ProviderError> {
        let resp = match &self.route {
            Route::Direct(client) => {
                let mut req = Request::post(self.url.clone());
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
                tokio::time::timeout(self.timeout, client.request(req))
                    .await
                    .map_err(|_| self.timed_out())?
                    .map_err(|e| {
                        if e.is_connect() {
                            ProviderError::Connect(chain(&e))
                        } else {
                            ProviderError::Protocol(chain(&e))
                        }
                    })?
                    .map(|b| b.map_err(BoxError::from).boxed_unsync())
            }
            Route::Proxied(client) => {
                let mut req = client
                    .post(self.url.to_string())
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                let resp = tokio::time::timeout(self.timeout, req.send())
                    .await
                    .map_err(|_| self.timed_out())?
                    .map_err(|e| super::classify(e, self.timeout))?;
                Response::from(resp).map(|b| b.map_err(BoxError::from).boxed_unsync())
            }
        };
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
    pub(crate) async fn body(&self, resp: Response<Body>) -> Result<Bytes, ProviderError> {
        let collected = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| self.timed_out())?
            .map_err(|e| ProviderError::Protocol(chain(&*e)))?;
        Ok(collected.to_bytes())
    }

    fn timed_out(&self) -> ProviderError {
        ProviderError::Timeout(self.timeout.as_millis() as u64)
    }
}

/// The body as it arrives.
pub(crate) fn stream(resp: Response<Body>) -> ByteStream {
    Box::pin(
        resp.into_body().into_data_stream().map(|r| {
            r.map_err(|e| ProviderError::Protocol(format!("stream broke: {}", chain(&*e))))
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

/// The header value of an API key (`Bearer sk-...` or the bare key), made
/// once at start and kept out of debug output.
pub(crate) fn key_header(value: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| "API key contains characters a header cannot carry".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

/// The URL of an endpoint under `base_url`, parsed at start.
fn endpoint(base_url: &str, path: &str) -> Result<Uri, String> {
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
        assert!(key_header("Bearer sk-abc").unwrap().is_sensitive());
        assert!(key_header("sk-\nabc").is_err());
    }

    fn no_proxy() -> Matcher {
        Matcher::builder().build()
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_with_its_cause() {
        let uri = endpoint("http://127.0.0.1:9/v1", "chat/completions").unwrap();
        let http = UpstreamHttp::new(500, 4, Duration::from_secs(2), uri, &no_proxy()).unwrap();
        match http.post_json(&[], b"{}".to_vec()).await {
            Err(ProviderError::Connect(m)) => assert!(m.contains("refused"), "{m}"),
            other => panic!("{:?}", other.map(|r| r.status())),
        }
    }

    /// A forward proxy on loopback that answers one request itself and
    /// returns the request's head as it saw it.
    async fn one_shot_proxy() -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the head ended");
                seen.extend_from_slice(&buf[..n]);
            }
            let answer = br#"{"id":"via-proxy","choices":[]}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                answer.len()
            );
            sock.write_all(head.as_bytes()).await.unwrap();
            sock.write_all(answer).await.unwrap();
            String::from_utf8_lossy(&seen).into_owned()
        });
        (format!("http://tollgate:s3cret@{addr}"), task)
    }

    #[tokio::test]
    async fn calls_go_through_the_proxy_the_environment_names() {
        let (proxy, seen) = one_shot_proxy().await;
        // The upstream's name does not resolve: only the proxy can reach it.
        let uri = endpoint("http://upstream.invalid/v1", "chat/completions").unwrap();
        let proxies = Matcher::builder().http(proxy).build();
        let http = UpstreamHttp::new(500, 4, Duration::from_secs(5), uri, &proxies).unwrap();
        let key = key_header("Bearer sk-test").unwrap();
        let resp = http
            .post_json(&[(header::AUTHORIZATION, key)], b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(
            http.body(resp).await.unwrap(),
            &br#"{"id":"via-proxy","choices":[]}"#[..]
        );
        let head = seen.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("post http://upstream.invalid/v1/chat/completions http/1.1"),
            "{head}"
        );
        // base64("tollgate:s3cret")
        assert!(
            head.contains("proxy-authorization: basic dg9sbgdhdgu6cznjcmv0"),
            "{head}"
        );
        assert!(head.contains("authorization: bearer sk-test"), "{head}");
    }

    #[tokio::test]
    async fn hosts_in_no_proxy_are_called_directly() {
        let uri = endpoint("http://127.0.0.1:9/v1", "chat/completions").unwrap();
        let proxies = Matcher::builder()
            .http("http://127.0.0.1:1")
            .no("127.0.0.1")
            .build();
        let http = UpstreamHttp::new(500, 4, Duration::from_secs(2), uri, &proxies).unwrap();
        assert!(matches!(http.route, Route::Direct(_)));
    }
}
