"""Prefix cache for the hybrid model: a prompt prefix's KV blocks plus the GDN states after exactly that prefix.

A full-attention layer can resume from any cached KV block, but a GDN layer resumes only from a recurrent state
taken at exactly the position it resumes from. So an entry is a snapshot at a multiple of `chunk` tokens:
- Making one: when a request's prefill passes one of its prompt's last two multiples of `chunk` short of its final
  token (`stops`): if the point lies a multiple of GDN_CHUNK tokens into the step's chunk, the GDN prefill writes
  the states there into a cache slot during the forward (SchedulerOutput.inline_snapshots); else, for points of at
  least MIN_PAUSE_TOKENS, the scheduler ends that step's chunk there and the runner copies the request's state slot
  into a cache slot after the forward (SchedulerOutput.snapshots), as it does for a chunk that ends at one anyway.
  The entry takes a reference on the KV blocks of those tokens (BlockPool counts them): they are whole blocks, which
  no request writes again.
- Using one: a request admitted with nothing computed whose tokens start with an entry's tokens, and go on for at
  least one more (the logits of its last token give its sample), shares the entry's blocks, gets a copy of its state
  slot before its first forward instead of a zeroed slot (SchedulerOutput.restores) and starts at the entry's length.
Entries are keyed by a hash chain over chunk-sized runs of token ids and keep their tokens, so a hash collision is
a miss, never a wrong state. The least recently used entry goes when a snapshot needs a slot or the scheduler needs
KV blocks. An entry is found only once the step that fills its slot has been launched (`ready`): every copy from
it is then queued on the device after the copy into it.
"""
from collections import OrderedDict
from dataclasses import dataclass

from .block_pool import BlockPool

CHUNK_TOKENS = 256  # snapshot granularity (rounded up to whole KV blocks): at most this many prompt tokens recomputed
SNAPSHOTS = 2  # snapshot points per prompt (stops)
# A prefill pauses only for a snapshot of at least this many tokens that it cannot take inline: the pause costs one
# more step (on an H200 a 9B prefill step of a few hundred tokens takes ~30 ms end to end, about what 1 000 tokens of
# prefill cost), so shorter prefixes are cached only where a chunk ends at a snapshot point anyway.
MIN_PAUSE_TOKENS = 1024
# The GDN prefill's chunk (kernels/gated_delta_rule): inside a step's chunk of a request, its kernels hold the state at
# every multiple of this many tokens from the chunk's first token, and write it to a cache slot there (no pause).
GDN_CHUNK = 64


@dataclass
class PrefixEntry:
    tokens: tuple[int, ...]  # the cached prefix: a multiple of the cache's chunk in length
    block_ids: list[int]  # its KV blocks (the entry holds one reference on each)
    slot: int  # the runner's state slot holding every GDN layer's states after exactly these tokens
    ready: bool = False  # the step whose forward fills `slot` has been launched


