"""Block streaming: compress, run and save models whose weights stay off the execution device.

A *streamed* model is an ordinary transformers model (its own class, or the compressed format) whose
decoder blocks sit in a :class:`StreamedLayers` list. Outside the blocks (embeddings, rotary tables,
final norm, head) everything is real and lives on the execution device. Each block is a placeholder whose
tensors are on the ``meta`` device; indexing or iterating the list *materializes* that block on the
execution device and first sends the block that was there back to its home (:class:`BlockStore`), so
exactly one block is ever resident. A block's home is one of:

- :class:`Source` — dense weights, read on demand: from safetensors files (:class:`SafetensorsReader`;
  ``safe_open`` maps them lazily, so pages count as resident memory only while a read tensor is alive)
  or from a model in memory (:class:`ModuleReader`);
- :class:`Spilled` — a safetensors file of our own (the compressed block, when the store has a folder);
- :class:`InMemory` — the module itself, on the CPU (the compressed block, without a folder).

Because the HF decoders loop over ``self.layers[: n]``, a streamed model's ordinary ``forward`` (and
``generate``) runs block by block unchanged, only slower; the methods' own ``for layer in mv.layers``
loops stream the same way. Every materialized block is a fresh allocation (like ``copy.deepcopy``), so
streaming computes exactly what the in-memory path computes.

Calibration activations are O(tokens × hidden) whatever the depth: the methods keep the current block's
on the execution device and drop the previous block's as they move on. :func:`measure_against` (the
evaluation of a streamed run) keeps its per-window states on the CPU between blocks.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import ARCHITECTURES, Arch, arch_for, count_params, get_path, view

Progress = Callable[[float, str], None]
Rows = tuple[int, int] | None                # a row range of a fused checkpoint tensor, or all of it
KeyMap = dict[str, tuple[str, Rows]]         # block tensor name -> (reader key, rows)

ORIGINAL_CLASS_METHODS = frozenset({"layerdrop"})  # methods whose run keeps the model's own class
FIT_FACTOR = 1.1  # a copy of the weights plus ~10% working room (activations, temporaries)
# Positions per logits comparison in the streamed evaluation: a comparison holds ~5 (P, vocab) fp32
# tensors, 190 MB at P = 64 with a 152k vocabulary (the in-memory evaluation's 256 would hold 775 MB,
# more than a streamed run needs for anything else). Only float32 summation order differs.
EVAL_POSITIONS = 64
LINEAR_PARTS = ("q", "k", "v", "o", "gate", "up", "down")
NORM_PARTS = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm")
FUSED = {"q": ("qkv", 0), "k": ("qkv", 1), "v": ("qkv", 2), "gate": ("gate_up", 0), "up": ("gate_up", 1)}


def _noop(fraction: float, message: str) -> None:
    pass


# --- where weights come from ------------------------------------------------------------------------

class SafetensorsReader:
    """Tensors of a safetensors checkpoint (one file, or shards with an index), read on demand.

    ``safe_open`` memory-maps the file; a tensor it returns is a view of that mapping, so only the pages
    actually touched become resident, and the mapping goes away with the last tensor read through it.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update({key: path for key in f.keys()})
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {folder}")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in names})
        return out


class ModuleReader:
    """Tensors of a model in memory, by state-dict name. Blocks of a streamed model are materialized
    through its own store first (so this also reads a streamed model whose blocks were rewritten)."""

    def __init__(self, model: nn.Module):
        self.model, self.mv = model, view(model)
        self.prefix = self.mv.arch.blocks + "."

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key in sorted(keys, key=self._block_of):
            index = self._block_of(key)
            if index < 0:
                out[key] = _tensor_at(self.model, key)
            else:
                block = self.mv.layers[index]
                out[key] = _tensor_at(block, key[len(self.prefix):].split(".", 1)[1])
        return out

    def _block_of(self, key: str) -> int:
        if not key.startswith(self.prefix):
            return -1
        return int(key[len(self.prefix):].split(".", 1)[0])


