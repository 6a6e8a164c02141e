//! Slots of the pipeline by name, and a plugin of any kind, so the admin API
//! can load, activate, roll back and remove plugins without knowing their
//! kind at compile time.

use super::{
    BudgetRuleKind, CachePolicyKind, CompressorKind, Kind, PluginKind, PluginSet, RouterKind, Slot,
};
use crate::config::FailMode;

/// A place in the pipeline: `router`, `compressor[N]` (`compressor` is
/// `compressor[0]`), `cache_policy`, `budget_rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotId {
    Router,
    Compressor(usize),
    CachePolicy,
    BudgetRule,
}

impl SlotId {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "router" => Ok(SlotId::Router),
            "cache_policy" => Ok(SlotId::CachePolicy),
            "budget_rule" => Ok(SlotId::BudgetRule),
            "compressor" => Ok(SlotId::Compressor(0)),
            other => other
                .strip_prefix("compressor[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
                .filter(|n| *n < 64)
                .map(SlotId::Compressor)
                .ok_or_else(|| {
                    format!(
                        "unknown slot {other:?} (router, compressor, compressor[N], cache_policy, budget_rule)"
                    )
                }),
        }
    }

    pub fn kind(self) -> PluginKind {
        match self {
            SlotId::Router => PluginKind::Router,
            SlotId::Compressor(_) => PluginKind::Compressor,
            SlotId::CachePolicy => PluginKind::CachePolicy,
            SlotId::BudgetRule => PluginKind::BudgetRule,
        }
    }
}

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotId::Router => f.write_str("router"),
            SlotId::Compressor(i) => write!(f, "compressor[{i}]"),
            SlotId::CachePolicy => f.write_str("cache_policy"),
            SlotId::BudgetRule => f.write_str("budget_rule"),
        }
    }
}

/// A loaded plugin of any kind, with its slot's failure mode.
#[derive(Clone)]
pub enum AnySlot {
    Router(Slot<RouterKind>),
    Compressor(Slot<CompressorKind>),
    CachePolicy(Slot<CachePolicyKind>),
    BudgetRule(Slot<BudgetRuleKind>),
}

macro_rules! each {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            AnySlot::Router($s) => $e,
            AnySlot::Compressor($s) => $e,
            AnySlot::CachePolicy($s) => $e,
            AnySlot::BudgetRule($s) => $e,
        }
    };
}

impl AnySlot {
    pub fn kind(&self) -> PluginKind {
        fn k<K: Kind>(_: &Slot<K>) -> PluginKind {
            K::KIND
        }
        each!(self, s => k(s))
    }

    pub fn name(&self) -> &str {
        each!(self, s => s.plugin.name())
    }

    pub fn digest(&self) -> &str {
        each!(self, s => s.plugin.digest())
    }

    pub fn fail_mode(&self) -> FailMode {
        each!(self, s => s.fail_mode)
    }

    pub fn describe(&self) -> serde_json::Value {
        each!(self, s => s.plugin.describe())
    }
}

impl PluginSet {
    /// The plugin in a slot, if any.
    pub fn get(&self, id: SlotId) -> Option<AnySlot> {
        match id {
            SlotId::Router => self.router.clone().map(AnySlot::Router),
            SlotId::Compressor(i) => self.compressors.get(i).cloned().map(AnySlot::Compressor),
            SlotId::CachePolicy => self.cache_policy.clone().map(AnySlot::CachePolicy),
            SlotId::BudgetRule => self.budget_rule.clone().map(AnySlot::BudgetRule),
        }
    }

