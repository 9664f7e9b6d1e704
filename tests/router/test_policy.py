from services.router.policy import AFFINITY_SLACK_TOKENS, Candidate, PrefixAffinity, least_outstanding_tokens
from services.router.worker_client import prefix_key
from services.runtime.wire import GenerateCall


def test_empty_gives_none():
    assert least_outstanding_tokens([]) is None


def test_least_outstanding_tokens_wins():
    a, b = Candidate("a", 100, 10), Candidate("b", 50, 1)
    assert least_outstanding_tokens([a, b]) is b


def test_tie_goes_to_most_free_blocks_then_id():
    a, b, c = Candidate("a", 10, 5), Candidate("b", 10, 9), Candidate("c", 10, 9)
    assert least_outstanding_tokens([a, c, b]) is b


def test_a_recent_prefix_goes_back_to_its_worker_and_a_new_one_to_the_least_loaded():
    policy = PrefixAffinity()
    busy, idle = Candidate("w0", 100, 10), Candidate("w1", 0, 10)
    assert policy([busy, idle], b"chat A") is idle  # new prefix: least loaded
    idle_now_busier = Candidate("w1", 300, 10)
    assert policy([busy, idle_now_busier], b"chat A") is idle_now_busier  # its worker, within the bound
    assert policy([busy, idle_now_busier], b"chat B") is busy  # new: least loaded
    assert policy([busy, idle_now_busier], None) is busy
    assert policy([], b"chat A") is None
    assert policy([busy], b"chat A") is busy  # its worker is gone: least loaded, remembered from now on
    assert policy([busy, idle], b"chat A") is busy


def test_a_clearly_busier_remembered_worker_loses_to_load():
    policy = PrefixAffinity()
    a, b = Candidate("w0", 0, 10), Candidate("w1", 0, 10)
    assert policy([a, b], b"doc") is a
    near = [Candidate("w0", 2 * 300 + AFFINITY_SLACK_TOKENS, 10), Candidate("w1", 300, 10)]
    assert policy(near, b"doc").worker_id == "w0"
    far = [Candidate("w0", 2 * 300 + AFFINITY_SLACK_TOKENS + 1, 10), Candidate("w1", 300, 10)]
    assert policy(far, b"doc").worker_id == "w1"
    assert policy([a, b], b"doc").worker_id == "w1"  # it moved: the cache there holds it now


def test_prefix_affinity_forgets_the_oldest_keys():
    policy = PrefixAffinity(max_keys=2)
    a, b = Candidate("w0", 0, 10), Candidate("w1", 0, 10)
    policy([a, b], b"k1")
    policy([b], b"k2")
    policy([b], b"k3")  # k1 (on w0) is forgotten
    assert policy([Candidate("w0", 5, 10), b], b"k1") is b and policy([a, Candidate("w1", 5, 10)], b"k3").worker_id == "w1"


def test_prefix_key_of_a_chat_is_its_turns_up_to_the_first_user_message():
    system = {"role": "system", "content": "You are terse."}
    turn1 = [system, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    key = lambda **p: prefix_key(GenerateCall("r", {}, **p))  # noqa: E731
    assert key(messages=turn1) == key(messages=turn2) != key(messages=[system, {"role": "user", "content": "yo"}])
    assert key(prompt="x" * 2000) == key(prompt="x" * 1500) != key(prompt="y" * 2000)
    assert key(prompt_token_ids=list(range(300))) == key(prompt_token_ids=list(range(256)) + [7])
    assert len(key(prompt="x" * 5000)) == 16  # a digest: 65,536 remembered keys stay small
