"""ForwardBatch: everything one model forward needs, as a flat varlen batch of N sequences and T tokens.

The scheduler never pads: sequence i owns tokens cu_seqlens[i]:cu_seqlens[i+1]. Prefill chunks and decode
tokens mix freely. Host copies of the lengths ride along so the torch reference paths need no device sync.
"""
from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64 token ids
    positions: torch.Tensor  # [T] int64 absolute position of each token in its sequence
    cu_seqlens: torch.Tensor  # [N+1] int64 token offsets of each sequence in this step
    context_lens: torch.Tensor  # [N] int64 tokens of each sequence in the KV cache after this step
    state_slots: torch.Tensor  # [N] int64 GDN state-pool slot per sequence (-1: padding row, writes nothing)
    block_tables: torch.Tensor  # [N, max_blocks] int32 KV block ids per sequence (unused entries arbitrary)
    slot_mapping: torch.Tensor  # [T] int64 flat KV-cache position (block * block_size + offset) per token, -1: skip
    logits_indices: torch.Tensor  # [M] int64 rows of the hidden states that need logits
    query_lens_cpu: list[int]  # N host ints: tokens of each sequence in this step
    context_lens_cpu: list[int]  # N host ints: same as context_lens
    is_decode: bool = False  # every sequence feeds exactly one token (the fused decode kernels apply)
    max_context_len: int = 0  # host int: max of context_lens (sizes the split-K attention grid)
    # mixed steps (prefill and decode together): the leading sequences that feed one token each (running decodes come
    # first), which the GDN layers and attention run through their decode kernels (the GDN chunked path would spend a
    # 64-token chunk and a state round trip on each, the attention prefill kernel a whole query tile)
    decode_rows: int = 0
    gdn_prefill: "GdnPrefill | None" = None  # the sequences after them, for the GDN chunked path (None: all of them)

    def gdn_prefill_part(self) -> "GdnPrefill":
        """The sequences the GDN chunked path runs: those after the leading decode rows."""
        if self.gdn_prefill is not None:
            return self.gdn_prefill
        return GdnPrefill(self.cu_seqlens, self.state_slots, self.query_lens_cpu)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class GdnPrefill:
    """Sequences of a step as the GDN chunked prefill sees them: token offsets count from their first token."""
    cu_seqlens: torch.Tensor  # [P+1] int64 token offsets, starting at 0
    state_slots: torch.Tensor  # [P] int64 GDN state-pool slots
    query_lens_cpu: list[int]  # P host ints
    tables: object = None  # Triton GDN prefill's (sequence, chunk) tables, built once per step (CUDA only)
    # prefix-cache snapshots taken inside the chunk: (sequence, token offset (a multiple of 64 inside it), state slot)
    snapshots: tuple = ()
