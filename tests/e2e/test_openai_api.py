"""Router + one worker as real processes, driven by the official openai client and raw aiohttp."""

from __future__ import annotations

import io
import json
import re

import aiohttp
import openai
import pytest

from tests.e2e.cluster import (
    get, router_workers, running_cluster, wait_for, wait_zero_used_blocks, wait_zero_used_blocks_async, worker_stats,
)
from services.worker.engine.api import GenerateRequest, SamplingParams, StructuredKind, StructuredOutput
from tests.e2e.offline import greedy, offline_generate

MAX_INFLIGHT = 4
ROUTER_ARGS = ("--max-inflight-requests", str(MAX_INFLIGHT), "--max-body-bytes", str(1 << 20), "--max-n", "4",
               "--tool-call-parser", "hermes")
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the memory cluster"}]
PROMPT = "The attention layer reads the key value cache"
MAX_TOKENS = 24
CONTINUED = [*MESSAGES, {"role": "assistant", "content": "The memory cluster is"}]  # an answer to go on with
FORCED = 345  # a token id of the tiny vocabulary, forced by logit_bias
PENALTIES = {"frequency_penalty": 1.5, "presence_penalty": 1.0, "repetition_penalty": 1.3}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["ok", "color"], "additionalProperties": False}
STRUCTURED_MAX_TOKENS = 192  # the random-weight model pads JSON with all the whitespace allowed
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": {
    "type": "object",
    "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["unit", "days"], "additionalProperties": False}}}
CLOCK_TOOL = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("openai_api"), 1, ROUTER_ARGS, ("--kv-blocks", "512")) as c:
        yield c
        exit_codes = c.stop()
    assert exit_codes == {"worker0": 0, "router": 0}


@pytest.fixture(scope="module")
def reference():
    chat, completion, forced, penalized, structured, continued = offline_generate([
        greedy("chat", MAX_TOKENS, messages=tuple(MESSAGES)),
        greedy("completion", MAX_TOKENS, prompt=PROMPT),
        GenerateRequest("forced", SamplingParams(max_tokens=6, temperature=0, logit_bias=((FORCED, 100.0),)),
                        prompt=PROMPT),
        GenerateRequest("penalized", SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **PENALTIES),
                        messages=tuple(MESSAGES)),
        GenerateRequest("structured", SamplingParams(
            max_tokens=STRUCTURED_MAX_TOKENS, temperature=0,
            structured=StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA))), messages=tuple(MESSAGES)),
        GenerateRequest("continued", SamplingParams(max_tokens=MAX_TOKENS, temperature=0), messages=tuple(CONTINUED),
                        chat_template_kwargs={"add_generation_prompt": False, "continue_final_message": True}),
    ])
    return {"chat": chat, "completion": completion, "forced": forced, "penalized": penalized,
            "structured": structured, "continued": continued}


@pytest.fixture(autouse=True)
def no_blocks_left(cluster):
    yield
    wait_zero_used_blocks(cluster.workers)


