"""Token-budget scheduler: no prefill or decode phases.

Each step hands out up to `max_num_batched_tokens` tokens: running requests first (a decode token, or the next
chunk of a long prompt), then waiting requests in arrival order while a state slot, KV blocks and budget remain.
A token sampled by the step still running on the device (`Request.num_inflight`, async scheduling) counts as known:
its request is scheduled to feed it, and the model runner reads its id on the device.
When KV blocks run out, the most recently admitted running request is preempted: its blocks and slot are freed and it
goes back to the front of the queue, to be re-prefilled from prompt + generated tokens (recompute).
Siblings of an n > 1 request wait on the first sample (`fork_children`) and are forked from it, state and KV
copied, in the step that finishes its prompt; without room to fork they queue and prefill on their own.
With a prefix cache (prefix_cache.py), a request admitted with nothing computed starts after the longest cached
prefix of its tokens, and the steps that reach its prompt's snapshot points cache the prefix there (inside a chunk
when the forward can take the states there, else by ending the chunk at the point). Cached prefixes give way first:
their KV blocks are released before any request is refused or preempted.
"""
from collections import deque

from .block_pool import BlockPool
from . import prefix_cache
from .prefix_cache import PrefixCache, PrefixEntry
from .request import Request, RequestStatus
from .scheduler_output import Fork, InlineSnapshot, ScheduledSeq, SchedulerOutput, SlotCopy
from .state_pool import StatePool


