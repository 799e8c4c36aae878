//! Log multiplexing, like `fly logs`: every line a machine writes (stdout and
//! stderr) and every event of the cluster itself comes out on one stream with
//! a prefix naming its source (`[100 3f8a0c2e1b7d44] ...`, `[dev] ...`).
//!
//! The last lines are also kept in memory, so that a test (or the admin API)
//! can show what the machines said around a failure.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

const KEPT_LINES: usize = 4000;

/// Where lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogSink {
    /// Printed on stdout (through `println!`, so the test harness captures it).
    Stdout,
    /// Only kept in memory.
    Quiet,
}

#[derive(Clone)]
pub struct Logs {
    sink: LogSink,
    recent: Arc<Mutex<VecDeque<String>>>,
}

impl Logs {
    pub fn new(sink: LogSink) -> Logs {
        Logs {
            sink,
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES))),
        }
    }

    /// Emits one line under `prefix`.
    pub fn line(&self, prefix: &str, text: &str) {
        let line = format!("[{prefix}] {}", text.trim_end());
        if self.sink == LogSink::Stdout {
            println!("{line}");
        }
        let mut recent = self.recent.lock().unwrap();
        if recent.len() == KEPT_LINES {
            recent.pop_front();
        }
        recent.push_back(line);
    }

    /// An event of the cluster itself.
    pub fn event(&self, text: impl AsRef<str>) {
        self.line("dev", text.as_ref());
    }

    /// The last `n` lines, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let recent = self.recent.lock().unwrap();
        recent
            .iter()
            .skip(recent.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// Copies lines from a child's pipe until it closes.
    pub fn pump(&self, prefix: String, pipe: impl AsyncRead + Unpin + Send + 'static) {
        let logs = self.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // Bytes, not `lines()`: a machine's non-UTF-8 output must not
                // end its log stream.
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => logs.line(&prefix, &String::from_utf8_lossy(&buf)),
                }
            }
        });
    }
}