@pytest.fixture
def client(cluster):
    with openai.OpenAI(base_url=cluster.router.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_each_request_is_logged_once_under_the_id_its_client_sees(cluster):
    """The router's request_finished line (vLLM logs requests too) and the X-Request-Id header name
    the response's id; the client's own X-Request-Id is logged beside it."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    async with aiohttp.ClientSession(cluster.router.url) as session:
        async with session.post("/v1/completions", json=body, headers={"X-Request-Id": "client-7"}) as resp:
            got = await resp.json()
            assert resp.headers["X-Request-Id"] == got["id"]
        async with session.post("/v1/completions", json={**body, "stream": True}) as resp:
            streamed_id = resp.headers["X-Request-Id"]
            await resp.read()

    def logged():
        return [line for line in cluster.router.log_text().splitlines() if "event='request_finished'" in line]

    wait_for(lambda: any(streamed_id in line for line in logged()), 5, "the streamed request's log line")
    (line,) = [line for line in logged() if f"request_id='{got['id']}'" in line]
    for part in ("client_request_id='client-7'", "status='200'", "prompt_tokens=", "completion_tokens=3",
                 "finish_reasons=['length']", "e2e_s="):
        assert part in line


def test_models_lists_the_worker_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming_matches_offline(client, reference):
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    ref = reference["chat"]
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].finish_reason == ref.finish_reason
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (ref.num_prompt_tokens, ref.num_generated_tokens)
    assert resp.usage.total_tokens == ref.num_prompt_tokens + ref.num_generated_tokens


def test_chat_streaming_matches_offline(client, reference):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    ref = reference["chat"]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == ref.num_generated_tokens
    assert chunks[-1].usage.prompt_tokens == ref.num_prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_match_offline(client, reference):
    ref = reference["completion"]
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert resp.choices[0].text == ref.text
    assert resp.usage.prompt_tokens == ref.num_prompt_tokens
    assert resp.usage.completion_tokens == ref.num_generated_tokens
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


async def test_raw_sse_wire_format(cluster, reference):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(cluster.router.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    objs = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert {o["object"] for o in objs} == {"text_completion"}
    assert len({o["id"] for o in objs}) == 1
    assert "".join(o["choices"][0]["text"] for o in objs) == reference["completion"].text


def test_n_seed_stop_and_logprobs(client, reference):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7, n=2)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens == 16

    text = reference["completion"].text
    stop = text[6:10]
    assert stop.strip(), text
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert resp.choices[0].text == text[:text.find(stop)]
    # vLLM's stop_reason: the stop string that matched (None for EOS or length)
    assert (resp.choices[0].finish_reason, resp.choices[0].model_dump()["stop_reason"]) == ("stop", stop)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stop=[stop], stream=True))
    assert chunks[-1].choices[0].model_dump()["stop_reason"] == stop
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == (text[:text.find(stop) + len(stop)], "stop")

    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    assert len(resp.choices[0].logprobs.tokens) == 4 and len(resp.choices[0].logprobs.top_logprobs[0]) == 3


def _hf_logprob_sums(prompt_ids: list[int], answers: list[list[int]]) -> list[float]:
    """Each answer's total logprob after the prompt, by transformers on the same weights."""
    import torch
    import transformers

    from services.worker.model.tiny import materialize_tiny

    model = transformers.AutoModelForCausalLM.from_pretrained(str(materialize_tiny()), dtype=torch.float32).eval()
    sums = []
    with torch.inference_mode():
        for ids in answers:
            logits = model(torch.tensor([prompt_ids + ids])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
            sums.append(float(logprobs.gather(1, torch.tensor(ids).view(-1, 1)).sum()))
    return sums


def test_use_beam_search_ranks_whole_answers_by_the_models_logprobs(client, reference):
    """vLLM's use_beam_search: width 1 is greedy; width 3 gives 3 different answers, ranked by total
    logprob / (prompt + answer) length as transformers scores them, the best no worse than greedy's."""
    extra = {"use_beam_search": True, "return_token_ids": True, "ignore_eos": True}
    one = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, n=1, extra_body=extra)
    assert one.choices[0].text == reference["completion"].text
    three = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, extra_body=extra)
    prompt_ids = three.choices[0].model_extra["prompt_token_ids"]
    answers = [c.model_extra["token_ids"] for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len({tuple(a) for a in answers}) == 3
    assert all(len(a) == 6 and c.finish_reason == "length" for a, c in zip(answers, three.choices))
    greedy_ids = one.choices[0].model_extra["token_ids"][:6]
    totals = _hf_logprob_sums(prompt_ids, answers + [greedy_ids])
    scores = [t / (len(prompt_ids) + 6) for t in totals]
    assert scores[:3] == sorted(scores[:3], reverse=True)
    assert scores[0] >= scores[3] - 1e-4  # the best beam is at least greedy's answer
    assert three.usage.completion_tokens == 18
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, stream=True,
                                                extra_body={"use_beam_search": True}):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == {c.index: c.message.content for c in chat.choices}
    # streamed (as vLLM): the same answers, each in one chunk once the search ends, then the usage
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra))
    texts = {c.index: "" for c in three.choices}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in three.choices}
    assert chunks[-1].usage.completion_tokens == 18


