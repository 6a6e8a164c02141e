//! Which language a plugin was written in, read from its component: the
//! `producers` metadata toolchains record, and the shared libraries a
//! Python component links. It picks the limits a slot gets when it sets
//! none: an interpreter (CPython, SpiderMonkey) runs a policy tens of times
//! slower than compiled code, and slowest on an instance's first call,
//! while its instance is already warm after `init` (its heap is a snapshot
//! taken at build time), so it needs a longer deadline — not more memory or
//! fuel than the defaults allow.

use wasmparser::{KnownCustom, Parser, Payload};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Rust,
    C,
    Python,
    JavaScript,
    Unknown,
}

impl Language {
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::C => "c",
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::Unknown => "unknown",
        }
    }

    /// Run by an interpreter (CPython, SpiderMonkey) compiled into the
    /// component, rather than compiled to WebAssembly themselves.
    fn interpreted(self) -> bool {
        matches!(self, Language::Python | Language::JavaScript)
    }

    /// Deadline of one call when the slot sets no `timeout_ms`. Measured
    /// here (release, 2 cores): Rust and C policies answer in about a
    /// microsecond; a warm Python router in ~10 µs and a JavaScript cache
    /// policy in ~40 µs, but their first call on a new instance takes up to
    /// a few milliseconds (lazy compilation of regular expressions and code
    /// paths), which a 5 ms deadline would turn into failures on a busy host.
    pub fn default_timeout_ms(self) -> u64 {
        if self.interpreted() { 25 } else { 5 }
    }

    /// Fuel of one call when the slot sets no `fuel`. An interpreter burns
    /// instructions interpreting: measured here, the JavaScript example
    /// spends 2-8 million per call and up to ~50 million scanning a pasted
    /// 20,000-character document, the Python one 0.5-3 million; Rust and C
    /// policies need tens of thousands. The deadline still bounds every call.
    pub fn default_fuel(self) -> u64 {
        if self.interpreted() {
            500_000_000
        } else {
            50_000_000
        }
    }

    /// Deadline of instantiation and `init` when the slot sets no `init_timeout_ms`.
    pub fn default_init_timeout_ms(self) -> u64 {
        if self.interpreted() { 5_000 } else { 1_000 }
    }
}

/// The language `bytes` (a component) was written in. Never fails: what
/// cannot be read is `Unknown`, and the component's validity is checked
/// elsewhere.
pub fn detect(bytes: &[u8]) -> Language {
    let mut found = Language::Unknown;
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            // componentize-py links CPython as shared libraries; its
            // producers section names no language.
            Payload::ImportSection(imports) => {
                let python = imports
                    .into_iter()
                    .flatten()
                    .flat_map(|group| group.into_iter().flatten())
                    .any(|(_, i)| {
                        i.module.starts_with("libpython3")
                            || i.module.starts_with("libcomponentize_py")
                    });
                if python {
                    return Language::Python;
                }
            }
            Payload::CustomSection(c) => {
                let KnownCustom::Producers(reader) = c.as_known() else {
                    continue;
                };
                let (mut rust, mut c_lang) = (false, false);
                for field in reader.into_iter().flatten() {
                    for value in field.values.into_iter().flatten() {
                        match (field.name, value.name) {
                            ("language", "JavaScript") | ("processed-by", "ComponentizeJS") => {
                                return Language::JavaScript;
                            }
                            ("processed-by", "wit-bindgen-rust") | ("language", "Rust") => {
                                rust = true;
                            }
                            ("language", "C99" | "C11") => c_lang = true,
                            _ => {}
                        }
                    }
                }
                // A module in C outweighs the Rust WASI adapter linked
                // beside it; a Rust module that links C objects is Rust.
                if c_lang && !rust {
                    found = Language::C;
                } else if rust && found == Language::Unknown {
                    found = Language::Rust;
                }
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_component_is_unknown() {
        assert_eq!(detect(b"not wasm"), Language::Unknown);
        assert_eq!(detect(&[]), Language::Unknown);
        assert_eq!(Language::Python.default_timeout_ms(), 25);
        assert_eq!(Language::Rust.default_timeout_ms(), 5);
    }
}
