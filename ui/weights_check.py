"""Uploaded weights checked against their config before any model is built (part of the app's trust
boundary, :mod:`ui.runs`): the config is built on the meta device (no memory) and every tensor it
implies must be in the safetensors files, read as transformers would, with its shape; a missing or
misshaped tensor is an error, never random weights, and the config may describe at most
:data:`MAX_PARAMS_MULTIPLE` × the parameters and layers of the dense model the app serves for the run."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from compression.files import MAX_JSON_DEPTH, FileError, read_json

MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a plain top-level file name of a run
MAX_CONFIG_BYTES = 1 << 20  # config.json, the safetensors index
MAX_PARAMS_MULTIPLE = 2.0  # an uploaded model: at most this many × the served dense model's parameters and layers


class RunError(ValueError):
    """Bad input about runs (unknown id, unsafe upload, malformed report); the session is unchanged."""


def inside(root: Path, *parts: str) -> Path:
    """``root/parts`` resolved, refusing anything that would land outside ``root``."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise RunError("refused: that path leaves the app's work folder")
    return path


@dataclass(frozen=True)
class Served:
    """The dense model the app serves for a run (its report's ``model``): what an uploaded model is
    checked against."""
    name: str
    params: int
    num_layers: int
    context: int | None = None


def _header_shapes(file: Path, names: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors file's header (no tensor data is read); RunError when
    the header is not a safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if names is None or k in names}
    except Exception:  # noqa: BLE001  SafetensorError, OSError, ...: the file is not what it says
        raise RunError(f"{file.name} is not a valid safetensors file (its header cannot be read)") from None


def present_tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors transformers would read from ``folder``: the files a
    ``model.safetensors.index.json`` maps them to, else ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            data = read_json(index, MAX_CONFIG_BYTES, 4)
        except FileError:
            raise RunError("model.safetensors.index.json is not valid JSON (or is over the size limit)") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and MEMBER.fullmatch(v) and v.endswith(".safetensors")
                for k, v in weight_map.items()):
            raise RunError("model.safetensors.index.json does not map tensors to safetensors files of the run")
        present: dict[str, tuple[int, ...]] = {}
        for name in sorted(set(weight_map.values())):
            file = inside(folder, name)
            if not file.is_file():
                raise RunError(f"the run's weights name {name}, which is not in the run")
            wanted = {k for k, v in weight_map.items() if v == name}
            present.update(_header_shapes(file, wanted))
        return present
    single = folder / "model.safetensors"
    if not single.is_file():
        raise RunError("the run has config.json but no model.safetensors (weights load as safetensors only)")
    return _header_shapes(single)


def check_weights(folder: Path, served: Served | None = None) -> int:
    """Check an uploaded model before anything is allocated; returns its parameter count.

    The config must be at most :data:`MAX_PARAMS_MULTIPLE` × ``served``'s layers and parameters
    (when given), and every tensor the config implies (tied copies aside) must be in the files
    transformers would read, with the config's shape: a missing or misshaped tensor is an error,
    never randomly initialised weights. The model is built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import compression.modeling  # noqa: F401  registers the compressed format
    from compression.arch import count_params

    try:
        raw = read_json(folder / "config.json", MAX_CONFIG_BYTES, MAX_JSON_DEPTH)
    except FileError:
        raise RunError(f"the run's config.json is not valid JSON (or is over {MAX_CONFIG_BYTES >> 20} MB)") from None
    if not isinstance(raw, dict):
        raise RunError("the run's config.json is not a model config")
    if "quantization_config" in raw:
        raise RunError("the run's config.json asks for a quantized model; a saved run holds plain weights")
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:  # noqa: BLE001  unknown model type, bad values: never echo the file
        raise RunError("the run's config.json is not a model config this app can build") from None
    layers = [getattr(config, "num_hidden_layers", None)]
    if hasattr(config, "layer_specs"):
        layers.append(len(config.layer_specs))
    if not all(isinstance(n, int) and n >= 0 for n in layers):
        raise RunError("the run's config.json gives no valid number of layers")
    if served is not None and max(layers) > MAX_PARAMS_MULTIPLE * served.num_layers:
        raise RunError(f"the run's config.json has {max(layers)} layers; the model it compresses "
                       f"({served.name}) has {served.num_layers}")
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001
        raise RunError("the run's config.json is not a model config this app can build") from None
    params = count_params(skeleton)
    if served is not None and params > MAX_PARAMS_MULTIPLE * served.params:
        raise RunError(f"the run's config.json describes {params / 1e6:,.1f}M parameters, over "
                       f"{MAX_PARAMS_MULTIPLE:g} × the {served.params / 1e6:,.1f}M of the model it compresses "
                       f"({served.name})")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
    present = present_tensors(folder)
    missing = [k for k in expected if k not in present and not (k in tied and tied[k] in present)]
    if missing:
        raise RunError(f"the run's weights do not match its config.json: {len(missing)} tensor(s) missing "
                       f"(first: {missing[0]}); a saved run holds every weight")
    for k, shape in expected.items():
        if k in present and present[k] != shape:
            raise RunError(f"the run's weights do not match its config.json: {k} is "
                           f"{'×'.join(map(str, present[k])) or 'a scalar'}, the config says "
                           f"{'×'.join(map(str, shape)) or 'a scalar'}")
    return params


