"""loragate.engine: continuous-batching inference over a paged KV cache with prefix caching."""

from .async_engine import AsyncEngine, EngineDeadError
from .beam_search import BeamSearchParams, BeamSequence
from .config import EngineConfig
from .errors import AdapterNotFoundError, InvalidRequestError, ModelConfigError
from .llm import LLM
from .llm_engine import LLMEngine, RequestOutput
from .request import Request, RequestStatus
from .sampling_params import SamplingParams

__all__ = ["AdapterNotFoundError", "AsyncEngine", "BeamSearchParams", "BeamSequence", "EngineConfig", "EngineDeadError",
           "InvalidRequestError", "LLM", "LLMEngine", "ModelConfigError", "Request", "RequestOutput", "RequestStatus",
           "SamplingParams"]
