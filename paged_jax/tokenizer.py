"""Tokenizers of checkpoint folders, and chat prompts as token ids."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: str | os.PathLike):
    """The transformers tokenizer saved in a checkpoint folder (AutoTokenizer, local files only)."""
    import transformers

    path = pathlib.Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in model folder {path} "
                                "(tokenizer= / --tokenizer takes it from another folder or hub name)")
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def apply_chat_template(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
    **options: Any,
) -> list[int]:
    """The token ids of `messages` rendered with the tokenizer's chat template (options: as
    render_chat's).

    The template writes every special token the model expects, so none are added on top (as vLLM).
    """
    text = render_chat(tokenizer, messages, add_generation_prompt, **options)
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                add_generation_prompt: bool = True, *, tools: list | None = None,
                chat_template: str | None = None, continue_final_message: bool = False,
                chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The text of `messages` rendered with a chat template (not yet tokenized): chat_template,
    else the tokenizer's. tools: OpenAI tool definitions the template may show the model.
    continue_final_message: the last (assistant) message is left open for the model to go on
    (add_generation_prompt must then be off). chat_template_kwargs: more variables for the
    template (e.g. enable_thinking)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has no chat template; pass a plain prompt instead")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                         "true: the last message is either continued or answered")
    kwargs = dict(chat_template_kwargs or {})
    reserved = {"tools", "chat_template", "add_generation_prompt", "continue_final_message",
                "tokenize", "conversation", "messages"} & set(kwargs)
    if reserved:
        raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}; "
                         "those are request fields of their own")
    return tokenizer.apply_chat_template(
        [dict(message) for message in messages], tokenize=False,
        add_generation_prompt=add_generation_prompt, tools=tools or None,
        chat_template=chat_template, continue_final_message=continue_final_message, **kwargs)


# Normalizers and pre-tokenizers that never drop text nor shrink its bytes, so every byte of
# the text lies in some token and no token covers more bytes than its vocabulary string.
_KEEPING_NORMALIZERS = {"Prepend", "Replace", "Sequence"}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation",
                           "Sequence"}


def max_bytes_per_token(tokenizer: Any) -> int | None:
    """An upper bound on the UTF-8 bytes of text one token can stand for, or None where the
    tokenizer can drop or shrink text (whitespace splitting, unknown-word tokens, Unicode
    composition), so that no such bound holds.

    With it a prompt of C characters is at least C / bound tokens before it is tokenized:
    a prompt far over the context length is refused without spending seconds on it. Each
    vocabulary string is at least as long in UTF-8 as the text it stands for (byte-level
    BPE maps each byte to one character; '▁' is 3 bytes for 1; '<0x41>' 6 for 1)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer")
    byte_level = any(p.get("type") == "ByteLevel" for p in _flatten(pre, "pretokenizers"))
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        return None  # unknown text may fold into one <unk> token
    for norm in _flatten(spec.get("normalizer"), "normalizers"):
        if norm.get("type") not in _KEEPING_NORMALIZERS:
            return None
        if norm.get("type") == "Replace" and len(norm.get("content", "").encode()) < len(
                str((norm.get("pattern") or {}).get("String", "\0" * 99)).encode()):
            return None  # a Replace that may shrink the text (or a regex pattern)
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens", [])):
        return None  # an added token that swallows the whitespace around it, however long
    for part in _flatten(pre, "pretokenizers"):
        if part.get("type") not in _KEEPING_PRE_TOKENIZERS or (
                part.get("type") == "Split" and part.get("behavior") == "Removed"):
            return None
    return max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())


def _flatten(node: dict | None, key: str) -> list[dict]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [node] + [x for child in node.get(key, []) for x in _flatten(child, key)]
    return [node]
