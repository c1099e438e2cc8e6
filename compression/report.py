"""The Report: everything a compression run measured, JSON-serialisable.

The app, the CLI and the benchmarks read only this (never the model) to draw plots and tables, so a
saved ``report.json`` reproduces every figure of a run.

Schema of ``Report.to_dict()`` (all plain numbers, lists and dicts):

- ``method``: a name of :data:`compression.methods.METHODS`
- ``model``: model name or folder; ``config``: the method config as a dict
- ``ratio_target``: fraction of decoder-block parameters to remove (None when given as widths)
- ``params_dense`` / ``params_compressed``: all parameters, tied weights counted once
- ``block_params_dense`` / ``block_params_compressed``: decoder blocks only
- ``ppl_dense`` / ``ppl_compressed``: wiki perplexity (None when not evaluated)
- ``calibration_seconds`` / ``compress_seconds``; ``peak_memory_mb``: peak memory while compressing
    (CUDA allocator peak, or the process's resident high-water mark on CPU)
- ``block_influence``: one float per original layer (None if the method did not compute it)
- ``layers``: one :class:`LayerReport` dict per *original* layer:
    ``index``, ``removed`` (bool), ``params_dense``, ``params_compressed``,
    ``sizes``: {name: int} kept sizes, e.g. ``d_in``, ``d_mid``, ``d_out``, ``qk_dim``, ``v_dim``,
        ``mlp_dim``, ``branch_rank``;
    ``spectra``: {name: [eigenvalues, descending]}, e.g. ``attn_input``, ``mlp_input``, ``mlp_corr``,
        ``vo_head0``...; ``kept``: {name: int} rank kept of the spectrum of the same name;
    ``leverage``: {"scores": [float per MLP channel], "kept": [channel indices]} or {};
    ``errors``: {name: float} relative Frobenius reconstruction errors, e.g. ``block``, ``attn``,
        ``mlp``, ``mlp_before_calibration``;
    ``influence``: Block Influence of the layer (or None).
- ``heal``: recovery-training record or None; ``extra``: free-form method notes.
- ``calibration``: ``samples``, ``seq_len``, ``tokens``, ``distinct_tokens``, ``fingerprint`` (of the
    token ids), ``source`` and the like; ``warnings``: strings the UI and CLI must show.
- ``evaluation``: metrics measured after compression, each with the settings that produced it.
- ``agreement``: the compressed model against the dense one on the perplexity windows: ``kl`` (mean
    token KL(dense ‖ compressed), nats), ``top1`` (next-token argmax agreement), ``ppl_ratio``, each
    with a 95% bootstrap interval (``*_ci``), and ``windows``.
- ``agreement_chat``: the same on the dense model's greedy replies to held-out instructions, chat
    template applied, scored on the reply tokens only: ``kl``, ``top1``, ``conversations``, ``tokens``.
- ``timing``: where the seconds went: ``compress_s`` (the :func:`compression.compress` call),
    ``stages`` ({stage: seconds} inside it, see :mod:`compression.timing`), and from the pipeline
    ``calibration_text_s``, ``evaluation_s`` and ``calibration_forward_s`` (one plain dense forward over
    the same calibration tokens in the same process: the unit the compress time is measured in; null
    when not measured) with ``compress_per_forward`` = compress_s / calibration_forward_s.
- ``export``: how the saved folder stores the model (``format``: "native" or "remote_code", and why).

:meth:`Report.from_dict` (through :func:`compression.methods.validated_report`, which knows the method
names) validates all of this (types, the method name, the layer entries) and
raises :class:`ReportError` naming the field, never echoing the file's content.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Collection

MAX_LAYERS = 4096
MAX_VECTOR = 1 << 20  # longest list a report may hold (spectra, leverage scores)


class ReportError(ValueError):
    """A report of the wrong shape; the message names the field, not the offending content."""


@dataclass
class LayerReport:
    index: int
    removed: bool = False
    params_dense: int = 0
    params_compressed: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    leverage: dict[str, list] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    influence: float | None = None


@dataclass
class Report:
    method: str
    model: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    ratio_target: float | None = None
    params_dense: int = 0
    params_compressed: int = 0
    block_params_dense: int = 0
    block_params_compressed: int = 0
    ppl_dense: float | None = None
    ppl_compressed: float | None = None
    calibration_seconds: float = 0.0
    compress_seconds: float = 0.0
    block_influence: list[float] | None = None
    layers: list[LayerReport] = field(default_factory=list)
    heal: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    agreement_chat: dict[str, Any] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio_achieved(self) -> float:
        """Fraction of decoder-block parameters actually removed."""
        if not self.block_params_dense:
            return 0.0
        return 1.0 - self.block_params_compressed / self.block_params_dense

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        d = json.loads(json.dumps(d))  # a deep copy of plain data only
        d["layers"] = [asdict(layer) for layer in self.layers]
        d["ratio_achieved"] = self.ratio_achieved
        return d

    def save(self, path: str | Path) -> None:
        from .files import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, methods: Collection[str]) -> "Report":
        """A validated Report (``methods``: the method names allowed); :class:`ReportError` on anything
        of the wrong shape. :func:`compression.methods.validated_report` gives the registry's names."""
        d = validate(d, methods)
        d = {k: v for k, v in d.items() if k != "ratio_achieved"}
        layers = [LayerReport(**layer) for layer in d.pop("layers", [])]
        return cls(layers=layers, **d)

    @classmethod
    def load(cls, path: str | Path, methods: Collection[str]) -> "Report":
        from .files import read_json

        return cls.from_dict(read_json(Path(path)), methods)


