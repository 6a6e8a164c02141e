//! `tollgate plugin inspect`: what a security reviewer reads before a
//! plugin is deployed — the world it implements, everything it imports and
//! exports, its size and digest, and which capabilities those imports ask
//! for next to what the gateway grants.

use serde_json::{Value, json};
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use super::LoadError;
use super::runtime::Runtime;

/// Whether a slot's grants allow an import: None when they do, else why not.
pub fn refusal(name: &str, grants: &crate::config::Capabilities) -> Option<String> {
    let iface = name.split('@').next().unwrap_or(name);
    if iface.starts_with("wasi:sockets/") {
        return Some("network access is never granted to a plugin".into());
    }
    if iface == "tollgate:policy/spend" && !grants.spend {
        return Some("spend figures are not granted; give the slot `capabilities.spend = true` if the plugin needs them".into());
    }
    if iface == "tollgate:policy/embed" && !grants.embed {
        return Some("embeddings are not granted; give the slot `capabilities.embed = true` if the plugin needs them".into());
    }
    // The filesystem is linked for every plugin (the Python and JavaScript
    // runtimes import it whether or not they read files), but holds
    // nothing unless the slot grants `capabilities.data_dir`: WASI opens
    // files only under a preopened directory, and none is given.
    None
}

/// What an import asks for, and what the gateway gives it.
fn capability(name: &str) -> (&'static str, &'static str) {
    let iface = name.split('@').next().unwrap_or(name);
    match iface {
        "tollgate:policy/host" => (
            "host functions",
            "granted: count-tokens, hash, now-ms (gateway clock), log (capped per call)",
        ),
        "tollgate:policy/types" => ("policy types", "granted (types only)"),
        "tollgate:policy/spend" => (
            "spend figures",
            "refused unless the slot grants capabilities.spend: today's spend of the request's tenant, feature and user",
        ),
        "tollgate:policy/embed" => (
            "embeddings",
            "refused unless the slot grants capabilities.embed: sentence embeddings from the gateway's model, at most 8 per call, within the call's deadline",
        ),
        i if i.starts_with("wasi:filesystem/") => (
            "filesystem",
            "linked empty (every open fails) unless the slot grants capabilities.data_dir: then that directory, read-only, as /data",
        ),
        i if i.starts_with("wasi:sockets/") => {
            ("network", "refused: plugins never get network access")
        }
        "wasi:cli/environment" => ("environment", "linked, empty: no variables, no arguments"),
        i if i.starts_with("wasi:cli/std") || i.starts_with("wasi:cli/terminal") => (
            "standard streams",
            "linked: stdin is empty, stdout is discarded, stderr is kept as the plugin's error tail",
        ),
        "wasi:cli/exit" => ("exit", "linked: exiting traps the call"),
        i if i.starts_with("wasi:clocks/") => ("clocks", "linked: wall and monotonic clocks"),
        i if i.starts_with("wasi:random/") => ("randomness", "linked"),
        i if i.starts_with("wasi:io/") => ("streams and polling", "linked"),
        _ => (
            "unknown",
            "not offered by the gateway: the plugin is refused at load",
        ),
    }
}

fn world_of(exports: &[String]) -> Option<&'static str> {
    let has = |n: &str| exports.iter().any(|e| e == n);
    if !has("init") {
        return None;
    }
    if has("route") {
        Some("router")
    } else if has("compress") {
        Some("compressor")
    } else if has("lookup") && has("admit") {
        Some("cache-policy")
    } else if has("check") {
        Some("budget-rule")
    } else {
        None
    }
}

