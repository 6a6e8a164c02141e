//! Starting the real binary on a free loopback port and talking to it, for
//! the end-to-end test binaries (each uses part of it).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

pub fn plugin_dir() -> PathBuf {
    std::env::var_os("TOLLGATE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"))
}

/// A running binary; killed on drop.
pub struct Proc {
    pub child: Child,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
    pub _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The admin listener's base URL, from the start-up log.
    pub fn admin_base(&self) -> String {
        let log = self.log.lock().unwrap();
        let line = log
            .iter()
            .find(|l| l.contains("admin API listening on http://"))
            .unwrap()
            .clone();
        let i = line.find("http://").unwrap();
        line[i..].split_whitespace().next().unwrap().to_string()
    }

    /// Whether a log line holds `needle`, waiting up to 5 s for it: the
    /// gateway writes its log from a background thread, so a line can come
    /// a moment after what it reports is visible.
    pub fn log_contains(&self, needle: &str) -> bool {
        let t = std::time::Instant::now();
        loop {
            if self.logged_so_far(needle) {
                return true;
            }
            if t.elapsed() > Duration::from_secs(5) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a line holding `needle` has been logged yet (no waiting).
    pub fn logged_so_far(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

pub fn spawn(args: &[&str], dir: tempfile::TempDir, marker: &str, envs: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("OPENAI_API_KEY")
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find(&marker) {
                let rest = &line[i + marker.len()..];
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                let _ = tx.send(addr);
            }
            log2.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("binary did not start: {:?}", log.lock().unwrap()));
    Proc {
        child,
        base: format!("http://{addr}"),
        log,
        _dir: dir,
    }
}

/// Starts the gateway with `config` ({plugins} is replaced by the plugin directory).
pub fn gateway(config: &str) -> Proc {
    gateway_env(config, &[])
}

pub fn gateway_env(config: &str, envs: &[(&str, &str)]) -> Proc {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let text = config.replace("{plugins}", &plugin_dir().display().to_string());
    std::fs::write(&path, text).unwrap();
    let p = path.display().to_string();
    spawn(
        &["serve", "--config", &p, "--listen", "127.0.0.1:0"],
        dir,
        "tollgate listening on http://",
        envs,
    )
}

pub fn sim_server() -> Proc {
    spawn(
        &["sim", "--listen", "127.0.0.1:0"],
        tempfile::tempdir().unwrap(),
        "simulator listening on http://",
        &[],
    )
}

/// An HTTP client (reqwest here has no default TLS backend: install one).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub async fn post(base: &str, headers: &[(&str, &str)], body: impl Into<reqwest::Body>) -> Resp {
    post_to(&format!("{base}/v1/chat/completions"), headers, body).await
}

pub async fn post_to(url: &str, headers: &[(&str, &str)], body: impl Into<reqwest::Body>) -> Resp {
    let mut req = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    Resp {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        text: r.text().await.unwrap(),
    }
}

pub async fn chat(base: &str, headers: &[(&str, &str)], body: Value) -> Resp {
    post(base, headers, body.to_string()).await
}

pub fn ask(text: &str) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
}

/// The `data:` payloads of an SSE body, parsed, until `[DONE]`.
pub fn sse_events(text: &str) -> (Vec<Value>, bool, Vec<String>) {
    let mut events = Vec::new();
    let mut done = false;
    let mut comments = Vec::new();
    for block in text.split("\n\n") {
        for line in block.lines() {
            if let Some(d) = line.strip_prefix("data: ") {
                if d == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(d).unwrap());
                }
            } else if let Some(c) = line.strip_prefix(": ") {
                comments.push(c.to_string());
            }
        }
    }
    (events, done, comments)
}

pub fn stream_content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

pub async fn get_text(url: impl reqwest::IntoUrl) -> String {
    http().get(url).send().await.unwrap().text().await.unwrap()
}

pub async fn get_json(url: &str) -> Value {
    let text = get_text(url).await;
    serde_json::from_str(&text).unwrap()
}

pub async fn metric(base: &str, name_and_labels: &str) -> f64 {
    let text = get_text(format!("{base}/metrics")).await;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("{name_and_labels} not in\n{text}"))
}

/// An admin API call made by "alice@ci": its status and JSON body.
pub async fn admin_call(
    admin: &str,
    token: &str,
    method: reqwest::Method,
    path: String,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http()
        .request(method, format!("{admin}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-tollgate-actor", "alice@ci");
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_str(&resp.text().await.unwrap()).unwrap(),
    )
}

/// The answer's text.
pub fn content(r: &Resp) -> String {
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
