"""Router + worker apps in one process over loopback, FakeEngine behind the worker."""

import asyncio
from importlib import metadata

import pytest

from services.router.keys import REGISTRY
from services.worker.engine.api import EngineOverloaded, KVCapacityBusy
from services.worker.engine.client import EngineDied
from services.runtime.wire import WorkerRegistration
from tests.router.stack import free_port, internal_headers, read_sse, running_stack

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_chat_non_streaming_usage_and_text():
    async with running_stack() as s:
        resp = await s.post("/v1/chat/completions", CHAT)
        body = await resp.json()
        assert resp.status == 200, body
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "abcde"}
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len("user:hi\n"), "completion_tokens": 5, "total_tokens": 13,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
        await s.wait_blocks_free()


async def test_streaming_sse_shape_and_fan_out():
    async with running_stack(num_workers=2) as s:
        body = {**CHAT, "stream": True, "n": 3, "seed": 1, "stream_options": {"include_usage": True}}
        resp = await s.post("/v1/chat/completions", body)
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(resp)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 15
        texts = {i: "" for i in range(3)}
        for ev in events[:-2]:
            (choice,) = ev["choices"]
            texts[choice["index"]] += choice["delta"].get("content", "")
        assert texts == {0: "bcdef", 1: "cdefg", 2: "defgh"}  # seeds 1, 2, 3
        assert sum(len(e.requests) for e in s.engines) == 3
        await s.wait_blocks_free()


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk():
    async with running_stack() as s:
        options = {"include_usage": True, "continuous_usage_stats": True}
        events = await read_sse(await s.post("/v1/chat/completions", {**CHAT, "stream": True, "n": 2, "seed": 1,
                                                                     "stream_options": options}))
        usages = [e["usage"] for e in events[:-1]]
        completion = [u["completion_tokens"] for u in usages]
        assert completion == sorted(completion) and completion[-1] == 10 and completion[0] < 10
        assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
        assert usages[-1]["prompt_tokens"] > 0 and events[-2]["choices"] == []  # the final usage chunk
        plain = await read_sse(await s.post("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {
            "include_usage": False, "continuous_usage_stats": True}}))
        assert all("usage" not in e for e in plain[:-1])  # as vLLM: only with include_usage
        await s.wait_blocks_free()


