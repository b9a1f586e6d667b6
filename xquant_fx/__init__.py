"""xquant_fx: ultra-low-bit KV cache (XQuant) and MoE expert pruning for transformers models."""

from .cache import XQuantCache
from .config import XQuantConfig

__all__ = ["XQuantCache", "XQuantConfig"]
