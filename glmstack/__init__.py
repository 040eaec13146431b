"""glmstack: the GLM open platform on your own machine.

`from glmstack import load` gives the classic Python API, and `from glmstack import AutoModel, AutoTokenizer`
ChatGLM's loading idiom (glmstack/engine/auto.py). The imports are lazy so that the HTTP platform, which
imports `glmstack.protocol`, never pulls in torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from glmstack.engine.classic import load

        return load
    if name in ("AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):
        from glmstack.engine import auto

        return getattr(auto, name)
    raise AttributeError(name)
