"""The checkpoint's own tokenizer and chat template (transformers), behind a small interface."""

from __future__ import annotations

from pathlib import Path

from services.worker.engine.api import InvalidRequest
from services.worker.model.errors import ModelNotFound


class Tokenizer:
    def __init__(self, model_dir: Path, eos_token_ids: tuple[int, ...], chat_template: str | None = None):
        """chat_template: a Jinja template used instead of the checkpoint's (vLLM's --chat-template)."""
        from transformers import AutoTokenizer

        if not (Path(model_dir) / "tokenizer.json").is_file() and not (
            Path(model_dir) / "tokenizer_config.json"
        ).is_file():
            raise ModelNotFound(f"no tokenizer.json / tokenizer_config.json in {str(model_dir)!r}")
        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        if chat_template is not None:
            self._tok.chat_template = chat_template
        own_eos = self._tok.eos_token_id
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *([own_eos] if own_eos is not None else [])]))
        self.vocab_size = len(self._tok)
        # decode runs twice per generated token (the detokenizer): transformers' wrapper around a
        # fast tokenizer costs ~4x the Rust call itself, and adds nothing unless it cleans up spaces.
        backend = getattr(self._tok, "backend_tokenizer", None)
        self._raw_decode = None
        if backend is not None and not getattr(self._tok, "clean_up_tokenization_spaces", True):
            self._raw_decode = backend.decode

    @property
    def hf(self):
        """The transformers tokenizer itself (for libraries that read its vocabulary, e.g. xgrammar)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: list[dict], tools=None, template_kwargs: dict | None = None) -> list[int]:
        """tools: OpenAI tool definitions, for templates that render them (others ignore them).
        template_kwargs: the template's own variables, add_generation_prompt (default True) and
        continue_final_message (the router checked that no other argument is named)."""
        if not getattr(self._tok, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions", "messages")
        kwargs = {"add_generation_prompt": True, **(template_kwargs or {})}
        try:
            text = self._tok.apply_chat_template(messages, tools=list(tools) if tools else None, tokenize=False,
                                                 **kwargs)
        except Exception as e:  # jinja raises on messages the template rejects
            raise InvalidRequest(f"the chat template rejected the messages: {e}", "messages") from e
        return list(self._tok.encode(text, add_special_tokens=False))

    def single_token_id(self, text: str) -> int | None:
        """The id of the one token that is exactly `text` (e.g. "</think>"), or None."""
        if not text:
            return None
        ids = self._tok.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 and self._tok.decode(ids) == text else None

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        if self._raw_decode is not None:
            return self._raw_decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)
