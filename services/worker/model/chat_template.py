"""vLLM's --chat-template: a Jinja file, or the template itself, used instead of the checkpoint's
own (a base model without one, or a better one)."""

from __future__ import annotations

from pathlib import Path


def load_chat_template(value: str) -> str:
    """A file's text, or ``value`` itself when it is a template; ValueError saying which it is not."""
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"--chat-template {value}: the file is empty")
        return text
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and no Jinja template ({{{{ ... }}}} or {{% ... %}}) "
                     "either; pass a template file or the template text")
