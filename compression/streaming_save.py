"""Saving a streamed model shard by shard: one block in memory at a time.

The folder is what :func:`compression.modeling.save_model` writes for the same model (same format
choice, same config files; the native format's blocks converted by the same
:func:`~compression.modeling.native_block`), split into one shard per block plus one for the rest,
with ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from .arch import Arch, arch_for, count_params, view
from .blockstore import tensors_of
from .modeling import CompressedForCausalLM, export_format, native_block, native_config

Progress = Callable[[float, str], None]


def _noop(fraction: float, message: str) -> None:
    pass


def save_streamed(model: nn.Module, tokenizer, folder: str | Path, progress: Progress = _noop) -> tuple[str, str]:
    """Save a streamed model as :func:`compression.modeling.save_model` would (same format choice), one
    shard per block plus one for the rest and ``model.safetensors.index.json``: one block in memory at
    a time. Returns (format, reason)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fmt, reason = export_format(model)
    native = fmt == "native" and isinstance(model, CompressedForCausalLM)
    config = _write_config(model, folder, native)
    weight_map, total = _write_shards(model, folder, arch_for(config) if native else None, progress)
    index = {"metadata": {"total_size": total, "total_parameters": count_params(model)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return fmt, reason


def _native_class_name(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def _write_config(model: nn.Module, folder: Path, native: bool):
    """config.json (and generation_config.json) as ``save_pretrained`` writes them; the compressed
    format also gets its modeling file and ``auto_map``. Returns the config written."""
    from transformers.dynamic_module_utils import custom_object_save

    compressed = isinstance(model, CompressedForCausalLM)
    if compressed:
        model.sync_config()
    config = native_config(model) if native else model.config
    config.architectures = [_native_class_name(config) if native else type(model).__name__]
    config.dtype = str(model.dtype).split(".")[1]
    if compressed and not native:
        custom_object_save(model, folder, config=model.config)
    config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    return config


def _write_shards(model: nn.Module, folder: Path, native_arch: Arch | None,
                  progress: Progress) -> tuple[dict[str, str], int]:
    """Shard 1: every saved tensor outside the blocks (a tied head once); shard k + 2: block k, under
    the original architecture's names when ``native_arch``. Returns (weight map, bytes written)."""
    from safetensors.torch import save_file

    mv = view(model)
    blocks, prefix = mv.layers, mv.arch.blocks
    n = len(blocks)
    saved = _persistent_names(model)
    outside = {name: t for name, t in tensors_of(model).items() if not name.startswith(prefix + ".") and name in saved}
    if mv.tied:
        outside.pop(mv.arch.lm_head + ".weight", None)
    weight_map, total = {}, 0
    for k in range(n + 1):
        if k == 0:
            tensors = outside
        else:
            block = blocks[k - 1]
            named = native_block(block, native_arch) if native_arch is not None else tensors_of(block)
            tensors = {f"{prefix}.{k - 1}.{name}": t for name, t in named.items()}
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        shard = f"model-{k + 1:05d}-of-{n + 1:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        progress((k + 1) / (n + 1), f"saved shard {k + 1}/{n + 1}")
    blocks.store.release()
    return weight_map, total


def _persistent_names(model: nn.Module) -> set[str]:
    """Names that belong in a checkpoint (parameters and persistent buffers), blocks included, read
    without materializing anything."""
    return set(model.state_dict(keep_vars=True))

