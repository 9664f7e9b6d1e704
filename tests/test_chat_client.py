"""`kvmesh chat`'s streaming client against a canned SSE answer."""

import io
import json

from aiohttp import web

from services.chat import ChatConfig, TurnStats, _session, stream_answer


def _sse(*deltas) -> bytes:
    events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events.append({"choices": [], "usage": {"completion_tokens": 5}})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def _answer(body: bytes) -> tuple[str, list[str], TurnStats]:
    async def handler(request):
        return web.Response(body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = ChatConfig(f"http://127.0.0.1:{port}", "m", None, 0.0, None)
    out, parts, stats = io.StringIO(), [], TurnStats()
    try:
        async with _session(config) as session:
            await stream_answer(session, config, "m", [{"role": "user", "content": "hi"}], out, stats, parts)
    finally:
        await runner.cleanup()
    return out.getvalue(), parts, stats


async def test_reasoning_is_shown_apart_and_kept_out_of_the_history():
    shown, parts, stats = await _answer(_sse({"role": "assistant", "content": ""}, {"reasoning_content": "hmm, "},
                                             {"reasoning_content": "three"}, {"content": "It is"}, {"content": " 3."}))
    assert shown == "[thinking: hmm, three]\nIt is 3." and parts == ["It is", " 3."]
    assert stats.num_tokens == 5 and stats.ttft_s is not None and not stats.thinking
    shown, parts, _ = await _answer(_sse({"reasoning_content": "still going"}))  # cut short while thinking
    assert shown == "[thinking: still going]\n" and parts == []
