"""adallm: NVFP4 LLM inference on Ada GPUs. Public API with vLLM's names."""
from adallm_core.config import EngineArgs
from adallm_core.outputs import CompletionOutput, RequestOutput
from adallm_core.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "LLMEngine",
    "EngineArgs",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
]


def __getattr__(name: str):
    # The engine pulls in torch and the models; keep `import adallm_core` light.
    if name == "LLM":
        from adallm_core.llm import LLM

        return LLM
    if name in ("AsyncLLM", "LLMEngine"):
        from adallm_core import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'adallm_core' has no attribute {name!r}")
