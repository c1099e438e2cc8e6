"""Form values -> method configs, and the controls for every method option, from the knob metadata.

The Compress tab lays out its own controls for what every method shares (the target, the allocation
over layers with its per-layer editor, ε, the calibration batch), their ranges and help read from the
shared knobs' declarations (:data:`RATIO`, :data:`PER_LAYER`, ...); every other knob of a method's config
becomes a control in that method's option group automatically (:func:`option_knobs`), and reaches the
handler as ``<method>_<knob>``. Each method turns the values into its config (``Method.from_form``).
Adding a knob to a method is one field in its config.
"""
from __future__ import annotations

from compression.knobs import Knob, knobs, parse_list
from compression.methods import METHODS, get
from compression.plan import FormInput, LayerwiseConfig

# Knobs with their own hand-made controls in the Compress tab.
CORE = ("ratio", "allocation", "epsilon", "layer_sparsity", "widths", "layers", "slicing", "batch_size")
ALLOCATION_LABELS = {"uniform": "uniform", "auto": "automatic", "manual": "manual"}
REACH_TOLERANCE = 0.02  # a plan removing this much less than the target counts as unreachable


def core_knob(name: str) -> Knob:
    """The declaration behind one of the shared controls (its range, label and help)."""
    return next(k for k in knobs(LayerwiseConfig) if k.name == name)


RATIO, PER_LAYER, EPSILON, BATCH = (core_knob(n) for n in ("ratio", "layer_sparsity", "epsilon", "batch_size"))


def option_knobs() -> list[tuple[str, Knob]]:
    """(method name, knob) for every knob without a hand-made control, in registry order."""
    return [(m.name, k) for m in METHODS.values() for k in m.knobs() if k.name not in CORE]


def option_param(method: str, k: Knob) -> str:
    return f"{method}_{k.name}"


def allocation_value(value: str | None) -> str:
    """Accept the labels shown ("automatic") as well as the values."""
    return {"automatic": "auto"}.get(value or "", value or "")


def make_config(method: str, ratio: float, allocation: str, per_layer, *, num_layers: int,
                hidden_size: int, slicing: bool = False, epsilon: float = 0.1, batch_size: int = 8,
                options: dict | None = None):
    """The method config for form values; ValueError with a readable message on bad input.

    per_layer (manual allocation): what the method's per-layer editor holds (``Method.per_layer``): the
    indices of the blocks to drop, or one fraction per layer. The method's own ``from_form`` turns the
    values into its config. options: ``{"<method>_<knob>": value}`` from the option controls (others'
    options are ignored).
    """
    m = get(method)
    allocation = allocation_value(allocation)
    if allocation not in m.allocations:
        shown = " / ".join(ALLOCATION_LABELS[a] for a in m.allocations)
        raise ValueError(f"{m.label} supports allocation {shown}, not {allocation!r}")
    values = {k.name: option_value(k, (options or {}).get(option_param(method, k))) for k in m.knobs()
              if k.name not in CORE}
    values["batch_size"] = batch_size
    per = None
    if allocation == "manual":
        per = _block_indices(per_layer) if m.per_layer == "blocks" else _per_layer_values(per_layer, num_layers)
    return m.from_form(FormInput(values, ratio, allocation, per, slicing=slicing, epsilon=epsilon,
                                 hidden_size=hidden_size, num_layers=num_layers))


def option_value(k: Knob, value):
    """An option control's value for ``k``: an optional number's text box (empty: automatic, None)
    gives a number; anything else is passed on as it is (the knob checks it)."""
    if not (isinstance(value, str) and k.kind in ("float", "int")):
        return value
    if not value.strip():
        return None if k.optional else value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{k.label} must be a number{' or empty (automatic)' if k.optional else ''}, "
                         f"got {value[:40]!r}") from None


def _block_indices(per_layer) -> tuple[int, ...]:
    return parse_list(per_layer or "", int, "the blocks to drop") if isinstance(per_layer, str) \
        else tuple(per_layer or ())


def _per_layer_values(per_layer, num_layers: int) -> tuple[float, ...]:
    values = parse_list(per_layer or "", float, "the per-layer values") if isinstance(per_layer, str) \
        else tuple(float(v) for v in per_layer or ())
    if len(values) != num_layers:
        raise ValueError(f"manual allocation needs {num_layers} per-layer values, got {len(values)}")
    return values


def target_of(config) -> float | None:
    """The parameter ratio a config promises (None when sizes were given per layer)."""
    if getattr(config, "layers", None) is not None or getattr(config, "widths", None) is not None:
        return None
    if getattr(config, "allocation", None) == "manual":
        return None
    return getattr(config, "ratio", None)


