"""BERT encoders (all-MiniLM, bge, e5, ... : the `BertModel` checkpoints that sentence-transformers folders hold),
and the (XLM-)RoBERTa ones (bge-m3, multilingual-e5, paraphrase-multilingual-*: `XLMRobertaModel`).

One readable encoder in plain PyTorch, gpt-fast style: embeddings (word + position + token type, LayerNorm),
then post-norm layers of fused QKV attention through `F.scaled_dot_product_attention` with a padding mask, and
a GELU feed-forward. Hugging Face parameter names are mapped on load (`load_bert_weights`): the three attention
projections become one QKV linear, so a layer runs one matmul where BertModel runs three. There is no cache and
no causal mask: an encoder sees a whole batch of padded sentences at once.

RoBERTa and XLM-RoBERTa are the same network but for their position ids (`roberta_positions`): real tokens count
from pad_token_id + 1 (fairseq's convention) and padding takes position pad_token_id. Their checkpoints also
have one token type and a "roberta." prefix where saved from a task head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

WEIGHTS_FILE = "model.safetensors"
# GELU variants BERT configs name; the tanh form is the approximation some checkpoints were trained with.
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# config.json model_type -> whether its position ids are RoBERTa's (counted from pad_token_id + 1).
MODEL_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True}
# Name prefixes of checkpoints saved from a task head (BertForMaskedLM, XLMRobertaForMaskedLM, ...); "" first.
PREFIXES = ("", "bert.", "roberta.")


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    gelu_approximate: str = "none"  # F.gelu's `approximate`
    pad_token_id: int = 0
    roberta_positions: bool = False  # positions count from pad_token_id + 1 (RoBERTa, XLM-RoBERTa)

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> BertConfig:
        """From a config.json of `model_type` bert, roberta or xlm-roberta. Refuses what this encoder does not
        implement."""
        model_type = config.get("model_type", "bert")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"not a BERT or (XLM-)RoBERTa model: model_type {model_type!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported position_embedding_type {config['position_embedding_type']!r}")
        activation = config.get("hidden_act", "gelu")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {activation!r} (supported: {', '.join(ACTIVATIONS)})")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config.get("max_position_embeddings", 512),
            type_vocab_size=config.get("type_vocab_size", 2),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            gelu_approximate=ACTIVATIONS[activation],
            pad_token_id=config.get("pad_token_id") or 0,
            roberta_positions=MODEL_TYPES[model_type],
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers (RoBERTa's first pad_token_id + 1 rows are not used by
        real tokens: 514 positions hold 512 tokens)."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.roberta_positions else 0)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.roberta_positions:
            # As transformers' create_position_ids_from_input_ids: real tokens count from pad + 1, padding is pad.
            pad = self.config.pad_token_id
            real = input_ids.ne(pad).long()
            positions = self.position_embeddings(torch.cumsum(real, dim=1) * real + pad)
        else:
            positions = self.position_embeddings.weight[:input_ids.shape[1]]
        # Single-segment input (what sentence embedding uses): every token is of type 0.
        x = self.word_embeddings(input_ids) + positions + self.token_type_embeddings.weight[0]
        return self.norm(x)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim
        q, k, v = self.qkv(x).view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attention_norm(x + self.attention_out(attended))
        feed_forward = self.output(F.gelu(self.intermediate(x), approximate=self.config.gelu_approximate))
        return self.output_norm(x + feed_forward)


class BertModel(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [batch, length, hidden] of `input_ids` [batch, length]. `attention_mask`
        [batch, length] is 1 on real tokens and 0 on padding (None: no padding)."""
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # [batch, 1 (heads), 1 (queries), length (keys)]: no query attends to a padding key. Padding
            # queries still see the real keys, so their rows stay finite (pooling ignores them anyway).
            mask = attention_mask[:, None, None, :].bool()
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# Our per-layer module -> its Hugging Face BertLayer path (the QKV linear is built from three: see hf_names).
LAYER_MODULES = {
    "attention_out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}


def hf_names(name: str) -> list[str]:
    """Our parameter name -> the Hugging Face BertModel tensor(s) it is built from, in order."""
    if name.startswith("embeddings.norm."):
        return [name.replace("embeddings.norm.", "embeddings.LayerNorm.")]
    if not name.startswith("layers."):
        return [name]
    _, index, module, parameter = name.split(".")
    layer = f"encoder.layer.{index}"
    if module == "qkv":
        return [f"{layer}.attention.self.{part}.{parameter}" for part in ("query", "key", "value")]
    return [f"{layer}.{LAYER_MODULES[module]}.{parameter}"]


def load_bert_weights(model: BertModel, weights: Path) -> None:
    """Copies a Hugging Face BertModel (or XLMRobertaModel) safetensors file into `model` (tensor by tensor).
    Checkpoints saved from a task head (BertForMaskedLM, ...) prefix names with "bert." or "roberta."; the pooler
    and heads are not used."""
    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
        prefix = next((p for p in PREFIXES if p + "embeddings.word_embeddings.weight" in stored), "")
        for name, parameter in model.state_dict().items():
            sources = [prefix + source for source in hf_names(name)]
            missing = [source for source in sources if source not in stored]
            if missing:
                raise ValueError(f"{weights}: no tensor {missing[0]!r} (for {name})")
            tensor = torch.cat([f.get_tensor(source) for source in sources])
            if tensor.shape != parameter.shape:
                raise ValueError(f"{weights}: {sources[0]} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(parameter.shape)}")
            parameter.copy_(tensor.to(parameter.dtype))


def load_bert(folder: Path, dtype: torch.dtype = torch.float32) -> BertModel:
    """The encoder of a Hugging Face BERT or (XLM-)RoBERTa folder (config.json + model.safetensors), in eval
    mode."""
    config = BertConfig.from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} (only safetensors weights are read)")
    with torch.device("meta"):
        model = BertModel(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        load_bert_weights(model, weights)
    return model.eval()
