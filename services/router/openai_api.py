"""Public routes: /v1/chat/completions, /v1/completions, /v1/responses, /v1/models, /tokenize,
/detokenize, /health, /ready, /metrics, /version."""

from __future__ import annotations

import dataclasses
import time
from importlib import metadata

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from services.router.completions import resolve_model, serve
from services.router.config import RouterConfig
from services.router.keys import CONFIG, METRICS, POOL, REGISTRY, RESPONSES
from services.router.protocol import (
    ParsedRequest, parse_chat_request, parse_completion_request, parse_detokenize_request, parse_tokenize_request,
)
from services.router.responses_format import ResponsesFormatter
from services.router.responses_request import chat_body
from services.router.responses_store import ResponseStore, StoredResponse, output_messages
from services.router.worker_client import call_worker_json
from services.router.params import get_str
from services.runtime.bodies import json_response, read_json_object
from services.runtime.errors import ApiError

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    body = await read_json_object(request)
    parsed = parse_chat_request(body, max_n=config.max_n, max_stop=config.max_stop_sequences,
                                tool_parser=config.tool_call_parser, reasoning_parser=config.reasoning_parser)
    return await serve(request, _server_defaults(parsed, config))


def _server_defaults(parsed: ParsedRequest, config: RouterConfig) -> ParsedRequest:
    """--return-tokens-as-token-ids names tokens by id for every request, as vLLM's flag does."""
    if config.return_tokens_as_token_ids and not parsed.tokens_as_ids:
        return dataclasses.replace(parsed, tokens_as_ids=True)
    return parsed


@routes.post("/v1/responses")
async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API, as the chat request it amounts to (services.router.responses_request);
    kept for previous_response_id and GET unless `store` is false (services.router.responses_store)."""
    config, store = request.app[CONFIG], request.app[RESPONSES]
    body = await read_json_object(request)
    previous = get_str(body, "previous_response_id")
    history: tuple[dict, ...] = ()
    if previous is not None:
        history = _stored(store, previous, "previous_response_id").conversation
    chat, echo, conversation = chat_body(body, history, can_store=store.enabled)
    parsed = parse_chat_request(chat, max_n=1, max_stop=config.max_stop_sequences,
                                tool_parser=config.tool_call_parser, reasoning_parser=config.reasoning_parser)

    def keep(response: dict) -> None:
        if echo.store:
            store.put(response, conversation + output_messages(response["output"]))

    return await serve(request, parsed, lambda p, model: ResponsesFormatter(p, model, echo, keep), endpoint="response")


@routes.get("/v1/responses/{response_id}")
async def get_response(request: web.Request) -> web.Response:
    return json_response(_stored(request.app[RESPONSES], request.match_info["response_id"]).response)


@routes.delete("/v1/responses/{response_id}")
async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not request.app[RESPONSES].delete(response_id):
        _stored(request.app[RESPONSES], response_id)  # raises its 404
    return json_response({"id": response_id, "object": "response", "deleted": True})


def _stored(store: ResponseStore, response_id: str, param: str | None = None) -> StoredResponse:
    stored = store.get(response_id)
    if stored is None:
        hint = "" if store.enabled else " (this router keeps no responses: see its --responses-store-size)"
        raise ApiError(f"Response with id '{response_id}' not found.{hint}", status=404, code="not_found",
                       param=param)
    return stored


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    body = await read_json_object(request)
    parsed = parse_completion_request(body, max_n=config.max_n, max_stop=config.max_stop_sequences)
    return await serve(request, _server_defaults(parsed, config))


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.Response:
    """vLLM's: the token ids of a prompt, or of chat messages as the chat template renders them."""
    return await _worker_tokenizer(request, parse_tokenize_request)


@routes.post("/detokenize")
async def detokenize(request: web.Request) -> web.Response:
    """vLLM's: the text of token ids."""
    return await _worker_tokenizer(request, parse_detokenize_request)


async def _worker_tokenizer(request: web.Request, parse) -> web.Response:
    """The request, checked by ``parse``, answered by a worker serving its model (/internal/tokenize)."""
    model, body = parse(await read_json_object(request))
    route = resolve_model(request.app[REGISTRY], model).route
    return json_response(await call_worker_json(request.app[POOL], route, "/internal/tokenize", body))


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """vLLM's cards: a LoRA adapter's root is its directory and its parent the base model."""
    created = int(time.time())
    registry = request.app[REGISTRY]
    data = []
    for name, max_len in registry.live_models().items():
        root, parent = registry.lora_adapter(name) or (name, None)
        data.append({"id": name, "object": "model", "created": created, "owned_by": "kvmesh", "root": root,
                     "parent": parent, "max_model_len": max_len})
    return json_response({"object": "list", "data": data})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/version")
async def version(request: web.Request) -> web.Response:
    """vLLM's: the server's version (kvmesh's package version)."""
    try:
        number = metadata.version("kvmesh")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        number = "0+unknown"
    return json_response({"version": number})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    num_live = len(request.app[REGISTRY].live())
    return json_response({"ready": num_live > 0, "num_live_workers": num_live}, status=200 if num_live else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
