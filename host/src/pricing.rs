//! The price catalog: what a token costs on each model. Shipped in
//! `host/pricing.toml`; a gateway config adds or overrides models.

use std::collections::BTreeMap;

use serde::Deserialize;

const BUILTIN: &str = include_str!("../pricing.toml");

/// Prices of one model, USD per million tokens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    #[serde(default)]
    pub tier: u8,
    /// Who sells the model (`openai`, `anthropic`, ...), for reports.
    #[serde(default)]
    pub provider: Option<String>,
    pub input: f64,
    /// Defaults to the input price when a provider has no prompt-cache discount.
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Price of prompt tokens written to the provider's cache; defaults to input.
    #[serde(default)]
    pub cache_write: Option<f64>,
    pub output: f64,
    /// Fraction off every price for batch API calls.
    #[serde(default)]
    pub batch_discount: f64,
}

impl ModelPrice {
    pub fn cached_input(&self) -> f64 {
        self.cached_input.unwrap_or(self.input)
    }

    pub fn cache_write(&self) -> f64 {
        self.cache_write.unwrap_or(self.input)
    }
}

/// Token counts of one upstream call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt tokens: uncached, read from the cache and written to it.
    pub prompt_tokens: u32,
    /// Prompt tokens read from the provider's cache.
    pub cached_tokens: u32,
    /// Prompt tokens written to the provider's cache (Anthropic).
    pub cache_write_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    models: BTreeMap<String, ModelPrice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    models: BTreeMap<String, ModelPrice>,
}

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("price catalog {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("price of {model}: {message}")]
    Invalid { model: String, message: String },
}

impl Catalog {
    /// The catalog shipped with the gateway.
    pub fn builtin() -> Result<Self, PricingError> {
        Self::parse(BUILTIN, "host/pricing.toml (built in)")
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, PricingError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| PricingError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut c = Self::default();
        for (name, price) in file.models {
            c.insert(name, price)?;
        }
        Ok(c)
    }

    /// Adds or replaces a model's price.
    pub fn insert(&mut self, model: String, price: ModelPrice) -> Result<(), PricingError> {
        let fields = [
            ("input", price.input),
            ("cached_input", price.cached_input()),
            ("cache_write", price.cache_write()),
            ("output", price.output),
        ];
        for (name, v) in fields {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PricingError::Invalid {
                    model,
                    message: format!("`{name}` must be a non-negative number, got {v}"),
                });
            }
        }
        if !(0.0..1.0).contains(&price.batch_discount) {
            return Err(PricingError::Invalid {
                model,
                message: format!(
                    "`batch_discount` must be in [0, 1), got {}",
                    price.batch_discount
                ),
            });
        }
        self.models.insert(model, price);
        Ok(())
    }

    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model)
    }

    pub fn models(&self) -> impl Iterator<Item = (&String, &ModelPrice)> {
        self.models.iter()
    }

    /// Cost in USD of `usage` on `model`; `None` when the model has no price
    /// (recorded as unpriced, never as zero).
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        let p = self.get(model)?;
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let written = usage.cache_write_tokens.min(usage.prompt_tokens - cached);
        let uncached = usage.prompt_tokens - cached - written;
        Some(
            (f64::from(uncached) * p.input
                + f64::from(cached) * p.cached_input()
                + f64::from(written) * p.cache_write()
                + f64::from(usage.completion_tokens) * p.output)
                / 1e6,
        )
    }

    /// Worst-case cost of a call before it is made: every prompt token at the
    /// full input price and every allowed output token.
    pub fn worst_case(&self, model: &str, prompt_tokens: u32, max_output: u32) -> Option<f64> {
        let p = self.get(model)?;
        Some((f64::from(prompt_tokens) * p.input + f64::from(max_output) * p.output) / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_matches_the_simulation_prices() {
        let c = Catalog::builtin().unwrap();
        let p = c.get("gpt-4o").unwrap();
        assert_eq!(
            (p.tier, p.input, p.cached_input(), p.output),
            (3, 2.5, 1.25, 10.0)
        );
    }

    #[test]
    fn cost_splits_cached_and_uncached_input() {
        let c = Catalog::builtin().unwrap();
        let u = Usage {
            prompt_tokens: 2000,
            cached_tokens: 1024,
            cache_write_tokens: 0,
            completion_tokens: 100,
        };
        let want = (976.0 * 2.5 + 1024.0 * 1.25 + 100.0 * 10.0) / 1e6;
        assert!((c.cost("gpt-4o", &u).unwrap() - want).abs() < 1e-12);
        assert_eq!(c.cost("no-such-model", &u), None);
    }

    #[test]
    fn cache_writes_are_billed_at_the_write_price() {
        let c = Catalog::builtin().unwrap();
        // Anthropic: 100 uncached + 3000 read + 2000 written, 50 out.
        let u = Usage {
            prompt_tokens: 5100,
            cached_tokens: 3000,
            cache_write_tokens: 2000,
            completion_tokens: 50,
        };
        let want = (100.0 * 3.0 + 3000.0 * 0.30 + 2000.0 * 3.75 + 50.0 * 15.0) / 1e6;
        let got = c.cost("claude-sonnet-4-5", &u).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn catalog_covers_the_major_providers() {
        let c = Catalog::builtin().unwrap();
        for (m, provider) in [
            ("gpt-4o", "openai"),
            ("claude-sonnet-4-5", "anthropic"),
            ("gemini-2.5-flash", "google"),
            ("deepseek-chat", "deepseek"),
        ] {
            assert_eq!(c.get(m).unwrap().provider.as_deref(), Some(provider), "{m}");
        }
        assert_eq!(c.get("gpt-4o").unwrap().batch_discount, 0.5);
    }

    #[test]
    fn rejects_negative_prices() {
        let err = Catalog::parse("[models.x]\ninput = -1\noutput = 1\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("`input` must be a non-negative"),
            "{err}"
        );
    }
}
