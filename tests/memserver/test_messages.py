"""The Attend wire layout: its frames' sizes follow the header, and a mismatch names the frame."""

import pytest
import torch

from services.memserver.messages import Attend, attend_layout
from transport.errors import WireDecodeError
from transport.wire import Envelope, Kind, decode, encode

LIMITS = {"max_header_bytes": 1 << 20, "max_frames": 4096}
MSG = Attend("w", layer=1, num_heads=8, scale=0.25, q_dtype="float32", num_tokens=2, num_seqs=2, table_width=3)


def test_layout_pads_tables_and_counts_blocks():
    tables, seq_lens = attend_layout([[7, 8, 9], [4]], [48, 16], [1, 1])
    assert tables.dtype == seq_lens.dtype == torch.int32
    assert tables.tolist() == [[7, 8, 9], [4, 0, 0]]
    assert seq_lens.tolist() == [[3, 1], [48, 16], [1, 1]]
    assert MSG.frame_sizes(head_dim=32, q_itemsize=4) == (2 * 8 * 32 * 4, tables.numel() * 4, seq_lens.numel() * 4)
    with pytest.raises(ValueError, match="differ in length"):
        attend_layout([[1]], [16, 16], [1])


def test_header_round_trips_and_the_old_version_is_refused():
    env = Envelope(Kind.REQUEST, 3, MSG, MSG.frame_sizes(32, 4))
    assert decode(encode(env), **LIMITS) == env
    raw = encode(env).replace(b"\xa1v\x03", b"\xa1v\x02")  # version 2 carried no epoch
    with pytest.raises(WireDecodeError, match="unsupported version 2"):
        decode(raw, **LIMITS)


@pytest.mark.parametrize("sizes, match", [
    ((2048, 24, 16), r"frame 2 holds 16 B; seq_lens \[3, 2\] int32 needs 24 B"),
    ((2048, 48, 24), r"frame 1 holds 48 B; block_tables \[2, 3\] int32 needs 24 B"),  # int64 tables
    ((1024, 24, 24), r"frame 0 holds 1024 B; q \[2, 8, 32\] float32 needs 2048 B"),  # bf16 q, or one token short
    ((2048, 24), "3 frames"),
])
def test_frames_that_do_not_match_the_header_are_named(sizes, match):
    with pytest.raises(ValueError, match=match):
        MSG.check_frames(sizes, head_dim=32, q_itemsize=4)


def test_matching_frames_pass():
    MSG.check_frames((2048, 24, 24), head_dim=32, q_itemsize=4)
