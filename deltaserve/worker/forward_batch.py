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
    gdn_tables: object = None  # Triton GDN prefill's (sequence, chunk) tables, built once per step (CUDA only)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
