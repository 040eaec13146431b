"""Which model names the API answers to.

The server runs one model. It answers to that model's own name, to "glmstack" and "default", to the
platform's chat model codes - the GLM-4 codes of the documentation (spec §2.1) and the codes applications
send today (`glm-4.5` ... `glm-4.7` in the Z.ai SDK's own examples, `glm-z1-*`, the `-0414`/`-250414` releases)
-, to the persona codes charglm-3 and emohaa (personas.py), and to the aliases in Settings
(GLMSTACK_MODEL_ALIASES), so code written for the hosted platform runs unchanged against a local server.
It also answers to the name of every adapter the engine serves on its base (`glmstack serve --adapter NAME=DIR`,
fine-tuned `ft:` models), as that adapter; those names are asked of the engine each time, since they come
and go while the server runs. A fine-tuned `ft:` model belongs to the key whose job made it, as on the hosted
platform: other keys neither see it in GET /models nor can call it (1211); adapters the operator serves with
`--adapter` are for every key.
Names match case-insensitively (the doc writes both "GLM-4-Flash" and "glm-4-flash"). Anything else is
business error 1211; a code of a capability this server lacks (vision, embeddings, images, video, voice) says
so rather than being answered by the chat model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from glmstack.api.errors import PlatformError
from glmstack.api.services.personas import PERSONA_MODELS

ALIASES = ("glmstack", "default")
CHAT_MODEL_CODES = (
    # GLM-4 and GLM-3 (the platform documentation)
    "glm-4", "glm-4-plus", "glm-4-0520", "glm-4-air", "glm-4-airx", "glm-4-long", "glm-4-flash", "glm-4-flashx",
    "glm-3-turbo",
    # GLM-4.5 and later (the Z.ai SDK's examples and model list)
    "glm-4.5", "glm-4.5-air", "glm-4.5-airx", "glm-4.5-x", "glm-4.5-flash", "glm-4.6", "glm-4.7",
    # the April 2025 releases and the Z1 reasoning models
    "glm-4-air-250414", "glm-4-flash-250414", "glm-4-flashx-250414", "glm-4-32b-0414-128k", "glm-4-9b-0414",
    "glm-z1-air", "glm-z1-airx", "glm-z1-flash", "glm-z1-flashx", "glm-z1-32b-0414", "glm-z1-9b-0414",
)
# Model codes of capabilities a chat model does not have, by family.
OTHER_CAPABILITIES = (
    (re.compile(r"glm-(4v|4\.\dv|4\.1v)"), "vision (image and video understanding)"),
    (re.compile(r"(embedding-|text-embedding)"), "embeddings"),
    (re.compile(r"cogview"), "image generation"),
    (re.compile(r"cogvideo"), "video generation"),
    (re.compile(r"(glm-4-voice|glm-realtime|glm-asr|glm-tts)"), "speech"),
)


class ModelCatalog:
    def __init__(self, served: str, created: int, aliases: Mapping[str, str] | None = None,
                 adapters: Callable[[], Sequence[str]] | None = None,
                 owns: Callable[[str | None, str], bool] | None = None) -> None:
        """`aliases`: extra name -> target, where the target is a name the server answers to already.
        `adapters`: the engine's `adapters()` (protocol.AdapterHost), when it serves any.
        `owns(key_id, name)`: whether that key's job made the fine-tuned model `name` (`ft:` names only)."""
        self.served = served  # the loaded model's name (ModelInfo.name)
        self.created = created  # when it was loaded, Unix seconds
        builtin = (served, *ALIASES, *CHAT_MODEL_CODES, *PERSONA_MODELS)
        known = {name.lower() for name in builtin}
        for name, target in (aliases or {}).items():
            if target.lower() not in known:
                raise ValueError(f"GLMSTACK_MODEL_ALIASES: {name}={target}: {target!r} is not a model this server "
                                 f"answers to (its model is {served!r})")
        names: dict[str, str] = {}  # lower-cased -> as first written; the served name first
        for name in (*builtin, *(aliases or {})):
            names.setdefault(name.lower(), name)
        self._builtin_names = tuple(names.values())
        self._known = set(names)
        self._adapters = adapters
        self._owns = owns

    def _visible(self, key_id: str | None, adapter: str) -> bool:
        return not adapter.startswith("ft:") or self._owns is None or self._owns(key_id, adapter)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the server answers to: the built-in ones, then the adapters served now."""
        return self._builtin_names + tuple(self._adapters() if self._adapters is not None else ())

    def names_for(self, key_id: str | None) -> tuple[str, ...]:
        """What GET /models lists to this key: `names` less the fine-tuned models of other keys."""
        served = self._adapters() if self._adapters is not None else ()
        return self._builtin_names + tuple(name for name in served if self._visible(key_id, name))

    def adapter_for(self, name: str, key_id: str | None) -> str | None:
        """The adapter a requested model name runs for this key (exact name), None for the base model."""
        if self._adapters is None or name.lower() in self._known:
            return None
        return name if name in self._adapters() and self._visible(key_id, name) else None

    def resolve(self, name: str, key_id: str | None) -> str:
        """The served model for a requested name and the key asking, or 1211."""
        if name.lower() in self._known or self.adapter_for(name, key_id) is not None:
            return self.served
        for pattern, capability in OTHER_CAPABILITIES:
            if pattern.match(name.lower()):
                raise PlatformError(1211, f"{name!r} is a {capability} model; this server runs the chat model "
                                          f"{self.served!r} and has no {capability} model")
        raise PlatformError(1211, f"{name!r} is not served here; use {self.served!r}, a GLM chat model code such "
                                  f"as 'glm-4' or 'glm-4.5', or another name GET /models lists")
