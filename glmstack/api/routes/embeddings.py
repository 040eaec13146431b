"""POST /embeddings (spec §2.7)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.embeddings import EmbeddingList, EmbeddingRequest
from glmstack.api.schemas.errors import error_responses
from glmstack.api.services import embeddings

router = keyed_router(tags=["embeddings"])


@router.post("/embeddings", response_model=EmbeddingList, responses=error_responses(400, 401, 413, 429, 500))
async def create_embeddings(
    body: EmbeddingRequest, request: Request, caller: CallerDep, platform: PlatformDep
) -> Response:
    """One vector per input, in input order. `embedding-2` answers 1024 dimensions; `embedding-3` 2048, or
    `dimensions` 256, 512, 1024 or 2048; whatever model serves them. Where the model's own vectors are
    shorter they are zero-padded: cosine similarities and dot products are exactly the model's. Where they
    are longer, they are cut (a Matryoshka model, at the sizes it was trained for) or projected by a fixed,
    seeded random projection, then renormalized. Texts longer than the model's input limit are truncated to
    it, as sentence-transformers does; `usage.prompt_tokens` counts the tokens embedded.

    Unknown `model`: 1211. Empty `input` (or an empty text), more than 256 texts, a `dimensions` the model
    name does not answer: 1214 naming the field."""
    result = await embeddings.create(platform, caller, body)
    request.state.log.update(model=result.model, prompt_tokens=result.usage.prompt_tokens)
    # Serialized once, without validating the vectors again (they are ours): 2048 floats per input add up.
    return Response(result.model_dump_json(), media_type="application/json")