def test_return_tokens_as_token_ids_names_each_logprob_by_its_generated_id(client):
    """vLLM's return_tokens_as_token_ids: "token_id:{id}", the ids return_token_ids lists, in order."""
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True, "ignore_eos": True}
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body=extra)
    content, ids = resp.choices[0].logprobs.content, resp.choices[0].model_extra["token_ids"]
    assert [t.token for t in content] == [f"token_id:{i}" for i in ids] and len(ids) == 6
    assert all(t.top_logprobs[0].token.startswith("token_id:") for t in content)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                       stream=True, extra_body=extra)
    chunks = [c.choices[0] for c in stream if c.choices]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert len(tokens) == 6
    assert tokens == [f"token_id:{i}" for c in chunks for i in c.model_extra.get("token_ids") or []]


def test_continue_final_message_goes_on_with_the_assistants_text(client, reference):
    """vLLM's add_generation_prompt / continue_final_message: the answer continues the last
    assistant message instead of starting a new turn."""
    resp = client.chat.completions.create(model="tiny", messages=CONTINUED, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"add_generation_prompt": False, "continue_final_message": True})
    new_turn = client.chat.completions.create(model="tiny", messages=CONTINUED, max_tokens=MAX_TOKENS, temperature=0)
    assert resp.choices[0].message.content == reference["continued"].text
    assert resp.usage.prompt_tokens < new_turn.usage.prompt_tokens  # no end of turn, no new assistant header


async def test_tokenize_and_detokenize_as_the_engine_counts(cluster, client):
    """vLLM's /tokenize and /detokenize: a prompt's ids, chat messages as the template renders them
    (the count the chat's usage gives), and back to text."""
    from services.worker.model.tiny import materialize_tiny
    from services.worker.model.tokenizer import Tokenizer

    tok = Tokenizer(materialize_tiny(), (0,))
    async with aiohttp.ClientSession(cluster.router.url) as session:
        async def post(path, body, status=200):
            async with session.post(path, json=body) as resp:
                assert resp.status == status, await resp.text()
                return await resp.json()

        got = await post("/tokenize", {"model": "tiny", "prompt": PROMPT, "return_token_strs": True})
        assert got["tokens"] == tok.encode(PROMPT) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == 32768 and len(got["token_strs"]) == got["count"]
        assert (await post("/detokenize", {"model": "tiny", "tokens": got["tokens"]}))["prompt"] == PROMPT

        chat = await post("/tokenize", {"model": "tiny", "messages": MESSAGES})
        usage = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1).usage
        assert chat["count"] == usage.prompt_tokens and chat["token_strs"] is None
        with_tools = await post("/tokenize", {"messages": MESSAGES, "tools": [WEATHER_TOOL]})
        assert with_tools["count"] > chat["count"]  # the template rendered them

        assert (await post("/detokenize", {"tokens": [10**6]}, 400))["error"]["param"] == "tokens"
        assert (await post("/tokenize", {"model": "tiny"}, 400))["error"]["param"] == "prompt"
        assert (await post("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404))["error"]["code"] == "model_not_found"


def test_penalties_logit_bias_and_stop_token_ids(client, reference):
    """OpenAI's logit_bias and penalties, and vLLM's repetition_penalty and stop_token_ids (extra
    body fields), as the engine computes them offline."""
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     logit_bias={str(FORCED): 100})
    text = resp.choices[0].text
    assert text == reference["forced"].text and text == text[:len(text) // 6] * 6 and text

    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          frequency_penalty=PENALTIES["frequency_penalty"],
                                          presence_penalty=PENALTIES["presence_penalty"],
                                          extra_body={"repetition_penalty": PENALTIES["repetition_penalty"]})
    assert resp.choices[0].message.content == reference["penalized"].text != reference["chat"].text

    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     logit_bias={str(FORCED): 100}, extra_body={"stop_token_ids": [FORCED]})
    assert (resp.choices[0].text, resp.choices[0].finish_reason, resp.usage.completion_tokens) == ("", "stop", 1)
    assert resp.choices[0].model_dump()["stop_reason"] == FORCED  # the stop token's id

    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"allowed_token_ids": [FORCED]})
    assert resp.choices[0].text == reference["forced"].text

    ids = list(range(300, 340))  # truncate_prompt_tokens keeps the last k: as if only those were sent
    cut = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 12})
    tail = client.completions.create(model="tiny", prompt=ids[-12:], max_tokens=5, temperature=0)
    assert (cut.choices[0].text, cut.usage.prompt_tokens) == (tail.choices[0].text, 12)
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                          extra_body={"truncate_prompt_tokens": 7})
    assert resp.usage.prompt_tokens == 7

    # <|im_start|> (id 1) is a special token, not an end of sequence: its text shows only on request.
    for skip, text in ((None, ""), (False, "<|im_start|>" * 3)):
        extra = {} if skip is None else {"skip_special_tokens": skip}
        resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0,
                                         logit_bias={"1": 100}, extra_body=extra)
        assert (resp.choices[0].text, resp.usage.completion_tokens) == (text, 3)


