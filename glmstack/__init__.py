"""glmstack: the GLM open platform on your own machine.

`from glmstack import load` gives the classic Python API. The import is lazy so that the HTTP platform,
which imports `glmstack.protocol`, never pulls in torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from glmstack.engine.classic import load

        return load
    raise AttributeError(name)
