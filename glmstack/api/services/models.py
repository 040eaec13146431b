"""Which model names the API answers to.

The server runs one model. It answers to that model's own name and to a fixed list of aliases: "glmstack"
and "default", and the platform's GLM-4 chat model codes (spec §2.1), so code written for the hosted
platform — `model="glm-4"` — runs unchanged against a local server. Names match case-insensitively (the doc
writes both "GLM-4-Flash" and "glm-4-flash"). Anything else is business error 1211.
"""

from __future__ import annotations

from glmstack.api.errors import PlatformError

ALIASES = (
    "glmstack",
    "default",
    "glm-4",
    "glm-4-plus",
    "glm-4-0520",
    "glm-4-air",
    "glm-4-airx",
    "glm-4-long",
    "glm-4-flash",
    "glm-3-turbo",
)


class ModelCatalog:
    def __init__(self, served: str, created: int) -> None:
        self.served = served  # the loaded model's name (ModelInfo.name)
        self.created = created  # when it was loaded, Unix seconds
        self.names = (served, *(a for a in ALIASES if a.lower() != served.lower()))
        self._known = {name.lower() for name in self.names}

    def resolve(self, name: str) -> str:
        """The served model for a requested name, or 1211."""
        if name.lower() not in self._known:
            raise PlatformError(1211, f"{name!r} is not served here; use one of: {', '.join(self.names)}")
        return self.served