def test_structured_outputs_follow_their_grammar_as_offline(cluster, client, reference):
    """OpenAI's response_format (json_schema), streamed and not, and vLLM's structured_outputs."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=STRUCTURED_MAX_TOKENS, temperature=0, response_format=fmt)
    resp = client.chat.completions.create(**kwargs)
    content = resp.choices[0].message.content
    value = json.loads(content)
    assert set(value) == {"ok", "color"} and isinstance(value["ok"], bool) and value["color"] in ("red", "green")
    assert (content, resp.choices[0].finish_reason) == (reference["structured"].text, "stop")
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == content

    choices = ["cache", "memory server", "router"]
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0.8, seed=7, n=3,
                                     extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.text in choices and c.finish_reason == "stop" for c in resp.choices)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}})
    assert re.fullmatch("[0-9]{2}-[a-z]{3}", resp.choices[0].text)

    with pytest.raises(openai.BadRequestError) as e:  # compiled by the worker, refused before streaming
        client.chat.completions.create(**{**kwargs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, stream=True)
    err = e.value.body
    assert err["param"] == "response_format" and "nope" in err["message"]


def _check_weather_args(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"unit", "days"} and args["unit"] in ("c", "f") and 1 <= args["days"] <= 7


def test_tool_calls_for_a_named_function_and_for_required(client):
    """tool_choice naming a function, or "required": the answer comes back as message.tool_calls
    whose arguments match the function's parameters; the tools reach the chat template."""
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=400, temperature=0, tools=[WEATHER_TOOL, CLOCK_TOOL])
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = client.chat.completions.create(**kwargs, tool_choice=named)
    message = resp.choices[0].message
    assert message.content is None and resp.choices[0].finish_reason == "stop"
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    _check_weather_args(call.function.arguments)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert resp.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # the tool definitions were rendered

    chunks = list(client.chat.completions.create(**kwargs, tool_choice=named, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments

    resp = client.chat.completions.create(**kwargs, tool_choice="required", parallel_tool_calls=False)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    (call,) = choice.message.tool_calls
    if call.function.name == "get_weather":
        _check_weather_args(call.function.arguments)
    else:
        assert (call.function.name, json.loads(call.function.arguments)) == ("now", {})

    # The next turn carries the call and its result; tool_choice "none" answers in text.
    follow = [*MESSAGES, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"}]
    resp = client.chat.completions.create(model="tiny", messages=follow, max_tokens=8, temperature=0,
                                          tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice="none")
    assert resp.choices[0].message.content and not resp.choices[0].message.tool_calls
    assert resp.usage.prompt_tokens > plain.usage.prompt_tokens + len(call.function.arguments) // 8


def test_tool_choice_auto_finds_the_calls_the_model_writes(client):
    """With --tool-call-parser hermes, tool_choice "auto" (the default with tools): a call the model
    writes as <tool_call>{json}</tool_call> comes back as message.tool_calls, other text as content.
    The random-weight model never writes one by itself: a structured output makes it."""
    markup = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=64, temperature=0, tools=[WEATHER_TOOL, CLOCK_TOOL],
                  extra_body={"structured_outputs": {"choice": [markup]}})
    resp = client.chat.completions.create(**kwargs)
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and not message.content
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("now", "{}")]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [(0, "now", "{}")]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          tools=[WEATHER_TOOL])  # the model answers in text
    assert resp.choices[0].message.content and not resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_completions_echo_returns_the_prompt_and_its_logprobs(client):
    """As lm-eval-harness scores a text: echo with logprobs gives every prompt token's logprob."""
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1)
    plain = client.completions.create(**kwargs)
    echoed = client.completions.create(**kwargs, echo=True)
    c, lp = echoed.choices[0], echoed.choices[0].logprobs
    assert c.text == PROMPT + plain.choices[0].text
    assert echoed.usage.prompt_tokens == plain.usage.prompt_tokens and echoed.usage.completion_tokens == 3
    assert len(lp.tokens) == echoed.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert lp.token_logprobs[-3:] == plain.choices[0].logprobs.token_logprobs
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chunks = list(client.completions.create(**kwargs, echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    scored = client.completions.create(**{**kwargs, "max_tokens": 0}, echo=True)  # score the prompt only
    assert (scored.choices[0].text, scored.choices[0].finish_reason, scored.usage.completion_tokens) == (PROMPT, "length", 0)
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-3]


def test_responses_api_answers_as_chat_does(client, reference):
    """OpenAI's Responses API (the official client's responses.create): the same tokens as the chat
    request it amounts to, whole and streamed; a named function tool comes back as a function_call."""
    ref = reference["chat"]
    kwargs = dict(model="tiny", instructions=MESSAGES[0]["content"], input=MESSAGES[1]["content"],
                  max_output_tokens=MAX_TOKENS, temperature=0)
    resp = client.responses.create(**kwargs)
    assert resp.output_text == ref.text and resp.usage.output_tokens == ref.num_generated_tokens
    assert resp.usage.input_tokens == ref.num_prompt_tokens
    assert resp.status == ("incomplete" if ref.finish_reason == "length" else "completed")
    events = list(client.responses.create(**kwargs, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ref.text
    assert events[0].type == "response.created" and events[-1].response.output_text == ref.text
    # include: message.output_text.logprobs: the chat request's logprobs, whole and streamed
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=True, top_logprobs=2).choices[0].logprobs.content
    scored = dict(kwargs, include=["message.output_text.logprobs"], top_logprobs=2)
    got = client.responses.create(**scored).output[0].content[0].logprobs
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in got] == \
        [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in chat]
    streamed = [t for e in client.responses.create(**scored, stream=True) if e.type == "response.output_text.delta"
                for t in e.logprobs]
    assert [t.logprob for t in streamed] == [t.logprob for t in chat]

    weather = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    named = dict(model="tiny", input=MESSAGES[1]["content"], tools=[weather], max_output_tokens=STRUCTURED_MAX_TOKENS,
                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    (call,) = client.responses.create(**named).output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert set(json.loads(call.arguments)) == {"unit", "days"}
    events = list(client.responses.create(**named, stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed == call.arguments == events[-1].response.output[0].arguments


def test_responses_api_goes_on_from_a_stored_response(client):
    """previous_response_id: the follow-up answers as chat does for the whole conversation (the
    earlier input and answer, then the new input; the earlier instructions are not inherited, as
    OpenAI's); retrieve and delete by id."""
    first = client.responses.create(model="tiny", instructions="Answer briefly.", input="Name a color.",
                                    max_output_tokens=MAX_TOKENS, temperature=0)
    follow = client.responses.create(model="tiny", previous_response_id=first.id, input="And another?",
                                     max_output_tokens=MAX_TOKENS, temperature=0)
    chat = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, temperature=0, messages=[
        {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And another?"}])
    assert follow.output_text == chat.choices[0].message.content
    assert follow.previous_response_id == first.id and follow.usage.input_tokens == chat.usage.prompt_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


async def test_prompt_logprobs_and_token_ids_as_vllm(cluster, client, reference):
    """vLLM's prompt_logprobs (each prompt token's logprob, rank and top alternatives, as echo
    scores them) and return_token_ids (the prompt's ids as /tokenize gives them; the output's, which
    /detokenize turns into the text), on completions and chat, whole and streamed."""
    async with aiohttp.ClientSession(cluster.router.url) as session:
        async def post(path, body):
            async with session.post(path, json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        prompt_ids = (await post("/tokenize", {"model": "tiny", "prompt": PROMPT}))["tokens"]
        chat_ids = (await post("/tokenize", {"model": "tiny", "messages": MESSAGES}))["tokens"]
        extra = {"prompt_logprobs": 2, "return_token_ids": True}
        kwargs = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=0)
        got = client.completions.create(prompt=PROMPT, **kwargs, extra_body=extra).model_dump()["choices"][0]
        assert got["text"] == reference["completion"].text and got["prompt_token_ids"] == prompt_ids
        assert (got["finish_reason"], got["stop_reason"]) == ("length", None)
        assert len(got["token_ids"]) == MAX_TOKENS
        assert (await post("/detokenize", {"model": "tiny", "tokens": got["token_ids"]}))["prompt"] == got["text"]
        scored = got["prompt_logprobs"]
        assert len(scored) == len(prompt_ids) and scored[0] is None
        echoed = client.completions.create(prompt=PROMPT, **{**kwargs, "max_tokens": 0}, echo=True, logprobs=0)
        for token_id, entry, expected in zip(prompt_ids[1:], scored[1:], echoed.choices[0].logprobs.token_logprobs[1:]):
            own = entry[str(token_id)]
            assert own["logprob"] == pytest.approx(expected, abs=1e-5) and own["rank"] >= 1
            top = sorted(entry.values(), key=lambda e: e["rank"])[:2]
            assert [e["rank"] for e in top] == [1, 2] and top[0]["logprob"] >= top[1]["logprob"] >= own["logprob"]
            assert own["rank"] > 2 or own in top
            assert all(isinstance(e["decoded_token"], str) for e in entry.values())

        chat = client.chat.completions.create(messages=MESSAGES, **kwargs, extra_body=extra).model_dump()
        assert chat["choices"][0]["message"]["content"] == reference["chat"].text
        assert chat["prompt_token_ids"] == chat_ids and len(chat["prompt_logprobs"]) == len(chat_ids)
        assert (await post("/detokenize", {"model": "tiny", "tokens": chat["choices"][0]["token_ids"]}))["prompt"] \
            == reference["chat"].text

    # Streamed: the prompt's ids once, on the first chunk; the output's ids spread over the chunks.
    stream = {"return_token_ids": True}
    chunks = [c.model_dump() for c in client.completions.create(prompt=PROMPT, **kwargs, stream=True, extra_body=stream)]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c["choices"][0] or c["choices"][0]["prompt_token_ids"] is None
               for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == got["token_ids"]
    chunks = [c.model_dump() for c in client.chat.completions.create(messages=MESSAGES, **kwargs, stream=True,
                                                                      extra_body=stream)]
    assert chunks[0]["prompt_token_ids"] == chat_ids
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == chat["choices"][0]["token_ids"]
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(prompt=PROMPT, **kwargs, stream=True, extra_body={"prompt_logprobs": 1})
    for bad in (-1, 21, "2"):
        with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
            client.completions.create(prompt=PROMPT, **kwargs, extra_body={"prompt_logprobs": bad})


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_INPUTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),
    ("not an object", "/v1/chat/completions", b"[]", 400),
    ("non-utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("priority on a fcfs worker", "/v1/completions", {"model": "tiny", "prompt": "x", "priority": 1}, 400),
    # integers past 64 bits: the wire to the worker cannot carry them (these were 500s)
    ("top_k past 64 bits", "/v1/completions", {"model": "tiny", "prompt": "x", "top_k": 2**70}, 400),
    ("truncate past 64 bits", "/v1/completions", {"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 2**64}, 400),
    ("min_tokens past 64 bits", "/v1/chat/completions", {**CHAT, "max_tokens": None, "min_tokens": 2**64}, 400),
    ("token id past 64 bits", "/v1/completions", {"model": "tiny", "prompt": [1, 2**64]}, 400),
    ("stop id past 64 bits", "/v1/completions", {"model": "tiny", "prompt": "x", "stop_token_ids": [2**64]}, 400),
    ("bias key past 64 bits", "/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {str(2**64): 1}}, 400),
    ("cache_salt empty", "/v1/completions", {"model": "tiny", "prompt": "x", "cache_salt": ""}, 400),
    ("wrong type", "/v1/chat/completions", {**CHAT, "max_tokens": "four"}, 400),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400),
    ("empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400),
    ("unknown role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, 404),
    ("max_tokens 0", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400),
    ("max_tokens > context", "/v1/chat/completions", {**CHAT, "max_tokens": 10**6}, 400),
    ("prompt + max_tokens > context", "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 32760}, 400),
    ("negative temperature", "/v1/chat/completions", {**CHAT, "temperature": -1}, 400),
    ("NaN temperature", "/v1/chat/completions", json.dumps(CHAT)[:-1].encode() + b', "temperature": NaN}', 400),
    ("unpaired surrogate escape", "/v1/chat/completions",
     b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
    ("top_p out of range", "/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400),
    ("n over cap", "/v1/chat/completions", {**CHAT, "n": 5}, 400),
    ("presence_penalty out of range", "/v1/chat/completions", {**CHAT, "presence_penalty": 3}, 400),
    ("logit_bias key not a token id", "/v1/chat/completions", {**CHAT, "logit_bias": {"hello": 1}}, 400),
    ("logit_bias token past the vocabulary", "/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}}, 400),
    ("stop_token_ids not ids", "/v1/completions", {"model": "tiny", "prompt": "x", "stop_token_ids": ["a"]}, 400),
    ("unknown response_format type", "/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400),
    ("regex that does not compile", "/v1/completions",
     {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a("}}, 400),
    ("tool_choice without tools", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400),
    ("tool_choice naming no tool", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400),
    ("chat_template_kwargs overriding a template argument", "/v1/chat/completions",
     {**CHAT, "chat_template_kwargs": {"tokenize": True}}, 400),
    ("continue_final_message with add_generation_prompt", "/v1/chat/completions",
     {**CHAT, "continue_final_message": True}, 400),
    ("tokenize without prompt or messages", "/tokenize", {"model": "tiny"}, 400),
    ("allowed_token_ids empty", "/v1/completions", {"model": "tiny", "prompt": "x", "allowed_token_ids": []}, 400),
    ("allowed_token_ids past the vocabulary", "/v1/completions",
     {"model": "tiny", "prompt": "x", "allowed_token_ids": [5, 99999]}, 400),
    ("truncate_prompt_tokens 0", "/v1/completions", {"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 0},
     400),
    ("bad_words with an empty word", "/v1/completions", {"model": "tiny", "prompt": "x", "bad_words": ["ok", " "]},
     400),
    ("skip_special_tokens not a boolean", "/v1/completions", {"model": "tiny", "prompt": "x", "skip_special_tokens": 0},
     400),
    ("detokenize a token past the vocabulary", "/detokenize", {"model": "tiny", "tokens": [10**6]}, 400),
    ("two structured outputs", "/v1/completions",
     {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400),
    ("body too large", "/v1/completions", {"model": "tiny", "prompt": "x" * (2 << 20)}, 413),
]


@pytest.mark.parametrize("name, path, body, status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_openai_error_and_service_survives(cluster, name, path, body, status):
    async with aiohttp.ClientSession() as session:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.post(cluster.router.url + path, data=io.BytesIO(data)) as resp:
            assert resp.status == status, await resp.text()
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if "context" in name:
                assert "32768" in err["message"]
            if "priority" in name:
                assert "--scheduling-policy priority" in err["message"] and err["param"] == "priority"
        async with session.post(cluster.router.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200


async def test_escaped_surrogate_pairs_are_one_character(cluster):
    body = b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    async with aiohttp.ClientSession() as session:
        async with session.post(cluster.router.url + "/v1/chat/completions", data=body) as resp:
            assert resp.status == 200, await resp.text()


async def test_queue_cap_gives_429_with_retry_after(cluster):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        held = [await session.post(cluster.router.url + "/v1/completions", json=body) for _ in range(MAX_INFLIGHT)]
        try:
            async with session.post(cluster.router.url + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 429
                assert resp.headers["Retry-After"]
        finally:
            for r in held:
                r.close()
        await wait_zero_used_blocks_async(cluster.workers)
        async with session.post(cluster.router.url + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200


async def test_client_disconnect_frees_worker_blocks(cluster):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(cluster.router.url + "/v1/chat/completions", json=body)
        for _ in range(3):
            await resp.content.readline()
        assert worker_stats(cluster.workers[0])["num_used_blocks"] > 0
        resp.close()
        await wait_zero_used_blocks_async(cluster.workers, 1.5)


def _cached_prompt_tokens_counted(cluster) -> float:
    status, body = get(cluster.router.url + "/metrics")
    assert status == 200
    line = next(x for x in body.decode().splitlines() if x.startswith("kvmesh_router_prompt_tokens_cached_total "))
    return float(line.split()[1])


def test_a_shared_prompt_prefix_is_served_from_the_prefix_cache(cluster, client):
    """A second chat with the same long system prompt, and the first chat again: their KV for the
    shared start comes from the worker's prefix cache (usage says how many prompt tokens), and their
    answers are those of prompts computed from scratch."""
    system = {"role": "system", "content": "You answer questions about the kvmesh memory cluster. " * 10}
    first = [system, {"role": "user", "content": "What is a memory server?"}]
    second = [system, {"role": "user", "content": "What does the router do?"}]
    refs = offline_generate([greedy("first", 16, messages=tuple(first)), greedy("second", 16, messages=tuple(second))])
    counted = _cached_prompt_tokens_counted(cluster)
    answers = [client.chat.completions.create(model="tiny", messages=m, max_tokens=16, temperature=0)
               for m in (first, second, first)]
    assert [a.choices[0].message.content for a in answers] == [refs[0].text, refs[1].text, refs[0].text]
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
    num_prompt = answers[0].usage.prompt_tokens
    assert cached[0] == 0
    assert 64 <= cached[1] < num_prompt
    assert cached[2] == (num_prompt - 1) // 16 * 16  # all its full blocks but the one holding its last token
    assert _cached_prompt_tokens_counted(cluster) == counted + sum(cached)
    # vLLM's cache_salt: the same chat under a salt finds nothing cached, then its own blocks
    salted = [client.chat.completions.create(model="tiny", messages=first, max_tokens=16, temperature=0,
                                             extra_body={"cache_salt": "tenant-7"}) for _ in range(2)]
    assert [a.choices[0].message.content for a in salted] == [refs[0].text] * 2
    assert [a.usage.prompt_tokens_details.cached_tokens for a in salted] == [0, cached[2]]


def test_health_ready_metrics(cluster, client):
    assert get(cluster.router.url + "/health")[0] == 200
    assert json.loads(get(cluster.router.url + "/ready")[1])["num_live_workers"] == 1
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, temperature=0, stream=False)
    text = get(cluster.router.url + "/metrics")[1].decode()
    for name in ("kvmesh_router_requests_total", "kvmesh_router_time_to_first_token_seconds_bucket",
                 "kvmesh_router_inter_token_latency_seconds_bucket", "kvmesh_router_prompt_tokens_total",
                 "kvmesh_router_generation_tokens_total", "kvmesh_worker_kv_blocks_used", "kvmesh_worker_kv_blocks_free",
                 "kvmesh_worker_requests_running", "kvmesh_worker_requests_waiting"):
        assert name in text, name
    # vLLM's names for the same figures, labelled with the served model
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total"):
        assert f'{name}{{' in text and 'model_name="tiny"' in text.split(name + "{", 1)[1].split("}", 1)[0], name
    assert get(cluster.router.url + "/internal/workers")[0] == 401
    assert router_workers(cluster.router)[0]["live"]


def test_kvmesh_chat_one_shot(cluster, reference):
    import subprocess
    import sys

    system, user = MESSAGES[0]["content"], MESSAGES[1]["content"]
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "chat", "--url", cluster.router.url, "--prompt", user,
         "--system", system, "--max-tokens", str(MAX_TOKENS), "--temperature", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reference["chat"].text.strip()
    assert "ttft" in result.stderr and "tok/s" in result.stderr
