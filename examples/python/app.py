"""The Python router's WebAssembly entry points: converts the WIT request
view to the plain shapes of `policy` and its answer back to a decision.

The component is built with `--stub-wasi`: it imports nothing but the
gateway's host functions, so it has no stdout, files or clock of its own.
`print` is sent to the gateway's log instead, and an exception is logged
with where it happened before the call fails (the gateway adds that line to
the call's error).
"""

import builtins
import json

import wit_world
from wit_world.imports import host, types
from componentize_py_types import Err

import policy


def _print(*args, sep=" ", end="\n", file=None, flush=False):
    host.log(host.Level.INFO, sep.join(str(a) for a in args))


builtins.print = _print


def _logged(e):
    """Logs an exception with its frames (file:line in function), innermost first."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    host.log(host.Level.ERROR, f"{type(e).__name__}: {e} at {' < '.join(reversed(frames))}")


class WitWorld(wit_world.WitWorld):
    def init(self, config: str) -> None:
        global SETTINGS
        try:
            SETTINGS = policy.Settings.from_json(json.loads(config or "{}"))
        except (ValueError, TypeError) as e:
            raise Err(str(e))

    def route(self, req: types.RequestView,
              candidates: list[types.ModelInfo]) -> types.RouteDecision:
        try:
            return decide(req, candidates)
        except Exception as e:
            _logged(e)
            raise


def decide(req, candidates):
    s = SETTINGS
    view = policy.Request(
        messages=[(m.role, m.content) for m in req.messages],
        has_tools=req.has_tools,
        json_mode=req.json_mode,
    )
    tier, reasons = policy.classify(view, s)
    top = 3
    asked = next((c.tier for c in candidates if c.name == req.model), None)
    if s.never_upgrade and asked is not None:
        tier = min(tier, asked)
        top = asked
    names = policy.ladder(
        tier,
        [(c.name, c.tier, c.input_per_mtok, c.output_per_mtok) for c in candidates],
        top,
    )
    host.log(host.Level.DEBUG, f"tier {tier}: {', '.join(reasons) or 'plain question'}")
    if not names:
        return types.RouteDecision_Keep()
    if len(names) == 1:
        return types.RouteDecision_UseModel(names[0])
    return types.RouteDecision_Fallback(names)


SETTINGS = policy.Settings()
