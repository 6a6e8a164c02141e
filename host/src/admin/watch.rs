//! GitOps-style deployment: the plugin directory as the desired state.
//!
//! With `admin.watch = true`, a file `<slot>.wasm` in `admin.plugin_dir`
//! (`router.wasm`, `compressor.wasm`, `compressor[1].wasm`,
//! `cache_policy.wasm`, `budget_rule.wasm`), with its slot settings in an
//! optional `<slot>.toml` beside it (`config`, limits, `on_error`,
//! `[[self_test]]` cases), is loaded and activated when either file appears
//! or changes — through the same validation, pins and self-tests as the
//! admin API, recorded with the actor `watch`. A file that fails is refused
//! and logged; the active version keeps serving. Other files are ignored.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::pipeline::Gateway;
use crate::plugins::SlotId;

/// Writes arrive in bursts (create, write, close, rename): wait this long
/// after the last event before loading.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
#[error("cannot watch plugin directory {path}: {message}")]
pub struct WatchError {
    path: String,
    message: String,
}

/// The slot a file name stands for, if it is `<slot>.wasm` or `<slot>.toml`.
fn slot_of(path: &Path) -> Option<SlotId> {
    let ext = path.extension()?.to_str()?;
    if ext != "wasm" && ext != "toml" {
        return None;
    }
    SlotId::parse(path.file_stem()?.to_str()?).ok()
}

/// Watches `dir` (not recursively) for created or modified files; `pick`
/// turns a changed path into what the receiver gets (None: ignored). Keep
/// the watcher alive.
pub fn watch_dir<T: Send + 'static>(
    dir: &Path,
    pick: impl Fn(&Path) -> Option<T> + Send + 'static,
) -> notify::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<T>)> {
    let (handler, rx) = changes(pick);
    let mut watcher = notify::recommended_watcher(handler)?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

/// An event handler for any watcher that sends what `pick` makes of each
/// created or modified path (None: ignored), and the receiving end.
pub fn changes<T: Send + 'static>(
    pick: impl Fn(&Path) -> Option<T> + Send + 'static,
) -> (impl notify::EventHandler, mpsc::UnboundedReceiver<T>) {
    let (tx, rx) = mpsc::unbounded_channel::<T>();
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && (event.kind.is_create() || event.kind.is_modify())
        {
            for item in event.paths.iter().filter_map(|p| pick(p)) {
                let _ = tx.send(item);
            }
        }
    };
    (handler, rx)
}

/// The next burst of changes: waits for one, then takes more until none
/// has come for [`SETTLE`]. None when the watcher is gone.
pub async fn next_burst<T: Ord>(rx: &mut mpsc::UnboundedReceiver<T>) -> Option<BTreeSet<T>> {
    let mut burst = BTreeSet::from([rx.recv().await?]);
    while let Ok(Some(item)) = tokio::time::timeout(SETTLE, rx.recv()).await {
        burst.insert(item);
    }
    Some(burst)
}

/// Starts watching; the returned watcher must be kept alive.
pub fn spawn(gw: Arc<Gateway>) -> Result<Option<notify::RecommendedWatcher>, WatchError> {
    if !gw.config.admin.watch {
        return Ok(None);
    }
    let Some(dir) = gw.config.admin.plugin_dir.clone() else {
        return Ok(None);
    };
    let err = |e: notify::Error| WatchError {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    let (watcher, rx) = watch_dir(&dir, slot_of).map_err(err)?;
    tracing::info!(dir = %dir.display(), "watching the plugin directory: <slot>.wasm and <slot>.toml are deployed on change");
    tokio::spawn(apply(gw, rx));
    Ok(Some(watcher))
}

/// Collects changed slots until the directory settles, then deploys each.
async fn apply(gw: Arc<Gateway>, mut rx: mpsc::UnboundedReceiver<SlotId>) {
    while let Some(slots) = next_burst(&mut rx).await {
        for slot in slots {
            deploy(&gw, slot).await;
        }
    }
}

async fn deploy(gw: &Arc<Gateway>, slot: SlotId) {
    let Some(dir) = gw.config.admin.plugin_dir.clone() else {
        return;
    };
    let wasm = format!("{slot}.wasm");
    if !dir.join(&wasm).exists() {
        return; // settings alone wait for their plugin
    }
    let mut body = match settings(&dir.join(format!("{slot}.toml"))).await {
        Ok(b) => b,
        Err(message) => {
            tracing::warn!(%slot, "plugin directory: {message}; the active version keeps serving");
            return;
        }
    };
    body.insert("path".into(), Value::String(wasm));
    body.insert("activate".into(), Value::Bool(true));
    let raw = Value::Object(body).to_string();
    match super::plugins::load(gw, slot, "watch", raw.as_bytes()).await {
        Ok(v) => tracing::info!(%slot, sha256 = %v["sha256"], "plugin directory: deployed"),
        Err(e) => {
            tracing::warn!(%slot, code = e.code, "plugin directory: refused, the active version keeps serving: {}", e.message)
        }
    }
}

/// The slot settings of `<slot>.toml` as the admin load body; none when absent.
async fn settings(path: &Path) -> Result<serde_json::Map<String, Value>, String> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Map::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: toml::Value = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match serde_json::to_value(v) {
        Ok(Value::Object(o)) => Ok(o),
        _ => Err(format!(
            "{}: expected a table of slot settings",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slot_files_count() {
        assert_eq!(slot_of(Path::new("/p/router.wasm")), Some(SlotId::Router));
        assert_eq!(
            slot_of(Path::new("/p/compressor[1].toml")),
            Some(SlotId::Compressor(1))
        );
        assert_eq!(slot_of(Path::new("/p/rules_router.wasm")), None);
        assert_eq!(slot_of(Path::new("/p/router.wasm.tmp")), None);
        assert_eq!(slot_of(Path::new("/p/router")), None);
    }
}
