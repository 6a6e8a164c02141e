//! Where `serve` writes its log: lines go into a bounded buffer in memory
//! and a background thread writes the buffer out every few milliseconds.
//!
//! Writing each line as it comes cost a write system call on the request
//! path (~20-30 µs of CPU per request at 3,000 requests a second); a channel
//! to a writer thread (tracing-appender) moved the call off the path but
//! woke that thread once per line: at 1,000 requests a second the wake-ups
//! alone were ~10% of the gateway's CPU. Here a line costs a copy under a
//! short lock, and the writer wakes on a timer, whatever the request rate.
//!
//! When the sink stalls (a full pipe, a stopped terminal) the buffer stops
//! growing at its bound and further lines are counted and dropped, and the
//! count is logged once the sink takes writes again: a slow stderr never
//! slows requests down or grows memory without bound.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the buffer is written out: short enough that a log follows
/// the requests it describes, long enough that its thread hardly wakes.
pub const FLUSH_EVERY: Duration = Duration::from_millis(25);

/// The most log text held while the sink does not take it.
pub const MAX_PENDING_BYTES: usize = 8 << 20;

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer early, to stop.
    wake: Condvar,
    dropped: AtomicU64,
    max_bytes: usize,
}

#[derive(Default)]
struct Pending {
    text: Vec<u8>,
    stopping: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only log text behind.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `tracing_subscriber` writer (`MakeWriter`): cheap to clone, one per
/// process.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Writes what is left and stops the writer thread when dropped: keep it
/// until the process exits.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchedWriter {
    /// Starts the writer thread for `sink`.
    pub fn new<W: Write + Send + 'static>(
        sink: W,
        every: Duration,
        max_bytes: usize,
    ) -> io::Result<(Self, FlushGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            max_bytes,
        });
        let thread = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared, sink, every)
            })?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Lines dropped so far because the sink did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

fn run<W: Write>(shared: &Shared, mut sink: W, every: Duration) {
    let mut out = Vec::new();
    loop {
        let stopping = {
            let mut p = shared.lock();
            if !p.stopping {
                p = shared
                    .wake
                    .wait_timeout(p, every)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            // The emptied buffer keeps its capacity for the next lines.
            std::mem::swap(&mut p.text, &mut out);
            p.stopping
        };
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            out.extend_from_slice(
                format!("tollgate: {dropped} log lines dropped: the log output did not keep up\n")
                    .as_bytes(),
            );
        }
        if !out.is_empty() {
            // Nowhere to report a failing log sink: the lines are lost.
            let _ = sink.write_all(&out).and_then(|()| sink.flush());
            out.clear();
        }
        if stopping {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut p = self.shared.lock();
        if p.stopping || p.text.len() + buf.len() > self.shared.max_bytes {
            drop(p);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            p.text.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read, and stall.
    #[derive(Clone, Default)]
    struct Sink {
        text: Arc<Mutex<Vec<u8>>>,
        stalled: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _wait = self.stalled.lock().unwrap();
            self.text.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn text(s: &Sink) -> String {
        String::from_utf8(s.text.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_arrive_in_order_within_a_few_intervals() {
        let sink = Sink::default();
        let (mut w, guard) =
            BatchedWriter::new(sink.clone(), Duration::from_millis(5), 1 << 20).unwrap();
        for i in 0..100 {
            writeln!(w, "line {i}").unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !text(&sink).contains("line 99") {
            assert!(std::time::Instant::now() < deadline, "not written");
            std::thread::sleep(Duration::from_millis(2));
        }
        let want: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text(&sink), want);
        drop(guard);
    }

    #[test]
    fn the_guard_writes_what_is_left() {
        let sink = Sink::default();
        let (mut w, guard) =
            BatchedWriter::new(sink.clone(), Duration::from_secs(3600), 1 << 20).unwrap();
        writeln!(w, "last words").unwrap();
        drop(guard);
        assert_eq!(text(&sink), "last words\n");
    }

    #[test]
    fn a_stalled_sink_bounds_the_buffer_and_counts_what_it_dropped() {
        let sink = Sink::default();
        let stall = sink.stalled.lock().unwrap();
        let (mut w, guard) =
            BatchedWriter::new(sink.clone(), Duration::from_millis(1), 100).unwrap();
        // The first batch is taken by the writer, which then blocks in the
        // sink; the next lines fill the buffer to its bound.
        writeln!(w, "first").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..50 {
            w.write_all(b"0123456789\n").unwrap();
        }
        assert_eq!(w.dropped(), 41, "100 bytes hold 9 lines of 11");
        drop(stall);
        drop(guard);
        let t = text(&sink);
        assert!(t.starts_with("first\n"), "{t}");
        assert_eq!(t.matches("0123456789").count(), 9, "{t}");
        assert!(t.contains("41 log lines dropped"), "{t}");
    }
}
