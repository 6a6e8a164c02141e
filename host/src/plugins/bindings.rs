//! Host bindings of the plugin interface, one module per released WIT
//! version. Version 0.1.0 is the newest, so the pipeline uses its types
//! directly; a later version gets its own module here and older plugins'
//! decisions are converted to the newest types at this boundary.

pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "imports",
        additional_derives: [PartialEq],
        // A forward pass of the embedding model takes milliseconds: it runs
        // on the blocking pool while the plugin's fiber waits.
        imports: { "tollgate:policy/embed.embed": async },
    });

    pub mod router {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "router",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.1.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.1.0": super::tollgate::policy::host,
            },
        });
    }

    pub mod compressor {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "compressor",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.1.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.1.0": super::tollgate::policy::host,
            },
        });
    }

    pub mod cache_policy {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "cache-policy",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.1.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.1.0": super::tollgate::policy::host,
            },
        });
    }

    pub mod budget_rule {
        wasmtime::component::bindgen!({
            path: "../wit/v0.1.0",
            world: "budget-rule",
            exports: { default: async },
            with: {
                "tollgate:policy/types@0.1.0": super::tollgate::policy::types,
                "tollgate:policy/host@0.1.0": super::tollgate::policy::host,
            },
        });
    }
}

/// The plugin-facing types of the newest interface version.
pub use v0_1_0::tollgate::policy::types;
