"""CORS: a page in a browser may call the API (any origin by default, as vLLM), preflights pass
without an API key, and --allowed-origins narrows who may."""

import json

import pytest

from services.router.cors import parse_origins
from tests.router.stack import running_stack

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
PAGE = "https://chat.example"
PREFLIGHT = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


async def _call(s, path: str, body: dict, origin: str) -> tuple[int, dict]:
    async with s.client.post(s.url(path), data=json.dumps(body), headers={
            "Origin": origin, "Authorization": "Bearer sk-1", "Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_any_origin_by_default_streamed_or_not_and_preflights_need_no_key():
    async with running_stack(api_keys=("sk-1",)) as s:
        async with s.client.options(s.url("/v1/chat/completions"), headers=PREFLIGHT) as resp:
            assert resp.status == 200  # no API key: browsers send none with a preflight
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        for body in (CHAT, {**CHAT, "stream": True}):
            status, headers = await _call(s, "/v1/chat/completions", body, PAGE)
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
            assert "X-Request-Id" in headers["Access-Control-Expose-Headers"]
        status, headers = await _call(s, "/v1/models", {}, PAGE)  # an error answer too (POST to a GET route)
        assert status == 405 and headers["Access-Control-Allow-Origin"] == "*"
        await s.wait_blocks_free()


async def test_allowed_origins_narrow_it():
    async with running_stack(allowed_origins=(PAGE,)) as s:
        async with s.client.options(s.url("/v1/chat/completions"), headers=PREFLIGHT) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == PAGE
        other = {**PREFLIGHT, "Origin": "https://evil.example"}
        async with s.client.options(s.url("/v1/chat/completions"), headers=other) as resp:
            assert resp.status == 400 and "Access-Control-Allow-Origin" not in resp.headers
        status, headers = await _call(s, "/v1/chat/completions", CHAT, PAGE)
        assert (status, headers["Access-Control-Allow-Origin"], headers["Vary"]) == (200, PAGE, "Origin")
        status, headers = await _call(s, "/v1/chat/completions", CHAT, "https://evil.example")
        assert status == 200 and "Access-Control-Allow-Origin" not in headers  # the browser hides it from the page
        await s.wait_blocks_free()


def test_origins_as_flags_comma_lists_or_vllms_json_list():
    assert parse_origins(None) == ("*",)
    assert parse_origins(["https://a", "https://b,https://c"]) == ("https://a", "https://b", "https://c")
    assert parse_origins(['["https://a", "https://b"]']) == ("https://a", "https://b")
    for bad in (["[1]"], ["[oops"], [","]):
        with pytest.raises(ValueError, match="--allowed-origins"):
            parse_origins(bad)
