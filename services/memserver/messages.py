"""Worker <-> memory server messages on the kvmesh transport (registered with transport.wire).

Every message of an owner carries its ``epoch`` for this memory server, a fencing token: a worker
that gave this server up for lost (it went silent, its sequences were recomputed elsewhere) and
later reaches it again writes off what it left there by moving to a higher epoch. The server frees
the owner's blocks of older epochs at the first message of a newer one and ignores (frees) or
refuses (stores, attention) messages of an older one, so a late free can never hit a block that
was handed out again. A worker starts its epochs at its start time in nanoseconds: a restarted
worker under the same id fences off what its predecessor left. The server moves the fence itself
when it frees an owner's blocks unasked (the router let the owner's lease expire, its connection
closed): the owner's old epoch is then stale here, and its next message tells it so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from transport.wire import message


@message
@dataclass(frozen=True, slots=True)
class StoreBlocks:
    """Allocate `num_blocks` for `owner` and store the request's frames in them: 2 x num_layers
    frames, frame 2 * layer + (0 for K, 1 for V) holding that layer's K (or V) of the blocks in
    order, [num_blocks, block_size, num_kv_heads, head_dim] in the worker's dtype. The pool is
    laid out the same way, so frames for consecutive block ids land in it directly."""

    TYPE: ClassVar[str] = "store_blocks"
    VERSION: ClassVar[int] = 3
    owner: str
    num_blocks: int
    epoch: int = 0


@message
@dataclass(frozen=True, slots=True)
class BlocksStored:
    TYPE: ClassVar[str] = "blocks_stored"
    VERSION: ClassVar[int] = 1
    block_ids: tuple[int, ...]


INDEX_DTYPE = "int32"  # block tables and sequence lengths travel as int32 frames
INDEX_BYTES = 4


@message
@dataclass(frozen=True, slots=True)
class Attend:
    """Partial attention for one layer over the owner's blocks. Three frames:

      0  q           [num_tokens, num_heads, head_dim], q_dtype (the pool's KV dtype)
      1  block_tables [num_seqs, table_width] int32: each sequence's block ids here, token order,
                     padded past its num_blocks
      2  seq_lens    [3, num_seqs] int32: rows num_blocks, context_len, query_len per sequence

    Frames 1 and 2 describe the step, not the layer: a worker sends the same bytes for every layer
    of a step, and the memory server reuses what it checked and planned for them (a byte compare).
    The reply carries out [num_tokens, num_heads, head_dim] (q's dtype) and lse [num_tokens,
    num_heads] fp32."""

    TYPE: ClassVar[str] = "attend"
    VERSION: ClassVar[int] = 3
    owner: str
    layer: int
    num_heads: int
    scale: float
    q_dtype: str
    num_tokens: int
    num_seqs: int
    table_width: int
    epoch: int = 0

    def frame_sizes(self, head_dim: int, q_itemsize: int) -> tuple[int, int, int]:
        """The byte sizes frames 0, 1 and 2 must have."""
        return (self.num_tokens * self.num_heads * head_dim * q_itemsize,
                self.num_seqs * self.table_width * INDEX_BYTES, 3 * self.num_seqs * INDEX_BYTES)

    def check_frames(self, frame_sizes: tuple[int, ...], head_dim: int, q_itemsize: int) -> None:
        """ValueError naming the first frame whose size does not match the header."""
        if min(self.num_tokens, self.num_heads, self.num_seqs, self.table_width) < 0:
            raise ValueError("num_tokens, num_heads, num_seqs and table_width must be >= 0")
        expected = self.frame_sizes(head_dim, q_itemsize)
        if len(frame_sizes) != len(expected):
            raise ValueError(f"attend carries 3 frames (q, block_tables, seq_lens), got {len(frame_sizes)}")
        shapes = (f"q [{self.num_tokens}, {self.num_heads}, {head_dim}] {self.q_dtype}",
                  f"block_tables [{self.num_seqs}, {self.table_width}] {INDEX_DTYPE}",
                  f"seq_lens [3, {self.num_seqs}] {INDEX_DTYPE}")
        for i, (got, want) in enumerate(zip(frame_sizes, expected)):
            if got != want:
                raise ValueError(f"attend frame {i} holds {got} B; {shapes[i]} needs {want} B")


def attend_layout(block_tables: list[list[int]], context_lens: list[int],
                  query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames 1 and 2 of an Attend: (block_tables [S, W] int32, zero-padded; seq_lens [3, S] int32)."""
    if not len(block_tables) == len(context_lens) == len(query_lens):
        raise ValueError("block_tables, context_lens and query_lens differ in length")
    width = max((len(t) for t in block_tables), default=0)
    tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    seq_lens = torch.tensor([[len(t) for t in block_tables], list(context_lens), list(query_lens)], dtype=torch.int32)
    return tables.view(len(block_tables), width), seq_lens.view(3, len(block_tables))


@message
@dataclass(frozen=True, slots=True)
class Attended:
    TYPE: ClassVar[str] = "attended"
    VERSION: ClassVar[int] = 1


@message
@dataclass(frozen=True, slots=True)
class FreeBlocks:
    """Free the owner's blocks ``block_ids``. With no ids and a newer epoch it is the fence alone:
    the owner writes off what it left here under older epochs."""

    TYPE: ClassVar[str] = "free_blocks"
    VERSION: ClassVar[int] = 2
    owner: str
    block_ids: tuple[int, ...]
    epoch: int = 0


@message
@dataclass(frozen=True, slots=True)
class FreeOwner:
    TYPE: ClassVar[str] = "free_owner"
    VERSION: ClassVar[int] = 2
    owner: str
    epoch: int = 0


@message
@dataclass(frozen=True, slots=True)
class Freed:
    TYPE: ClassVar[str] = "freed"
    VERSION: ClassVar[int] = 1
    num_blocks: int
