"""The router's one config object, built once from the command line."""

from __future__ import annotations

from dataclasses import dataclass

from services.router.reasoning import REASONING_PARSERS
from services.router.tool_parsers import TOOL_CALL_PARSERS
from services.runtime.tls import ServerTLS


@dataclass(frozen=True, slots=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    cluster_token: str = ""
    api_keys: tuple[str, ...] = ()  # clients of the OpenAI routes present one (Bearer); empty: open
    heartbeat_timeout_s: float = 3.0  # a worker silent this long is out of rotation
    max_inflight_requests: int = 256  # client requests in flight; beyond it: 429 + Retry-After
    default_max_tokens: int = 1024  # chat requests without max_tokens (the router cannot count prompt tokens)
    max_n: int = 8  # cap on `n` (each choice is one engine sequence)
    max_body_bytes: int = 32 * 1024 * 1024
    max_stop_sequences: int = 16
    drain_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    tool_call_parser: str | None = None  # finds tool calls in answers (tool_choice "auto"); None: refuse "auto"
    reasoning_parser: str | None = None  # splits a chat answer's reasoning_content from its content
    allowed_origins: tuple[str, ...] = ("*",)  # CORS: browser pages of these origins may call the API ("*": any)
    responses_store_size: int = 1000  # /v1/responses kept for previous_response_id and GET (0: none)
    allow_runtime_lora_updating: bool = False  # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (lora_api)
    tls: ServerTLS | None = None  # HTTPS on the listener (vLLM's --ssl-* flags); None: plain HTTP
    return_tokens_as_token_ids: bool = False  # vLLM's flag: logprobs name every token "token_id:{id}"

    def __post_init__(self) -> None:
        if not self.cluster_token:
            raise ValueError("cluster_token must be set (see services.runtime.auth.resolve_cluster_token)")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ValueError("api_keys must be non-empty strings without surrounding spaces")
        for name in ("heartbeat_timeout_s", "drain_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.responses_store_size < 0:
            raise ValueError(f"responses_store_size must be >= 0, got {self.responses_store_size}")
        for name in ("max_inflight_requests", "default_max_tokens", "max_n", "max_body_bytes", "max_stop_sequences"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {list(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {list(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if not self.allowed_origins or any(not o for o in self.allowed_origins):
            raise ValueError(f"allowed_origins must name origins (or '*'), got {self.allowed_origins}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