class Scheduler:
    def __init__(self, block_pool: BlockPool, state_pool: StatePool, max_num_seqs: int, max_num_batched_tokens: int,
                 prefix_cache: PrefixCache | None = None):
        self.blocks, self.states, self.cache = block_pool, state_pool, prefix_cache
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._filling: list[PrefixEntry] = []  # cache entries whose slot the step being scheduled fills

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        if self._filling:  # the step that was to fill these raised before it launched: they hold nothing
            for entry in self._filling:
                self.cache.discard(entry)
            self._filling = []
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.last_token_inflight:  # finishes when the step in flight is read
                i += 1
                continue
            stops = self._stops(req, req.num_computed_tokens)
            n = self._chunk(req, req.num_computed_tokens, budget, stops)
            if not self._reserve_blocks(req, n, out):
                continue  # req itself was preempted; self.running shrank
            out.seqs.append(self._seq(req, n))
            self._snapshot(req, out, stops)
            budget -= n
            i += 1
            self._fork(req, out)
        while (self.waiting and budget > 0 and len(self.running) + len(out.forks) < self.max_num_seqs
               and not out.preempted):
            req = self.waiting[0]
            hit = self._lookup(req)
            start = len(hit.tokens) if hit else req.num_computed_tokens
            stops = self._stops(req, start)
            n = self._chunk(req, start, budget, stops)
            have = len(req.block_ids) + (len(hit.block_ids) if hit else 0)
            need = self.blocks.blocks_needed(start + n, have)
            if self.states.num_free == 0 or not self._make_room(need, keep=hit):
                break
            self.waiting.popleft()
            self._admit(req, hit, need, out)
            out.seqs.append(self._seq(req, n))
            self._snapshot(req, out, stops)
            budget -= n
            self._fork(req, out)
        self.running += [f.child for f in out.forks]  # they join after this step's forward
        return out

    def _fork(self, req: Request, out: SchedulerOutput) -> None:
        """If this step completes req's prompt, fork its waiting siblings off it (or queue them on their own)."""
        if not req.fork_children or out.seqs[-1].request is not req or not out.seqs[-1].sample:
            return
        children, req.fork_children = req.fork_children, []
        for k, child in enumerate(children):
            blocks = None
            if len(self.running) + len(out.forks) < self.max_num_seqs and self.states.num_free and \
                    self._make_room(len(req.block_ids)):
                blocks = self.blocks.allocate(len(req.block_ids))
            if blocks is None:
                self.waiting.extendleft(reversed(children[k:]))
                return
            child.block_ids, child.state_slot = blocks, self.states.allocate()
            child.status = RequestStatus.RUNNING
            out.forks.append(Fork(req, child))

    def _admit(self, req: Request, hit: PrefixEntry | None, need: int, out: SchedulerOutput) -> None:
        """Start req: a state slot (zeroed, or given the states of the cached prefix it starts from, whose blocks it
        then shares) and `need` new KV blocks."""
        req.state_slot = self.states.allocate()
        if hit:
            self.blocks.share(hit.block_ids)
            req.block_ids, req.num_computed_tokens = list(hit.block_ids), len(hit.tokens)
            if req.num_preemptions == 0:
                req.num_cached_tokens = len(hit.tokens)
            out.restores.append(SlotCopy(hit.slot, req.state_slot))
        else:
            out.slots_to_zero.append(req.state_slot)
        req.block_ids += self.blocks.allocate(need)
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _lookup(self, req: Request) -> PrefixEntry | None:
        """The cached prefix a request about to be admitted starts from (none when it owes prompt logprobs: those
        need every prompt position computed)."""
        if self.cache is None or req.num_computed_tokens or req.block_ids or req.wants_prompt_logprobs:
            return None
        return self.cache.lookup(req.token_ids(0, req.num_tokens))

    def _stops(self, req: Request, start: int) -> list[int]:
        """The snapshot points of req's prompt not yet cached that a prefill from `start` can still reach."""
        if self.cache is None or start >= req.num_prompt_tokens:
            return []
        return [stop for stop in self.cache.stops(req.prompt_token_ids) if stop > start]

    def _chunk(self, req: Request, start: int, budget: int, stops: list[int]) -> int:
        """Tokens to feed req from `start` this step: what the budget allows, ending at a snapshot point (`stops`)
        that the forward cannot take inside the chunk (one of at least MIN_PAUSE_TOKENS)."""
        n = min(req.num_scheduled_tokens - start, budget)
        return min([n] + [stop - start for stop in stops
                          if stop >= prefix_cache.MIN_PAUSE_TOKENS and (stop - start) % prefix_cache.GDN_CHUNK])

    def _snapshot(self, req: Request, out: SchedulerOutput, stops: list[int]) -> None:
        """Cache the prefixes of req's prompt that this step's chunk reaches at its snapshot points (`stops`): their
        blocks now, their states written by the forward (a point at a multiple of GDN_CHUNK inside the chunk) or
        copied from req's slot after it (the chunk's end)."""
        s = out.seqs[-1]
        end = s.start + s.num_new_tokens
        for stop in stops:
            inline = s.start < stop < end and (stop - s.start) % prefix_cache.GDN_CHUNK == 0
            if not inline and stop != end:
                continue
            entry = self.cache.insert(req.prompt_token_ids, stop, req.block_ids[: stop // self.blocks.block_size])
            if entry is None:  # every cache slot is taken by this step's own snapshots
                continue
            if inline:
                out.inline_snapshots.append(InlineSnapshot(req, stop - s.start, entry.slot))
            else:
                out.snapshots.append(SlotCopy(req.state_slot, entry.slot))
            self._filling.append(entry)

    def _make_room(self, need: int, keep: PrefixEntry | None = None) -> bool:
        """Release cached prefixes (least recently used first among those whose release frees a block, never `keep`)
        until `need` KV blocks are free; none when releasing them all would not free enough (blocks running requests
        share stay in use)."""
        if need <= self.blocks.num_free:
            return True
        if self.cache is None or need > self.blocks.num_free + self.cache.reclaimable(keep):
            return False
        while need > self.blocks.num_free:
            if not self.cache.evict_one(keep, for_blocks=True):
                return False
        return True

    def _seq(self, req: Request, n: int) -> ScheduledSeq:
        return ScheduledSeq(req, req.num_computed_tokens, n, req.num_computed_tokens + n == req.num_scheduled_tokens)

    def _reserve_blocks(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Give `req` the blocks for n more tokens, preempting later requests (or req itself) until they fit."""
        need = self.blocks.blocks_needed(req.num_computed_tokens + n, len(req.block_ids))
        while not self._make_room(need):
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
        """After the step is launched (its copies queued on the device): its snapshots may be read from now on."""
        for entry in self._filling:
            entry.ready = True
        self._filling = []
        for s in sched.seqs:
            s.request.num_computed_tokens += s.num_new_tokens
        for f in sched.forks:
            f.child.num_computed_tokens = f.parent.num_computed_tokens

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks and slot."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        for child in req.fork_children:  # not yet forked: they never started, nothing to free
            child.status = RequestStatus.FINISHED
        req.fork_children = []
        self._release(req)
        req.status = RequestStatus.FINISHED
