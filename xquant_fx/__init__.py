"""xquant_fx: ultra-low-bit KV cache (XQuant) and MoE expert pruning for transformers models.

Importing the package loads no Triton and initializes no CUDA; the kernels load on first use.
"""

from .aoti import export, load
from .api import optimize
from .backend import register as _register_backend
from .cache import XQuantCache
from .config import MoESchedule, XQuantConfig
from .config_search import search
from .version import __version__

_register_backend()

__all__ = ["MoESchedule", "XQuantCache", "XQuantConfig", "export", "load", "optimize", "search"]
