"""RapidIn: token-wise influential training data retrieval for LLMs (Lin et al., ACL 2024)."""

__version__ = "0.1.0"

from .attribution import Generation, attribute  # noqa: E402
from .cache import CachePlan, build_cache, build_shards, finalize_cache, open_cache, plan_cache  # noqa: E402
from .config import AttributeConfig, GradientConfig, SketchConfig  # noqa: E402
from .errors import RapidInError  # noqa: E402
from .models import LoadedModel, ModelRef, load_model  # noqa: E402
from .results import Attribution  # noqa: E402

__all__ = [
    "Attribution", "AttributeConfig", "CachePlan", "Generation", "GradientConfig", "LoadedModel", "ModelRef",
    "RapidInError", "SketchConfig", "attribute", "build_cache", "build_shards", "finalize_cache", "load_model",
    "open_cache", "plan_cache",
]
