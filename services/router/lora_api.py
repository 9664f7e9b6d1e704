"""vLLM's runtime LoRA updating: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Off unless the router runs with --allow-runtime-lora-updating (or vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING=true): anyone holding an API key could otherwise make the workers
read a directory of their choosing. A load goes to every live worker started with --enable-lora (of
the base model named by `model`, when several are served); all load it or none keeps it. An unload
goes to every worker that has it; requests already admitted finish with the adapter.

The router remembers what was loaded (RuntimeAdapters): a worker that registers later with
--enable-lora, a replacement for one that died or one more, is given the adapters of its base model.
"""

from __future__ import annotations

import asyncio
import os

import structlog
from aiohttp import web

from services.router.keys import CONFIG, POOL, REGISTRY
from services.router.params import get_str
from services.router.registry import WorkerState
from services.runtime.wire import WorkerRegistration
from services.router.worker_client import post_each_worker_json, post_worker_json
from services.runtime.bodies import read_json_object
from services.runtime.errors import ApiError

routes = web.RouteTableDef()
log = structlog.get_logger()
VLLM_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


class RuntimeAdapters:
    """Adapters loaded through /v1/load_lora_adapter and not unloaded: name -> (directory, base model)."""

    def __init__(self):
        self.adapters: dict[str, tuple[str, str]] = {}
        self._giving: dict[str, asyncio.Task] = {}  # worker id -> the task loading adapters into it

    def missing(self, info: WorkerRegistration) -> list[tuple[str, str]]:
        """(name, directory) of the adapters a worker serving LoRA adapters lacks."""
        if info.lora_modules is None:
            return []
        return [(name, path) for name, (path, base) in sorted(self.adapters.items())
                if base == info.model_name and name not in info.lora_modules]

    def give(self, app: web.Application, info: WorkerRegistration) -> None:
        """Load what the worker lacks into it, in the background; once it has them it registers
        again (with each one), and is looked at again then."""
        worker_id = info.worker_id
        if worker_id in self._giving or not (missing := self.missing(info)):
            return
        task = asyncio.create_task(_give(app, worker_id, missing), name=f"lora-give-{worker_id}")
        self._giving[worker_id] = task
        task.add_done_callback(lambda _: self._giving.pop(worker_id, None))


async def _give(app: web.Application, worker_id: str, adapters: list[tuple[str, str]]) -> None:
    for name, path in adapters:
        try:
            await post_worker_json(app[POOL], worker_id, "/internal/lora",
                                   {"op": "load", "lora_name": name, "lora_path": path})
        except ApiError as e:  # the worker serves the rest; a request for this one goes elsewhere
            log.warning("lora_give_failed", worker_id=worker_id, lora_name=name, error=e.message)
            continue
        log.info("lora_given", worker_id=worker_id, lora_name=name, lora_path=path)


RUNTIME_ADAPTERS = web.AppKey("runtime_lora_adapters", RuntimeAdapters)


def runtime_updating_allowed(flag: bool) -> bool:
    return flag or os.environ.get(VLLM_ENV, "").strip().lower() in ("1", "true")


def _check_allowed(request: web.Request) -> None:
    if not request.app[CONFIG].allow_runtime_lora_updating:
        raise ApiError("loading LoRA adapters at runtime is off: start the router with "
                       f"--allow-runtime-lora-updating (or {VLLM_ENV}=true)", status=404, code="not_found")


def _name(body: dict, field: str) -> str:
    value = get_str(body, field)
    if not value or value != value.strip():
        raise ApiError(f"'{field}' must be a non-empty string without surrounding spaces", param=field)
    return value


def _lora_workers(request: web.Request, base: str | None) -> list[WorkerState]:
    """The live workers that serve LoRA adapters, of one base model."""
    states = [s for s in request.app[REGISTRY].live() if s.info.lora_modules is not None
              and (base is None or base in s.info.model_names)]
    if not states:
        where = f" of model '{base}'" if base is not None else ""
        raise ApiError(f"no live worker{where} serves LoRA adapters: start workers with --enable-lora",
                       code="lora_not_enabled", param="model" if base is not None else None)
    bases = {s.info.model_name for s in states}
    if len(bases) > 1:
        raise ApiError(f"workers of several base models serve LoRA adapters ({sorted(bases)}): name one in 'model'",
                       param="model")
    return states


async def _update(request: web.Request, states: list[WorkerState], body: dict) -> list[BaseException | None]:
    results = await post_each_worker_json(request.app[POOL], [s.info.worker_id for s in states], "/internal/lora", body)
    return [r if isinstance(r, BaseException) else None for r in results]


def _as_reply(error: BaseException, op: str) -> ApiError:
    """A worker's failure as the answer: its own ApiError, else a 502."""
    return error if isinstance(error, ApiError) else ApiError(f"{op} the adapter failed: {error!r}", status=502,
                                                              code="worker_error")


@routes.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: web.Request) -> web.Response:
    """{"lora_name", "lora_path" (a directory on the workers' hosts), "model" (optional: the base)}."""
    _check_allowed(request)
    body = await read_json_object(request)
    name, path = _name(body, "lora_name"), _name(body, "lora_path")
    states = _lora_workers(request, get_str(body, "model"))
    registry = request.app[REGISTRY]
    if any(name in s.info.model_names for s in registry.live()):
        raise ApiError(f"'{name}' is a base model's name: name the adapter differently", param="lora_name")
    if any(name in s.info.lora_modules for s in states):
        raise ApiError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    errors = await _update(request, states, {"op": "load", "lora_name": name, "lora_path": path})
    failed = [e for e in errors if e is not None]
    if failed:  # all or none: unload it where it loaded
        loaded = [s for s, e in zip(states, errors) if e is None]
        await _update(request, loaded, {"op": "unload", "lora_name": name})
        log.warning("lora_load_failed", lora_name=name, lora_path=path, error=str(failed[0]))
        raise _as_reply(failed[0], "loading")
    log.info("lora_loaded", lora_name=name, lora_path=path, num_workers=len(states))
    runtime = request.app[RUNTIME_ADAPTERS]
    runtime.adapters[name] = (path, states[0].info.model_name)
    for state in request.app[REGISTRY].live():  # workers that registered while it was loading
        runtime.give(request.app, state.info)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


@routes.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: web.Request) -> web.Response:
    """{"lora_name"}: every worker holding it unloads it."""
    _check_allowed(request)
    body = await read_json_object(request)
    name = _name(body, "lora_name")
    states = [s for s in request.app[REGISTRY].live() if name in (s.info.lora_modules or {})]
    if not states:
        raise ApiError(f"The lora adapter '{name}' cannot be found.", status=404, code="not_found",
                       param="lora_name")
    # Forgotten first: each worker registers again as it unloads it, and must not be given it back.
    runtime = request.app[RUNTIME_ADAPTERS].adapters
    remembered = runtime.pop(name, None)
    errors = [e for e in await _update(request, states, {"op": "unload", "lora_name": name}) if e is not None]
    if errors:
        if remembered is not None:
            runtime[name] = remembered
        raise _as_reply(errors[0], "unloading")
    log.info("lora_unloaded", lora_name=name, num_workers=len(states))
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
