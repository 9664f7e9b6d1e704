"""`kvmesh chat`'s streaming client against a canned SSE answer."""

import contextlib
import io
import json

import pytest
from aiohttp import web

from services.chat import ChatConfig, TurnStats, _first_model, _session, stream_answer


def _sse(*deltas) -> bytes:
    events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({"choices": [], "usage": {"completion_tokens": 5}})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def _serving(method: str, path: str, handler):
    """A one-route server on a free loopback port; yields its base URL."""
    app = web.Application()
    app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _answer(body: bytes) -> tuple[str, list[str], TurnStats]:
    async def handler(request):
        return web.Response(body=body, content_type="text/event-stream")

    out, parts, stats = io.StringIO(), [], TurnStats()
    async with _serving("POST", "/v1/chat/completions", handler) as url:
        config = ChatConfig(url, "m", None, 0.0, None)
        async with _session(config) as session:
            await stream_answer(session, config, "m", [{"role": "user", "content": "hi"}], out, stats, parts)
    return out.getvalue(), parts, stats


async def test_reasoning_is_shown_apart_and_kept_out_of_the_history():
    shown, parts, stats = await _answer(_sse({"role": "assistant", "content": ""}, {"reasoning_content": "hmm, "},
                                             {"reasoning_content": "three"}, {"content": "It is"}, {"content": " 3."}))
    assert shown == "[thinking: hmm, three]\nIt is 3." and parts == ["It is", " 3."]
    assert stats.num_tokens == 5 and stats.ttft_s is not None and not stats.thinking
    shown, parts, _ = await _answer(_sse({"reasoning_content": "still going"}))  # cut short while thinking
    assert shown == "[thinking: still going]\n" and parts == []


async def test_a_server_that_wants_an_api_key_gets_a_hint():
    async def models(request):
        if request.headers.get("Authorization") != "Bearer sk-right":
            return web.json_response({"error": {"message": "missing or incorrect API key"}}, status=401)
        return web.json_response({"data": [{"id": "m"}]})

    async with _serving("GET", "/v1/models", models) as url:
        async with _session(ChatConfig(url, None, None, 0.0, None)) as session:
            with pytest.raises(RuntimeError, match="wants an API key: pass --api-key or set KVMESH_API_KEY"):
                await _first_model(session, ChatConfig(url, None, None, 0.0, None))
        config = ChatConfig(url, None, None, 0.0, "sk-right")
        async with _session(config) as session:
            assert await _first_model(session, config) == "m"


@pytest.mark.parametrize("temperature, sent", [(None, None), (0.0, 0.0), (0.7, 0.7)])
async def test_temperature_is_left_to_the_server_unless_given(temperature, sent):
    """Unset, the server's default applies (the model's generation config, as vLLM)."""
    bodies = []

    async def handler(request):
        bodies.append(await request.json())
        return web.Response(body=_sse({"content": "ok"}), content_type="text/event-stream")

    async with _serving("POST", "/v1/chat/completions", handler) as url:
        config = ChatConfig(url, "m", None, temperature, None)
        async with _session(config) as session:
            await stream_answer(session, config, "m", [{"role": "user", "content": "hi"}], io.StringIO(), TurnStats(), [])
    assert bodies[0].get("temperature") == sent and ("temperature" in bodies[0]) == (sent is not None)


def test_chat_refuses_a_ca_file_that_does_not_exist(tmp_path, capsys):
    import argparse

    from services import chat

    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    args = parser.parse_args(["--url", "https://127.0.0.1:1", "--ca-certs", str(tmp_path / "nope.pem"),
                              "--prompt", "x"])
    assert chat.main(args) == 2
    assert "--ca-certs" in capsys.readouterr().err
