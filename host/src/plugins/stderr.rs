//! A plugin's stderr, kept as a short tail. A Rust plugin that panics
//! writes the panic message there just before it traps; the host puts that
//! line into the error so the plugin's author sees why, not just "unreachable".

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Bytes of stderr kept per instance (the end of the output).
const KEEP: usize = 4096;

#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<Vec<u8>>>);

impl StderrTail {
    fn push(&self, bytes: &[u8]) {
        if let Ok(mut buf) = self.0.lock() {
            buf.extend_from_slice(bytes);
            if buf.len() > KEEP {
                let cut = buf.len() - KEEP;
                buf.drain(..cut);
            }
        }
    }

    pub fn clear(&self) {
        if let Ok(mut buf) = self.0.lock() {
            buf.clear();
        }
    }

    /// The most telling line written so far: a Rust panic message if there
    /// is one, else the last non-empty line.
    pub fn last_message(&self) -> Option<String> {
        let buf = self.0.lock().ok()?;
        let text = String::from_utf8_lossy(&buf);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let panic_at = lines.iter().rposition(|l| l.contains("panicked at"));
        let line = match panic_at {
            // Rust prints "panicked at src/lib.rs:1:2:" then the message on the next line.
            Some(i) => lines[i..lines.len().min(i + 2)].join(" "),
            None => lines.last()?.to_string(),
        };
        Some(line.chars().take(400).collect())
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrTail {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_and_finds_the_panic() {
        let t = StderrTail::default();
        t.push(&vec![b'x'; 10_000]);
        t.push(b"\nthread '<unnamed>' panicked at src/lib.rs:3:5:\nboom\nnote: run with RUST_BACKTRACE=1\n");
        assert!(t.0.lock().unwrap().len() <= KEEP);
        assert_eq!(
            t.last_message().unwrap(),
            "thread '<unnamed>' panicked at src/lib.rs:3:5: boom"
        );
        t.clear();
        assert_eq!(t.last_message(), None);
    }
}
