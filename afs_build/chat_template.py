"""Compiles a checkpoint's Jinja chat template into a table the engine applies without Jinja.

The compiled form ("afs-chat-v1", stored in the manifest under "chat_template") says, for the roles
system / user / assistant, what text comes before the first message (start[role]), between two
messages (between[a][b]), and after the last one with and without a generation prompt (end[role]),
and whether the template strips message contents (trim[role]). Those strings are read off Jinja
renders of conversations whose contents are sentinels; then the table is verified against Jinja on
many seeded multi-turn conversations (odd contents, every role order, with and without generation
prompts). A template whose output cannot be written this way (contents reordered or transformed,
text depending on the turn number, ...) raises ChatTemplateError; build with --no-chat to skip it.
A role order the template rejects (raise_exception) or in which it silently drops a message (say, a
system message after the first turn) is a null entry: the engine refuses such a conversation.
"""

from __future__ import annotations

import itertools
import random

from .errors import AfsBuildError

ROLES = ("system", "user", "assistant")
FORMAT = "afs-chat-v1"
VERIFY_CONVERSATIONS = 300


class ChatTemplateError(AfsBuildError):
    """The chat template cannot be compiled (build with --no-chat to leave it out)."""


def _sentinel(k: int) -> str:
    return f"AfsChat{k}q7Z"  # mixed case, no spaces: survives |trim, changes under |upper or |lower


def _in_order(text: str, n: int) -> bool:
    """Whether the sentinels present in text appear in message order."""
    found = [text.find(_sentinel(k)) for k in range(n)]
    present = [p for p in found if p >= 0]
    return present == sorted(present)


def compile_chat_template(template: str, *, bos_token: str | None = None, eos_token: str | None = None,
                          pad_token: str | None = None, unk_token: str | None = None,
                          where: str = "tokenizer_config.json: chat_template") -> dict:
    """Returns the compiled "afs-chat-v1" dict for `template`, or raises ChatTemplateError."""
    from afs.chat import ChatTemplateRenderError, CompiledChat, render_chat_template

    tokens = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)

    last_error: list[str] = []

    def render(messages, gen):
        try:
            return render_chat_template(template, messages, add_generation_prompt=gen, **tokens)
        except ChatTemplateRenderError as e:
            last_error[:] = [str(e)]
            return None
        except Exception as e:  # a template bug (undefined attribute, type error, syntax error)
            raise ChatTemplateError(f"{where}: rendering failed: {type(e).__name__}: {e}") from None

    start: dict[str, str | None] = {}
    between: dict[str, dict[str, str | None]] = {r: {} for r in ROLES}
    end: dict[str, dict[str, str | None]] = {r: {} for r in ROLES}
    seen_roles: set[str] = set()

    def record(table: dict, key: str, value: str, what: str) -> None:
        if key in table and table[key] != value:
            raise ChatTemplateError(
                f"{where}: the text {what} depends on more than the neighbouring roles "
                f"({table[key]!r} vs {value!r}); afs cannot compile this template (build with --no-chat)")
        table[key] = value

    for length in (1, 2, 3):
        for roles in itertools.product(ROLES, repeat=length):
            msgs = [{"role": r, "content": _sentinel(k)} for k, r in enumerate(roles)]
            for gen in (False, True):
                text = render(msgs, gen)
                if text is None:
                    continue
                if any(text.count(_sentinel(k)) > 1 for k in range(length)) or not _in_order(text, length):
                    raise ChatTemplateError(f"{where}: message contents are not rendered once each and in order "
                                            f"for roles {list(roles)}; afs cannot compile this template "
                                            "(build with --no-chat)")
                if any(_sentinel(k) not in text for k in range(length)):
                    if length == 1:
                        other = render([{"role": roles[0], "content": "something else"}], gen)
                        if other != text:
                            raise ChatTemplateError(f"{where}: the template transforms {roles[0]!r} message "
                                                    "contents; afs cannot compile it (build with --no-chat)")
                    # The template drops a content here: the compiled form rejects this role order.
                    continue
                segments, pos = [], 0
                for k in range(length):
                    at = text.index(_sentinel(k), pos)
                    segments.append(text[pos:at])
                    pos = at + len(_sentinel(k))
                seen_roles.update(roles)
                record(start, roles[0], segments[0], f"before a first {roles[0]!r} message")
                for k in range(1, length):
                    record(between[roles[k - 1]], roles[k], segments[k],
                           f"between {roles[k - 1]!r} and {roles[k]!r} messages")
                record(end[roles[-1]], "gen" if gen else "nogen", text[pos:],
                       f"after a last {roles[-1]!r} message")

    roles = [r for r in ROLES if r in seen_roles]
    if not roles:
        said = f" (the template said: {last_error[0]})" if last_error else ""
        raise ChatTemplateError(f"{where}: no conversation of system/user/assistant messages renders{said}; "
                                "afs cannot compile this template (build with --no-chat)")
    trim = {r: _detects_trim(render, r, start, between, end, where) for r in roles}
    compiled = {
        "format": FORMAT,
        "roles": roles,
        "trim": trim,
        "start": {r: start.get(r) for r in roles},
        "between": {a: {b: between[a].get(b) for b in roles} for a in roles},
        "end": {r: {"nogen": end[r].get("nogen"), "gen": end[r].get("gen")} for r in roles},
    }
    _verify(template, compiled, render, where)
    return compiled