async def test_client_disconnect_aborts_on_the_worker():
    async with running_stack(engine_kwargs={"step_s": 0.01}) as s:
        resp = await s.post("/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True})
        await resp.content.readline()
        assert s.engines[0].used > 0
        resp.close()
        await s.wait_blocks_free(timeout=2.0)


async def test_engine_error_mid_stream_becomes_one_sse_error_event():
    async with running_stack() as s:
        resp = await s.post("/v1/completions", {"prompt": "FAIL", "max_tokens": 10, "stream": True})
        events = await read_sse(resp)
        assert "error" in events[-1] and "boom" in events[-1]["error"]["message"]
        assert "[DONE]" not in events
        resp = await s.post("/v1/completions", {"prompt": "FAIL", "max_tokens": 10})
        assert resp.status == 500 and "boom" in (await resp.json())["error"]["message"]
        await s.wait_blocks_free()


async def test_queue_cap_gives_429_with_retry_after():
    async with running_stack(max_inflight_requests=1, engine_kwargs={"step_s": 0.01}) as s:
        slow = await s.post("/v1/completions", {"prompt": "x", "max_tokens": 300, "stream": True})
        await slow.content.readline()
        resp = await s.post("/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "too_many_requests"
        slow.close()
        await s.wait_blocks_free()
        await asyncio.sleep(0.05)
        assert (await s.post("/v1/completions", {"prompt": "x", "max_tokens": 3})).status == 200


async def test_body_limits_encoding_and_engine_errors():
    async with running_stack(max_body_bytes=1000) as s:
        resp = await s.post("/v1/completions", {"prompt": "x" * 2000})
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "request_too_large"
        assert (await s.post("/v1/completions", b'{"prompt": "\xff"}')).status == 400
        assert (await s.post("/v1/completions", b'{"prompt": ')).status == 400
        assert (await s.post("/v1/completions", b'[1]')).status == 400
        resp = await s.post("/v1/completions", {"prompt": "x" * 10, "max_tokens": 510})  # engine: context exceeded
        err = (await resp.json())["error"]
        assert resp.status == 400 and err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
        resp = await s.post("/v1/completions", {"model": "nope", "prompt": "x"})
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
        assert (await s.post("/v1/completions", {"prompt": "x", "max_tokens": 3})).status == 200


async def test_internal_endpoints_need_the_cluster_token():
    async with running_stack() as s:
        async with s.client.get(s.url("/internal/workers")) as resp:
            assert resp.status == 401
        async with s.client.get(s.url("/internal/workers"), headers={"X-Kvmesh-Cluster-Token": "wrong"}) as resp:
            assert resp.status == 401
        async with s.client.get(s.url("/internal/workers"), headers=internal_headers()) as resp:
            assert resp.status == 200 and len((await resp.json())["workers"]) == 1
        worker_url = str(s.workers[0].make_url("/internal/stats"))
        async with s.client.get(worker_url) as resp:
            assert resp.status == 401


async def test_with_api_keys_the_openai_routes_need_one_and_the_probes_do_not():
    async with running_stack(api_keys=("sk-one", "sk-two")) as s:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-one"},
                        {"Authorization": "Basic sk-one"}):
            async with s.client.post(s.url("/v1/chat/completions"), json=CHAT, headers=headers) as resp:
                assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
                error = (await resp.json())["error"]
                assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
        for path in ("/v1/models", "/tokenize", "/detokenize", "/reset_prefix_cache"):
            method = s.client.get if path == "/v1/models" else s.client.post
            async with method(s.url(path), json={}) as resp:
                assert resp.status == 401, path
        async with s.client.post(s.url("/reset_prefix_cache"), headers={"Authorization": "Bearer sk-two"}) as resp:
            assert resp.status == 200 and list((await resp.json())["workers"].values()) == [
                {"num_local_blocks": 0, "num_remote_blocks": 0}]
        for key in ("sk-one", "sk-two"):
            headers = {"Authorization": f"Bearer {key}"}
            async with s.client.post(s.url("/v1/chat/completions"), json=CHAT, headers=headers) as resp:
                assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"]
        for path in ("/health", "/ready", "/metrics", "/version"):
            async with s.client.get(s.url(path)) as resp:
                assert resp.status == 200, path
        async with s.client.get(s.url("/version")) as resp:
            assert (await resp.json()) == {"version": metadata.version("kvmesh")}
        async with s.client.get(s.url("/internal/workers"), headers=internal_headers()) as resp:
            assert resp.status == 200  # cluster members present the cluster token, not an API key
        await s.wait_blocks_free()


async def test_no_worker_and_unreachable_worker_give_503():
    async with running_stack(num_workers=0) as s:
        resp = await s.post("/v1/completions", {"prompt": "x"})
        assert resp.status == 503 and "no worker available" in (await resp.json())["error"]["message"]
        async with s.client.get(s.url("/ready")) as r:
            assert r.status == 503
        registry = s.router.app[REGISTRY]
        registry.register(WorkerRegistration("ghost", f"http://127.0.0.1:{free_port()}", "fake", 512, 4, 64))
        resp = await s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert resp.status == 503  # connection refused: marked failed, no other candidate
        assert registry.live() == []


@pytest.mark.parametrize("refusal,marked_failed", [
    (EngineDied("the engine process died: killed"), True),
    (EngineOverloaded("the engine's queue is full"), False),
    (KVCapacityBusy("the cluster's KV cache is busy: ... retry shortly", "max_tokens"), False),
], ids=["engine-died", "overloaded", "kv-busy"])
async def test_a_worker_that_refuses_with_503_is_routed_around(refusal, marked_failed):
    # Nothing was generated yet: the next worker serves the request, the client never sees the 503.
    async with running_stack(num_workers=2) as s:
        sick, healthy = s.engines
        sick.refuse = refusal
        for _ in range(6):
            resp = await s.post("/v1/completions", {"prompt": "hello", "max_tokens": 3})
            assert resp.status == 200 and (await resp.json())["choices"][0]["text"] == "abc"
        assert sick.requests == [] and len(healthy.requests) == 6
        healthy.refuse = refusal  # every worker refuses: the client gets the worker's 503, and when to retry
        resp = await s.post("/v1/completions", {"prompt": "hello", "max_tokens": 3})
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == refusal.code and resp.headers["Retry-After"] == "1"
        registry = s.router.app[REGISTRY]
        assert all(w.failed_at is not None for w in registry.all()) == marked_failed


async def test_metrics_exposed():
    async with running_stack() as s:
        await (await s.post("/v1/chat/completions", {**CHAT, "stream": True})).read()
        async with s.client.get(s.url("/metrics")) as resp:
            text = await resp.text()
        assert 'kvmesh_router_requests_total{endpoint="chat.completion",status="200"} 1.0' in text
        assert "kvmesh_router_time_to_first_token_seconds_count 1.0" in text
        assert "kvmesh_router_generation_tokens_total 5.0" in text
        assert "kvmesh_router_e2e_request_latency_seconds_count 1.0" in text
        assert 'kvmesh_router_sequences_finished_total{finish_reason="length"} 1.0' in text
        assert "kvmesh_worker_kv_blocks_free{" in text


async def test_vllm_metric_names_carry_the_same_measurements():
    """Dashboards and autoscalers written for vLLM read the router: vllm:* names, model_name label."""
    from prometheus_client.parser import text_string_to_metric_families

    async with running_stack() as s:
        await (await s.post("/v1/chat/completions", {**CHAT, "stream": True})).read()
        body = await (await s.post("/v1/completions", {"prompt": "hello", "max_tokens": 3})).json()
        async with s.client.get(s.url("/metrics")) as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}

        def value(family: str, sample: str, **labels) -> float:
            return next(x.value for x in families[family].samples if x.name == sample and x.labels == labels)

        tiny = {"model_name": "fake"}
        assert value("vllm:request_success", "vllm:request_success_total", finished_reason="length", **tiny) == 2
        assert value("vllm:generation_tokens", "vllm:generation_tokens_total", **tiny) == 5 + 3
        prompt = value("vllm:prompt_tokens", "vllm:prompt_tokens_total", **tiny)
        assert prompt == value("kvmesh_router_prompt_tokens", "kvmesh_router_prompt_tokens_total")
        assert prompt > body["usage"]["prompt_tokens"]  # both requests' prompts
        assert value("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total", **tiny) == prompt
        for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                     "vllm:request_prompt_tokens"):
            assert value(name, name + "_count", **tiny) == 2
        assert value("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count", **tiny) == 4 + 2
        # the workers' last heartbeat (it may still count a request that has ended since)
        assert value("vllm:num_requests_running", "vllm:num_requests_running", **tiny) in (0, 1)
        assert value("vllm:num_requests_waiting", "vllm:num_requests_waiting", **tiny) == 0
        assert 0 <= value("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", **tiny) < 1
        assert value("vllm:num_preemptions", "vllm:num_preemptions_total", **tiny) == 0


