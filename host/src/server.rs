//! The HTTP surface: OpenAI-compatible routes in front of the pipeline,
//! plus health and metrics. Also serves the simulator on its own (`tollgate sim`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::in_flight::Place;
use crate::pipeline::{Gateway, Identity, Reply, ReplyBody};
use crate::providers::{Provider, SimProvider, UpstreamCall, UpstreamReply};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

fn sse_body(rx: mpsc::Receiver<Bytes>) -> Body {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status, e.body())
}

fn into_response(reply: Reply) -> Response<Body> {
    let mut r = match reply.body {
        ReplyBody::Json(b) => json_response(reply.status, b),
        ReplyBody::Sse(rx) => {
            let mut r = Response::new(sse_body(rx));
            *r.status_mut() = reply.status;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
    };
    for (name, value) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    r
}

/// Reads a request body up to `max` bytes: 413 beyond it.
pub async fn read_body(
    req: Request<Incoming>,
    max: usize,
) -> Result<(http::request::Parts, Bytes), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body is larger than the limit of {max} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok((parts, c.to_bytes())),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) => Err(ApiError::invalid(
            "unreadable_body",
            format!("could not read the request body: {e}"),
        )),
    }
}

/// The 503 for a request past `server.max_in_flight`: no ledger row and no
/// body read, so that refusing stays cheap while the gateway is overloaded.
fn overloaded(gw: &Gateway, e: &ApiError) -> Response<Body> {
    gw.metrics.request(e.status.as_u16(), 0.0);
    let mut r = error_response(e);
    r.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(crate::in_flight::RETRY_AFTER_SECONDS),
    );
    r
}

/// A response that keeps its request's place in flight until its body is
/// sent or dropped (a stream holds it to its last event).
fn holding(place: Place, r: Response<Body>) -> Response<Body> {
    if !place.is_held() {
        return r;
    }
    r.map(|body| {
        Holding {
            body,
            _place: place,
        }
        .boxed_unsync()
    })
}

struct Holding {
    body: Body,
    _place: Place,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn not_found(path: &str) -> Response<Body> {
    error_response(&ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Unknown request URL: {path}"),
    ))
}

fn method_not_allowed(method: &Method, path: &str) -> Response<Body> {
    error_response(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    ))
}

async fn route(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(id) = path.strip_prefix("/v1/deferred/")
        && method == Method::GET
    {
        let live = gw.live.load();
        let result = Identity::from_headers(req.headers(), &live.config.identity)
            .and_then(|who| gw.deferred.poll(id, &who.tenant));
        return match result {
            Ok(v) => json_response(StatusCode::OK, Bytes::from(v.to_string())),
            Err(e) => error_response(&e),
        };
    }
    match (path.as_str(), &method) {
        ("/v1/chat/completions" | "/chat/completions", &Method::POST) => {
            let place = match gw.in_flight.enter() {
                Ok(p) => p,
                Err(e) => return overloaded(&gw, &e),
            };
            let live = gw.live.load();
            let max = live.config.server.max_body_bytes;
            let identity = Identity::from_headers(req.headers(), &live.config.identity);
            let (_parts, body) = match read_body(req, max).await {
                Ok(x) => x,
                Err(e) => return into_response(gw.reject(identity.as_ref().ok(), &e)),
            };
            let id = match identity {
                Ok(id) => id,
                Err(e) => return into_response(gw.reject(None, &e)),
            };
            holding(place, into_response(gw.chat(id, body).await))
        }
        ("/v1/feedback" | "/feedback", &Method::POST) => {
            let (parts, body) = match read_body(req, 64 * 1024).await {
                Ok(x) => x,
                Err(e) => return error_response(&e),
            };
            let result = Identity::from_headers(&parts.headers, &gw.live.load().config.identity)
                .and_then(|id| gw.feedback(&id, &body));
            match result {
                Ok(()) => json_response(
                    StatusCode::OK,
                    Bytes::from_static(b"{\"status\":\"recorded\"}"),
                ),
                Err(e) => error_response(&e),
            }
        }
        ("/v1/models" | "/models", &Method::GET) => {
            let providers = gw.live.load().providers.clone();
            let data: Vec<Value> = providers
                .model_names()
                .into_iter()
                .map(|m| {
                    let owner = providers
                        .get(m)
                        .map(|t| t.provider_name.clone())
                        .unwrap_or_default();
                    json!({"id": m, "object": "model", "created": 0, "owned_by": owner})
                })
                .collect();
            json_response(
                StatusCode::OK,
                Bytes::from(json!({"object": "list", "data": data}).to_string()),
            )
        }
        ("/healthz", &Method::GET) => {
            json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"))
        }
        ("/metrics", &Method::GET) => {
            if let Some(e) = gw.runtime.embedder() {
                gw.metrics.embeddings(&e.stats);
            }
            gw.metrics.in_flight(&gw.in_flight);
            let text = gw.metrics.render(
                &gw.live.load().plugins,
                gw.ledger.as_ref().map(|l| l.stats()),
            );
            let mut r = Response::new(full(text));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (
            "/v1/chat/completions"
            | "/chat/completions"
            | "/v1/models"
            | "/models"
            | "/healthz"
            | "/metrics"
            | "/v1/feedback"
            | "/feedback",
            _,
        ) => method_not_allowed(&method, &path),
        _ => not_found(&path),
    }
}

/// Serves connections from `listener` until `shutdown` completes, then
/// stops accepting and waits (up to `drain`) for requests in flight.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining requests in flight");
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timed out after {} ms", drain.as_millis());
    }
}

