//! Relays an upstream SSE stream to the client event by event while reading
//! the content, finish reason and usage out of it, then accounts the call.
//!
//! The gateway always asks the upstream for the usage chunk; a client that
//! did not ask for it does not get it. The cost, known only at the end, is
//! sent as an SSE comment (`: x-tollgate-cost-usd=...`) just before
//! `data: [DONE]`; SSE clients ignore comments.
//! If the client goes away, the upstream stream is dropped (generation stops)
//! and what was generated so far is billed as an estimate.

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::account::Accounting;
use super::format_cost;
use crate::api::{self, WireCompletion};
use crate::pricing::Usage;
use crate::providers::ByteStream;
use crate::providers::sse::{SseSplitter, event_data};

/// Events buffered between the upstream and a slow client.
const BUFFER: usize = 64;

pub fn relay(
    mut upstream: ByteStream,
    mut acct: Accounting,
    client_wants_usage: bool,
) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let mut splitter = SseSplitter::default();
        let mut seen = Seen::default();
        let mut accounted = false;
        'read: while let Some(item) = upstream.next().await {
            let bytes = match item {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(request_id = %acct.row.request_id, "upstream stream failed: {e}");
                    acct.row.error_code = Some("upstream_stream_broken".into());
                    let err = api::ApiError::new(
                        http::StatusCode::BAD_GATEWAY,
                        "api_error",
                        "upstream_stream_broken",
                        e.to_string(),
                    );
                    let _ = tx
                        .send(api::sse_data(&String::from_utf8_lossy(&err.body())))
                        .await;
                    break;
                }
            };
            for event in splitter.push(&bytes) {
                let data = event_data(&event);
                if data.as_deref() == Some("[DONE]") {
                    let cost = seen.account(&mut acct).await;
                    accounted = true;
                    if tx.send(cost_comment(cost)).await.is_err() {
                        break 'read;
                    }
                } else if let Some(d) = &data
                    && let Ok(chunk) = serde_json::from_str::<WireCompletion>(d)
                {
                    let usage_only = seen.observe(chunk);
                    if usage_only && !client_wants_usage {
                        continue;
                    }
                }
                if tx.send(event).await.is_err() {
                    break 'read;
                }
            }
        }
        if !accounted {
            let cost = seen.account(&mut acct).await;
            if let Some(rest) = splitter.finish() {
                let _ = tx.send(rest).await;
            }
            let _ = tx.send(cost_comment(cost)).await;
        }
    });
    rx
}

/// The SSE comment that carries a stream's cost.
fn cost_comment(cost: Option<f64>) -> Bytes {
    Bytes::from(format!(": x-tollgate-cost-usd={}\n\n", format_cost(cost)))
}

#[derive(Default)]
struct Seen {
    content: String,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl Seen {
    /// Reads one chunk; true when it carries only usage (no choices).
    fn observe(&mut self, chunk: WireCompletion) -> bool {
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
        }
        for c in &chunk.choices {
            if let Some(t) = c.delta.as_ref().and_then(|d| d.content.as_deref()) {
                self.content.push_str(t);
            }
            if let Some(f) = &c.finish_reason {
                self.finish = Some(f.clone());
            }
        }
        chunk.choices.is_empty() && chunk.usage.is_some()
    }

    async fn account(&mut self, acct: &mut Accounting) -> Option<f64> {
        let finish = self.finish.clone().unwrap_or_else(|| "interrupted".into());
        match self.usage {
            Some(u) => acct.finish(u, false, &self.content, &finish, None).await,
            None => {
                let u = acct.estimate(&self.content);
                acct.finish(u, true, &self.content, &finish, None).await
            }
        }
    }
}
