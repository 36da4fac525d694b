"""The built-in catalog of model shapes (:data:`KNOWN_MODELS`), the :class:`ModelSpec` an
estimate runs, and :func:`synthetic_batch`, the inputs of a known kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memprof.errors import EstimateError

#: Batch kinds :func:`synthetic_batch` can make.
BATCH_KINDS = ("causal-lm", "masked-lm", "image-classification", "base")


@dataclass(frozen=True)
class ModelSpec:
    """A model to estimate: how to build it and what a batch for it looks like.

    ``factory`` builds the ``nn.Module`` (called inside the fake mode, under the target default
    dtype); ``make_batch(batch_size, seq_len)`` builds the inputs, also inside the fake mode, as
    a dict of keyword arguments (or a tensor / tuple of positional ones). ``kind`` is one of
    :data:`BATCH_KINDS` or ``"custom"``; ``has_kv_cache`` says inference can keep a KV cache.
    """

    name: str
    factory: Callable[[], nn.Module]
    make_batch: Callable[[int, int], Any]
    kind: str = "custom"
    description: str = ""
    has_kv_cache: bool = False
    config: Mapping[str, Any] | None = None


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> dict[str, Any]:
    return {"model_type": "gpt2", "architecture": "GPT2LMHeadModel", "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "vocab_size": 50257, "n_positions": 1024}


def _llama_like(model_type: str, architecture: str, *, intermediate: int, kv_heads: int,
                vocab: int, max_pos: int, **extra: Any) -> dict[str, Any]:
    return {"model_type": model_type, "architecture": architecture, "hidden_size": 4096,
            "intermediate_size": intermediate, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, **extra}


#: Built-in shapes (transformers configs written out here: nothing is downloaded). Each value is
#: a config dict with ``model_type`` and the ``architecture`` (transformers class) to build.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "llama-2-7b": _llama_like("llama", "LlamaForCausalLM", intermediate=11008, kv_heads=32,
                              vocab=32000, max_pos=4096),
    "llama-3-8b": _llama_like("llama", "LlamaForCausalLM", intermediate=14336, kv_heads=8,
                              vocab=128256, max_pos=8192, rope_theta=500000.0),
    "mistral-7b": _llama_like("mistral", "MistralForCausalLM", intermediate=14336, kv_heads=8,
                              vocab=32000, max_pos=32768, sliding_window=4096,
                              rope_theta=10000.0),
    "bert-base": {"model_type": "bert", "architecture": "BertForMaskedLM", "hidden_size": 768,
                  "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 30522,
                  "max_position_embeddings": 512},
    "vit-base": {"model_type": "vit", "architecture": "ViTForImageClassification",
                 "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
                 "num_channels": 3, "num_labels": 1000},
}


def synthetic_batch(
    kind: str, *, batch_size: int, seq_len: int = 512, vocab: int = 32000,
    image_size: int = 224, num_channels: int = 3, num_labels: int = 1000,
) -> dict[str, torch.Tensor]:
    """A batch of the right shapes and dtypes (contents do not matter to memory).

    ``causal-lm`` / ``masked-lm``: ``input_ids`` and ``labels`` (int64, ``batch_size x seq_len``);
    ``base``: ``input_ids`` only; ``image-classification``: ``pixel_values`` (float32,
    ``batch_size x C x H x W``) and ``labels`` (int64, ``batch_size``). Call it inside the fake
    mode (as :func:`estimate` does for a callable batch) to make fake tensors.
    """
    if kind in ("causal-lm", "masked-lm", "base"):
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        if kind == "base":
            return {"input_ids": ids}
        return {"input_ids": ids, "labels": torch.zeros(batch_size, seq_len, dtype=torch.long)}
    if kind == "image-classification":
        return {
            "pixel_values": torch.zeros(batch_size, num_channels, image_size, image_size),
            "labels": torch.zeros(batch_size, dtype=torch.long),
        }
    raise EstimateError(f"unknown batch kind {kind!r}; known: {', '.join(BATCH_KINDS)}")
