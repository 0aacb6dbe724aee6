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
        raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in model folder {path}")
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def apply_chat_template(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of `messages` rendered with the tokenizer's chat template.

    The template writes every special token the model expects, so none are added on top (as vLLM).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name} has no chat template; pass a plain prompt instead")
    text = tokenizer.apply_chat_template(
        [dict(message) for message in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer.encode(text, add_special_tokens=False))
