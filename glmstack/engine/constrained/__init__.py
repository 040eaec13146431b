"""Constrained decoding with llguidance: a request's JSON schema or tool-call grammar becomes a per-token mask
over the vocabulary, applied in `serving/core.py` before sampling.

    vocabulary.py  any glmstack tokenizer as an llguidance LLTokenizer (token id -> bytes), built once
    grammar.py     request fields -> grammar -> compiled matcher (LRU-cached), errors naming the field
    masks.py       a step's constrained rows masked in place; the sampled token advances the matcher
"""

from glmstack.engine.constrained.grammar import Constraints
from glmstack.engine.constrained.masks import advance, mask_logits

__all__ = ["Constraints", "advance", "mask_logits"]
