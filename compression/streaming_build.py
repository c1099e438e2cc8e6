"""Building streamed models: one opened from a checkpoint, and the working copy a method rewrites.

:func:`open_checkpoint` reads only the tensors outside the blocks; each block is a placeholder whose
home (:mod:`compression.blockstore`) is the checkpoint. :func:`working_copy` is what ``copy.deepcopy``
is in memory: a structural copy whose blocks read the caller's dense weights on demand (through the
key maps below, which also find the rows of fused projections), and :func:`finish` tidies the store
after the method ran. Because the HF decoders loop over ``self.layers[: n]``, a streamed model's
ordinary ``forward`` (and ``generate``) runs block by block unchanged, only slower; the methods' own
``for layer in mv.layers`` loops stream the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .arch import ARCHITECTURES, Arch, get_path, view
from .blockstore import (BlockStore, KeyMap, ModuleReader, SafetensorsReader, Source, StreamedLayers, assign,
                         check_persistent, fresh, placeholders, store_of, tensors_of)
from .modeling import LINEAR_PARTS, NORM_PARTS, CompressedForCausalLM, to_compressed

# the compressed format's parts that a fused checkpoint tensor holds, and their place in it
FUSED = {"q": ("qkv", 0), "k": ("qkv", 1), "v": ("qkv", 2), "gate": ("gate_up", 0), "up": ("gate_up", 1)}


# --- key maps --------------------------------------------------------------------------------------

def identity_keys(block: nn.Module, prefix: str) -> KeyMap:
    """Each tensor of ``block`` under the same name in a checkpoint, after ``prefix``."""
    return {name: (prefix + name, None) for name in tensors_of(block)}


def compressed_keys(layer: nn.Module, arch: Arch, shape, prefix: str) -> KeyMap:
    """Where each tensor of a dense block in the compressed format (``to_compressed`` of an ``arch``
    model) is in that model's checkpoint: parts by the architecture table, fused projections (Phi-3's
    ``qkv_proj`` [q; k; v] and ``gate_up_proj`` [gate; up]) by row range, as ``to_compressed`` splits."""
    ours, hd = ARCHITECTURES["compressed_decoder"], shape.head_dim
    rows = {"qkv": [shape.heads * hd, shape.kv_heads * hd, shape.kv_heads * hd],
            "gate_up": [shape.intermediate] * 2}
    out: KeyMap = {}
    for part in LINEAR_PARTS + NORM_PARTS:
        target = get_path(layer, getattr(ours, part))
        if target is None:
            continue
        for name in tensors_of(target):
            here = f"{getattr(ours, part)}.{name}"
            if getattr(arch, part) is not None:
                out[here] = (f"{prefix}{getattr(arch, part)}.{name}", None)
            elif part in FUSED and getattr(arch, FUSED[part][0]) is not None:
                fused, k = FUSED[part]
                start = sum(rows[fused][:k])
                out[here] = (f"{prefix}{getattr(arch, fused)}.{name}", (start, start + rows[fused][k]))
    unmapped = sorted(set(tensors_of(layer)) - set(out))
    if unmapped:
        raise ValueError(f"cannot stream this architecture: block tensors {unmapped} have no source")
    return out


def _compose(keys: KeyMap, source: Source, prefix: str) -> KeyMap:
    """``keys`` (names of a block of the caller, after ``prefix``) resolved through the caller's own
    source of that block, so a copy reads the checkpoint directly."""
    out = {}
    for name, (key, rows) in keys.items():
        inner_key, inner_rows = source.keys[key[len(prefix):]]
        if inner_rows is not None:
            rows = inner_rows if rows is None else (inner_rows[0] + rows[0], inner_rows[0] + rows[1])
        out[name] = (inner_key, rows)
    return out


# --- the working copy ----------------------------------------------------------------------------------

def _outside_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor of ``model`` outside its blocks, by id."""
    block_ids = {id(t) for t in tensors_of(view(model).layers).values()}
    return {id(t): t for t in tensors_of(model).values() if id(t) not in block_ids}


