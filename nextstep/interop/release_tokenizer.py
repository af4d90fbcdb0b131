"""The tokenizer files of a release directory, in the form the release's own transformers reads.

The release pins transformers 4.x. Its tokenizers read the additional special
tokens (``<|image_area|>``, ``<|begin_of_image|>`` ...) from
``additional_special_tokens`` in ``tokenizer_config.json`` and from
``special_tokens_map.json``, and take ``extra_special_tokens`` to be a mapping
of named tokens. transformers 5 writes the same tokens as a list under
``extra_special_tokens``, with neither ``special_tokens_map.json`` nor
``added_tokens.json``: a 4.x tokenizer fails on that list. `save_release_tokenizer`
writes the files in the 4.x form, which transformers 5 reads as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nextstep.io import read_json_object
from nextstep.tokenizers.special_tokens import NEXTSTEP_SPECIAL_TOKENS, PAD

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"
#: The named special tokens of a Hugging Face tokenizer, in ``special_tokens_map.json``'s order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: Arguments of the call that loaded a tokenizer, which transformers 5 writes back into its config.
LOAD_ARGUMENTS = ("backend", "is_local", "local_files_only")


def release_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` in transformers 4.x form.

    A list under ``extra_special_tokens`` (transformers 5) is appended to
    ``additional_special_tokens`` (a token already there, as a string or an added-token mapping, is not
    listed again) and removed; a mapping
    there (named extra tokens, which 4.x reads too) is kept. The loading call's own
    arguments (`LOAD_ARGUMENTS`) are dropped: 4.x would pass them to the tokenizer.

    Args:
        config: the parsed ``tokenizer_config.json``.
    """
    config = {key: value for key, value in config.items() if key not in LOAD_ARGUMENTS}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = _appended(config.get("additional_special_tokens"), extra)
    return config


def _token_text(token: str | dict[str, Any]) -> str:
    """The text of a special-token entry: a string, or an added-token mapping's ``content``."""
    return token["content"] if isinstance(token, dict) else token


def _appended(listed: list | None, tokens: list) -> list:
    """``listed`` followed by those of ``tokens`` whose text it does not hold yet, each text once; an entry
    keeps its place and its form (string or added-token mapping)."""
    merged = list(listed or [])
    seen = {_token_text(token) for token in merged}
    for token in tokens:
        if _token_text(token) not in seen:
            seen.add(_token_text(token))
            merged.append(token)
    return merged


def with_nextstep_tokens(config: dict[str, Any], vocabulary: dict[str, int]) -> dict[str, Any]:
    """A 4.x-form tokenizer config that names NextStep's tokens as the release's tokenizer does:
    ``[PAD]`` as ``pad_token`` and the others under ``additional_special_tokens`` (those in
    ``vocabulary``; tokens listed there already keep their place)."""
    config = dict(config)
    if PAD in vocabulary:
        config["pad_token"] = PAD
    present = [token for token in NEXTSTEP_SPECIAL_TOKENS[1:] if token in vocabulary]
    config["additional_special_tokens"] = _appended(config.get("additional_special_tokens"), present)
    return config


def special_tokens_map(config: dict[str, Any]) -> dict[str, Any]:
    """``special_tokens_map.json`` for a 4.x-form tokenizer config: its named tokens that are set, then
    ``additional_special_tokens``."""
    out = {name: config[name] for name in NAMED_SPECIAL_TOKENS if config.get(name) is not None}
    if config.get("additional_special_tokens"):
        out["additional_special_tokens"] = list(config["additional_special_tokens"])
    return out


def save_release_tokenizer(tokenizer, directory: Path) -> None:
    """Write a Hugging Face tokenizer's files into ``directory``, in the form the release's transformers reads.

    ``tokenizer_config.json`` is rewritten by `release_tokenizer_config` and
    `with_nextstep_tokens` (a tokenizer that came from a base model such as
    Qwen2.5 pads with ``[PAD]`` and lists NextStep's tokens, as the release's);
    ``special_tokens_map.json`` is written with the same named tokens (keeping
    other entries ``save_pretrained`` wrote) and ``added_tokens.json`` (added
    token -> id) when ``save_pretrained`` did not write it. The files are written
    in place: ``directory`` is the staging folder of an atomic write.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        directory: the folder to write into.
    """
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    config = release_tokenizer_config(read_json_object(directory / TOKENIZER_CONFIG, TOKENIZER_CONFIG))
    config = with_nextstep_tokens(config, tokenizer.get_vocab())
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    written = (read_json_object(directory / SPECIAL_TOKENS_MAP, SPECIAL_TOKENS_MAP)
               if (directory / SPECIAL_TOKENS_MAP).is_file() else {})
    (directory / SPECIAL_TOKENS_MAP).write_text(
        json.dumps({**written, **special_tokens_map(config)}, indent=2, ensure_ascii=False) + "\n")
    if not (directory / ADDED_TOKENS).is_file():
        added = dict(sorted(tokenizer.get_added_vocab().items(), key=lambda item: item[1]))
        (directory / ADDED_TOKENS).write_text(json.dumps(added, indent=2, ensure_ascii=False) + "\n")
