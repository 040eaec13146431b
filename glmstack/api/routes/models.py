"""GET /models and /models/{id}: the served model and the aliases it answers to."""

from __future__ import annotations

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import Platform, PlatformDep
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.errors import error_responses
from glmstack.api.schemas.models import ModelCard, ModelList
from glmstack.api.services.chat import effective_defaults

router = keyed_router(tags=["models"])


def _card(platform: Platform, name: str) -> ModelCard:
    return ModelCard(id=name, created=platform.models.created, root=platform.models.served,
                     generation_defaults=effective_defaults(platform))


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(caller: CallerDep, platform: PlatformDep) -> ModelList:
    return ModelList(data=[_card(platform, name) for name in platform.models.names_for(caller.key_id)])


@router.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(401, 404))
async def retrieve_model(model_id: str, caller: CallerDep, platform: PlatformDep) -> ModelCard:
    try:
        platform.models.resolve(model_id, caller.key_id)
    except PlatformError as e:
        raise PlatformError(1211, f"{model_id!r} is not served here", http_status=404) from e
    return _card(platform, model_id)
