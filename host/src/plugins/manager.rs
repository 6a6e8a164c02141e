//! Plugin versions the admin API has loaded, per slot, beside the active set:
//! loading validates a version and keeps it ready; activating swaps it into
//! a new plugin set (one atomic pointer store: requests in flight finish on
//! the set they started with); the version it replaced is kept for rollback.

use std::collections::{BTreeMap, HashMap};

use super::slots::{AnySlot, SlotId};

/// Loaded versions kept per slot; the oldest unused one goes first.
const KEEP_PER_SLOT: usize = 8;

/// A validated plugin version waiting in a slot.
#[derive(Clone)]
pub struct Staged {
    pub plugin: AnySlot,
    /// The digest and every setting (config, limits, grants, failure mode):
    /// the same bytes with another config are another version.
    pub version: String,
    pub loaded_at_ms: u64,
    pub loaded_by: String,
    /// Where the bytes came from: a path under the plugin directory, or "upload".
    pub source: String,
}

#[derive(Default)]
pub struct Versions {
    staged: BTreeMap<SlotId, Vec<Staged>>,
    /// What each slot held before its last activation (None: it was empty).
    previous: HashMap<SlotId, Option<AnySlot>>,
    /// Required sha256 per slot, from the config.
    pins: HashMap<SlotId, String>,
}

impl Versions {
    pub fn new(pins: HashMap<SlotId, String>) -> Self {
        Self {
            pins,
            ..Self::default()
        }
    }

    pub fn pin(&self, slot: SlotId) -> Option<&str> {
        self.pins.get(&slot).map(String::as_str)
    }

    /// Keeps a validated version (replacing an identical one).
    pub fn stage(&mut self, slot: SlotId, s: Staged) {
        let list = self.staged.entry(slot).or_default();
        list.retain(|x| x.version != s.version);
        list.push(s);
        if list.len() > KEEP_PER_SLOT {
            list.remove(0);
        }
    }

    /// A staged version by its version id or its sha256 (or a unique prefix
    /// of either, at least 8 characters).
    pub fn find(&self, slot: SlotId, id: &str) -> Result<&Staged, String> {
        let list = self.staged.get(&slot).map(Vec::as_slice).unwrap_or(&[]);
        let id = id.to_ascii_lowercase();
        if id.len() < 8 {
            return Err("give the version or the sha256 (at least 8 characters)".into());
        }
        let shown = || {
            list.iter()
                .map(|s| format!("{} (sha256 {})", s.version, &s.plugin.digest()[..12]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut found = list
            .iter()
            .filter(|s| s.version.starts_with(&id) || s.plugin.digest().starts_with(&id));
        match (found.next(), found.next()) {
            (Some(s), None) => Ok(s),
            (Some(_), Some(_)) => Err(format!(
                "{id} matches several loaded versions of {slot}; give the version: {}",
                shown()
            )),
            (None, _) => Err(format!(
                "no loaded version {id} for slot {slot}; load it first (loaded: {})",
                shown()
            )),
        }
    }

    /// Remembers what a slot held before a change.
    pub fn replaced(&mut self, slot: SlotId, before: Option<AnySlot>) {
        self.previous.insert(slot, before);
    }

    /// What a rollback of `slot` would put back.
    pub fn previous(&self, slot: SlotId) -> Option<&Option<AnySlot>> {
        self.previous.get(&slot)
    }

    /// Loaded versions of every slot, for the admin API.
    pub fn describe(&self) -> serde_json::Value {
        let slots: serde_json::Map<String, serde_json::Value> = self
            .staged
            .iter()
            .map(|(slot, list)| {
                let versions: Vec<serde_json::Value> = list
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "version": s.version,
                            "name": s.plugin.name(),
                            "sha256": s.plugin.digest(),
                            "kind": s.plugin.kind().world(),
                            "loaded_at_ms": s.loaded_at_ms,
                            "loaded_by": s.loaded_by,
                            "source": s.source,
                        })
                    })
                    .collect();
                (slot.to_string(), serde_json::Value::Array(versions))
            })
            .collect();
        let pins: serde_json::Map<String, serde_json::Value> = self
            .pins
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
            .collect();
        serde_json::json!({ "loaded": slots, "pins": pins })
    }
}
