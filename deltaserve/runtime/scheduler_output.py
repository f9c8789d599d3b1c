"""What the scheduler hands the model runner for one step."""
from dataclasses import dataclass, field

from .request import Request


@dataclass
class ScheduledSeq:
    request: Request
    start: int  # request.num_computed_tokens before this step: position of the first token fed
    num_new_tokens: int  # tokens fed this step (a prefill chunk, or 1 for decode)
    sample: bool  # this step reaches the end of the known tokens, so a new token is sampled


@dataclass
class Fork:
    """After this step's forward, `child` takes a copy of `parent`'s state slot and KV blocks (n > 1 samples share
    one prompt prefill) and samples its first token from the parent's logits row."""
    parent: Request
    child: Request


@dataclass
class SlotCopy:
    """A GDN state copy between state slots (prefix cache): every GDN layer's conv and recurrent state."""
    src: int
    dst: int


@dataclass
class InlineSnapshot:
    """A prefix-cache snapshot the GDN prefill takes inside this step's chunk of a request (no pause needed)."""
    request: Request
    offset: int  # tokens of the request's chunk before the snapshot point: a multiple of prefix_cache.GDN_CHUNK
    dst: int  # the cache's state slot


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # batch order
    slots_to_zero: list[int] = field(default_factory=list)  # state slots newly handed out: zero before the forward
    preempted: list[str] = field(default_factory=list)  # request ids sent back to the queue this step
    forks: list[Fork] = field(default_factory=list)  # copies to make after the forward, in order
    restores: list[SlotCopy] = field(default_factory=list)  # cached prefix state -> a new request's slot, before the
    # forward (in place of zeroing it)
    snapshots: list[SlotCopy] = field(default_factory=list)  # a request's slot -> a prefix-cache slot, after the
    # forward
    inline_snapshots: list[InlineSnapshot] = field(default_factory=list)  # taken by the forward itself

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)
