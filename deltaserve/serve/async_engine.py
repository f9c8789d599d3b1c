"""AsyncEngine: drives an `LLM`'s EngineCore from one background thread for an asyncio server.

EngineCore is not thread-safe, so only the engine thread touches it: `add_request` / `abort` put commands on a
thread-safe queue that the thread drains between steps. Outputs go back to the event loop in one
`call_soon_threadsafe` per step and are fanned out to per-request asyncio queues. Everything on the asyncio side
(`_streams`, metrics) is touched by the event-loop thread only.

A step that raises fails every request in flight with `EngineError` (the server answers 500) and aborts them so
their KV blocks and state slots are freed; the thread keeps serving new requests, since EngineCore is consistent again
after such a step (a bug one batch hit, an out-of-memory). Unless the engine cannot run again: its thread died, a
tensor-parallel worker exited, or the CUDA device is broken (a sticky error such as an illegal memory access fails
every later kernel). Then it is `dead`: new requests are refused and `on_dead(reason)` is called once on the event
loop (the server shuts down there, as vLLM's does when its engine dies).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams

logger = logging.getLogger("deltaserve.serve")


class EngineError(RuntimeError):
    """The engine failed while running this request (answered as 500)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or its thread died (answered as 503)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread takes after every iteration; the event loop (/metrics) reads it."""
    running: int = 0  # sequences holding a state slot
    waiting: int = 0  # sequences queued
    kv_blocks_used: int = 0  # blocks some request uses
    kv_blocks_total: int = 0
    prefix_cache_kv_blocks: int = 0  # blocks only cached prompt prefixes hold (given up when requests need them)
    state_slots_used: int = 0
    state_slots_total: int = 0


class RequestStream:
    """Async iterator over one request's RequestOutputs; the last one has `finished` set."""

    def __init__(self, engine: AsyncEngine, request_id: str, num_prompt_tokens: int):
        self.engine, self.request_id, self.num_prompt_tokens = engine, request_id, num_prompt_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.arrival = time.monotonic()
        self.first_token: float | None = None  # when the first generated token reached the event loop
        self.num_generated = 0

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request if it is still running (client gone); frees its KV blocks and state slot. Idempotent."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """llm: a built `LLM`; its EngineCore is driven from the engine thread only. metrics: an optional observer
    with `on_added(stream)`, `on_output(stream, output, new_tokens)`, `on_finished(stream, output)`."""

    def __init__(self, llm, metrics=None):
        self.llm, self.core, self.tokenizer = llm, llm.engine, llm.tokenizer
        self.max_model_len: int = llm.max_model_len
        self.metrics = metrics
        self.stats = EngineStats()  # set on the event loop only (see _publish)
        self._posted_stats: EngineStats | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self._abort_all_at: float | None = None  # set by begin_shutdown: abort what still runs at this time
        self.accepting = True
        self.dead = False
        self._tp_broken = False  # a step failed on the tensor-parallel group (set before dead)
        self.on_dead = None  # called once, on the event loop, with why, when the engine cannot run requests any more

    # ---- lifecycle (event-loop thread) ----
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="deltaserve-engine", daemon=True)
        self._thread.start()

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new requests; requests still running after grace_s seconds are aborted."""
        self.accepting = False
        self._abort_all_at = time.monotonic() + max(0.0, grace_s)
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abort everything in flight and stop the engine thread."""
        self.accepting = False
        self._abort_all_at = time.monotonic()
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine reports to (set by start())."""
        return self._loop

    @property
    def alive(self) -> bool:
        """False once the engine cannot run requests: its thread ended, a step found the tensor-parallel group broken,
        or a worker exited while the server was idle (/health turns 503 at once, not at the next request)."""
        return self._thread is not None and self._thread.is_alive() and not self.dead and not self.llm.tp_lost

    # ---- requests (event-loop thread) ----
    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                          prompt: str | None = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises ValueError (one sentence) for a request
        the engine rejects, e.g. a prompt longer than max_model_len; EngineStopped when shutting down."""
        if self.llm.tp_lost or self._tp_broken:
            raise EngineStopped("a tensor-parallel worker exited, so the server cannot run requests any more; retry on "
                                "another replica")
        if not self.accepting or not self.alive:
            raise EngineStopped("the server is shutting down or its engine stopped; retry on another replica")
        stream = RequestStream(self, request_id, len(prompt_token_ids))
        accepted = self._loop.create_future()
        self._streams[request_id] = stream
        self._send(("add", request_id, list(prompt_token_ids), params, prompt, accepted))
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            # caller gone while queued, or cancelled after the engine took it but before this resumed: drop the
            # request (only one the engine refused is not there to drop)
            if not accepted.done() or accepted.cancelled() or accepted.exception() is None:
                self._send(("abort", request_id))
            raise
        if self.metrics is not None:
            self.metrics.on_added(stream)
        return stream

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       prompt: str | None = None):
        """Async iterator of RequestOutputs; closing it early (or cancelling the task) aborts the request."""
        stream = await self.add_request(prompt_token_ids, params, request_id, prompt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- event-loop side of the engine thread's results ----
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
            if new_tokens and stream.first_token is None:
                stream.first_token = time.monotonic()
            stream.num_generated += new_tokens
            if self.metrics is not None:
                self.metrics.on_output(stream, out, new_tokens)
            stream.queue.put_nowait(out)
            if out.finished:
                del self._streams[out.request_id]
                if self.metrics is not None:
                    self.metrics.on_finished(stream, out)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.queue.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail(list(self._streams), error)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ---- engine thread ----
    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_commands()
                self._abort_all_if_due()
                if self.llm.tp_lost and not self.dead:  # the watchdog saw a worker exit, maybe while idle
                    self._declare_dead(self.llm.tp_failure() or "a tensor-parallel worker exited")
                if self.core.has_unfinished():
                    self._step()
                else:
                    self._publish([])
                    self._wake.wait(timeout=0.25)
                    self._wake.clear()
            self._drain_commands()
            self._abort_all()
        except BaseException as e:  # noqa: BLE001 - the thread must report, not vanish
            logger.exception("engine thread died")
            self._post(self._fail_all, EngineError(f"the engine thread died: {type(e).__name__}: {e}"))
            self._declare_dead(f"the engine thread died: {type(e).__name__}: {e}")

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                self._add(*cmd[1:])
            else:
                out = self.core.abort(cmd[1])
                if out is not None:
                    self._publish([out])

    def _add(self, rid: str, ids: list[int], params: SamplingParams, prompt: str | None,
             accepted: asyncio.Future) -> None:
        if self._abort_all_at is not None and time.monotonic() >= self._abort_all_at:
            self._post(_resolve, accepted, EngineStopped("the server is shutting down; retry on another replica"))
            return
        try:
            self.core.add_request(ids, params, prompt=prompt, request_id=rid)
        except ValueError as e:
            self._post(_resolve, accepted, e)
            return
        except Exception as e:  # noqa: BLE001 - a bug hit by one request must not end the engine thread for all
            logger.exception("could not queue request %s", rid)
            if rid in self.core.groups:
                self._abort_quietly(rid)
            self._post(_resolve, accepted, EngineError(f"the engine could not queue this request: "
                                                       f"{type(e).__name__}: {e}"))
            return
        self._post(_resolve, accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.core.step()
        except Exception as e:  # noqa: BLE001 - fail the requests, keep the server up
            # the core aborted every request (EngineCore.step); any it could not are aborted here. What the step
            # read before it failed (a request may have finished there) is delivered as usual.
            core = self.core
            read, failed = core.read_before_failure, core.failed_outputs
            core.read_before_failure, core.failed_outputs = [], []
            rids = [out.request_id for out in failed] + list(core.groups)
            logger.exception("engine step failed; aborting the %d requests in flight", len(rids))
            reason = str(e)
            # it cannot run again: /health turns 503, new requests are refused (instead of each failing on a broken
            # pipe or a broken device) and the server shuts down
            if (why := self.llm.tp_failure(wait=1.0)) is not None:  # a broken pipe: the worker's exit tells more
                reason = f"{why}; the server cannot run requests any more"
                # before dead is set: add_request names the lost worker even before the watchdog sets tp_lost
                self._tp_broken = True
            elif (why := _device_failure(self.llm.device)) is not None:
                reason = f"{reason} ({why}); the server cannot run requests any more"
            for rid in list(core.groups):
                self._abort_quietly(rid)
            self._publish([out for out in read if out.request_id not in rids])
            self._post(self._fail, rids, EngineError(f"the engine failed while running this request: {reason}"))
            if why is not None:
                self._declare_dead(why)
            return
        self._publish(outputs)

    def _declare_dead(self, reason: str) -> None:
        """Mark the engine unable to run requests and tell the event loop, once (after the failures posted so far)."""
        if not self.dead:
            self.dead = True
            self._post(self._report_dead, reason)

    def _report_dead(self, reason: str) -> None:
        if self.on_dead is not None:
            self.on_dead(reason)

    def _abort_quietly(self, rid: str) -> None:
        try:
            self.core.abort(rid)
        except Exception:  # noqa: BLE001 - already failing; freeing is best effort
            logger.exception("could not abort request %s", rid)

    def _abort_all_if_due(self) -> None:
        if self._abort_all_at is not None and time.monotonic() >= self._abort_all_at and self.core.groups:
            self._abort_all()

    def _abort_all(self) -> None:
        outs = [o for o in (self.core.abort(rid) for rid in list(self.core.groups)) if o is not None]
        if outs:
            logger.info("aborted %d requests in flight", len(outs))
        self._publish(outs)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Post outputs and a snapshot of the scheduler's gauges to the event loop in one callback: a /metrics scrape
        sees a request leave `running` together with its final output counted, never one without the other."""
        sched = self.core.scheduler
        stats = EngineStats(
            running=len(sched.running), waiting=len(sched.waiting),
            kv_blocks_used=sched.blocks.num_in_requests, kv_blocks_total=sched.blocks.num_blocks,
            prefix_cache_kv_blocks=sched.blocks.num_used - sched.blocks.num_in_requests,
            state_slots_used=sched.states.num_used, state_slots_total=sched.states.num_slots)
        if outputs or stats != self._posted_stats:
            self._posted_stats = stats
            self._post(self._deliver, outputs, stats)

    def _deliver(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self._dispatch(outputs)
        self.stats = stats


def _device_failure(device) -> str | None:
    """Why a CUDA device can run nothing more after a failed step (its error is sticky: every later call raises it
    again), else None; a failure that left the device usable (out of memory, a Python error) gives None."""
    if device.type != "cuda":
        return None
    import torch
    try:
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any error here means the context is unusable
        return f"the CUDA device failed ({type(e).__name__}: {e})"
    return None


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
