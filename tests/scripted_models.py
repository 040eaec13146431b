"""Tiny checkpoints that write a chosen reply: "forced-token" models for testing what the server makes of a
family's tool-call syntax without a trained model.

Every sublayer's output projection is zeroed, so the residual stream at a position is just the current
token's embedding, and the model becomes a bigram table: each scripted token gets its own one-hot direction
in the embedding, and the output row of the token that must follow it is that direction (scaled). Greedy
decoding then walks the script from the prompt's last token (`<|assistant|>`, or the template's last
token) to the stop token. A token may appear in the script more than once only with the same successor.

The weights are edited in the checkpoint's own tensor names (THUDM's v2 layout and the HF layouts), so the
model is loaded and served exactly like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

ZEROED = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight", "self_attn.o_proj.weight",
          "mlp.down_proj.weight")
EMBEDDINGS = ("transformer.embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORMS = ("transformer.encoder.final_layernorm.weight", "model.norm.weight")
OUTPUTS = ("transformer.output_layer.weight", "lm_head.weight")
LOGIT = 10.0  # x sqrt(hidden) after the final RMSNorm: far above the zeros of every other token


def transitions(after: int, script: list[int], stop: int) -> dict[int, int]:
    """`after` -> script[0] -> ... -> script[-1] -> `stop`; refuses a script whose repeats disagree."""
    chain = [after, *script, stop]
    table: dict[int, int] = {}
    for current, following in zip(chain, chain[1:], strict=False):
        if table.setdefault(current, following) != following:
            raise ValueError(f"token {current} is followed by both {table[current]} and {following}")
    return table


def script_checkpoint(folder: Path, table: dict[int, int]) -> None:
    """Rewrite `folder/model.safetensors` so greedy decoding follows `table` (token -> next token)."""
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    embedding = next(sd[name] for name in EMBEDDINGS if name in sd)
    output = next(sd[name] for name in OUTPUTS if name in sd)
    hidden = embedding.shape[1]
    if len(table) > hidden:
        raise ValueError(f"{len(table)} scripted tokens need a hidden size of at least that ({hidden})")
    for name, tensor in sd.items():
        if name.endswith(ZEROED):
            tensor.zero_()
        if name in FINAL_NORMS:
            tensor.fill_(1.0)
    embedding.zero_()
    output.zero_()
    for slot, (current, following) in enumerate(table.items()):
        embedding[current, slot] = 1.0
        output[following, slot] = LOGIT
    save_file({name: tensor.contiguous() for name, tensor in sd.items()}, str(path))


def scripted_reply(folder: Path, encode, after: int, reply: str, stop: int) -> list[int]:
    """Script the checkpoint in `folder` to answer `reply` (encoded with the model's own tokenizer, special
    tokens off) after the token `after`, then `stop`. Returns the reply's ids."""
    ids = list(encode(reply))
    script_checkpoint(folder, transitions(after, ids, stop))
    return ids