def _detects_trim(render, role, start, between, end, where) -> bool:
    """Whether the template strips this role's content (e.g. `message['content'] | trim`)."""
    # A short conversation that renders with this role: alone, or after/before another role.
    candidates = [[role]] + [[a, role] for a in ROLES] + [[role, b] for b in ROLES]
    for roles in candidates:
        msgs = [{"role": r, "content": "x"} for r in roles]
        idx = roles.index(role)
        padded = " \n " + _sentinel(idx) + " \t\n"
        msgs[idx] = {"role": role, "content": padded}
        for gen in (False, True):
            text = render(msgs, gen)
            if text is None:
                continue
            if padded in text:
                return False
            if _sentinel(idx) in text:
                return True
            raise ChatTemplateError(f"{where}: the template transforms {role!r} message contents; "
                                    "afs cannot compile it (build with --no-chat)")
    return False


def _random_content(rng: random.Random) -> str:
    pieces = ["Hello", "world", " ", "  ", "\n", "\n\n", "\t", "{{ x }}", "{% if %}", "<|user|>", "日本語",
              "émoji 😀", "'quoted'", '"double"', "\\n", "AFS", "", "end.", "<|endoftext|>", "\u00a0", "1234"]
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 7)))


def _verify(template: str, compiled: dict, render, where: str) -> None:
    from afs.chat import CompiledChat

    chat = CompiledChat(compiled)
    rng = random.Random(20241126)
    conversations = []
    for length in range(1, 4):
        conversations += [list(p) for p in itertools.product(ROLES, repeat=length)]
    for _ in range(VERIFY_CONVERSATIONS):
        conversations.append([rng.choice(ROLES) for _ in range(rng.randrange(1, 8))])
    for roles in conversations:
        # Each content carries a sentinel, so a content the template drops can be told apart.
        msgs = [{"role": r, "content": _random_content(rng) + _sentinel(k) + _random_content(rng)}
                for k, r in enumerate(roles)]
        for gen in (False, True):
            expected = render(msgs, gen)
            try:
                got = chat.apply(msgs, add_generation_prompt=gen)
            except ValueError:
                got = None
            if expected is not None and any(_sentinel(k) not in expected for k in range(len(roles))):
                expected = None  # Jinja drops a message here; the compiled form must reject it
            if expected is not None and got != expected:
                raise ChatTemplateError(
                    f"{where}: the compiled template differs from Jinja for roles {roles} "
                    f"(add_generation_prompt={gen}): {got!r} != {expected!r}; build with --no-chat")
            if expected is None and got is not None:
                raise ChatTemplateError(
                    f"{where}: Jinja rejects (or drops a message of) roles {roles} (add_generation_prompt={gen}) "
                    "but the compiled template accepts them; afs cannot compile this template (build with --no-chat)")
