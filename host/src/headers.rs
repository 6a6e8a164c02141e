//! The `x-tollgate-*` header names, built once. Looking a header up by a
//! `&str`, or inserting under one, parses and validates the name on every
//! call (~600 instructions each, ten or more per request in profiles); a
//! constant `HeaderName` is hashed and compared directly.

use http::HeaderName;

macro_rules! names {
    ($($(#[$doc:meta])* $id:ident = $name:literal;)*) => {
        $($(#[$doc])* pub const $id: HeaderName = HeaderName::from_static($name);)*
    };
}

names! {
    // Sent by clients: who a request is for.
    TENANT = "x-tollgate-tenant";
    USER = "x-tollgate-user";
    FEATURE = "x-tollgate-feature";
    TASK = "x-tollgate-task";
    STEP = "x-tollgate-step";
    PROMPT_VERSION = "x-tollgate-prompt-version";
    DEFERRABLE = "x-tollgate-deferrable";
    CALLBACK_URL = "x-tollgate-callback-url";
    /// Who makes an admin change (the admin API's audit log).
    ACTOR = "x-tollgate-actor";
    /// Simulator controls: they reach the simulator only.
    SIM_OUTPUT_TOKENS = "x-tollgate-sim-output-tokens";
    SIM_FAULT = "x-tollgate-sim-fault";
    SIM_ATTEMPT = "x-tollgate-sim-attempt";
    // Sent back on every answer: what the gateway did.
    REQUEST_ID = "x-tollgate-request-id";
    MODEL = "x-tollgate-model";
    CACHE = "x-tollgate-cache";
    CACHE_ORIGIN = "x-tollgate-cache-origin";
    CACHE_MATCH = "x-tollgate-cache-match";
    COST_USD = "x-tollgate-cost-usd";
    FALLBACK = "x-tollgate-fallback";
    DEFERRED = "x-tollgate-deferred";
}

/// Prefix of the `x-tollgate-tag-<key>` headers.
pub const TAG_PREFIX: &str = "x-tollgate-tag-";

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_the_lowercase_strings_clients_send() {
        assert_eq!(super::TENANT, "x-tollgate-tenant");
        assert_eq!(super::COST_USD.as_str(), "x-tollgate-cost-usd");
    }
}
