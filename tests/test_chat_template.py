"""Chat templates: the build-time compiler (afs_build.chat_template), the engine's C++ applier
(afs._native.ChatTemplate) and the Python renderer (afs.chat) against Jinja / transformers.

For each template: Jinja render == compiled Python apply == compiled C++ apply, as text and as
token ids (encoded with add_special_tokens=False, as transformers' apply_chat_template does), on
seeded multi-turn conversations; transformers' own apply_chat_template is the oracle for the renderer.
"""

from __future__ import annotations

import json
import random

import pytest

_native = pytest.importorskip("afs._native", reason="afs is not installed with its native module (pip install .)")

from afs.chat import ChatTemplateRenderError, CompiledChat, render_chat_template  # noqa: E402
from afs_build.chat_template import ChatTemplateError, compile_chat_template  # noqa: E402
from afs_build.demo_tokenizer import OLMO2_CHAT_TEMPLATE  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-3 style: trims contents, bos only before the first message.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")

# Strict alternation with an optional leading system message (raise_exception on violations).
ALTERNATING = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{{ '[SYS]' + "
               "messages[0]['content'] + '[/SYS]' }}{% else %}{% set loop_messages = messages %}{% endif %}"
               "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
TEMPLATES = {"olmo2": OLMO2_CHAT_TEMPLATE, "chatml": CHATML, "llama3": LLAMA3}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from afs_build.demo_tokenizer import write_demo_tokenizer

    d = tmp_path_factory.mktemp("demo-chat")
    write_demo_tokenizer(d)
    return d, _native.Tokenizer((d / "tokenizer.json").read_text())


def conversations(seed: int, n: int, roles=("system", "user", "assistant")):
    rng = random.Random(seed)
    pieces = ["Hi", " there", "\n", "  ", "What is 2+2?", "日本語で", "😀", "<|endoftext|>", "{{ oops }}", "\t",
              "It's 4.", "", "<|user|>", " x ", "\u00a0"]
    for _ in range(n):
        k = rng.randrange(1, 7)
        msgs = [{"role": rng.choice(roles), "content": "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 6)))}
                for _ in range(k)]
        yield msgs, rng.random() < 0.5


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_compiled_matches_jinja_text_and_ids(name, demo):
    _, tok = demo
    template = TEMPLATES[name]
    compiled = compile_chat_template(template, **SPECIALS)
    native = _native.ChatTemplate(json.dumps(compiled))
    python = CompiledChat(compiled)
    assert list(native.roles) == compiled["roles"]
    checked = 0
    for msgs, gen in conversations(seed=len(name), n=400):
        try:
            expected = render_chat_template(template, msgs, add_generation_prompt=gen, **SPECIALS)
        except ChatTemplateRenderError:
            with pytest.raises(ValueError):
                native.apply(msgs, gen)
            continue
        assert python.apply(msgs, gen) == expected
        got = native.apply(msgs, gen)
        assert got == expected, (msgs, gen)
        assert tok.encode(got, False) == tok.encode(expected, False)
        checked += 1
    assert checked > 100


def test_olmo2_template_shape():
    compiled = compile_chat_template(OLMO2_CHAT_TEMPLATE, **SPECIALS)
    assert compiled["start"]["user"] == "<|endoftext|><|user|>\n"
    assert compiled["between"]["user"]["assistant"] == "\n<|assistant|>\n"
    assert compiled["between"]["assistant"]["user"] == "<|endoftext|>\n<|user|>\n"
    assert compiled["end"]["user"]["gen"] == "\n<|assistant|>\n"
    assert compiled["end"]["assistant"]["nogen"] == "<|endoftext|>"
    assert not any(compiled["trim"].values())
    assert all(compile_chat_template(LLAMA3, bos_token="<s>")["trim"].values())


def test_renderer_matches_transformers(demo):
    """afs.chat's Jinja environment renders exactly what transformers' apply_chat_template renders."""
    transformers = pytest.importorskip("transformers")
    d, _ = demo
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for name, template in sorted(TEMPLATES.items()):
        for msgs, gen in conversations(seed=3, n=60):
            expected = ref.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                               add_generation_prompt=gen)
            assert render_chat_template(template, msgs, add_generation_prompt=gen, **SPECIALS) == expected, name


def test_builder_pack_ids_match_transformers(demo):
    """Checkpoint dir -> load_tokenizer -> compiled chat applied natively == transformers' token ids."""
    transformers = pytest.importorskip("transformers")
    from afs.tokenizer import Tokenizer

    d, _ = demo
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    tok = Tokenizer.from_pretrained_dir(d)
    for msgs, gen in conversations(seed=8, n=150):
        expected = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
        if hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == list(expected)


def test_alternation_rules_are_kept():
    compiled = compile_chat_template(ALTERNATING, **SPECIALS)
    native = _native.ChatTemplate(json.dumps(compiled))
    assert compiled["between"]["user"]["user"] is None
    assert native.apply([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A"}], False) == "[SYS]S[/SYS][INST] U [/INST]A<|endoftext|>"
    with pytest.raises(_native.Error, match="does not allow a 'user' message after a 'user' message"):
        native.apply([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], True)
    with pytest.raises(_native.Error, match="has no role 'tool'"):
        native.apply([("tool", "x")], True)
    with pytest.raises(_native.Error, match="at least one message"):
        native.apply([], True)
    for msgs, gen in conversations(seed=4, n=300):
        msgs = [{"role": m["role"], "content": f"<m{k}>" + m["content"]} for k, m in enumerate(msgs)]
        try:
            expected = render_chat_template(ALTERNATING, msgs, add_generation_prompt=gen, **SPECIALS)
        except ChatTemplateRenderError:
            expected = None
        if expected is not None and all(f"<m{k}>" in expected for k in range(len(msgs))):
            assert native.apply(msgs, gen) == expected
        else:  # Jinja rejects the conversation, or silently drops a message (a late system one): we reject
            with pytest.raises(ValueError):
                native.apply(msgs, gen)


@pytest.mark.parametrize("template, message", [
    # Content rendered twice.
    ("{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}", "not rendered once"),
    # Text that depends on the turn number.
    ("{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}", "depends on more than"),
    # Content transformed.
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "transforms"),
    # Broken template.
    ("{% for m in messages %}{{ m.content.nope() }}{% endfor %}", "no conversation .* renders"),
])
def test_uncompilable_templates_fail_clearly(template, message):
    with pytest.raises(ChatTemplateError, match=message) as info:
        compile_chat_template(template, **SPECIALS)
    assert "--no-chat" in str(info.value)


def test_bad_compiled_json_is_rejected():
    with pytest.raises(_native.Error, match="unknown format"):
        _native.ChatTemplate(json.dumps({"format": "v0"}))
    with pytest.raises(_native.Error, match="invalid JSON"):
        _native.ChatTemplate("{")
