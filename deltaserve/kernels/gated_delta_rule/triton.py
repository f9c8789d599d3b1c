"""Triton GDN kernels, one import point for dispatch: the chunked (WY) prefill over a flat varlen batch
(`triton_chunk`) and the fused one-token-per-row decode step (`triton_decode`). State layout [HV, K, V] fp32, as the
reference; both update the pool IN PLACE at slots and treat slot -1 as a padding row that writes nothing."""
from .triton_chunk import ChunkLaunchConfig, ChunkTables, build_chunk_tables, chunk_gated_delta_rule_varlen
from .triton_decode import DecodeLaunchConfig, fused_recurrent_decode

__all__ = [
    "ChunkLaunchConfig",
    "ChunkTables",
    "DecodeLaunchConfig",
    "build_chunk_tables",
    "chunk_gated_delta_rule_varlen",
    "fused_recurrent_decode",
]
