"""vLLM's bad_words: the token sequences a request bans, and which token each step may not take."""

from services.worker.engine.bad_words import bad_word_ids, banned_next

VOCAB = {"cat": [5], " cat": [6], "dog house": [7, 8], " dog house": [9, 7, 8]}


def test_a_word_is_banned_as_spelled_alone_and_after_a_space():
    assert bad_word_ids(["cat", " dog house"], VOCAB.__getitem__) == ((5,), (6,), (7, 8), (9, 7, 8))
    assert bad_word_ids([], VOCAB.__getitem__) == ()


def test_a_longer_spelling_bans_its_last_token_only_after_the_rest():
    spellings = ((5,), (7, 8), (9, 7, 8))
    assert banned_next(spellings, []) == (5,)
    assert banned_next(spellings, [1, 7]) == (5, 8)
    assert banned_next(spellings, [9, 7]) == (5, 8, 8)
    assert banned_next(spellings, [7, 1]) == (5,)
