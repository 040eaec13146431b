"""HFTokenizer: the `tokenizers` library behind our Tokenizer interface, and the loader for a HF tokenizer.json."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer

from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.json_files import read_json
from glmstack.engine.tokenization.base import Tokenizer


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (the Rust library behind HF's fast tokenizers)."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        # Highest id + 1, not the number of entries: a vocabulary with duplicate strings has holes.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.special_tokens = {added.content: i for i, added in backend.get_added_tokens_decoder().items()}

    @cached_property
    def _backend_without_special(self) -> BackendTokenizer:
        # `encode_special_tokens` is a switch on the tokenizer object; flipping it per call would race
        # between threads, so user text goes through a second copy that always has it on.
        clone = BackendTokenizer.from_str(self.backend.to_str())
        clone.encode_special_tokens = True
        return clone

    def encode(self, text: str, *, add_special_tokens: bool = False, allow_special: bool = True) -> list[int]:
        backend = self.backend if allow_special else self._backend_without_special
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)


def load_tokenizer_json(path_or_dir: str | Path) -> HFTokenizer:
    """A tokenizer saved by HF: `tokenizer.json`, with `tokenizer_config.json` (and `chat_template.jinja`,
    where newer transformers put the template) next to it for the chat template and bos/eos/pad."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ModelFileError(path, "no tokenizer here (expected tokenizer.json)")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises a bare Exception that names no file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(path, f"cannot read the tokenizer ({first})") from None
    config = read_json(path.parent / "tokenizer_config.json", missing_ok=True)
    special_map = read_json(path.parent / "special_tokens_map.json", missing_ok=True)

    def token_id(name: str) -> int | None:
        token = config.get(name) or special_map.get(name)
        if isinstance(token, dict):  # a serialized AddedToken
            token = token.get("content")
        return backend.token_to_id(token) if isinstance(token, str) else None

    template = config.get("chat_template")
    template_file = path.parent / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    elif isinstance(template, list):  # named templates, e.g. "default" and "tool_use"
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    return HFTokenizer(
        backend,
        bos_token_id=token_id("bos_token"),
        eos_token_id=token_id("eos_token"),
        pad_token_id=token_id("pad_token"),
        chat_template=template,
    )


