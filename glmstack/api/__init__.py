"""The HTTP service: the platform's v4 API (plus OpenAI-style /v1 and ChatGLM's classic endpoint) over an
engine that is only ever seen through glmstack.protocol. Never imports torch.

`create_app` is imported lazily so that `glmstack.cli.serve` (loaded by every CLI command to register its
subcommand) does not pull in FastAPI.
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from glmstack.api.app import create_app

        return create_app
    raise AttributeError(name)
