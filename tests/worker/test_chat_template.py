"""vLLM's --chat-template: a file or the template itself, used instead of the checkpoint's own."""

from __future__ import annotations

import argparse

import pytest

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.model.chat_template import load_chat_template

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the KV?"}]


def test_a_file_or_the_template_itself(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE == load_chat_template(TEMPLATE)
    with pytest.raises(ValueError, match="no such file, and no Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        load_chat_template(str(tmp_path / "empty.jinja"))


def test_the_engine_renders_chats_with_the_given_template(tmp_path):
    """From the worker's flag to what the engine tokenizes (and so what /tokenize and chat prompts are)."""
    from services.worker.cli import add_arguments, config_from_args

    (tmp_path / "t.jinja").write_text(TEMPLATE)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--chat-template", str(tmp_path / "t.jinja"), "--cluster-token", "t"]))
    assert config.engine_config().chat_template == TEMPLATE
    engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=16, chat_template=TEMPLATE))
    rendered = "<system>Be brief.\n<user>Where is the KV?\n<bot>"
    assert engine.tokenize({"messages": MESSAGES})["tokens"] == engine.tokenizer.encode(rendered, add_special_tokens=False)
    own = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=16)).tokenize({"messages": MESSAGES})["tokens"]
    assert own != engine.tokenize({"messages": MESSAGES})["tokens"]  # the model's own template differs
