"""Worker <-> memory server messages on the kvmesh transport (registered with transport.wire)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transport.wire import message


@message
@dataclass(frozen=True, slots=True)
class StoreBlocks:
    """Allocate `num_blocks` for `owner` and store the request's frames in them, one frame per
    block ([num_layers, 2, block_size, num_kv_heads, head_dim], the worker's dtype), in order."""

    TYPE: ClassVar[str] = "store_blocks"
    VERSION: ClassVar[int] = 1
    owner: str
    num_blocks: int


@message
@dataclass(frozen=True, slots=True)
class BlocksStored:
    TYPE: ClassVar[str] = "blocks_stored"
    VERSION: ClassVar[int] = 1
    block_ids: tuple[int, ...]


@message
@dataclass(frozen=True, slots=True)
class Attend:
    """Partial attention for one layer; frame 0 is q [num_tokens, num_heads, head_dim]. The reply
    carries out [num_tokens, num_heads, head_dim] (q's dtype) and lse [num_tokens, num_heads] fp32."""

    TYPE: ClassVar[str] = "attend"
    VERSION: ClassVar[int] = 1
    owner: str
    layer: int
    num_heads: int
    scale: float
    block_tables: tuple[tuple[int, ...], ...]
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]


@message
@dataclass(frozen=True, slots=True)
class Attended:
    TYPE: ClassVar[str] = "attended"
    VERSION: ClassVar[int] = 1


@message
@dataclass(frozen=True, slots=True)
class FreeBlocks:
    TYPE: ClassVar[str] = "free_blocks"
    VERSION: ClassVar[int] = 1
    owner: str
    block_ids: tuple[int, ...]


@message
@dataclass(frozen=True, slots=True)
class FreeOwner:
    TYPE: ClassVar[str] = "free_owner"
    VERSION: ClassVar[int] = 1
    owner: str


@message
@dataclass(frozen=True, slots=True)
class Freed:
    TYPE: ClassVar[str] = "freed"
    VERSION: ClassVar[int] = 1
    num_blocks: int
