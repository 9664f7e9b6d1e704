"""The launcher's one config object, built once from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.runtime.sizes import parse_size
from services.runtime.tls import ServerTLS
from services.worker.model.chat_template import load_chat_template
from services.worker.config import check_lora_names
from services.worker.engine.spec_decode import SpeculativeConfig
from services.worker.model.generation_defaults import check_setting

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    model: str = "tiny"
    served_model_name: str | None = None  # the name clients use; None: the workers' default (--model)
    served_model_aliases: tuple[str, ...] = ()  # more names for it
    num_workers: int = 1
    num_memservers: int = 2
    memserver_capacity: str = "512MiB"  # passed verbatim to `kvmesh memserver --capacity`
    worker_kv_blocks: int | None = None
    block_size: int = 16
    max_model_len: int | None = None  # the workers' --max-model-len
    max_num_seqs: int | None = None  # the workers' --max-num-seqs; None: theirs
    max_num_batched_tokens: int | None = None  # the workers' --max-num-batched-tokens; None: theirs
    dtype: str = "auto"
    worker_threads: int | None = None  # torch threads per worker; None: torch's default
    enable_prefix_caching: bool = True  # the workers' --[no-]enable-prefix-caching
    generation_config: str = "auto"  # the workers' --generation-config
    chat_template: str | None = None  # the workers' --chat-template (a file or the template)
    scheduling_policy: str = "fcfs"  # the workers' --scheduling-policy
    enable_lora: bool = False  # the workers' --enable-lora
    speculative_config: str | None = None  # the workers' --speculative-config (JSON)
    kv_cache_dtype: str = "auto"  # the workers' --kv-cache-dtype
    lora_modules: tuple[tuple[str, str], ...] = ()  # the workers' --lora-modules (absolute directories)
    max_lora_rank: int = 16  # the workers' --max-lora-rank
    tool_call_parser: str | None = None  # the router's --tool-call-parser
    reasoning_parser: str | None = None  # the router's --reasoning-parser
    allow_runtime_lora_updating: bool = False  # the router's --allow-runtime-lora-updating
    responses_store_size: int | None = None  # the router's --responses-store-size; None: its default
    api_keys: tuple[str, ...] = ()  # the router's --api-key (given through its environment, not argv)
    tls: ServerTLS | None = None  # the router's --ssl-* flags: HTTPS for everyone, the cluster's own processes too
    return_tokens_as_token_ids: bool = False  # the router's --return-tokens-as-token-ids
    host: str = "127.0.0.1"
    port: int = 8000  # 0: pick a free port
    log_dir: Path = Path(".kvmesh/logs")
    cluster_token: str = ""
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 30.0  # SIGTERM -> SIGKILL deadline per process group

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.num_workers}")
        if self.num_memservers < 0:
            raise ValueError(f"--memservers must be >= 0, got {self.num_memservers}")
        if self.worker_kv_blocks is not None and self.worker_kv_blocks < 1:
            raise ValueError(f"--worker-kv-blocks must be >= 1, got {self.worker_kv_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two, got {self.block_size}")
        for flag, value in (("--max-model-len", self.max_model_len), ("--max-num-seqs", self.max_num_seqs),
                            ("--max-num-batched-tokens", self.max_num_batched_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.worker_threads is not None and self.worker_threads < 1:
            raise ValueError(f"--worker-threads must be >= 1, got {self.worker_threads}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.model != "tiny" and not Path(self.model).is_dir():
            raise ValueError(f"--model must be 'tiny' or a model directory; {self.model!r} is not a directory")
        check_setting(self.generation_config)
        if self.chat_template is not None:
            load_chat_template(self.chat_template)  # a file, or a template: refused before anything starts
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("--served-model-name must not be empty")
        if not self.cluster_token:
            raise ValueError("cluster_token must be set")
        if self.responses_store_size is not None and self.responses_store_size < 0:
            raise ValueError(f"--responses-store-size must be >= 0, got {self.responses_store_size}")
        if self.max_lora_rank < 1:
            raise ValueError(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        check_lora_names(self.lora_modules, {self.served_model_name or self.model, *self.served_model_aliases})
        parse_size(self.memserver_capacity)
        if self.tls is not None:
            if self.tls.cert_reqs == 2:
                raise ValueError("--ssl-cert-reqs 2: kvmesh up's own workers and memory servers present no client "
                                 "certificate to the router; use 1 (verified when sent), or run kvmesh router yourself")
            self.tls.context()  # a certificate and key that do not load are refused before anything starts

    @property
    def memserver_capacity_bytes(self) -> int:
        return parse_size(self.memserver_capacity)
