"""Content hashes of full KV blocks, for prefix caching: block j's hash covers its tokens and, through
its parent's hash, every token before them. Two sequences share block j's KV exactly when they
share tokens [0, (j + 1) x block_size).

SHA-256, not Python's hash(): a collision would hand one request another's KV, and a crafted
prompt could aim for one (vLLM moved to SHA-256 for that reason). About 2 us a block of 16 tokens
(an 8K-token prompt: 1 ms, once).
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Callable

_ROOT = b"kvmesh-prefix-v1"


def hash_root(cache_salt: str | None, lora_key: str | None = None) -> bytes:
    """The chain's start: a salt (vLLM's cache_salt) gives a chain of its own, so requests with
    different salts (say, different tenants) never share KV, nor learn from timing what another
    one's prompts were. A LoRA adapter too (lora_key: its cache_key): its K and V differ from the
    base model's for the same tokens."""
    root = _ROOT
    if lora_key is not None:
        root = hashlib.sha256(root + b"lora:" + lora_key.encode()).digest()
    return root if cache_salt is None else hashlib.sha256(root + b"salt:" + cache_salt.encode()).digest()


def extend_block_hashes(hashes: list[bytes], token_ids: Callable[[int, int], list[int]], block_size: int,
                        num_blocks: int, root: bytes = _ROOT) -> list[bytes]:
    """Append to `hashes` (those of the first len(hashes) blocks) the hashes of the blocks up to
    `num_blocks`; token_ids(start, end) gives a sequence's tokens; root: hash_root(its salt).
    Returns `hashes`."""
    parent = hashes[-1] if hashes else root
    for j in range(len(hashes), num_blocks):
        tokens = token_ids(j * block_size, (j + 1) * block_size)
        if len(tokens) != block_size:
            raise ValueError(f"block {j} is not full: {len(tokens)} of {block_size} tokens")
        parent = hashlib.sha256(parent + array("q", tokens).tobytes()).digest()
        hashes.append(parent)
    return hashes
