"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter at the router, without a model: off
unless allowed; bad bodies and workers without --enable-lora get clear errors. (The loading itself:
tests/e2e/test_lora.py.)"""

from __future__ import annotations

import pytest

from services.router.lora_api import runtime_updating_allowed
from tests.router.stack import internal_headers, running_stack


async def test_runtime_lora_updating_is_off_unless_allowed():
    async with running_stack(1) as stack:
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            resp = await stack.post(path, {"lora_name": "sql", "lora_path": "/adapters/sql"})
            assert resp.status == 404
            assert "start the router with --allow-runtime-lora-updating" in (await resp.json())["error"]["message"]


async def test_bad_requests_and_workers_without_lora_get_clear_errors():
    async with running_stack(1, allow_runtime_lora_updating=True) as stack:
        cases = [
            ({"lora_path": "/a"}, 400, "'lora_name' must be a non-empty string"),
            ({"lora_name": "sql"}, 400, "'lora_path' must be a non-empty string"),
            ({"lora_name": " sql", "lora_path": "/a"}, 400, "without surrounding spaces"),
            ({"lora_name": "sql", "lora_path": "/a"}, 400, "no live worker serves LoRA adapters: start workers "
                                                           "with --enable-lora"),
        ]
        for body, status, message in cases:
            resp = await stack.post("/v1/load_lora_adapter", body)
            assert resp.status == status and message in (await resp.json())["error"]["message"], body
        resp = await stack.post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert resp.status == 404 and "The lora adapter 'sql' cannot be found." in (await resp.json())["error"]["message"]
        resp = await stack.post("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2})
        assert resp.status == 200  # the router still serves
        await stack.wait_blocks_free()


@pytest.mark.parametrize("flag, env, allowed", [(False, None, False), (True, None, True), (False, "True", True),
                                                (False, "1", True), (False, "false", False)])
def test_vllm_environment_variable_allows_it_too(monkeypatch, flag, env, allowed):
    if env is None:
        monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    else:
        monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", env)
    assert runtime_updating_allowed(flag) is allowed


async def test_a_worker_without_enable_lora_refuses_the_routers_lora_call():
    async with running_stack(1) as stack:
        url = str(stack.workers[0].make_url("/internal/lora"))
        async with stack.client.post(url, json={"op": "load", "lora_name": "sql", "lora_path": "/a"},
                                     headers=internal_headers()) as resp:
            assert resp.status == 400 and "start it with --enable-lora" in (await resp.json())["error"]["message"]
        resp = await stack.post("/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2})
        assert resp.status == 200  # and it still serves
        await stack.wait_blocks_free()