def forecast_numbers(store, name: str, config) -> dict:
    """forecast() on the weightless skeleton plus sizes; ValueError if the target is out of reach."""
    from compression.forecast import forecast

    info = store.info(name)
    fc = dict(forecast(info.skeleton, config))
    fc["params_dense"] = info.params
    fc["bytes"] = fc["params"] * store.bytes_per_param()
    fc["bytes_dense"] = info.params * store.bytes_per_param()
    target = target_of(config)
    if target is not None and fc["ratio"] < target - REACH_TOLERANCE:
        raise ValueError(f"{name} cannot reach a ratio of {target:.0%} with {get_label(config)}: the "
                         f"closest plan removes {fc['ratio']:.1%} of the block parameters")
    return fc


def get_label(config) -> str:
    from compression.methods import method_for

    return method_for(config).label


# --- the per-layer editor: sliders (or checkboxes) <-> the text field, and presets ---------------
MAX_LAYER_VALUE = PER_LAYER.high  # the library's ceiling for one layer's sparsity (and slicing fraction)
MAX_SLIDERS = 64  # deeper models are edited in the text field alone
PRESETS = ("uniform", "automatic (Block Influence)", "spare first/last k")


def slider_values(text: str, num_layers: int) -> list[float] | None:
    """The per-layer values in ``text`` when they fit ``num_layers`` sliders, else None."""
    try:
        values = [float(v) for v in parse_list(text or "", float, "values")]
    except ValueError:
        return None
    ok = len(values) == num_layers and all(0.0 <= v <= MAX_LAYER_VALUE for v in values)
    return values if ok else None


def drop_indices(text: str, num_layers: int) -> list[int]:
    """The block indices in ``text`` that exist (an unreadable text picks none)."""
    try:
        return sorted({v for v in parse_list(text or "", int, "blocks") if 0 <= v < num_layers})
    except ValueError:
        return []


def values_text(values) -> str:
    return ",".join(f"{float(v):.2f}" for v in values)


def indices_text(indices) -> str:
    return ",".join(str(int(i)) for i in sorted(indices or ()))


def spared(num_layers: int, k: int) -> set[int]:
    """The first and last ``k`` layers; ValueError when that leaves none to compress."""
    if not 0 <= k or 2 * k >= num_layers:
        raise ValueError(f"spare first/last k needs 0 ≤ k < {num_layers / 2:g} for {num_layers} layers")
    return set(range(k)) | set(range(num_layers - k, num_layers))


def preset_values(preset: str, num_layers: int, mean: float, k: int = 2, influence=None,
                  epsilon: float = 0.1) -> list[float]:
    """Per-layer sparsities averaging ``mean``: the same everywhere, by Block Influence (the
    library's entropic allocation, as automatic allocation does), or 0 on the first and last ``k``
    layers and the rest spread evenly over the others."""
    from compression.plan import entropic_allocation

    if preset == "uniform":
        return [mean] * num_layers
    if preset == "automatic (Block Influence)":
        return entropic_allocation(list(influence), mean, epsilon)
    if preset == "spare first/last k":
        keep = spared(num_layers, k)
        each = mean * num_layers / (num_layers - len(keep))
        if each > MAX_LAYER_VALUE:
            raise ValueError(f"sparing {len(keep)} layers leaves {each:.0%} for each other layer "
                             f"(at most {MAX_LAYER_VALUE:.0%}): lower the mean or k")
        return [0.0 if i in keep else each for i in range(num_layers)]
    raise ValueError(f"preset must be one of: {', '.join(PRESETS)}")


def preset_drops(preset: str, ratio: float, k: int, influence, block_sizes: list[int]) -> list[int]:
    """Blocks to drop for layer dropping: the lowest-influence ones reaching ``ratio`` (the library's
    choice), optionally never the first and last ``k``."""
    from compression.layerdrop import layers_to_drop

    if preset == "uniform":
        raise ValueError("layer dropping removes whole blocks: pick automatic or spare first/last k")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of: {', '.join(PRESETS)}")
    keep = spared(len(block_sizes), k) if preset == "spare first/last k" else set()
    top = max(influence) + 1.0
    chosen = layers_to_drop([top if i in keep else s for i, s in enumerate(influence)], block_sizes, ratio)
    if keep & set(chosen):
        raise ValueError(f"a ratio of {ratio:.0%} needs blocks among the first/last {k}: lower the ratio or k")
    return sorted(chosen)
