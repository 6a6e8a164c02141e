//! The floor: the least a JSON-aware HTTP forwarder can add. It parses the
//! request body (as any gateway must, to read the model), writes it back out
//! and forwards it over a pooled keep-alive connection; the answer streams
//! back untouched. Nothing else: no auth, no routing, no accounting. What a
//! gateway adds beyond this is the price of its features.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;
type Upstream = Client<HttpConnector, Full<Bytes>>;

/// Serves on `listen`, forwarding every request to `upstream` (scheme and
/// authority; the request's path is kept). Runs until the process ends.
pub async fn serve(listen: SocketAddr, upstream: Uri) -> Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), upstream.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Upstream,
    upstream: Uri,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match try_forward(&client, &upstream, req).await {
        Ok(r) => r,
        Err((status, message)) => error(status, &message),
    })
}

async fn try_forward(
    client: &Upstream,
    upstream: &Uri,
    req: Request<Incoming>,
) -> Result<Response<Body>, (StatusCode, String)> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?
        .to_bytes();
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let body = serde_json::to_vec(&json).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = Uri::builder()
        .scheme(upstream.scheme_str().unwrap_or("http"))
        .authority(upstream.authority().map_or("127.0.0.1", |a| a.as_str()))
        .path_and_query(path)
        .build()
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut out = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
            out = out.header(name, value);
        }
    }
    let out = out
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let resp = client
        .request(out)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(resp.map(|b| b.boxed()))
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"message": message, "type": "floor_error"}});
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}
