"""Build-time tokenizer stage: validate tokenizer.json / tokenizer_config.json, produce the manifest parts.

load_tokenizer(checkpoint_dir, generation_config) returns a TokenizerPack:
  .tokenizer_json  the tokenizer.json bytes, stored verbatim in model.afs
  .options         the manifest's "tokenizer" section, read by afs::TokenizerOptions::from_json:
                   bos/eos/pad ids, eos_token_ids (generation stop ids), add_bos_token/add_eos_token
                   (null unless transformers would honour them, see FLAG_HONOURING_CLASSES), and the
                   token strings, for people reading manifest.json
  .chat            the compiled chat template (manifest "chat_template"), or None
  .notes           remarks the CLI should print (e.g. settings the engine ignores)

Everything the native tokenizer does not implement fails here, naming the file, the field and its
value, so a user finds out before a compile starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AfsBuildError

SUPPORTED_SPLIT_REGEXES = {
    # OLMo 2 / Llama 3 (cl100k as HF writes it), cl100k as tiktoken writes it, GPT-2.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}


# transformers honours add_bos_token / add_eos_token (it rebuilds the post-processor from them) only in
# the tokenizer classes that implement it; the byte-level BPE classes OLMo 2 checkpoints name
# (TokenizersBackend, PreTrainedTokenizerFast, GPT2Tokenizer) ignore both, and tokenizer.json's
# post_processor alone decides which special tokens encode() adds.
FLAG_HONOURING_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


class TokenizerError(AfsBuildError):
    """tokenizer.json or tokenizer_config.json is missing, malformed or unsupported."""


@dataclass(frozen=True)
class TokenizerPack:
    tokenizer_json: bytes
    options: dict
    chat: dict | None
    notes: list[str] = field(default_factory=list)


def _fail(path: Path, what: str) -> None:
    raise TokenizerError(f"{path}: {what}")


def _type(path: Path, obj, where: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        _fail(path, f"{where} must be an object with a \"type\"")
    return obj["type"]


def _unsupported(path: Path, where: str, value) -> None:
    _fail(path, f"unsupported {where} {value!r} (afs supports byte-level BPE tokenizers of the OLMo 2 / "
                f"Llama 3 / GPT-2 kind)")


def validate_tokenizer_json(path: Path, data: dict) -> list[str]:
    """Checks everything the native tokenizer relies on; returns notes for settings it ignores."""
    notes = []
    if not isinstance(data, dict):
        _fail(path, "the document must be a JSON object")
    if data.get("normalizer") is not None:
        _unsupported(path, "normalizer", _type(path, data["normalizer"], "normalizer"))

    model = data.get("model")
    if _type(path, model, "model") != "BPE":
        _unsupported(path, "model.type", model["type"])
    if model.get("dropout") not in (None, 0, 0.0):
        _unsupported(path, "model.dropout", model["dropout"])
    if model.get("byte_fallback"):
        _unsupported(path, "model.byte_fallback", True)
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            _unsupported(path, f"model.{key}", model[key])
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        _fail(path, "model.vocab must be an object and model.merges a list")

    pt = data.get("pre_tokenizer")
    if pt is None:
        _unsupported(path, "pre_tokenizer", None)
    items = pt.get("pretokenizers") if _type(path, pt, "pre_tokenizer") == "Sequence" else [pt]
    if not isinstance(items, list):
        _fail(path, "pre_tokenizer.pretokenizers must be a list")
    splits = 0
    for i, p in enumerate(items):
        where = f"pre_tokenizer.pretokenizers[{i}]" if pt.get("type") == "Sequence" else "pre_tokenizer"
        kind = _type(path, p, where)
        if kind == "ByteLevel":
            if p.get("add_prefix_space", True):
                _unsupported(path, f"{where}.add_prefix_space", True)
            splits += bool(p.get("use_regex", True))
        elif kind == "Split":
            pattern = p.get("pattern")
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if not isinstance(regex, str) or regex not in SUPPORTED_SPLIT_REGEXES:
                _unsupported(path, f"{where}.pattern", p.get("pattern"))
            behavior, invert = p.get("behavior"), bool(p.get("invert", False))
            if not (behavior == "Isolated" or (behavior == "Removed" and invert)):
                _unsupported(path, f"{where}.behavior/invert", f"{behavior}/{invert}")
            splits += 1
        else:
            _unsupported(path, f"{where}.type", kind)
    if not splits:
        _unsupported(path, "pre_tokenizer", "without a splitting regex")

    def check_post(pp, where):
        kind = _type(path, pp, where)
        if kind == "Sequence":
            subs = pp.get("processors") or []
            if not isinstance(subs, list):
                _fail(path, f"{where}.processors must be a list")
            for k, sub in enumerate(subs):
                check_post(sub, f"{where}.processors[{k}]")
        elif kind not in ("ByteLevel", "TemplateProcessing"):
            _unsupported(path, f"{where}.type", kind)

    if data.get("post_processor") is not None:
        check_post(data["post_processor"], "post_processor")
    dec = data.get("decoder")
    if dec is None or _type(path, dec, "decoder") != "ByteLevel":
        _unsupported(path, "decoder", None if dec is None else dec.get("type"))
    for key in ("truncation", "padding"):
        if data.get(key) is not None:
            notes.append(f"{path.name}: {key} is set; the engine ignores it (it never truncates or pads prompts)")
    return notes


def _load_json(path: Path, raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise TokenizerError(f"{path}: not valid UTF-8 JSON: nested too deeply") from None


def _token_string(path: Path, config: dict, key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, dict):  # an AddedToken as transformers serialises it
        value = value.get("content")
    if not isinstance(value, str):
        _fail(path, f"{key} must be a string, an AddedToken object or null, not {config[key]!r}")
    return value


def _flag(path: Path, config: dict, key: str) -> bool | None:
    if key not in config or config[key] is None:
        return None
    if not isinstance(config[key], bool):
        _fail(path, f"{key} must be true or false, not {config[key]!r}")
    return config[key]


def _chat_template_source(directory: Path, config: dict, config_path: Path) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            _fail(jinja_file, f"not valid UTF-8 ({e.reason} at byte {e.start})")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)}
        if isinstance(named.get("default"), str):
            return named["default"]
    _fail(config_path, "chat_template must be a string or a list with a \"default\" template")
    return None


def load_tokenizer(checkpoint_dir: Path, generation_config: dict | None, *, chat: bool = True) -> TokenizerPack:
    """Validates the checkpoint's tokenizer files and returns what model.afs stores about them."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{checkpoint_dir}: no tokenizer.json (afs needs the fast-tokenizer file that "
                             "Hugging Face checkpoints ship)")
    raw = path.read_bytes()
    data = _load_json(path, raw)
    notes = validate_tokenizer_json(path, data)

    vocab = data["model"]["vocab"]
    added_list = data.get("added_tokens") or []
    if not isinstance(added_list, list):
        _fail(path, "added_tokens must be a list")
    added = {}
    for i, t in enumerate(added_list):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or isinstance(t.get("id"), bool) \
                or not isinstance(t.get("id"), int):
            _fail(path, f"added_tokens[{i}] must be an object with a string \"content\" and an integer \"id\"")
        added[t["content"]] = t["id"]

    def token_id(where: Path, key: str, token: str | None) -> int | None:
        if token is None:
            return None
        if token in added:
            return added[token]
        if token in vocab:
            return vocab[token]
        _fail(where, f"{key} {token!r} is not a token of tokenizer.json")
        return None

    config_path = checkpoint_dir / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        config = _load_json(config_path, config_path.read_bytes())
        if not isinstance(config, dict):
            _fail(config_path, "the document must be a JSON object")
    strings = {k: _token_string(config_path, config, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    ids = {k: token_id(config_path, k, v) for k, v in strings.items()}
    add_bos, add_eos = _flag(config_path, config, "add_bos_token"), _flag(config_path, config, "add_eos_token")
    tokenizer_class = config.get("tokenizer_class")
    if tokenizer_class is not None and not isinstance(tokenizer_class, str):
        _fail(config_path, f"tokenizer_class must be a string, not {tokenizer_class!r}")
    if tokenizer_class not in FLAG_HONOURING_CLASSES:
        for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            if value:
                notes.append(f"{config_path.name}: {key} is true but transformers' "
                             f"{config.get('tokenizer_class') or 'fast'} tokenizer ignores it; so does the engine "
                             "(tokenizer.json's post_processor decides)")
        add_bos = add_eos = None
    # transformers turns a flag off when its token is missing.
    if add_bos and ids["bos_token"] is None:
        add_bos = False
    if add_eos and ids["eos_token"] is None:
        add_eos = False

    eos_ids: list[int] = []
    if generation_config and generation_config.get("eos_token_id") is not None:
        value = generation_config["eos_token_id"]
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise TokenizerError(f"generation_config.json: eos_token_id must be a token id or a list of them, "
                                 f"not {value!r}")
        eos_ids = list(dict.fromkeys(values))
    elif ids["eos_token"] is not None:
        eos_ids = [ids["eos_token"]]

    if config.get("clean_up_tokenization_spaces"):
        notes.append(f"{config_path.name}: clean_up_tokenization_spaces is true; the engine decodes without it "
                     "(as HF tokenizers does)")

    options = {
        "bos_token_id": ids["bos_token"],
        "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["pad_token"],
        "eos_token_ids": eos_ids,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": strings["bos_token"],
        "eos_token": strings["eos_token"],
        "pad_token": strings["pad_token"],
    }

    # The native tokenizer is the final judge of tokenizer.json (when the package is installed).
    try:
        from afs import _native
    except ImportError:
        _native = None
    if _native is not None:
        try:
            _native.Tokenizer(raw.decode("utf-8"), json.dumps(options))
        except ValueError as e:
            raise TokenizerError(f"{path}: {e}") from None

    compiled = None
    template = _chat_template_source(checkpoint_dir, config, config_path) if chat else None
    if template is not None:
        from .chat_template import compile_chat_template

        compiled = compile_chat_template(template, bos_token=strings["bos_token"], eos_token=strings["eos_token"],
                                         pad_token=strings["pad_token"], unk_token=strings["unk_token"],
                                         where=f"{config_path}: chat_template")
    return TokenizerPack(tokenizer_json=raw, options=options, chat=compiled, notes=notes)