def _structural_copy(model: nn.Module, device: torch.device, alias_outside: bool) -> nn.Module:
    """``copy.deepcopy(model)`` without copying block tensors (they become meta placeholders). Tensors
    outside the blocks are shared when ``alias_outside`` (a streamed caller, read only), else copied
    onto ``device``. The copy's blocks sit in a plain ModuleList."""
    mv = view(model)
    memo: dict[int, object] = {}
    for tensor in tensors_of(mv.layers).values():
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    for key, tensor in _outside_tensors(model).items():
        if alias_outside:
            memo[key] = tensor
        else:
            copied = fresh(tensor.detach(), device)
            memo[key] = nn.Parameter(copied, requires_grad=tensor.requires_grad) \
                if isinstance(tensor, nn.Parameter) else copied
    layers = mv.layers
    store = layers.store if isinstance(layers, StreamedLayers) else None
    if store is not None:
        memo[id(store)] = None  # the copy gets its own store below
    twin = copy.deepcopy(model, memo)
    decoder = view(twin).decoder
    decoder.layers = nn.ModuleList(placeholders(decoder.layers))
    return twin.eval()


def working_copy(model: nn.Module, *, compressed: bool, device: torch.device | str,
                 folder: str | Path | None = None) -> nn.Module:
    """The streamed copy of ``model`` that a method rewrites (what ``copy.deepcopy`` is in memory).

    compressed: convert to the compressed format first (every method but layer dropping), so the method's
    own ``to_compressed`` finds it done. Blocks read their dense weights from the caller's checkpoint
    when the caller is itself streamed from one, else from the caller in memory; rewritten blocks go to
    ``folder`` (or CPU memory). The caller is never changed.
    """
    device = torch.device(device)
    caller = view(model)
    caller_store = store_of(model)
    twin = _structural_copy(model, device, alias_outside=caller_store is not None)
    converted = compressed and not isinstance(twin, CompressedForCausalLM)
    if converted:
        twin = to_compressed(twin)
    tv = view(twin)
    store = BlockStore(device, folder)
    blocks = placeholders(tv.layers)
    reader = ModuleReader(model)
    for i, block in enumerate(blocks):
        check_persistent(block, f"block {i}")
        prefix = f"{caller.arch.blocks}.{i}."
        keys = compressed_keys(block, caller.arch, caller.shape, prefix) if converted \
            else identity_keys(block, prefix)
        home = None if caller_store is None else caller_store.home(placeholders(caller.layers)[i])
        if isinstance(home, Source):
            store.add(block, Source(home.reader, _compose(keys, home, prefix), home.dtype))
        else:
            store.add(block, Source(reader, keys))
    tv.decoder.layers = StreamedLayers(blocks, store)
    return twin


def finish(model: nn.Module, store: BlockStore) -> nn.Module:
    """After a method ran on a working copy: blocks back in a :class:`StreamedLayers` (a method may have
    rebuilt the list, as layer dropping does), deleted blocks forgotten, the last block sent home."""
    mv = view(model)
    blocks = placeholders(mv.layers)
    if not isinstance(mv.layers, StreamedLayers):
        mv.decoder.layers = StreamedLayers(blocks, store)
    store.release()
    store.retain(blocks)
    return model


# --- a checkpoint, opened streamed ------------------------------------------------------------------

def open_checkpoint(folder: str | Path, device: torch.device | str, dtype: torch.dtype,
                    trust_remote_code: bool = False) -> nn.Module:
    """A streamed model from a folder of safetensors weights: only the tensors outside the blocks are
    read (memory-mapped, and copied only when ``dtype`` or ``device`` differ); each block is read when
    it is materialized. Raises ValueError when the checkpoint's names do not match the model's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder, device = Path(folder), torch.device(device)
    reader = SafetensorsReader(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    mv = view(model)
    decoder, blocks = mv.decoder, placeholders(mv.layers)
    decoder.layers = nn.ModuleList()
    outside = [name for name, t in tensors_of(model).items() if t.is_meta]
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [name for name in outside if name not in reader and name not in tied]
    if missing:
        raise ValueError(f"checkpoint names do not match the model ({missing[:3]} missing)")
    loaded = reader.read([name for name in outside if name in reader])
    assign(model, {name: t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)
                   for name, t in loaded.items()})
    model.tie_weights()
    left = [name for name, t in tensors_of(model).items() if t.is_meta]
    if left:
        raise ValueError(f"checkpoint leaves {left[:3]} unset")
    model.to(device)
    store = BlockStore(device)
    for i, block in enumerate(blocks):
        check_persistent(block, f"block {i}")
        keys = identity_keys(block, f"{mv.arch.blocks}.{i}.")
        absent = [key for key, _ in keys.values() if key not in reader]
        if absent:
            raise ValueError(f"checkpoint names do not match the model ({absent[:3]} missing)")
        block.to("meta")
        store.add(block, Source(reader, keys, dtype))
    decoder.layers = StreamedLayers(blocks, store)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