async def test_a_workers_preemptions_reach_its_heartbeat():
    """The count behind vllm:num_preemptions_total and kvmesh_worker_preemptions: engine -> heartbeat."""
    from services.worker.app import ENGINE, _load

    async with running_stack() as s:
        worker = s.workers[0]
        worker.app[ENGINE].num_preemptions = 3
        assert _load(worker.app).num_preemptions == 3


async def test_worker_ready_turns_503_while_draining():
    from services.worker.app import INFLIGHT

    async with running_stack() as s:
        worker = s.workers[0]
        async with s.client.get(str(worker.make_url("/ready"))) as resp:
            assert resp.status == 200
        worker.app[INFLIGHT].draining = True
        async with s.client.get(str(worker.make_url("/ready"))) as resp:
            assert resp.status == 503 and (await resp.json())["error"]["code"] == "draining"
        worker.app[INFLIGHT].draining = False


async def test_borrow_with_a_malformed_near_is_refused_clearly():
    from services.runtime.wire import CONTENT_TYPE, BorrowRequest, encode

    async with running_stack() as s:
        headers = {**internal_headers(), "Content-Type": CONTENT_TYPE}
        body = encode(BorrowRequest("w", 4, near=(1, 2)))
        async with s.client.post(s.url("/internal/kv/borrow"), data=body, headers=headers) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 400 and error["param"] == "near" and "memserver ids" in error["message"]
        async with s.client.post(s.url("/internal/kv/borrow"), data=encode(BorrowRequest("w", 4, need=-1)),
                                 headers=headers) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 400 and error["param"] == "need" and ">= 0" in error["message"]
        # the ledger still answers a well-formed borrow (no memserver registered: nothing to lend)
        body = encode(BorrowRequest("w", 4, near=("ms-0",)))
        async with s.client.post(s.url("/internal/kv/borrow"), data=body, headers=headers) as resp:
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "insufficient_capacity"