class PrefixCache:
    def __init__(self, blocks: BlockPool, slots: list[int], chunk: int = CHUNK_TOKENS):
        """slots: runner state slots reserved for snapshots (none of the request StatePool's)."""
        if not slots:
            raise ValueError("the prefix cache needs at least one state slot")
        self.blocks = blocks
        self.chunk = -(-chunk // blocks.block_size) * blocks.block_size
        self.num_slots = len(slots)
        self._free_slots = list(reversed(slots))
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # key -> entry, least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def _keys(self, tokens: list[int], n: int) -> list[int]:
        """Chain keys of the first n chunks: key i hashes key i-1 and chunk i's token ids."""
        keys, key = [], 0
        for i in range(n):
            key = hash((key, tuple(tokens[i * self.chunk: (i + 1) * self.chunk])))
            keys.append(key)
        return keys

    def lookup(self, tokens: list[int]) -> PrefixEntry | None:
        """The longest ready entry whose tokens start `tokens` with at least one token of it left over."""
        n = (len(tokens) - 1) // self.chunk
        keys = self._keys(tokens, n)
        for i in range(n, 0, -1):
            entry = self._entries.get(keys[i - 1])
            if entry is not None and entry.ready and entry.tokens == tuple(tokens[: i * self.chunk]):
                self._entries.move_to_end(keys[i - 1])
                return entry
        return None

    def stops(self, prompt: list[int]) -> list[int]:
        """Where a prefill of `prompt` pauses for snapshots, ascending: its last SNAPSHOTS multiples of chunk short of
        its final token that no entry holds yet. Two, not one: a prompt = shared part + its own part takes its last
        snapshot inside its own part whenever that part crosses a multiple of chunk; the one before is then still
        inside the shared part if its own part is at most chunk tokens long."""
        last = (len(prompt) - 1) // self.chunk
        keys = self._keys(prompt, last)
        first = max(1, last - SNAPSHOTS + 1)
        return [i * self.chunk for i in range(first, last + 1) if keys[i - 1] not in self._entries]

    def _key(self, tokens: list[int], length: int) -> int:
        return self._keys(tokens, length // self.chunk)[-1]

    def insert(self, tokens: list[int], length: int, block_ids: list[int]) -> PrefixEntry | None:
        """A new (not yet ready) entry for tokens[:length], whose KV is in block_ids (held by the caller: the entry
        takes its own reference), with a slot for its states, evicting the least recently used entry if none is
        free; None (no entry) when every slot belongs to this step's own snapshots."""
        if length % self.chunk or len(block_ids) != length // self.blocks.block_size:
            raise ValueError(f"a prefix entry covers whole chunks and their blocks: {length} tokens, "
                             f"{len(block_ids)} blocks")
        if not self._free_slots and not self.evict_one():
            return None
        self.blocks.share(block_ids, cache=True)
        entry = PrefixEntry(tuple(tokens[:length]), list(block_ids), self._free_slots.pop())
        self._entries[self._key(tokens, length)] = entry
        return entry

    def reclaimable(self, keep: PrefixEntry | None = None) -> int:
        """KV blocks that evicting every evictable entry (ready, not `keep`) would free: those no request and no
        other entry holds."""
        held: dict[int, int] = {}
        for entry in self._entries.values():
            if entry.ready and entry is not keep:
                for b in entry.block_ids:
                    held[b] = held.get(b, 0) + 1
        return sum(self.blocks.held_only_by_cache(b, n) for b, n in held.items())

    def discard(self, entry: PrefixEntry) -> None:
        """Drop `entry` if it is still cached (an entry whose step never ran)."""
        key = next((k for k, e in self._entries.items() if e is entry), None)
        if key is not None:
            self._drop(key)

    def clear(self) -> None:
        while self.evict_one(pending=True):
            pass

    def evict_one(self, keep: PrefixEntry | None = None, pending: bool = False, for_blocks: bool = False) -> bool:
        """Drop the least recently used ready entry other than `keep` (its slot freed, its block references
        dropped); False when there is none. An entry not ready yet belongs to the step being scheduled, whose forward
        writes its slot: handing that slot to another snapshot of the same step would have one kernel write two
        states into it (only `clear`, between steps, passes pending=True). for_blocks (room for KV blocks): the least
        recently used entry whose drop frees a block, if any does; one whose blocks a running request or a longer
        entry still holds frees nothing, and was dropped for nothing."""
        keys = [k for k, e in self._entries.items() if e is not keep and (e.ready or pending)]
        if for_blocks:
            keys = [k for k in keys if any(self.blocks.held_only_by_cache(b, 1) for b in self._entries[k].block_ids)] \
                or keys  # none frees a block alone (entries sharing blocks a request also holds): plain LRU
        key = keys[0] if keys else None
        if key is None:
            return False
        self._drop(key)
        return True

    def _drop(self, key: int) -> None:
        """Remove an entry: its slot back to the free ones, its block references dropped."""
        entry = self._entries.pop(key)
        self._free_slots.append(entry.slot)
        self.blocks.free(entry.block_ids, cache=True)
