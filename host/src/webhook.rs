//! JSON POSTs to endpoints outside the gateway (budget alerts, deferred
//! results): one HTTP client per sender, a few attempts with a growing
//! pause, a log line for every failed attempt.

use std::time::Duration;

use bytes::Bytes;

/// Attempts per delivery.
pub const ATTEMPTS: u32 = 3;

pub struct Webhook {
    /// What is delivered, for log lines ("alert webhook", "deferred callback").
    what: &'static str,
    /// None only if no HTTP client could be built: nothing is delivered.
    client: Option<reqwest::Client>,
    /// Pause after attempt n is n × this.
    pause: Duration,
}

impl Webhook {
    pub fn new(what: &'static str, timeout: Duration, pause: Duration) -> Self {
        let client = crate::providers::http_client()
            .timeout(timeout)
            .build()
            .inspect_err(|e| tracing::error!("{what} client: {e}; nothing will be delivered"))
            .ok();
        Self {
            what,
            client,
            pause,
        }
    }

    /// POSTs `body` (JSON) to `url`; whether it was accepted (2xx) within
    /// [`ATTEMPTS`] attempts.
    pub async fn post(&self, url: &str, body: Bytes) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        let what = self.what;
        for attempt in 1..=ATTEMPTS {
            let req = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.clone());
            match req.send().await {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => {
                    tracing::warn!(url, status = r.status().as_u16(), attempt, "{what} refused")
                }
                Err(e) => tracing::warn!(url, attempt, "{what} failed: {e}"),
            }
            tokio::time::sleep(self.pause * attempt).await;
        }
        false
    }
}
