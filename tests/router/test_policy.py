from services.router.policy import Candidate, least_outstanding_tokens


def test_empty_gives_none():
    assert least_outstanding_tokens([]) is None


def test_least_outstanding_tokens_wins():
    a, b = Candidate("a", 100, 10), Candidate("b", 50, 1)
    assert least_outstanding_tokens([a, b]) is b


def test_tie_goes_to_most_free_blocks_then_id():
    a, b, c = Candidate("a", 10, 5), Candidate("b", 10, 9), Candidate("c", 10, 9)
    assert least_outstanding_tokens([a, c, b]) is b