@dataclass(frozen=True)
class Source:
    """Dense weights read on demand: ``keys`` maps each block tensor to its reader key (and rows of a
    fused tensor); floating tensors are cast to ``dtype`` when it is set."""

    reader: SafetensorsReader | ModuleReader
    keys: KeyMap
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Spilled:
    """A block written to a safetensors file of the store's folder."""

    path: Path


@dataclass(frozen=True)
class InMemory:
    """The block module itself holds its tensors, on the CPU."""


Home = Source | Spilled | InMemory


# --- tensors of a module --------------------------------------------------------------------------

def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by dotted name."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def _tensor_at(module: nn.Module, name: str) -> torch.Tensor:
    owner, attr = _owner(module, name)
    tensor = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if tensor is None:
        raise KeyError(name)
    return tensor


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` into ``module`` by name (parameters stay parameters, without gradients)."""
    for name, tensor in tensors.items():
        owner, attr = _owner(module, name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise KeyError(f"block has no tensor {name!r}")


def _fresh(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new contiguous allocation holding ``tensor`` (like deepcopy: no view of a file mapping or of
    the caller's weights survives, and alignment-sensitive kernels see what the in-memory path sees)."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    return out.copy_(tensor)


def _check_persistent(module: nn.Module, what: str) -> None:
    """Placeholders lose every tensor on eviction: a non-persistent buffer would never come back."""
    for sub_name, sub in module.named_modules():
        if sub._non_persistent_buffers_set:
            raise ValueError(f"{what}: {sub_name or 'block'} has non-persistent buffers "
                             f"{sorted(sub._non_persistent_buffers_set)}; it cannot be streamed")


# --- the store ----------------------------------------------------------------------------------

class BlockStore:
    """Where each block's tensors are, and which single block is resident on ``device``.

    ``folder``: where rewritten blocks are spilled (one safetensors file each); without it they stay in
    CPU memory. A block is *clean* when none of its tensors was replaced or edited in place since it was
    materialized; a clean block goes back to meta (its home still holds it), a rewritten one is written
    to a new home.
    """

    def __init__(self, device: torch.device | str, folder: str | Path | None = None):
        self.device = torch.device(device)
        self.folder = None if folder is None else Path(folder)
        self.homes: dict[int, tuple[nn.Module, Home]] = {}
        self.resident: nn.Module | None = None
        self._signature: dict | None = None
        self._writes = itertools.count()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, module: nn.Module, home: Home) -> None:
        self.homes[id(module)] = (module, home)

    def home(self, module: nn.Module) -> Home:
        return self.homes[id(module)][1]

    def materialize(self, module: nn.Module) -> nn.Module:
        """Make ``module`` the resident block, on the execution device."""
        if self.resident is module:
            return module
        self.release()
        home = self.home(module)
        if isinstance(home, InMemory):
            module.to(self.device)
        else:
            _assign(module, self._read(home))
            missing = [n for n, t in _tensors(module).items() if t.is_meta]
            if missing:
                raise KeyError(f"block tensors missing from their source: {missing[:5]}")
        self.resident, self._signature = module, _signature(module)
        return module

    def release(self) -> None:
        """Send the resident block home (written first if it was rewritten)."""
        module, self.resident = self.resident, None
        if module is None:
            return
        home, clean = self.home(module), _same(self._signature, _signature(module))
        if clean and not isinstance(home, InMemory):
            module.to("meta")
        elif self.folder is not None:
            self.add(module, self._spill(module, home))
            module.to("meta")
        else:
            module.to("cpu")
            self.add(module, InMemory())

    def retain(self, modules: Iterable[nn.Module]) -> None:
        """Forget every block but ``modules`` (blocks a method deleted), with their spill files."""
        keep = {id(m) for m in modules}
        for key in [k for k in self.homes if k not in keep]:
            module, home = self.homes.pop(key)
            if self.resident is module:
                self.resident = None
            if isinstance(home, Spilled):
                home.path.unlink(missing_ok=True)

    def _read(self, home: Source | Spilled) -> dict[str, torch.Tensor]:
        if isinstance(home, Spilled):
            return {name: _fresh(t, self.device) for name, t in _read_file(home.path).items()}
        raw = home.reader.read({key for key, _ in home.keys.values()})
        out = {}
        for name, (key, rows) in home.keys.items():
            tensor = raw[key] if rows is None else raw[key][rows[0]:rows[1]]
            out[name] = _fresh(tensor, self.device, home.dtype)
        return out

    def _spill(self, module: nn.Module, old: Home) -> Spilled:
        from safetensors.torch import save_file

        path = self.folder / f"block-{next(self._writes):05d}.safetensors"
        save_file({n: t.detach().to("cpu").contiguous() for n, t in _tensors(module).items()}, str(path))
        if isinstance(old, Spilled):
            old.path.unlink(missing_ok=True)
        return Spilled(path)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}



def _signature(module: nn.Module) -> dict:
    """Identity and in-place version of every tensor (weak references: a freed tensor's id may be
    reused, so ids alone could call a rewritten block clean)."""
    return {name: (weakref.ref(t), t._version) for name, t in _tensors(module).items()}


def _same(a: dict | None, b: dict) -> bool:
    if a is None or a.keys() != b.keys():
        return False
    return all(a[n][0]() is b[n][0]() and a[n][1] == b[n][1] for n in a)


class StreamedLayers(nn.ModuleList):
    """The decoder blocks of a streamed model: indexing or iterating materializes a block (and sends
    the previous one home); slices share the store. ``parameters()``, ``state_dict()`` and friends see
    the placeholders as they are (shapes right, tensors on meta) and never load anything."""

    def __init__(self, modules: Iterable[nn.Module], store: BlockStore):
        super().__init__(modules)
        self.store = store

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return StreamedLayers(list(self._modules.values())[idx], self.store)
        return self.store.materialize(super().__getitem__(idx))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def is_streamed(model: nn.Module) -> bool:
    return isinstance(view(model).layers, StreamedLayers)


def store_of(model: nn.Module) -> BlockStore | None:
    layers = view(model).layers
    return layers.store if isinstance(layers, StreamedLayers) else None


def _placeholders(layers: nn.ModuleList) -> list[nn.Module]:
    """The block modules as they are (no materialization)."""
    return list(layers._modules.values())


# --- key maps --------------------------------------------------------------------------------------

def identity_keys(block: nn.Module, prefix: str) -> KeyMap:
    """Each tensor of ``block`` under the same name in a checkpoint, after ``prefix``."""
    return {name: (prefix + name, None) for name in _tensors(block)}


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
        for name in _tensors(target):
            here = f"{getattr(ours, part)}.{name}"
            if getattr(arch, part) is not None:
                out[here] = (f"{prefix}{getattr(arch, part)}.{name}", None)
            elif part in FUSED and getattr(arch, FUSED[part][0]) is not None:
                fused, k = FUSED[part]
                start = sum(rows[fused][:k])
                out[here] = (f"{prefix}{getattr(arch, fused)}.{name}", (start, start + rows[fused][k]))
    unmapped = sorted(set(_tensors(layer)) - set(out))
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


# --- building streamed models ------------------------------------------------------------------------

def _outside_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor of ``model`` outside its blocks, by id."""
    block_ids = {id(t) for t in _tensors(view(model).layers).values()}
    return {id(t): t for t in _tensors(model).values() if id(t) not in block_ids}


def _structural_copy(model: nn.Module, device: torch.device, alias_outside: bool) -> nn.Module:
    """``copy.deepcopy(model)`` without copying block tensors (they become meta placeholders). Tensors
    outside the blocks are shared when ``alias_outside`` (a streamed caller, read only), else copied
    onto ``device``. The copy's blocks sit in a plain ModuleList."""
    mv = view(model)
    memo: dict[int, object] = {}
    for tensor in _tensors(mv.layers).values():
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    for key, tensor in _outside_tensors(model).items():
        if alias_outside:
            memo[key] = tensor
        else:
            fresh = _fresh(tensor.detach(), device)
            memo[key] = nn.Parameter(fresh, requires_grad=tensor.requires_grad) \
                if isinstance(tensor, nn.Parameter) else fresh
    layers = mv.layers
    store = layers.store if isinstance(layers, StreamedLayers) else None
    if store is not None:
        memo[id(store)] = None  # the copy gets its own store below
    twin = copy.deepcopy(model, memo)
    decoder = view(twin).decoder
    decoder.layers = nn.ModuleList(_placeholders(decoder.layers))
    return twin.eval()


def working_copy(model: nn.Module, *, compressed: bool, device: torch.device | str,
                 folder: str | Path | None = None) -> nn.Module:
    """The streamed copy of ``model`` that a method rewrites (what ``copy.deepcopy`` is in memory).

    compressed: convert to the compressed format first (every method but layer dropping), so the method's
    own ``to_compressed`` finds it done. Blocks read their dense weights from the caller's checkpoint
    when the caller is itself streamed from one, else from the caller in memory; rewritten blocks go to
    ``folder`` (or CPU memory). The caller is never changed.
    """
    from .modeling import CompressedForCausalLM, to_compressed

    device = torch.device(device)
    caller = view(model)
    caller_store = store_of(model)
    twin = _structural_copy(model, device, alias_outside=caller_store is not None)
    converted = compressed and not isinstance(twin, CompressedForCausalLM)
    if converted:
        twin = to_compressed(twin)
    tv = view(twin)
    store = BlockStore(device, folder)
    blocks = _placeholders(tv.layers)
    reader = ModuleReader(model)
    for i, block in enumerate(blocks):
        _check_persistent(block, f"block {i}")
        prefix = f"{caller.arch.blocks}.{i}."
        keys = compressed_keys(block, caller.arch, caller.shape, prefix) if converted \
            else identity_keys(block, prefix)
        home = None if caller_store is None else caller_store.home(_placeholders(caller.layers)[i])
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
    blocks = _placeholders(mv.layers)
    if not isinstance(mv.layers, StreamedLayers):
        mv.decoder.layers = StreamedLayers(blocks, store)
    store.release()
    store.retain(blocks)
    return model


def open_checkpoint(folder: str | Path, device: torch.device | str, dtype: torch.dtype,
                    trust_remote_code: bool = False) -> nn.Module:
    """A streamed model from a folder of safetensors weights: only the tensors outside the blocks are
    read (memory-mapped, and copied only when ``dtype`` or ``device`` differ); each block is read when
    it is materialized. Raises ValueError when the checkpoint's names do not match the model's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    import compression.modeling  # noqa: F401  registers the compressed-model classes

    folder, device = Path(folder), torch.device(device)
    reader = SafetensorsReader(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    mv = view(model)
    decoder, blocks = mv.decoder, _placeholders(mv.layers)
    decoder.layers = nn.ModuleList()
    outside = [name for name, t in _tensors(model).items() if t.is_meta]
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [name for name in outside if name not in reader and name not in tied]
    if missing:
        raise ValueError(f"checkpoint names do not match the model ({missing[:3]} missing)")
    loaded = reader.read([name for name in outside if name in reader])
    _assign(model, {name: t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)
                    for name, t in loaded.items()})
    model.tie_weights()
    left = [name for name, t in _tensors(model).items() if t.is_meta]
    if left:
        raise ValueError(f"checkpoint leaves {left[:3]} unset")
    model.to(device)
    store = BlockStore(device)
    for i, block in enumerate(blocks):
        _check_persistent(block, f"block {i}")
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


# --- when to stream ------------------------------------------------------------------------------

def available_bytes(device: torch.device | str) -> int:
    """Free memory where the work would run: the CUDA device's free memory, else the host's
    ``MemAvailable`` (Linux; elsewhere physical pages available)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def needs_offload(weight_bytes: int, device: torch.device | str, copies: int) -> tuple[bool, str]:
    """Whether ``copies`` copies of ``weight_bytes`` of weights, times :data:`FIT_FACTOR` (working
    room), exceed the memory available on ``device``; and that comparison as one line.

    The CLI asks before loading with copies = 2 (the dense model and the working copy: 2.2 × the
    weights); :func:`compression.compress` asks for a model already in memory with copies = 1 (1.1 ×)."""
    need, free = FIT_FACTOR * copies * weight_bytes, available_bytes(device)
    verdict = "does not fit" if need > free else "fits"
    return need > free, (f"{verdict}: {copies} × {weight_bytes / 2**30:.2f} GiB of weights × {FIT_FACTOR} "
                         f"= {need / 2**30:.2f} GiB vs {free / 2**30:.2f} GiB available on {torch.device(device)}")


def return_large_frees(threshold: int = 1 << 17) -> bool:
    """Have glibc serve every allocation above ``threshold`` bytes with its own mapping, unmapped when
    freed. By default glibc raises that threshold as large buffers are freed (up to 32 MB), after which
    block- and activation-sized buffers come from the heap and stay resident after use: measured on a
    streamed MoDeGPT run of the default model's first 3 blocks with 64 × 512 calibration tokens, the
    peak went from 1810 MB to 1296 MB. Process-wide, so for a command's own process (the CLI calls it
    when it streams); False where the C library has no ``mallopt``."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (tied tensors once; placeholders counted at their dtype)."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())


# --- saving, shard by shard -------------------------------------------------------------------------

def _native_block(layer: nn.Module, arch: Arch) -> dict[str, torch.Tensor]:
    """A compressed-format block's tensors under the original architecture's names (fused projections
    concatenated), as :func:`compression.modeling.to_native` writes them."""
    from .arch import BlockView

    src = BlockView(0, layer, ARCHITECTURES["compressed_decoder"])
    out = {}
    for part in LINEAR_PARTS + NORM_PARTS:
        path = getattr(arch, part)
        if path is not None and src.get(part) is not None:
            out.update({f"{path}.{n}": t for n, t in src.get(part).state_dict().items()})
    if arch.qkv is not None:
        for name in ("weight", "bias"):
            parts = [getattr(src.get(p), name) for p in ("q", "k", "v")]
            if parts[0] is not None:
                out[f"{arch.qkv}.{name}"] = torch.cat(parts)
    if arch.gate_up is not None:
        out[f"{arch.gate_up}.weight"] = torch.cat([src.gate.weight, src.up.weight])
    return out


def _native_config(model: nn.Module):
    """The original architecture's config of a compressed model that exports natively."""
    base = copy.deepcopy(model.model.config)
    layers = _placeholders(model.model.layers)
    if layers:
        base.intermediate_size = layers[0].mlp.gate_proj.out_features
    return base


def _native_class_name(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def save_streamed(model: nn.Module, tokenizer, folder: str | Path, progress: Progress = _noop) -> tuple[str, str]:
    """Save a streamed model as :func:`compression.modeling.save_model` would (same format choice), one
    shard per block plus one for the rest and ``model.safetensors.index.json``: one block in memory at
    a time. Returns (format, reason)."""
    from .modeling import CompressedForCausalLM, export_format

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


def _write_config(model: nn.Module, folder: Path, native: bool):
    """config.json (and generation_config.json) as ``save_pretrained`` writes them; the compressed
    format also gets its modeling file and ``auto_map``. Returns the config written."""
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling import CompressedForCausalLM

    compressed = isinstance(model, CompressedForCausalLM)
    if compressed:
        model.sync_config()
    config = _native_config(model) if native else model.config
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
    outside = {name: t for name, t in _tensors(model).items() if not name.startswith(prefix + ".") and name in saved}
    if mv.tied:
        outside.pop(mv.arch.lm_head + ".weight", None)
    weight_map, total = {}, 0
    for k in range(n + 1):
        if k == 0:
            tensors = outside
        else:
            block = blocks[k - 1]
            named = _native_block(block, native_arch) if native_arch is not None else _tensors(block)
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


# --- evaluation of streamed models ------------------------------------------------------------------

@torch.no_grad()
def head_inputs(model: nn.Module, windows: torch.Tensor, progress: Progress = _noop) -> torch.Tensor:
    """The output head's input (N, T, d) for every window of ``windows`` (N, T), computed block-major:
    each block is materialized once and runs every window (one at a time, as a forward of batch 1
    would); the windows' states wait on the CPU between blocks."""
    from .calibration import capture_block_inputs

    mv = view(model)
    device = mv.device
    inputs = capture_block_inputs(mv, windows, batch_size=1)
    hidden = [h.to("cpu") for h in inputs.hidden]
    blocks = mv.layers
    for i in range(len(blocks)):
        block, kwargs = blocks[i], inputs.kwargs_for(i)
        hidden = [block(h.to(device), use_cache=False, **kw).to("cpu") for h, kw in zip(hidden, kwargs)]
        progress((i + 1) / len(blocks), f"block {i + 1}/{len(blocks)}")
    store = store_of(model)
    if store is not None:
        store.release()
    return torch.cat([mv.final_norm(h.to(device)).to("cpu") for h in hidden])


def _head(model: nn.Module):
    """(weight, bias, soft-cap) of the output head: logits = cap·tanh((h Wᵀ + b)/cap) where capped."""
    mv = view(model)
    head = mv.lm_head
    base = mv.config
    cap = getattr(base, "final_logit_softcapping", None)
    return head.weight, head.bias, cap


def _logits(hidden: torch.Tensor, head, dtype=None) -> torch.Tensor:
    weight, bias, cap = head
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = F.linear(hidden.to(weight.device, weight.dtype), weight, bias)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def measure_against(dense: nn.Module, model: nn.Module, windows: torch.Tensor,
                    progress: Progress = _noop, what: str = "wiki evaluation split") -> dict:
    """What :func:`compression.pipeline.measure_against` returns (perplexity of both models with 95%
    intervals, and agreement: KL, top-1, ppl ratio), for streamed models: the head inputs of both models
    are computed block-major (:func:`head_inputs`), then the logits window by window and
    :data:`EVAL_POSITIONS` positions at a time with :func:`~compression.evaluate.compare_chunk`, as
    :func:`~compression.evaluate.evaluate_against` compares them. Nothing of the dense side is cached."""
    from .evaluate import bootstrap_interval, compare_chunk, ppl_summary

    dense_hidden = head_inputs(dense, windows, lambda f, m: progress(0.4 * f, f"dense: {m}"))
    hidden = head_inputs(model, windows, lambda f, m: progress(0.4 + 0.4 * f, f"compressed: {m}"))
    head, dense_head = _head(model), _head(dense)
    n, length = windows.shape
    nll, kl, agree, dense_nll = [0.0] * n, [0.0] * n, [0] * n, [0.0] * n
    for i in range(n):
        targets = windows[i, 1:].to(head[0].device)
        for start in range(0, length - 1, EVAL_POSITIONS):
            stop = min(start + EVAL_POSITIONS, length - 1)
            logits = _logits(hidden[i, start:stop], head)                       # (P, V) model dtype
            dense = _logits(dense_hidden[i, start:stop], dense_head)            # (P, V) model dtype
            # the dense NLL from the logits a dense forward gives; the comparison in fp32 from the head
            # input, as DenseReference does
            dense_nll[i] += F.cross_entropy(dense.float(), targets[start:stop], reduction="sum").item()
            if dense.dtype != torch.float32:
                dense = _logits(dense_hidden[i, start:stop], dense_head, torch.float32)
            a, b, c = compare_chunk(logits, dense, targets[start:stop])
            nll[i], kl[i], agree[i] = nll[i] + a, kl[i] + b, agree[i] + c
            del logits, dense
        progress(0.8 + 0.2 * (i + 1) / n, f"perplexity and agreement {i + 1}/{n}")
    tokens = [length - 1] * n
    out, dense_stats = ppl_summary(nll, tokens), ppl_summary(dense_nll, tokens)
    log_ratio_ci = bootstrap_interval([c - d for c, d in zip(nll, dense_nll)], tokens)
    agreement = {
        "kl": sum(kl) / sum(tokens), "kl_ci": list(bootstrap_interval(kl, tokens)),
        "top1": sum(agree) / sum(tokens), "top1_ci": list(bootstrap_interval(agree, tokens)),
        "ppl_ratio": math.exp((sum(nll) - sum(dense_nll)) / sum(tokens)),
        "ppl_ratio_ci": [math.exp(x) for x in log_ratio_ci],
        "dense_ppl": dense_stats["ppl"], "windows": n, "tokens": sum(tokens),
    }
    return {"ppl": {"dense": dense_stats["ppl"], "dense_ci": dense_stats["ppl_ci"], "compressed": out["ppl"],
                    "compressed_ci": out["ppl_ci"], "windows": n, "seq_len": int(length),
                    "text": what},
            "agreement": agreement}
