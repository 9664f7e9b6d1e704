"""vLLM's POST /reset_prefix_cache: every live worker forgets the KV it keeps for prefixes that no
running request uses, its own and what it keeps on memory servers (which frees that room there).

Benchmarks call it between runs so that a run does not find the previous run's prompts cached.
vLLM serves it in its dev mode only; here it is always served, behind the API keys when the router
has any.
"""

from __future__ import annotations

import structlog
from aiohttp import web

from services.router.keys import POOL, REGISTRY
from services.router.worker_client import post_each_worker_json
from services.runtime.bodies import json_response
from services.runtime.errors import ApiError

routes = web.RouteTableDef()
log = structlog.get_logger()


@routes.post("/reset_prefix_cache")
async def reset_prefix_cache(request: web.Request) -> web.Response:
    """200 {"workers": {worker id: {"num_local_blocks", "num_remote_blocks"}}}: blocks forgotten."""
    worker_ids = [s.info.worker_id for s in request.app[REGISTRY].live()]
    results = await post_each_worker_json(request.app[POOL], worker_ids, "/internal/reset_prefix_cache", {})
    failed = [(w, r) for w, r in zip(worker_ids, results) if isinstance(r, BaseException)]
    if failed:
        raise ApiError(f"{len(failed)} of {len(worker_ids)} workers did not reset their prefix cache "
                       f"({failed[0][0]}: {failed[0][1]})", status=502, code="worker_error")
    answers = dict(zip(worker_ids, results))
    log.info("prefix_cache_reset", num_workers=len(answers))
    return json_response({"workers": answers})
