"""The Report: everything a compression run measured, JSON-serialisable.

The app, the CLI and the benchmarks read only this (never the model) to draw plots and tables, so a
saved ``report.json`` reproduces every figure of a run.

Schema of ``Report.to_dict()`` (all plain numbers, lists and dicts):

- ``method``: "layerdrop" | "slicegpt" | "modegpt" | "olica" | "dense"
- ``model``: model name or folder; ``config``: the method config as a dict
- ``ratio_target``: fraction of decoder-block parameters to remove (None when given as widths)
- ``params_dense`` / ``params_compressed``: all parameters, tied weights counted once
- ``block_params_dense`` / ``block_params_compressed``: decoder blocks only
- ``ppl_dense`` / ``ppl_compressed``: wiki perplexity (None when not evaluated)
- ``calibration_seconds`` / ``compress_seconds``
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
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


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
    # The compressed model object itself (not serialised): methods may return a new wrapper module.
    compressed: Any = field(default=None, repr=False, compare=False)

    @property
    def ratio_achieved(self) -> float:
        """Fraction of decoder-block parameters actually removed."""
        if not self.block_params_dense:
            return 0.0
        return 1.0 - self.block_params_compressed / self.block_params_dense

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("compressed", "layers")}
        d = json.loads(json.dumps(d))  # a deep copy of plain data only
        d["layers"] = [asdict(layer) for layer in self.layers]
        d["ratio_achieved"] = self.ratio_achieved
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        d = {k: v for k, v in d.items() if k not in ("ratio_achieved", "compressed")}
        layers = [LayerReport(**layer) for layer in d.pop("layers", [])]
        return cls(layers=layers, **d)

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text()))
