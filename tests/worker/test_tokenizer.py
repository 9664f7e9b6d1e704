"""The model's tokenizer behind the engine: decode as transformers decodes, chat template arguments."""

import random

import pytest

from services.worker.model.tiny import materialize_tiny
from services.worker.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(materialize_tiny(), (0,))


def test_decode_equals_transformers_decode(tok):
    """Tokenizer.decode skips transformers' wrapper where it adds nothing: same text, specials too."""
    rng = random.Random(1)
    hf = tok.hf
    for _ in range(200):
        ids = [rng.randrange(0, tok.vocab_size) for _ in range(rng.randint(0, 30))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode([0, 1, 2]) == ""  # the embedded model's special tokens


def test_chat_template_arguments_and_variables_reach_the_template():
    tok = Tokenizer(materialize_tiny(), (0,))
    tok.hf.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                            "{% if enable_thinking is false %}/no_think{% endif %}"
                            "{% if add_generation_prompt %}[assistant]{% endif %}")
    text = lambda **kw: tok.hf.decode(tok.encode_chat([{"role": "user", "content": "hi"}], None, kw or None))
    assert text() == "[user]hi[assistant]"
    assert text(enable_thinking=False) == "[user]hi/no_think[assistant]"
    assert text(add_generation_prompt=False) == "[user]hi"