# --- validation ------------------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _numbers(x, limit: int = MAX_VECTOR) -> bool:
    return isinstance(x, list) and len(x) <= limit and all(_is_number(v) for v in x)


def _table(x, ok) -> bool:
    """A dict with short string keys whose values all pass ``ok``."""
    return isinstance(x, dict) and len(x) <= 4096 and all(
        isinstance(k, str) and len(k) <= 64 and ok(v) for k, v in x.items())


def _leverage_value(v) -> bool:
    return isinstance(v, list) and len(v) <= MAX_VECTOR and all(
        _is_number(x) or _numbers(x) for x in v)


TOP_LEVEL = {  # field -> (check, what it must be)
    "model": (lambda x: isinstance(x, str) and len(x) <= 512, "a string of at most 512 characters"),
    "config": (lambda x: isinstance(x, dict), "an object"),
    "ratio_target": (lambda x: x is None or _is_number(x), "a number or null"),
    "params_dense": (_is_count, "a non-negative integer"),
    "params_compressed": (_is_count, "a non-negative integer"),
    "block_params_dense": (_is_count, "a non-negative integer"),
    "block_params_compressed": (_is_count, "a non-negative integer"),
    "ppl_dense": (lambda x: x is None or _is_number(x), "a number or null"),
    "ppl_compressed": (lambda x: x is None or _is_number(x), "a number or null"),
    "calibration_seconds": (_is_number, "a number"),
    "compress_seconds": (_is_number, "a number"),
    "block_influence": (lambda x: x is None or _numbers(x, MAX_LAYERS), "a list of numbers or null"),
    "layers": (lambda x: isinstance(x, list) and len(x) <= MAX_LAYERS, f"a list of at most {MAX_LAYERS}"),
    "heal": (lambda x: x is None or isinstance(x, dict), "an object or null"),
    "extra": (lambda x: isinstance(x, dict), "an object"),
    "calibration": (lambda x: isinstance(x, dict), "an object"),
    "warnings": (lambda x: isinstance(x, list) and len(x) <= 100
                 and all(isinstance(w, str) and len(w) <= 1000 for w in x), "a list of short strings"),
    "evaluation": (lambda x: isinstance(x, dict), "an object"),
    "export": (lambda x: isinstance(x, dict), "an object"),
    "agreement": (lambda x: isinstance(x, dict), "an object"),
    "agreement_chat": (lambda x: isinstance(x, dict), "an object"),
    "peak_memory_mb": (lambda x: x is None or _is_number(x), "a number or null"),
    "timing": (lambda x: _table(x, lambda v: v is None or _is_number(v) or _table(v, _is_number)),
               "an object of seconds (numbers, null, or an object of numbers)"),
    "ratio_achieved": (lambda x: x is None or _is_number(x), "a number or null"),
}
LAYER = {
    "index": (_is_count, "a non-negative integer"),
    "removed": (lambda x: isinstance(x, bool), "true or false"),
    "params_dense": (_is_count, "a non-negative integer"),
    "params_compressed": (_is_count, "a non-negative integer"),
    "sizes": (lambda x: _table(x, _is_count), "an object of non-negative integers"),
    "spectra": (lambda x: _table(x, _numbers), "an object of number lists"),
    "kept": (lambda x: _table(x, _is_count), "an object of non-negative integers"),
    "leverage": (lambda x: _table(x, _leverage_value), "an object of number lists"),
    "errors": (lambda x: _table(x, _is_number), "an object of numbers"),
    "influence": (lambda x: x is None or _is_number(x), "a number or null"),
}


def _check_fields(d: dict, schema: dict, where: str) -> None:
    unknown = len(set(d) - set(schema))
    if unknown:
        raise ReportError(f"{where} has {unknown} unknown field(s)")
    for name, value in d.items():
        ok, what = schema[name]
        if not ok(value):
            raise ReportError(f"{where}.{name} must be {what}")


def validate(d: Any, methods: Collection[str]) -> dict:
    """``d`` if it is a well-formed report dict of one of ``methods`` (the registry's names, which
    :func:`compression.methods.validated_report` passes), else :class:`ReportError` naming the field."""
    if not isinstance(d, dict):
        raise ReportError("a report must be a JSON object")
    if d.get("method") not in methods:
        raise ReportError(f"report.method must be one of {', '.join(methods)}")
    _check_fields({k: v for k, v in d.items() if k != "method"}, TOP_LEVEL, "report")
    for i, layer in enumerate(d.get("layers", [])):
        if not isinstance(layer, dict) or "index" not in layer:
            raise ReportError(f"report.layers[{i}] must be an object with an index")
        _check_fields(layer, LAYER, f"report.layers[{i}]")
    return d
