"""Token-budget scheduler: no prefill or decode phases.

Each step hands out up to `max_num_batched_tokens` tokens: running requests first (a decode token, or the next
chunk of a long prompt), then waiting requests in arrival order while a state slot, KV blocks and budget remain.
When KV blocks run out, the most recently admitted running request is preempted: its blocks and slot are freed and it
goes back to the front of the queue, to be re-prefilled from prompt + generated tokens (recompute).
"""
from collections import deque

from .block_pool import BlockPool
from .request import Request, RequestStatus
from .scheduler_output import ScheduledSeq, SchedulerOutput
from .state_pool import StatePool


class Scheduler:
    def __init__(self, block_pool: BlockPool, state_pool: StatePool, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.states = block_pool, state_pool
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve_blocks(req, n, out):
                continue  # req itself was preempted; self.running shrank
            out.seqs.append(self._seq(req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
            if need > self.blocks.num_free or self.states.num_free == 0:
                break
            self.waiting.popleft()
            req.block_ids += self.blocks.allocate(need)
            req.state_slot = self.states.allocate()
            out.slots_to_zero.append(req.state_slot)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.seqs.append(self._seq(req, n))
            budget -= n
        return out

    def _seq(self, req: Request, n: int) -> ScheduledSeq:
        return ScheduledSeq(req, req.num_computed_tokens, n, req.num_computed_tokens + n == req.num_tokens)

    def _reserve_blocks(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Give `req` the blocks for n more tokens, preempting later requests (or req itself) until they fit."""
        need = self.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        while need > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            if victim is req:
                return False
        req.block_ids += self.blocks.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        self.blocks.free(req.block_ids)
        req.block_ids = []
        if req.state_slot >= 0:
            self.states.free(req.state_slot)
            req.state_slot = -1

    def update_after_step(self, sched: SchedulerOutput) -> None:
        for s in sched.seqs:
            s.request.num_computed_tokens += s.num_new_tokens

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks and slot."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED
