"""Structured outputs: the engine's constrained greedy tokens equal transformers' generate with
xgrammar's own logits processor on the same weights, and every output matches its grammar."""

from __future__ import annotations

import json
import re

import pytest
import torch
import xgrammar

from services.worker.engine.api import (
    FinishReason, GenerateRequest, InvalidRequest, SamplingParams, StructuredKind, StructuredOutput,
)
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.model.tiny import resolve_model_dir

# Small, so that a match fits in MAX_TOKENS even when the (random-weight) model pads every gap
# with the 16 whitespace characters allowed.
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ("alpha", "beta gamma", "δέλτα")
EBNF = 'root ::= "x" item item? item? "!"\nitem ::= "y" | "z"'
CASES = {
    "json_schema": StructuredOutput(StructuredKind.JSON_SCHEMA, json.dumps(SCHEMA)),
    "json_object": StructuredOutput(StructuredKind.JSON_OBJECT),
    "regex": StructuredOutput(StructuredKind.REGEX, REGEX),
    "choice": StructuredOutput(StructuredKind.CHOICE, choices=CHOICES),
    "grammar": StructuredOutput(StructuredKind.GRAMMAR, EBNF),
}
PROMPTS = ["Describe the weather as JSON", "The code is", "Pick one"]
MAX_TOKENS = 192


def _matches(name: str, text: str) -> bool:
    if name == "json_schema":
        value = json.loads(text)
        return set(value) == {"ok", "color"} and isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
    if name == "json_object":
        return isinstance(json.loads(text), dict)
    if name == "regex":
        return re.fullmatch(REGEX, text) is not None
    if name == "choice":
        return text in CHOICES
    return re.fullmatch(r"x[yz]{1,3}!", text) is not None


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(model="tiny", dtype="float32"))


def run(engine: LLMEngine, requests: list[GenerateRequest]) -> dict[str, tuple[list[int], str, FinishReason, str | None]]:
    for r in requests:
        engine.submit(engine.prepare(r))
    out = {r.request_id: ([], [], None, None) for r in requests}
    while engine.has_work():
        for d in engine.step():
            ids, texts, _, _ = out[d.request_id]
            ids.extend(d.token_ids)
            texts.append(d.text)
            if d.finish_reason is not None:
                out[d.request_id] = (ids, texts, d.finish_reason, d.error)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing leaked
    return {k: (ids, "".join(texts), finish, error) for k, (ids, texts, finish, error) in out.items()}


def _hf_compiled(tokenizer, stop_ids: list[int], name: str):
    # The grammar stated again with xgrammar's API, as the reference's own.
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=32000, stop_token_ids=stop_ids)
    compiler = xgrammar.GrammarCompiler(info)
    if name == "json_schema":
        return compiler.compile_json_schema(json.dumps(SCHEMA), max_whitespace_cnt=16)
    if name == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', max_whitespace_cnt=16)
    if name == "regex":
        return compiler.compile_regex(REGEX)
    if name == "choice":
        return compiler.compile_grammar('root ::= "alpha" | "beta gamma" | "δέλτα"')
    return compiler.compile_grammar(EBNF)


def test_greedy_structured_outputs_equal_transformers_with_xgrammar(engine):
    import transformers
    from xgrammar.contrib.hf import LogitsProcessor

    model_dir = resolve_model_dir("tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    requests = [GenerateRequest(f"{name}-{i}", SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured=so),
                                prompt=prompt)
                for name, so in CASES.items() for i, prompt in enumerate(PROMPTS)]
    free = GenerateRequest("free", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), prompt=PROMPTS[0])
    ours = run(engine, [*requests, free])  # one batch: masked rows beside an unconstrained one
    assert ours["free"][0] == run(engine, [GenerateRequest("alone", free.sampling, prompt=PROMPTS[0])])["alone"][0]
    stop_ids = list(engine.tokenizer.eos_token_ids)
    for r in requests:
        name = r.request_id.rsplit("-", 1)[0]
        ids, text, finish, _ = ours[r.request_id]
        if name == "json_object" and finish is FinishReason.LENGTH:
            # Random weights may write one endless key: a prefix of an object, cut at max_tokens.
            assert len(ids) == MAX_TOKENS and text.lstrip().startswith("{"), (r.request_id, text)
        else:
            assert finish is FinishReason.STOP and ids[-1] in stop_ids, (r.request_id, text)  # the grammar's end
            assert _matches(name, text), (r.request_id, text)
        prompt = torch.tensor([engine.tokenizer.encode(r.prompt)])
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_TOKENS,
                              do_sample=False, eos_token_id=stop_ids, pad_token_id=0,
                              logits_processor=[LogitsProcessor(_hf_compiled(tokenizer, stop_ids, name))])
        assert ids == out[0, prompt.shape[1]:].tolist(), r.request_id


def test_sampled_structured_outputs_match_and_repeat_with_a_seed(engine):
    requests = [GenerateRequest(f"{name}-{seed}", SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95,
                                                                 seed=seed, structured=so), prompt=PROMPTS[0])
                for name, so in CASES.items() if name != "json_object" for seed in (1, 2)]  # bounded ones
    first, again = run(engine, requests), run(engine, requests)
    for r in requests:
        ids, text, finish, _ = first[r.request_id]
        assert finish is FinishReason.STOP and _matches(r.request_id.rsplit("-", 1)[0], text), (r.request_id, text)
        assert again[r.request_id][0] == ids


def test_a_complete_match_ends_the_request_even_with_ignore_eos(engine):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, structured=CASES["choice"])
    ids, text, finish, _ = run(engine, [GenerateRequest("c", params, prompt="Pick one")])["c"]
    assert finish is FinishReason.STOP and text in CHOICES and ids[-1] in engine.tokenizer.eos_token_ids


def test_max_tokens_cuts_a_match_short_with_finish_length(engine):
    params = SamplingParams(max_tokens=3, temperature=0, structured=CASES["json_schema"])
    ids, text, finish, _ = run(engine, [GenerateRequest("short", params, prompt=PROMPTS[0])])["short"]
    assert finish is FinishReason.LENGTH and len(ids) == 3 and text.startswith("{")


def test_min_tokens_past_a_complete_match_ends_with_an_error_not_a_wrong_token(engine):
    # "alpha" is at most a few tokens; min_tokens bans the EOS the complete match then needs.
    params = SamplingParams(max_tokens=40, min_tokens=30, temperature=0, structured=CASES["choice"])
    _, text, finish, error = run(engine, [GenerateRequest("m", params, prompt="Pick one")])["m"]
    assert finish is FinishReason.ERROR and "grammar" in error and "min_tokens" in error and text in CHOICES


@pytest.mark.parametrize("so, words", [
    (StructuredOutput(StructuredKind.JSON_SCHEMA, '{"type": "nope"}'), "nope"),
    (StructuredOutput(StructuredKind.JSON_SCHEMA, "{not json"), "json_schema"),
    (StructuredOutput(StructuredKind.REGEX, "a(b", param="structured_outputs"), "parenthesis"),
    (StructuredOutput(StructuredKind.GRAMMAR, "root ::= "), "EBNF"),
    (StructuredOutput(StructuredKind.REGEX, ""), "non-empty"),
    (StructuredOutput(StructuredKind.CHOICE), "choice"),
])
def test_a_spec_that_does_not_compile_is_refused_naming_its_field(engine, so, words):
    with pytest.raises(InvalidRequest) as e:
        engine.prepare(GenerateRequest("bad", SamplingParams(structured=so), prompt="x"))
    assert e.value.param == so.param and words in e.value.message and not e.value.message.startswith("[")
    ok = run(engine, [GenerateRequest("next", SamplingParams(max_tokens=4, structured=CASES["regex"]), prompt="x")])
    assert ok["next"][2] in (FinishReason.STOP, FinishReason.LENGTH)


def test_the_wire_form_round_trips_and_refuses_bad_shapes():
    for so in CASES.values():
        assert StructuredOutput.from_obj(so.to_obj()) == so
    for bad in ({"kind": "yaml"}, {"kind": "regex", "spec": 3}, "regex", {"kind": "choice", "choices": []}):
        with pytest.raises(InvalidRequest):
            StructuredOutput.from_obj(bad)


def test_a_grammar_waits_for_the_end_of_the_reasoning(engine):
    """A thinking model's structured output applies after its reasoning (vLLM's behaviour with a
    reasoning parser). Markers are any one-token strings: here a word of the tiny vocabulary ends
    the 'reasoning', forced first by logit_bias."""
    marker = " memory"
    end_id = engine.tokenizer.single_token_id(marker)
    assert end_id is not None
    so = StructuredOutput(StructuredKind.REGEX, "[0-9]{3}", reasoning_end=marker)
    params = SamplingParams(max_tokens=20, temperature=0, structured=so, logit_bias=((end_id, 100.0),))
    ids, text, finish, _ = run(engine, [GenerateRequest("think", params, prompt="Think first")])["think"]
    assert ids[0] == end_id and finish is FinishReason.STOP
    assert text.startswith(marker) and re.fullmatch("[0-9]{3}", text[len(marker):]), text
    # The prompt closed the reasoning already (thinking turned off): the grammar applies at once.
    prompt = tuple(engine.tokenizer.encode("Think first")) + (end_id,)
    ids, text, finish, _ = run(engine, [GenerateRequest("done", params, prompt_token_ids=prompt)])["done"]
    assert re.fullmatch("[0-9]{3}", text) and end_id not in ids and finish is FinishReason.STOP


def test_reasoning_markers_must_be_single_tokens(engine):
    so = StructuredOutput(StructuredKind.REGEX, "[0-9]", param="tool_choice", reasoning_start="<think>",
                          reasoning_end="</think>")
    with pytest.raises(InvalidRequest, match="one token") as e:
        engine.prepare(GenerateRequest("x", SamplingParams(structured=so), prompt="x"))
    assert e.value.param == "tool_choice"


def test_the_structured_output_benchmark_runs():
    """`python -m services.worker.bench_structured` prints a free and a constrained step time per batch."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "services.worker.bench_structured", "--rounds", "1",
                          "--max-tokens", "6", "--batches", "2", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=240, check=True).stdout
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "2" and float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
