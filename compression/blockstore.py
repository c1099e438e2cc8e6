"""Where a streamed model's blocks live, and the one block that is resident.

A streamed model keeps its decoder blocks in a :class:`StreamedLayers` list: each block is a
placeholder whose tensors are on the ``meta`` device; indexing or iterating the list *materializes*
that block on the execution device and first sends the block that was there back to its home
(:class:`BlockStore`), so exactly one block is ever resident. A block's home is one of:

- :class:`Source` — dense weights, read on demand: from safetensors files (:class:`SafetensorsReader`;
  ``safe_open`` maps them lazily, so pages count as resident memory only while a read tensor is alive)
  or from a model in memory (:class:`ModuleReader`);
- :class:`Spilled` — a safetensors file of our own (the compressed block, when the store has a folder);
- :class:`InMemory` — the module itself, on the CPU (the compressed block, without a folder).

Every materialized block is a fresh allocation (like ``copy.deepcopy``), so streaming computes exactly
what the in-memory path computes. Building streamed models is :mod:`compression.streaming_build`.
"""
from __future__ import annotations

import itertools
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .arch import view

Rows = tuple[int, int] | None                # a row range of a fused checkpoint tensor, or all of it
KeyMap = dict[str, tuple[str, Rows]]         # block tensor name -> (reader key, rows)


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

def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
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


def assign(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` into ``module`` by name (parameters stay parameters, without gradients)."""
    for name, tensor in tensors.items():
        owner, attr = _owner(module, name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise KeyError(f"block has no tensor {name!r}")


def fresh(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new contiguous allocation holding ``tensor`` (like deepcopy: no view of a file mapping or of
    the caller's weights survives, and alignment-sensitive kernels see what the in-memory path sees)."""
    dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    out = torch.empty(tensor.shape, dtype=dtype, device=device)
    return out.copy_(tensor)


def check_persistent(module: nn.Module, what: str) -> None:
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
            assign(module, self._read(home))
            missing = [n for n, t in tensors_of(module).items() if t.is_meta]
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
            return {name: fresh(t, self.device) for name, t in _read_file(home.path).items()}
        raw = home.reader.read({key for key, _ in home.keys.values()})
        out = {}
        for name, (key, rows) in home.keys.items():
            tensor = raw[key] if rows is None else raw[key][rows[0]:rows[1]]
            out[name] = fresh(tensor, self.device, home.dtype)
        return out

    def _spill(self, module: nn.Module, old: Home) -> Spilled:
        from safetensors.torch import save_file

        path = self.folder / f"block-{next(self._writes):05d}.safetensors"
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors_of(module).items()}, str(path))
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
    return {name: (weakref.ref(t), t._version) for name, t in tensors_of(module).items()}


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


def placeholders(layers: nn.ModuleList) -> list[nn.Module]:
    """The block modules as they are (no materialization)."""
    return list(layers._modules.values())