    /// A copy of this set with `plugin` in slot `id` (None empties it). A
    /// compressor goes at an existing position or right after the last one;
    /// removing one closes the gap.
    pub fn with(&self, id: SlotId, plugin: Option<AnySlot>) -> Result<PluginSet, String> {
        let mut set = self.clone();
        let wrong = |p: &AnySlot| {
            Err(format!(
                "slot {id} takes a {} plugin, not a {} plugin",
                id.kind(),
                p.kind()
            ))
        };
        match (id, plugin) {
            (SlotId::Router, None) => set.router = None,
            (SlotId::Router, Some(AnySlot::Router(s))) => set.router = Some(s),
            (SlotId::CachePolicy, None) => set.cache_policy = None,
            (SlotId::CachePolicy, Some(AnySlot::CachePolicy(s))) => set.cache_policy = Some(s),
            (SlotId::BudgetRule, None) => set.budget_rule = None,
            (SlotId::BudgetRule, Some(AnySlot::BudgetRule(s))) => set.budget_rule = Some(s),
            (SlotId::Compressor(i), None) => {
                if i < set.compressors.len() {
                    set.compressors.remove(i);
                }
            }
            (SlotId::Compressor(i), Some(AnySlot::Compressor(s))) => {
                match i.cmp(&set.compressors.len()) {
                    std::cmp::Ordering::Less => set.compressors[i] = s,
                    std::cmp::Ordering::Equal => set.compressors.push(s),
                    std::cmp::Ordering::Greater => {
                        return Err(format!(
                            "slot {id}: the compressor chain has {} plugins; add at compressor[{}]",
                            set.compressors.len(),
                            set.compressors.len()
                        ));
                    }
                }
            }
            (_, Some(p)) => return wrong(&p),
        }
        Ok(set)
    }
}

impl PluginSet {
    /// The shadow of a slot, if any.
    pub fn shadow_of(&self, id: SlotId) -> Option<AnySlot> {
        match id {
            SlotId::Router => self.shadow.router.clone().map(AnySlot::Router),
            SlotId::CachePolicy => self.shadow.cache_policy.clone().map(AnySlot::CachePolicy),
            SlotId::BudgetRule => self.shadow.budget_rule.clone().map(AnySlot::BudgetRule),
            SlotId::Compressor(_) => None,
        }
    }

    /// A copy of this set with `plugin` as the shadow of slot `id` (None
    /// removes it). Compressors have no shadow: their rewrite changes what
    /// every later step sees, so it cannot be compared on the same request.
    pub fn with_shadow(&self, id: SlotId, plugin: Option<AnySlot>) -> Result<PluginSet, String> {
        let mut set = self.clone();
        match (id, plugin) {
            (SlotId::Router, None) => set.shadow.router = None,
            (SlotId::Router, Some(AnySlot::Router(s))) => set.shadow.router = Some(s),
            (SlotId::CachePolicy, None) => set.shadow.cache_policy = None,
            (SlotId::CachePolicy, Some(AnySlot::CachePolicy(s))) => {
                set.shadow.cache_policy = Some(s)
            }
            (SlotId::BudgetRule, None) => set.shadow.budget_rule = None,
            (SlotId::BudgetRule, Some(AnySlot::BudgetRule(s))) => set.shadow.budget_rule = Some(s),
            (SlotId::Compressor(_), _) => {
                return Err("shadow mode covers router, cache_policy and budget_rule".into());
            }
            (_, Some(p)) => {
                return Err(format!(
                    "slot {id} takes a {} plugin, not a {} plugin",
                    id.kind(),
                    p.kind()
                ));
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_round_trip() {
        for s in [
            "router",
            "compressor[0]",
            "compressor[3]",
            "cache_policy",
            "budget_rule",
        ] {
            assert_eq!(SlotId::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(SlotId::parse("compressor").unwrap(), SlotId::Compressor(0));
        assert!(
            SlotId::parse("compressor[x]")
                .unwrap_err()
                .contains("unknown slot")
        );
        assert!(SlotId::parse("routr").is_err());
        assert_eq!(
            SlotId::parse("budget_rule").unwrap().kind(),
            PluginKind::BudgetRule
        );
    }

    #[test]
    fn emptying_slots_of_an_empty_set_is_fine_and_gaps_are_refused() {
        let set = PluginSet::default();
        assert!(set.with(SlotId::Router, None).unwrap().router.is_none());
        assert!(
            set.with(SlotId::Compressor(2), None)
                .unwrap()
                .compressors
                .is_empty()
        );
    }
}
