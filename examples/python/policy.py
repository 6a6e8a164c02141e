"""Which model tier a request needs, judged from its length, structure and
wording: the routing logic of the Python router, kept free of any WebAssembly
binding so it can be unit tested with plain `python3 -m unittest`.

A request starts at the small tier (1). Structure, size and cue words raise
it: tools or an agent mid-task need at least the mid tier (2); a long pasted
document, a deep conversation, code, a troubleshooting report or a request
to write something need the mid tier; several reasoning or judgement cues,
or a calculation over several numbers, need the premium tier (3). Cues are
read at the start and the end of the last user message only, where the ask
is: words inside a pasted document say nothing about the work asked for.
"""

from dataclasses import dataclass, field
import re

REASONING = ("why", "explain", "reason", "recommend", "should we", "should i",
             "trade-off", "tradeoff", "pros and cons", "compare", "evaluate",
             "assess", "justify", "propose", "analy", "strategy", "risk")
CALCULATION = ("calculat", "compute", "how many", "how much", "estimate",
               "forecast", "break-even", "break even", "payback", "percent", "%")
JUDGEMENT = ("critic", "disagree", "inconsisten", "root cause", "prioriti",
             "what would you", "unresolved", "gaps")
TROUBLE = ("error", "fail", "exit code", "crash", "timed out", "timeout",
           "not working", "broken", "stack trace", "out of memory")
MAKING = ("write", "draft", "rewrite", "fix ", "sql", "script", "code",
          "function", "query", "regex")
BREVITY = ("tl;dr", "tldr", "one sentence", "one line", "in a sentence", "brief")

# Characters kept from each end of a long message when looking for cues.
EDGE = 800
NUMBER = re.compile(r"\d[\d,.]*")


@dataclass
class Settings:
    """What a slot's `config` may change; every field has a working default."""
    long_message_chars: int = 6000
    deep_conversation: int = 4
    premium_cues: int = 2
    premium_numbers: int = 3
    never_upgrade: bool = True
    extra_reasoning: list = field(default_factory=list)

    @staticmethod
    def from_json(obj):
        if not isinstance(obj, dict):
            raise ValueError("config must be a JSON object")
        known = Settings.__dataclass_fields__
        unknown = sorted(k for k in obj if k not in known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        s = Settings(**obj)
        for name in ("long_message_chars", "deep_conversation", "premium_cues",
                     "premium_numbers"):
            v = getattr(s, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {v!r}")
        if not isinstance(s.never_upgrade, bool):
            raise ValueError("never_upgrade must be true or false")
        if not all(isinstance(w, str) and w for w in s.extra_reasoning):
            raise ValueError("extra_reasoning must be a list of words")
        s.extra_reasoning = [w.lower() for w in s.extra_reasoning]
        return s


def edges(text):
    if len(text) <= 2 * EDGE:
        return text
    return text[:EDGE] + "\n" + text[-EDGE:]


def count(text, words):
    return sum(text.count(w) for w in words)


@dataclass
class Request:
    """The parts of a request the router reads (a plain mirror of the WIT
    request-view, so tests need no bindings)."""
    messages: list  # (role, content) pairs
    has_tools: bool = False
    json_mode: bool = False


def classify(req, s):
    """The tier the request needs (1-3) and the reasons, for the log."""
    roles = [r for r, _ in req.messages]
    last_user = next((c for r, c in reversed(req.messages) if r == "user"), "")
    ask = edges(last_user).lower()
    reasons = []
    tier = 1

    def need(t, why):
        nonlocal tier
        reasons.append(why)
        tier = max(tier, t)

    if req.has_tools or (roles and roles[-1] == "tool"):
        need(2, "agent")
    # The user's own message, not the system prompt: a long fixed prompt
    # says which application is calling, not how hard this request is.
    if len(last_user) >= s.long_message_chars:
        need(2, "long document")
    if roles.count("assistant") >= s.deep_conversation:
        need(2, "deep conversation")
    if "```" in last_user or count(last_user, "{};=<>") >= 12:
        need(2, "code")
    if count(ask, TROUBLE):
        need(2, "troubleshooting")
    if count(ask, MAKING):
        need(2, "writing")

    cues = count(ask, REASONING) + count(ask, JUDGEMENT) + count(ask, s.extra_reasoning)
    numbers = len(NUMBER.findall(ask))
    if cues >= s.premium_cues:
        need(3, f"{cues} reasoning cues")
    elif cues:
        need(2, "reasoning cue")
    if count(ask, CALCULATION) and numbers >= s.premium_numbers:
        need(3, f"calculation over {numbers} numbers")
    if tier > 1 and count(ask, BREVITY) and not req.has_tools:
        tier -= 1
        reasons.append("brief answer asked")
    return tier, reasons


def ladder(tier, candidates, top=3):
    """The cheapest candidate of each tier from `tier` up to `top` (at most
    two), cheapest first. `candidates` are (name, tier, input, output) with
    prices per million tokens."""
    out = []
    for t in range(tier, top + 1):
        at = [c for c in candidates if c[1] == t]
        if at:
            out.append(min(at, key=lambda c: c[2] + c[3])[0])
    return out[:2]