async def test_a_chats_turns_go_to_the_worker_holding_its_prefix():
    """Prefix-affinity routing: a chat's next turn (same system prompt and first user message) goes
    to the worker that served the first, though another is less loaded, unless it owes clearly more."""
    async with running_stack(num_workers=2, engine_kwargs={"max_model_len": 4096}) as s:
        history = [{"role": "system", "content": "You discuss memory."}, {"role": "user", "content": "start"}]

        async def turn(i: int) -> int:
            history.extend([{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"more {i}"}])
            resp = await s.post("/v1/chat/completions", {**CHAT, "messages": history})
            assert resp.status == 200
            return next(w for w, e in enumerate(s.engines) if [list(r.messages or ()) for r in e.requests[-1:]] == [history])

        async def background(max_tokens: int) -> None:
            resp = await s.post("/v1/completions", {"model": "fake", "prompt": "other", "max_tokens": max_tokens})
            assert resp.status == 200

        async def landed(max_tokens: int) -> int:  # the worker the background request went to
            for _ in range(500):
                for w, e in enumerate(s.engines):
                    if any(r.prompt == "other" and r.sampling.max_tokens == max_tokens for r in e.requests):
                        return w
                await asyncio.sleep(0.01)
            raise AssertionError(f"the request of {max_tokens} tokens reached no worker")

        first = await turn(0)
        # A long request lands on the same worker (both idle: the lower id), which now owes more.
        busy = asyncio.create_task(background(200))
        assert await landed(200) == first
        assert [await turn(i) for i in (1, 2)] == [first, first]
        # The same prompt follows the first there too: that worker now owes beyond the bound.
        much_busier = asyncio.create_task(background(900))
        assert await landed(900) == first
        assert await turn(3) == 1 - first
        await asyncio.gather(busy, much_busier)


async def test_a_client_gone_during_a_write_is_a_disconnect_not_a_server_error(monkeypatch):
    """Whether aiohttp reports a client that left as a cancelled handler or as a failed write
    depends on timing; both end the generation on the worker and count as client_disconnected."""
    from aiohttp.client_exceptions import ClientConnectionResetError

    from services.router import completions

    opened = completions._open_sse

    async def open_then_lose_the_client(request, formatter):
        response = await opened(request, formatter)

        async def write(data):
            raise ClientConnectionResetError("Cannot write to closing transport")

        response.write = write
        return response

    monkeypatch.setattr(completions, "_open_sse", open_then_lose_the_client)
    async with running_stack(engine_kwargs={"step_s": 0.01}) as s:
        resp = await s.post("/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True})
        await resp.read()
        await s.wait_blocks_free(timeout=2.0)
        assert s.engines[0].requests  # it reached the engine, and was aborted there
        async with s.client.get(s.url("/metrics")) as got:
            metrics = await got.text()
        assert 'kvmesh_router_requests_total{endpoint="text_completion",status="client_disconnected"} 1.0' in metrics
        assert 'status="error"' not in metrics
