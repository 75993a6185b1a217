"""Chat templates in Python: Jinja rendering as transformers does it, and the compiled form.

render_chat_template() renders a checkpoint's Jinja chat template with the environment transformers'
apply_chat_template uses (sandboxed, trim_blocks, lstrip_blocks, loop controls, raise_exception,
tojson, strftime_now). afs_build.chat_template compiles templates into a transition table
("afs-chat-v1"); CompiledChat.apply() is the Python twin of the engine's C++ afs::ChatTemplate, which
applies the same table with no Jinja at run time.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Iterable, Mapping

Message = Mapping[str, str]


class ChatTemplateRenderError(ValueError):
    """The template raised (raise_exception) or failed while rendering this conversation."""


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: Iterable[Message], *, add_generation_prompt: bool = True,
                         bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                         unk_token: str | None = None, **extra) -> str:
    """The text transformers' apply_chat_template(tokenize=False) produces for these messages."""
    import jinja2

    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    specials = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                                  ("unk_token", unk_token)) if v is not None}
    try:
        return _compile(template).render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **specials, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateRenderError(str(e)) from e


class CompiledChat:
    """A compiled chat template ("afs-chat-v1" dict) applied in Python, exactly as the engine applies it."""

    FORMAT = "afs-chat-v1"

    def __init__(self, compiled: Mapping):
        if compiled.get("format") != self.FORMAT:
            raise ValueError(f"unknown compiled chat template format {compiled.get('format')!r}")
        self.compiled = dict(compiled)
        self.roles: list[str] = list(compiled["roles"])

    def apply(self, messages: Iterable[Message], add_generation_prompt: bool = True) -> str:
        c = self.compiled
        msgs = list(messages)
        if not msgs:
            raise ValueError("a chat needs at least one message")
        out, prev = [], None
        for k, m in enumerate(msgs):
            role = m["role"]
            if role not in self.roles:
                raise ValueError(f"the chat template has no role {role!r} (it supports {', '.join(self.roles)})")
            sep = c["start"].get(role) if prev is None else (c["between"].get(prev) or {}).get(role)
            if sep is None:
                if prev is None:
                    raise ValueError(f"the chat template does not allow a conversation to start with a {role!r} message")
                raise ValueError(f"the chat template does not allow a {role!r} message after a {prev!r} message")
            out.append(sep)
            content = m["content"]
            out.append(content.strip() if c["trim"].get(role) else content)
            prev = role
        tail = (c["end"].get(prev) or {}).get("gen" if add_generation_prompt else "nogen")
        if tail is None:
            raise ValueError(f"the chat template does not allow a conversation to end with a {prev!r} message"
                             + (" and a generation prompt" if add_generation_prompt else ""))
        out.append(tail)
        return "".join(out)
