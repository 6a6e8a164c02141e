"""Python tiktoken's o200k token counting, measured the way `tollgate bench
--only tokens` measures Tollgate's: each paragraph of a text counted as one
chat message, and the whole text at once; best of five rounds of at least
200 ms, one thread. Prints JSON.

tiktoken fetches its vocabulary on first use; offline, point TIKTOKEN_CACHE_DIR
at the copy LiteLLM's package ships (the compare harness does).
"""

import json
import sys
import time

import tiktoken


def best_mb_per_s(nbytes, f):
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < 0.2:
            f()
            n += 1
        best = max(best, nbytes * n / (time.perf_counter() - start) / 1e6)
    return best


def main():
    text = open(sys.argv[1], encoding="utf-8").read()
    messages = [p.strip() for p in text.split("\n\n") if p.strip()]
    enc = tiktoken.get_encoding("o200k_base")
    message_bytes = sum(len(m.encode()) for m in messages)

    def count_all():
        return sum(len(enc.encode_ordinary(m)) for m in messages)

    def whole():
        return len(enc.encode_ordinary(text))

    print(json.dumps({
        "encoding": "o200k_base",
        "tiktoken": tiktoken.__version__,
        "messages": len(messages),
        "message_bytes": message_bytes,
        "tokens": count_all(),
        "messages_mb_per_s": round(best_mb_per_s(message_bytes, count_all), 2),
        "whole_text_bytes": len(text.encode()),
        "whole_text_tokens": whole(),
        "whole_text_mb_per_s": round(best_mb_per_s(len(text.encode()), whole), 2),
    }))


if __name__ == "__main__":
    main()
