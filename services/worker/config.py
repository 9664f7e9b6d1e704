"""The worker service's one config object (the engine's own settings live in engine/config.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from services.runtime.host import default_logits_threads, default_num_threads
from services.worker.engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig, check_thread_counts


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model: str = "tiny"
    router_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8100
    cluster_token: str = ""
    advertise_url: str | None = None  # what the router dials; default http://host:port
    worker_id: str | None = None  # default host:port
    served_model_name: str | None = None  # default: the engine's model name
    served_model_aliases: tuple[str, ...] = ()  # more names for it (--served-model-name A B C: B, C)
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads; None: default_num_threads()
    logits_threads: int | None = None  # for the lm_head; None: default_logits_threads(num_threads)
    heartbeat_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    remote_kv: bool = False  # spill to memory servers (the CLI turns it on)
    enable_prefix_caching: bool = True
    generation_config: str = "auto"  # vLLM's --generation-config (engine.config.EngineConfig)
    chat_template: str | None = None  # the template's text (--chat-template, read by the CLI)
    scheduling_policy: str = "fcfs"  # vLLM's --scheduling-policy
    enable_lora: bool = False  # vLLM's --enable-lora: serves LoRA adapters, loaded at start or at runtime
    lora_modules: tuple[tuple[str, str], ...] = ()  # vLLM's --lora-modules: (name, adapter directory)
    max_lora_rank: int = 16  # vLLM's --max-lora-rank
    speculative_config: str | None = None  # vLLM's --speculative-config (JSON, method "ngram")
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype

    def __post_init__(self) -> None:
        if not self.cluster_token:
            raise ValueError("cluster_token must be set (see services.runtime.auth.resolve_cluster_token)")
        if not self.router_url.startswith(("http://", "https://")):
            raise ValueError(f"router_url must be an http(s) URL, got {self.router_url!r}")
        if self.heartbeat_interval_s <= 0 or self.drain_timeout_s <= 0:
            raise ValueError("heartbeat_interval_s and drain_timeout_s must be > 0")
        check_thread_counts(self.num_threads, self.logits_threads)
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        check_lora_names(self.lora_modules, self.base_names)

    @property
    def base_names(self) -> set[str]:
        """The names the base model answers to (a LoRA adapter may not take one)."""
        return {self.served_model_name or self.model, *self.served_model_aliases}

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"

    @property
    def id(self) -> str:
        return self.worker_id or f"{self.host}:{self.port}"

    def engine_config(self) -> EngineConfig:
        threads = self.num_threads or default_num_threads()
        return EngineConfig(model=self.model, dtype=self.dtype, block_size=self.block_size,
                            num_kv_blocks=self.num_kv_blocks, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, num_threads=threads,
                            logits_threads=self.logits_threads or default_logits_threads(threads),
                            enable_prefix_caching=self.enable_prefix_caching, max_model_len=self.max_model_len,
                            generation_config=self.generation_config, chat_template=self.chat_template,
                            scheduling_policy=self.scheduling_policy, lora_modules=self.lora_modules,
                            max_lora_rank=self.max_lora_rank, speculative_config=self.speculative_config,
                            kv_cache_dtype=self.kv_cache_dtype)


def served_names(names: list[str] | None) -> dict:
    """--served-model-name A B C -> the name and its aliases; each must be new and non-empty."""
    if not names:
        return {}
    if any(not n.strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(f"--served-model-name needs distinct non-empty names, got {names}")
    return {"served_model_name": names[0], "served_model_aliases": tuple(names[1:])}


def lora_modules(enable_lora: bool, specs: list[str] | None) -> tuple[tuple[str, str], ...]:
    """--enable-lora --lora-modules name=path ... -> ((name, absolute path), ...); as vLLM, adapters
    need --enable-lora."""
    if not specs:
        return ()
    if not enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    modules = [parse_lora_module(spec) for spec in specs]
    for name, path in modules:
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"--lora-modules {name}={path}: not a directory (a PEFT adapter directory holding "
                             "adapter_config.json)")
    return tuple((name, str(Path(path).expanduser().resolve())) for name, path in modules)


def check_lora_names(modules: tuple[tuple[str, str], ...], base_names: set[str]) -> None:
    """Each adapter's name is its own: not another adapter's, not one of the base model's."""
    names = [name for name, _ in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"--lora-modules needs distinct names, got {names}")
    taken = sorted(base_names.intersection(names))
    if taken:
        raise ValueError(f"--lora-modules name {taken[0]!r} is already the base model's name: name the adapter "
                         "differently")


def parse_lora_module(spec: str) -> tuple[str, str]:
    """vLLM's --lora-modules entry: ``name=path`` or ``{"name": ..., "path": ...}`` -> (name, path)."""
    if spec.lstrip().startswith("{"):
        try:
            obj = json.loads(spec)
            name, path = obj["name"], obj["path"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--lora-modules {spec!r}: a JSON entry needs \"name\" and \"path\" ({e})") from e
    else:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {spec!r}: expected name=path")
    if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path.strip():
        raise ValueError(f"--lora-modules {spec!r}: name and path must be non-empty")
    return name.strip(), path.strip()


def add_lora_arguments(parser: argparse.ArgumentParser, whose: str = "") -> None:
    """vLLM's LoRA flags, for `kvmesh worker` and (whose="the workers': ") `kvmesh up`."""
    parser.add_argument("--enable-lora", action="store_true", help=f"{whose}serve LoRA adapters (vLLM's flag)")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                        help=f"{whose}LoRA adapters (PEFT directories) served as models: a request whose model is "
                        "NAME runs with that adapter; also JSON {\"name\": ..., \"path\": ...}, as vLLM")
    parser.add_argument("--max-lora-rank", type=int, default=16,
                        help=f"{whose}adapters of a higher rank are refused at start-up (default 16)")