/// The gateway's HTTP handler.
pub fn gateway_handler(
    gw: Arc<Gateway>,
) -> impl Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |req| Box::pin(route(gw.clone(), req))
}

/// A standalone simulator upstream (`tollgate sim`): the same simulator the
/// gateway embeds, behind an OpenAI-compatible HTTP API.
pub fn sim_handler(
    sim: Arc<SimProvider>,
) -> impl Fn(Request<Incoming>) -> std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    let batches = Arc::new(crate::providers::sim_batch::SimBatches::default());
    move |req| {
        let sim = sim.clone();
        let batches = batches.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if path.starts_with("/v1/files") || path.starts_with("/v1/batches") {
                let method = req.method().clone();
                let content_type = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let (_, body) = match read_body(req, 256 << 20).await {
                    Ok(x) => x,
                    Err(e) => return error_response(&e),
                };
                let answer = crate::providers::sim_batch::route(
                    &batches,
                    &sim,
                    &method,
                    &path,
                    &content_type,
                    &body,
                )
                .await;
                return match answer {
                    Some(Ok(Value::String(text))) => {
                        json_response(StatusCode::OK, Bytes::from(text))
                    }
                    Some(Ok(v)) => json_response(StatusCode::OK, Bytes::from(v.to_string())),
                    Some(Err(m)) => error_response(&ApiError::new(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        "not_found",
                        m,
                    )),
                    None => not_found(&path),
                };
            }
            if path == "/v1/messages" {
                return sim_messages(&sim, req).await;
            }
            if path != "/v1/chat/completions" && path != "/chat/completions" {
                return not_found(&path);
            }
            if req.method() != Method::POST {
                return method_not_allowed(req.method(), &path);
            }
            let (parts, body) = match read_body(req, 64 << 20).await {
                Ok(x) => x,
                Err(e) => return error_response(&e),
            };
            let id = match Identity::from_headers(&parts.headers, &Default::default()) {
                Ok(id) => id,
                Err(e) => return error_response(&e),
            };
            let parsed = match crate::api::ChatRequest::parse(&body) {
                Ok(p) => p,
                Err(e) => return error_response(&e),
            };
            let timeout_here = id
                .sim_fault
                .as_deref()
                .is_some_and(|f| f == "timeout" || f == format!("timeout@{}", parsed.model));
            if timeout_here {
                // Hold the request long enough for any client deadline to fire.
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            let call = UpstreamCall {
                stream: parsed.stream,
                body: parsed.body,
                sim_output_tokens: id.sim_output_tokens,
                sim_fault: id.sim_fault,
                attempt: parts
                    .headers
                    .get(crate::headers::SIM_ATTEMPT)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
            };
            match sim.chat(&call).await {
                Ok(UpstreamReply::Complete(b)) => json_response(StatusCode::OK, b),
                Ok(UpstreamReply::Stream(s)) => sim_events(s.map(Result::unwrap_or_default)),
                Err(e) => sim_error(e, "api_error"),
            }
        })
    }
}

use futures_util::StreamExt as _;

/// A simulated stream of server-sent events.
fn sim_events(events: impl futures_util::Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    let s = events.map(|e| Ok::<_, Infallible>(Frame::data(e)));
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(s)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// A simulated failure: its status, message and `Retry-After`, or 502 when
/// it has no status.
fn sim_error(e: crate::providers::ProviderError, kind: &'static str) -> Response<Body> {
    match e {
        crate::providers::ProviderError::Status {
            status,
            message,
            retry_after_s,
        } => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = error_response(&ApiError::new(code, kind, "simulated", message));
            if let Some(s) = retry_after_s
                && let Ok(v) = HeaderValue::from_str(&s.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        e => error_response(&ApiError::new(
            StatusCode::BAD_GATEWAY,
            "api_error",
            "simulated",
            e.to_string(),
        )),
    }
}

/// The simulator's Anthropic Messages endpoint.
async fn sim_messages(sim: &SimProvider, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return method_not_allowed(req.method(), "/v1/messages");
    }
    let (parts, body) = match read_body(req, 64 << 20).await {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let output_tokens = parts
        .headers
        .get(crate::headers::SIM_OUTPUT_TOKENS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    match crate::providers::sim_anthropic::answer(sim, &body, output_tokens) {
        Ok((msg, false)) => json_response(StatusCode::OK, Bytes::from(msg.to_string())),
        Ok((msg, true)) => sim_events(futures_util::stream::iter(
            crate::providers::sim_anthropic::stream_events(&msg),
        )),
        Err(e) => sim_error(e, "invalid_request_error"),
    }
}

/// Binds `addr`, with a clear error when it is taken.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let sa: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    TcpListener::bind(sa)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
