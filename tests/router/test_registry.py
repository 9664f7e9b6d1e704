import pytest

from services.router.registry import FORGET_AFTER_TIMEOUTS, WorkerRegistry
from services.runtime.wire import WorkerLoad, WorkerRegistration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def info(wid: str, model: str = "m") -> WorkerRegistration:
    return WorkerRegistration(wid, f"http://{wid}", model, 1000, 16, 100)


def load(wid: str, free: int = 100, draining: bool = False) -> WorkerLoad:
    return WorkerLoad(wid, 0, 0, free, 100, 0, draining)


def test_missing_heartbeats_leave_rotation_and_return():
    clock = Clock()
    reg = WorkerRegistry(3.0, clock)
    reg.register(info("a"))
    assert [s.info.worker_id for s in reg.live()] == ["a"]
    clock.t = 3.5
    assert reg.live() == []
    assert reg.heartbeat(load("a"))
    assert len(reg.live()) == 1


def test_failed_worker_out_until_next_heartbeat():
    clock = Clock()
    reg = WorkerRegistry(3.0, clock)
    reg.register(info("a"))
    clock.t = 1.0
    reg.mark_failed("a")
    assert reg.live() == []
    clock.t = 1.5
    reg.heartbeat(load("a"))
    assert len(reg.live()) == 1


def test_draining_worker_is_not_live_and_unknown_heartbeat_is_refused():
    reg = WorkerRegistry(3.0, Clock())
    reg.register(info("a"))
    reg.heartbeat(load("a", draining=True))
    assert reg.live() == []
    assert not reg.heartbeat(load("zzz"))


def test_candidates_use_router_side_tokens_and_heartbeat_free_blocks():
    reg = WorkerRegistry(3.0, Clock())
    reg.register(info("a"))
    reg.register(info("b"))
    reg.register(info("c", model="other"))
    reg.heartbeat(load("a", free=7))
    reg.dispatch("b", 40)
    cands = {c.worker_id: c for c in reg.candidates("m")}
    assert set(cands) == {"a", "b"}
    assert (cands["a"].outstanding_tokens, cands["a"].num_free_blocks) == (0, 7)
    assert cands["b"].outstanding_tokens == 40
    reg.release("b", 40)
    assert reg.get("b").inflight_tokens == 0
    assert [c.worker_id for c in reg.candidates("m", frozenset({"a"}))] == ["b"]
    assert reg.live_models() == {"m": 1000, "other": 1000}


def test_a_model_answers_to_each_of_its_names_under_the_first():
    """--served-model-name big gpt-4o: both names route to the worker, /v1/models lists both, and
    responses name the first (vLLM's rule); a name no worker serves is unknown."""
    from services.router.completions import ResolvedModel, resolve_model
    from services.runtime.errors import ApiError

    reg = WorkerRegistry(3.0, Clock())
    reg.register(WorkerRegistration("a", "http://a", "big", 1000, 16, 100, model_aliases=["gpt-4o"]))
    reg.register(info("b", "small"))
    assert reg.live_models() == {"big": 1000, "gpt-4o": 1000, "small": 1000}
    assert [s.info.worker_id for s in reg.live("gpt-4o")] == ["a"] and reg.canonical("gpt-4o") == "big"
    assert resolve_model(reg, "gpt-4o") == ResolvedModel("big", "gpt-4o", 1000, "big")
    assert resolve_model(reg, "small") == ResolvedModel("small", "small", 1000, "small")
    assert resolve_model(reg, None) == ResolvedModel("big", "big", 1000, "big")  # the first served
    assert reg.knows("gpt-4o") and not reg.knows("gpt-5")
    with pytest.raises(ApiError) as e:
        resolve_model(reg, "gpt-5")
    assert e.value.status == 404


def test_an_alias_routes_only_to_the_workers_that_have_it():
    """Two workers of one model name, each with an alias of its own: a request for one alias never
    goes to the other worker (it was routed by the model name, so to either); responses name the model."""
    from services.router.completions import ResolvedModel, resolve_model

    reg = WorkerRegistry(3.0, Clock())
    reg.register(WorkerRegistration("a", "http://a", "tiny", 1000, 16, 100, model_aliases=["prod"]))
    reg.register(WorkerRegistration("b", "http://b", "tiny", 1000, 16, 100, model_aliases=["canary"]))
    resolved = resolve_model(reg, "canary")
    assert resolved == ResolvedModel("tiny", "canary", 1000, "tiny")
    assert [c.worker_id for c in reg.candidates(resolved.route)] == ["b"]
    assert [c.worker_id for c in reg.candidates(resolve_model(reg, "tiny").route)] == ["a", "b"]