impl Runtime {
    /// Describes a component without instantiating it or running any of its code.
    pub fn inspect(&self, bytes: &[u8], path: &str) -> Result<Value, LoadError> {
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
            path: path.into(),
            message: format!("{e:#}"),
        })?;
        let ty = component.component_type();
        // An import refused even with every grant can never be loaded.
        let every_grant = crate::config::Capabilities {
            data_dir: Some(std::path::PathBuf::from("/data")),
            spend: true,
            embed: true,
        };
        let mut never = None;
        let mut imports = Vec::new();
        for (name, item) in ty.imports(&self.engine) {
            if never.is_none() {
                never = refusal(name, &every_grant).map(|m| format!("imports {name}: {m}"));
            }
            let functions: Vec<String> = match item.ty {
                ComponentItem::ComponentInstance(i) => i
                    .exports(&self.engine)
                    .map(|(n, _)| n.to_string())
                    .collect(),
                _ => Vec::new(),
            };
            let (what, granted) = capability(name);
            imports.push(json!({
                "name": name, "capability": what, "gateway": granted, "items": functions,
            }));
        }
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let world = world_of(&exports);
        let links = self
            .linker
            .instantiate_pre(&component)
            .err()
            .map(|e| format!("{e:#}"));
        // Grants a slot can give are reported by `needs_spend` / `needs_embed`.
        let links = links.or(never);
        let mut needs: Vec<&str> = imports
            .iter()
            .filter_map(|i| i["capability"].as_str())
            .filter(|c| !matches!(*c, "host functions" | "policy types"))
            .collect();
        needs.sort_unstable();
        needs.dedup();
        Ok(json!({
            "file": path,
            "bytes": bytes.len(),
            "sha256": super::sha256_hex(bytes),
            "world": world,
            "language": super::language::detect(bytes).name(),
            "exports": exports,
            "imports": imports,
            "wasi_capabilities_imported": needs,
            "imports_filesystem": imports.iter().any(|i| i["capability"] == "filesystem"),
            "needs_spend": imports.iter().any(|i| i["capability"] == "spend figures"),
            "needs_embed": imports.iter().any(|i| i["capability"] == "embeddings"),
            "loadable": links.is_none() && world.is_some(),
            "refused_because": links.or_else(|| world.is_none().then(|| {
                "exports match no policy world (router, compressor, cache-policy, budget-rule)".to_string()
            })),
        }))
    }
}

/// Grants an inspected plugin may need, by the report's key.
const GRANTS_NEEDED: [(&str, &str); 2] = [
    (
        "needs_spend",
        "capabilities.spend (it imports the spend figures)",
    ),
    ("needs_embed", "capabilities.embed (it imports embeddings)"),
];

/// The inspection as text for a terminal.
pub fn inspection_text(v: &Value) -> String {
    use std::fmt::Write as _;
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    let _ = writeln!(out, "file      {}", s("file"));
    let _ = writeln!(out, "size      {} bytes", v["bytes"]);
    let _ = writeln!(out, "sha256    {}", s("sha256"));
    let _ = writeln!(
        out,
        "world     {}",
        v["world"].as_str().unwrap_or("none (not a policy plugin)")
    );
    let exports: Vec<&str> = v["exports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let _ = writeln!(out, "language  {}", s("language"));
    let _ = writeln!(out, "exports   {}", exports.join(", "));
    let _ = writeln!(out, "imports");
    for i in v["imports"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<40} {:<20} {}",
            i["name"].as_str().unwrap_or(""),
            i["capability"].as_str().unwrap_or(""),
            i["gateway"].as_str().unwrap_or("")
        );
    }
    match v["refused_because"].as_str() {
        None if GRANTS_NEEDED.iter().any(|(k, _)| v[*k] == true) => {
            let grants: Vec<&str> = GRANTS_NEEDED
                .iter()
                .filter(|(k, _)| v[*k] == true)
                .map(|(_, g)| *g)
                .collect();
            let _ = writeln!(
                out,
                "verdict   loadable only into a slot that grants {}",
                grants.join(" and ")
            );
        }
        None => {
            let _ = writeln!(
                out,
                "verdict   loadable: imports only what the gateway offers"
            );
        }
        Some(why) => {
            let _ = writeln!(out, "verdict   refused at load: {why}");
        }
    }
    out
}
