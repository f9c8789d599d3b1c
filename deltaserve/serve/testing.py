"""TEST-ONLY hook: make the model "say" a given text, so end-to-end tests can drive a random tiny checkpoint into
reasoning blocks and tool calls (and make a step fail on purpose).

Active only when the environment variable DELTASERVE_TEST_FORCED_OUTPUTS holds a JSON list of rules:
    [{"contains": ["get_weather", "Paris"], "output": "<tool_call>..."},    # forced text, then EOS
     {"contains": ["BOOM"], "raise": "injected failure"},                   # the engine step raises
     {"contains": ["DIE"], "die": "injected death"}]                        # the engine thread dies
A request whose prompt (decoded with special tokens) contains every string of a rule's "contains" follows the first
such rule: its sampled tokens are replaced by the rule's output tokens, then EOS; the model still runs, so
batching, KV blocks and state slots behave as in real use. Never set it in production.
"""
from __future__ import annotations

import json
import logging
import os

ENV_VAR = "DELTASERVE_TEST_FORCED_OUTPUTS"
logger = logging.getLogger("deltaserve.serve")


class InjectedEngineDeath(BaseException):
    """Not an Exception, so no handler of a failed step catches it: the engine thread ends, as on a fatal error."""


class ForcedOutputRunner:
    """Wraps a ModelRunner: `launch` runs the real forward; the result read from it has the tokens of matching
    requests overridden."""

    def __init__(self, runner, tokenizer, rules: list[dict], eos_token_id: int):
        self._runner, self._tokenizer, self._rules = runner, tokenizer, rules
        self._forced = [tokenizer.encode(r["output"]) + [eos_token_id] if "output" in r else None for r in rules]
        self._match: dict[str, int | None] = {}  # request id -> index of its rule (None: no rule)

    def __getattr__(self, name):  # device, caches, ...: the wrapped runner's
        return getattr(self._runner, name)

    def launch(self, sched):
        for s in sched.seqs:
            rule = self._rule(s.request)
            if rule is not None and "raise" in self._rules[rule]:
                raise RuntimeError(self._rules[rule]["raise"])
            if rule is not None and "die" in self._rules[rule]:
                raise InjectedEngineDeath(self._rules[rule]["die"])
        return _ForcedPending(self._runner.launch(sched), self, sched)

    def execute(self, sched):
        return self.launch(sched).result()

    def override(self, sched, out):
        """Replace the sampled tokens of requests that follow a rule (before they are appended)."""
        for req in [s.request for s in sched.seqs] + [f.child for f in sched.forks]:
            rule = self._rule(req)
            if rule is None or req.request_id not in out.sampled or self._forced[rule] is None:
                continue
            forced, k = self._forced[rule], len(req.output_token_ids)
            if k < len(forced):
                rid, sampled = req.request_id, out.sampled[req.request_id]
                out.sampled[rid] = forced[k]
                lp = out.logprobs.get(rid)
                if lp is not None and forced[k] not in lp:  # the sampled token's entry leads; the hook cannot know
                    lp = {forced[k]: lp[sampled], **lp}  # the forced token's own logprob, so it takes that value
                    out.logprobs[rid] = lp
        return out

    def _rule(self, req) -> int | None:
        if req.request_id not in self._match:
            if len(self._match) > 100_000:
                self._match.clear()
            text = self._tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
            self._match[req.request_id] = next(
                (i for i, r in enumerate(self._rules) if all(s in text for s in r["contains"])), None)
        return self._match[req.request_id]


class _ForcedPending:
    """A launched step's PendingOutput whose `result()` comes back with the forced tokens in place."""

    def __init__(self, pending, runner: ForcedOutputRunner, sched):
        self._pending, self._runner, self._sched = pending, runner, sched

    def __getattr__(self, name):  # requests, ...: the wrapped handle's
        return getattr(self._pending, name)

    def result(self):
        return self._runner.override(self._sched, self._pending.result())


def install_from_env(llm) -> bool:
    """Wrap llm's runner when DELTASERVE_TEST_FORCED_OUTPUTS is set; -> whether it was installed."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return False
    try:
        rules = json.loads(spec)
        assert isinstance(rules, list) and all(isinstance(r.get("contains"), list) for r in rules)
    except (ValueError, AssertionError, AttributeError):
        raise ValueError(f"{ENV_VAR} must be a JSON list of {{'contains': [...], 'output', 'raise' or 'die': ...}} "
                         f"rules") from None
    if llm.tokenizer is None or llm.tokenizer.eos_token_id is None:
        raise ValueError(f"{ENV_VAR} needs a model with a tokenizer that has an EOS token")
    llm.engine.runner = ForcedOutputRunner(llm.engine.runner, llm.tokenizer, rules, llm.tokenizer.eos_token_id)
    # forced tokens exist only on the host: the next step must read its input from there, not from the device sample
    llm.engine.async_scheduling = False
    logger.warning("TEST-ONLY: %s is set; %d forced-output rules are active", ENV_VAR, len(rules))
    return True
