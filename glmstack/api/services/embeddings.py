"""POST /embeddings (spec §2.7): pick the model, embed in a worker thread, fit each vector to the size asked
for, count usage.

The platform's names fix the sizes, whatever model serves them: `embedding-2` answers 1024 dimensions and
`embedding-3` 2048 unless `dimensions` (256, 512, 1024, 2048) says otherwise; another configured name answers
its model's own size, or `dimensions`. A model's unit vector becomes a vector of the size asked for by
(`fit_vector`):

- zero-padding, when the size is above the model's: lengths, dot products and so cosine similarities are
  exactly the model's own;
- truncation and renormalizing, when the size is one the model was trained to be cut to (Matryoshka:
  `EmbeddingModelInfo.matryoshka_dims`);
- otherwise a fixed random projection: a Gaussian matrix (size x model size) drawn from `random.Random` seeded
  with "glmstack-projection-<in>-<out>" (the same on every machine and Python version), then renormalizing.
  By Johnson-Lindenstrauss, cosine similarities are kept up to an error of about 1/sqrt(size) (~0.06 at 256).

Pure Python (the platform side has no numpy): a projection is built once per (in, out) and costs a few
milliseconds per vector; all of it runs in the worker thread with the model.
"""

from __future__ import annotations

import base64
import math
import random
import struct
import threading
from dataclasses import dataclass
from functools import cache
from operator import mul

from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from glmstack.protocol import Embedder, EmbeddingModelInfo

# The platform's names and their sizes (spec §2.7): embedding-2 is fixed, embedding-3 has a default and a set.
FIXED_DIMENSIONS = {"embedding-2": 1024}
DIMENSION_CHOICES = {"embedding-3": (256, 512, 1024, 2048)}
DEFAULT_DIMENSIONS = {"embedding-3": 2048}
PROJECTION_SEED = "glmstack-projection-{}-{}"


def resolve(platform: Platform, name: str) -> tuple[str, Embedder]:
    """The configured name (matched case-insensitively, as model codes are) and its model; 1211 if none."""
    if name in platform.embedders:
        return name, platform.embedders[name]
    for served, embedder in platform.embedders.items():
        if served.lower() == name.lower():
            return served, embedder
    served = ", ".join(sorted(platform.embedders)) or "none configured"
    raise PlatformError(1211, f"{name!r} is not an embedding model served here (served: {served})")


def output_dimensions(name: str, info: EmbeddingModelInfo, requested: int | None) -> int:
    """The size `name` answers with when asked for `requested` (None: not given); 1214 when it cannot."""
    if name in FIXED_DIMENSIONS:
        fixed = FIXED_DIMENSIONS[name]
        if requested not in (None, fixed):
            raise PlatformError(1214, f"{name} answers {fixed} dimensions only", field="dimensions")
        return fixed
    if name in DIMENSION_CHOICES:
        if requested is None:
            return DEFAULT_DIMENSIONS[name]
        if requested not in DIMENSION_CHOICES[name]:
            choices = ", ".join(map(str, DIMENSION_CHOICES[name]))
            raise PlatformError(1214, f"{name} answers {choices} dimensions", field="dimensions")
        return requested
    return requested or info.dimensions


def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(map(mul, vector, vector)))
    return [x / norm for x in vector] if norm > 0 else vector


@cache
def projection(inputs: int, outputs: int) -> tuple[tuple[float, ...], ...]:
    """The fixed Gaussian projection from `inputs` to `outputs` dimensions: `outputs` rows of `inputs`
    standard normal numbers (their scale does not matter: the result is renormalized)."""
    rng = random.Random(PROJECTION_SEED.format(inputs, outputs))
    return tuple(tuple(rng.gauss(0.0, 1.0) for _ in range(inputs)) for _ in range(outputs))


_projection_lock = threading.Lock()  # two first requests for a size build its matrix once


def fit_vector(vector: list[float], size: int, matryoshka_dims: tuple[int, ...] = ()) -> list[float]:
    """A unit vector of the model's size as a vector of `size` (see the module docstring)."""
    if size == len(vector):
        return vector
    if size > len(vector):
        return vector + [0.0] * (size - len(vector))
    if size in matryoshka_dims:
        return _normalized(vector[:size])
    with _projection_lock:
        matrix = projection(len(vector), size)
    return _normalized([sum(map(mul, row, vector)) for row in matrix])


def encode_base64(vector: list[float]) -> str:
    """Little-endian float32 bytes, base64: what OpenAI clients decode (numpy.frombuffer, float32)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@dataclass
class _Embedded:
    data: list[Embedding]
    prompt_tokens: int


def _embed(embedder: Embedder, texts: list[str], size: int, as_base64: bool) -> _Embedded:
    """Blocking: the model, the size fitting and the encoding, all in the worker thread."""
    batch = embedder.embed(texts)
    matryoshka_dims = embedder.info().matryoshka_dims
    data = []
    for index, vector in enumerate(batch.vectors):
        fitted = fit_vector(vector, size, matryoshka_dims)
        data.append(Embedding.model_construct(embedding=encode_base64(fitted) if as_base64 else fitted,
                                              index=index, object="embedding"))
    return _Embedded(data, batch.prompt_tokens)


async def create(platform: Platform, caller: Caller, body: EmbeddingRequest, *,
                 background: bool = False) -> EmbeddingList:
    """`background`: a batch line, bounded by the job runner's concurrency rather than the key's slots."""
    name, embedder = resolve(platform, body.model)
    size = output_dimensions(name, embedder.info(), body.dimensions)
    texts = [body.input] if isinstance(body.input, str) else body.input
    as_base64 = body.encoding_format == "base64"
    if background:
        embedded = await run_in_threadpool(_embed, embedder, texts, size, as_base64)
    else:
        # An embedding request holds a concurrency slot like a chat request: both keep the CPU busy.
        with platform.limiter.acquire(caller):
            embedded = await run_in_threadpool(_embed, embedder, texts, size, as_base64)
    # Written behind the reply, as chat usage is; embeddings are billed on input tokens only (spec §5).
    platform.usage.add(caller.key_id, name, embedded.prompt_tokens, 0)
    usage = EmbeddingUsage.model_construct(prompt_tokens=embedded.prompt_tokens, completion_tokens=0,
                                           total_tokens=embedded.prompt_tokens)
    return EmbeddingList.model_construct(model=name, object="list", data=embedded.data, usage=usage)
