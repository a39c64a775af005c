"""Generation backends behind one small protocol (see `base.py` for the exact conventions).

    from spiral_cli.generation import make_generator
    gen = make_generator(loaded, recipe.generation)       # HFGenerator, in-process vLLM or a vLLM server
    outs = gen.generate(prompts, n=8, max_new_tokens=256, temperature=1.0, stop=["\\n\\n"], seed=0)
    outs[i][j].text, .token_ids, .logprobs, .finish_reason

This package knows nothing of training: it takes a loaded model and returns completions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spiral_cli.generation.base import Completion, Generator, cut_at_stop

if TYPE_CHECKING:  # pragma: no cover
    from spiral_cli.generation.hf import HFGenerator

__all__ = ["Completion", "Generator", "HFGenerator", "close_generator", "cut_at_stop", "make_generator"]


def __getattr__(name: str) -> Any:  # lazy: importing the protocol does not import torch
    if name == "HFGenerator":
        from spiral_cli.generation.hf import HFGenerator

        return HFGenerator
    raise AttributeError(name)


def make_generator(loaded, section) -> Generator:
    """The backend named by a `GenerationSection` (`backend`, `batch_size`, `vllm`, `vllm.server`); a backend
    that is missing or cannot serve this model is a RecipeError (a ValueError) naming the field."""
    from spiral_cli.generation.roles import attach_aggregator
    from spiral_cli.recipe import RecipeError

    if section.backend == "hf":
        from spiral_cli.generation.hf import HFGenerator

        generator = HFGenerator(loaded, batch_size=section.batch_size, fast_decode=section.fast_decode,
                                 compile=section.compile)
    elif section.backend == "vllm":
        try:
            from spiral_cli.generation.vllm import VLLMGenerator  # type: ignore[import-not-found]
        except ImportError as e:
            raise RecipeError(f"generation.backend=vllm is not available: {e}") from None
        try:
            generator = VLLMGenerator(loaded, section)
        except ValueError as e:  # the engine refusing the settings (memory, lengths): a recipe matter
            from spiral_cli.models import ModelError

            if isinstance(e, (RecipeError, ModelError)):
                raise
            raise RecipeError(str(e)) from None
    elif section.backend == "vllm_server":  # a vLLM server started on its own: needs no vllm install here
        from spiral_cli.generation.vllm_server import VLLMServerGenerator

        generator = VLLMServerGenerator(loaded, section)
    else:
        raise RecipeError(f"generation.backend: unknown backend {section.backend!r} (hf, vllm or vllm_server)")
    attach_aggregator(loaded, generator)  # a second LoRA adapter plays the aggregation role
    return generator


def close_generator(generator) -> None:
    """Release a backend's resources (a vLLM engine's memory and temporary model directory);
    backends without a `close` hold nothing beyond the model."""
    close = getattr(generator, "close", None)
    if callable(close):
        close()