def test_lora_adapters_are_models_named_as_themselves():
    """--lora-modules sql=DIR: the adapter routes to its worker only, /v1/models' card names its
    directory and base model, and responses name the adapter (vLLM's)."""
    from services.router.completions import ResolvedModel, resolve_model

    reg = WorkerRegistry(3.0, Clock())
    reg.register(WorkerRegistration("a", "http://a", "base", 1000, 16, 100, lora_modules={"sql": "/adapters/sql"}))
    reg.register(info("b", "base"))
    assert reg.live_models() == {"base": 1000, "sql": 1000}
    assert [s.info.worker_id for s in reg.live("sql")] == ["a"] and [c.worker_id for c in reg.candidates("sql")] == ["a"]
    assert [s.info.worker_id for s in reg.live("base")] == ["a", "b"]
    assert reg.lora_adapter("sql") == ("/adapters/sql", "base") and reg.lora_adapter("base") is None
    # responses name the adapter; vLLM's metrics its base model
    assert resolve_model(reg, "sql") == ResolvedModel("sql", "sql", 1000, "base") and reg.knows("sql")


def test_the_clusters_block_count_leaves_out_a_worker_presumed_gone():
    """A worker whose engine died took its KV blocks with it: once it misses the heartbeat timeout,
    GET /cluster lists its last report (silent) but counts neither its blocks nor its capacity. A
    draining or failed worker that still heartbeats holds real blocks: counted."""
    from aiohttp import web

    from services.launch.view import view_from_cluster_json
    from services.router.keys import LEDGER, REGISTRY
    from services.router.kv_api import cluster_view
    from services.router.ledger import Ledger

    clock = Clock()
    app = web.Application()
    app[REGISTRY] = reg = WorkerRegistry(3.0, clock)
    app[LEDGER] = Ledger(3.0, clock=clock)
    for wid in ("a", "b", "c"):
        reg.register(info(wid))
    reg.heartbeat(WorkerLoad("a", 1, 0, 96, 100, 0, False))  # 4 blocks in use
    reg.heartbeat(WorkerLoad("b", 1, 0, 90, 100, 0, True))  # draining with 10
    reg.heartbeat(load("c", free=99))  # 1
    reg.mark_failed("c")
    view = cluster_view(app)
    assert view["num_used_blocks"] == 15 and view["num_total_blocks"] == 300
    assert view_from_cluster_json(view).num_used_blocks == 15

    clock.t = 2.0
    reg.heartbeat(load("b", free=100, draining=True))
    reg.heartbeat(load("c", free=100))
    reg.mark_failed("c")
    clock.t = 3.5  # "a" died at 0.0 holding 4 blocks
    view = cluster_view(app)
    silent = {w["worker_id"]: w["silent"] for w in view["workers"]}
    assert silent == {"a": True, "b": False, "c": False}
    # memory servers keep the blocks of "b" (draining) and "c" (seen to fail, still heartbeating)
    assert [s.info.worker_id for s in reg.present()] == ["b", "c"]
    assert next(w for w in view["workers"] if w["worker_id"] == "a")["num_used_blocks"] == 4  # its last report
    assert (view["num_used_blocks"], view["num_total_blocks"]) == (0, 200)
    parsed = view_from_cluster_json(view)
    assert (parsed.num_workers, parsed.num_used_blocks, parsed.num_total_blocks) == (2, 0, 200)

    reg.heartbeat(WorkerLoad("a", 1, 0, 98, 100, 0, False))  # it was only slow: counted again
    assert cluster_view(app)["num_used_blocks"] == 2


def test_a_worker_silent_for_long_is_forgotten_but_its_model_stays_known():
    # Crashed workers come back under new ids (kvmesh up, chaos): kept for good, /cluster and the
    # registry grew with every crash. A request for the model of a forgotten worker is still told
    # no worker serves it now (503), not that the model does not exist (404).
    clock = Clock()
    reg = WorkerRegistry(3.0, clock)
    reg.register(info("a", model="m"))
    reg.register(info("b", model="m"))
    clock.t = FORGET_AFTER_TIMEOUTS * 3.0 - 1
    reg.heartbeat(load("b"))
    assert reg.forget_silent() == []  # "a" is silent, listed with its last report
    clock.t = FORGET_AFTER_TIMEOUTS * 3.0
    assert reg.forget_silent() == ["a"]
    assert [s.info.worker_id for s in reg.all()] == ["b"]
    assert not reg.heartbeat(load("a"))  # back after all: told to register again
    clock.t = 2 * FORGET_AFTER_TIMEOUTS * 3.0
    assert reg.forget_silent() == ["b"] and reg.all() == []
    assert reg.knows("m") and not reg.knows("other")
    assert reg.live("m") == []


def test_time_the_router_itself_stalled_is_held_against_no_worker():
    clock = Clock()
    reg = WorkerRegistry(3.0, clock)
    reg.register(info("a"))
    reg.register(info("b"))
    clock.t = 1.0
    reg.mark_failed("b")  # seen to fail: out until it heartbeats again
    clock.t = 6.0
    reg.excuse(5.0)
    assert [s.info.worker_id for s in reg.live()] == ["a"]  # the stall does not make "b" look heartbeated
    assert [s.info.worker_id for s in reg.present()] == ["a", "b"]
    clock.t = 8.0
    assert reg.live() == [] and reg.present() == []
