"""Incremental text: never splits a UTF-8 character, concatenates to the full decode, cuts at stop
strings (which are never sent)."""

import random

import pytest

from services.worker.engine.detokenizer import IncrementalDetokenizer
from services.worker.model.tiny import materialize_tiny
from services.worker.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(materialize_tiny(), (0,))


def _stream(tok, ids, stop=(), include_stop=False):
    detok = IncrementalDetokenizer(tok.decode, stop, include_stop)
    pieces = []
    for n in range(1, len(ids) + 1):
        pieces.append(detok.step(ids[:n], final=n == len(ids)))
        if detok.stopped:
            break
    return pieces, detok


def test_multibyte_characters_are_never_split(tok):
    text = "Unicode: café, naïve, 日本語, emoji 🙂 and more 🙂🙂 Ωmega"
    ids = tok.encode(text)
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it did stream


def test_random_ids_concatenate_to_full_decode(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randint(1, 40))]
        pieces, _ = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)


def test_byte_tokens_that_end_mid_character_flush_at_the_end(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # byte-level pieces
    pieces, _ = _stream(tok, ids[:-1])  # generation ended inside the character
    assert "".join(pieces) == tok.decode(ids[:-1])


def test_stop_string_is_cut_and_never_sent(tok):
    ids = tok.encode("the answer is 42. STOP here and more text")
    pieces, detok = _stream(tok, ids, stop=("STOP",))
    assert detok.stopped
    assert "".join(pieces) == "the answer is 42. "
    assert all("S" not in p for p in pieces)


def test_with_include_stop_the_text_ends_with_the_stop_string(tok):
    ids = tok.encode("the answer is 42. STOP here and STOPPED more text")
    for stop in (("STOP",), ("here", "STOP")):  # the first stop string to appear ends it
        pieces, detok = _stream(tok, ids, stop=stop, include_stop=True)
        assert detok.matched == "STOP" and "".join(pieces) == "the answer is 42. STOP"
    whole = IncrementalDetokenizer(tok.decode, ("STOP", "STOP here"), include_stop=True)  # both complete at once
    assert whole.step(ids, final=True) == "the answer is 42. STOP here" and whole.matched == "STOP here"


def test_held_back_prefix_is_released_when_not_a_stop(tok):
    ids = tok.encode("the STORY goes on")
    pieces, detok = _stream(tok, ids, stop=("STOP",))
    assert not detok.stopped and detok.matched is None
    assert "".join(pieces) == "the STORY goes on"

