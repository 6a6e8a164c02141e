"""The official `openai` Python package against the real gateway binary.

Run by `make test-python`, which installs the package into target/venv:

    target/venv/bin/python tests/openai_client_test.py --bin target/debug/tollgate \
        --config examples/quickstart.toml
"""

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import unittest

import openai
from openai import OpenAI

ARGS = None
GATEWAY = None


class Gateway:
    """The binary on a free loopback port, with its log collected."""

    def __init__(self, binary, config):
        env = dict(os.environ)
        env.pop("OPENAI_API_KEY", None)  # the quickstart then uses the simulator
        env["RUST_LOG"] = "info"
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", config, "--listen", "127.0.0.1:0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.log = []
        found = queue.Queue()

        def reader():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    found.put(m.group(1))

        threading.Thread(target=reader, daemon=True).start()
        try:
            self.base = found.get(timeout=120)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError("gateway did not start:\n" + "".join(self.log))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def client(**headers):
    base_headers = {"x-tollgate-tenant": "pytest", "x-tollgate-sim-output-tokens": "20"}
    base_headers.update(headers)
    return OpenAI(
        base_url=GATEWAY.base + "/v1",
        api_key="not-needed-for-the-simulator",
        default_headers=base_headers,
        max_retries=0,
    )


class OpenAIClientTest(unittest.TestCase):
    def test_non_streamed_answer_with_usage_and_headers(self):
        raw = client().chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "What does the annual plan include?"}],
        )
        r = raw.parse()
        self.assertTrue(r.choices[0].message.content)
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(r.usage.completion_tokens, 20)
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertEqual(raw.headers["x-tollgate-model"], "gpt-4o-mini")  # quickstart default route
        self.assertTrue(raw.headers["x-tollgate-request-id"].startswith("req_"))
        self.assertGreater(float(raw.headers["x-tollgate-cost-usd"]), 0.0)

    def test_streamed_answer_with_usage_chunk(self):
        stream = client().chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Explain step by step how proration works"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, models = "", None, set()
        for chunk in stream:
            models.add(chunk.model)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        self.assertEqual(len(text), 80)
        self.assertIsNotNone(usage)
        self.assertEqual(usage.completion_tokens, 20)
        self.assertEqual(models, {"gpt-4o"})  # the reasoning rule routes up

    def test_stream_without_usage_option_has_no_usage_chunk(self):
        stream = client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Name three colours"}],
            stream=True,
        )
        chunks = list(stream)
        self.assertTrue(chunks)
        self.assertTrue(all(c.usage is None for c in chunks))

    def test_repeated_question_is_a_cache_hit(self):
        c = client(**{"x-tollgate-user": "u1"})
        q = [{"role": "user", "content": "What is the refund window for monthly plans?"}]
        first = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=q, temperature=0)
        second = client(**{"x-tollgate-user": "u2"}).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=q, temperature=0
        )
        self.assertEqual(first.headers["x-tollgate-cache"], "miss")
        self.assertEqual(second.headers["x-tollgate-cache"], "hit")
        self.assertEqual(
            first.parse().choices[0].message.content, second.parse().choices[0].message.content
        )

    def test_greeting_is_answered_by_the_router(self):
        r = client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}]
        )
        self.assertEqual(r.choices[0].message.content, "Hello! How can I help you today?")

    def test_errors_raise_the_sdk_exceptions(self):
        with self.assertRaises(openai.NotFoundError) as e:
            client().chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "x"}]
            )
        self.assertEqual(e.exception.code, "model_not_found")
        with self.assertRaises(openai.BadRequestError) as e:
            client().chat.completions.create(model="gpt-4o", messages=[])
        self.assertEqual(e.exception.code, "empty_array")

    def test_models_list(self):
        ids = sorted(m.id for m in client().models.list())
        self.assertEqual(ids, ["gpt-4.1-mini", "gpt-4o", "gpt-4o-mini"])


def main():
    global ARGS, GATEWAY
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--config", required=True)
    ARGS, rest = p.parse_known_args()
    GATEWAY = Gateway(ARGS.bin, ARGS.config)
    try:
        result = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2).result
    finally:
        code = GATEWAY.stop()
    if code != 0:
        print("gateway exited with", code, "".join(GATEWAY.log[-20:]))
        sys.exit(1)
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
