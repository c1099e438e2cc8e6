"""Running a model block by block on calibration tokens, and float64 statistics of activations.

``capture_block_inputs`` runs only the embeddings: the block list is swapped for a single module that
records what the first block would have received (hidden states and the keyword arguments the base
model passes: masks, rotary tables, positions) and returns it unchanged. Methods then push those
inputs through one block at a time (:func:`run_block`), so statistics stream per block and only one
block's activations are held at once.

Statistics precision (:class:`Gram`): ``"float64"`` accumulates XᵀX in float64 throughout;
``"mixed"`` forms each batch's XᵀX in float32 and adds the batches up in float64 (a batch is a few
thousand rows, so the float32 part loses ~1e-6 relative; the float64 adds are O(d²) per batch). Float64
matmuls run at 1/32–1/64 of the float32 rate on consumer GPUs, so ``"auto"`` picks by device
(:func:`precision_for`): float64 on GPUs with full-rate float64, mixed elsewhere, the CPU included
(there the float32 products run through BLAS syrk at 2× the float64 rate; MoDeGPT and Olica at 0.25
on SmolLM2-135M, 64 × 512 tokens, gave the same wiki perplexity to 7 digits in both precisions).
:func:`statistics_precision` sets the mode for the statistics taken inside it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ModelView
from .ops import relative_error
from .timing import stage

CAPTURED_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


@dataclass
class BlockInputs:
    """Per calibration batch: the first block's hidden states (b, T, d) and, per layer, the block
    keyword arguments (layers can differ: sliding-window masks, local vs global rotary tables)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    layer_kwargs: list[list[dict]] = field(default_factory=list)  # [layer][batch]

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def kwargs(self) -> list[dict]:
        """The first block's keyword arguments per batch."""
        return self.layer_kwargs[0]

    def kwargs_for(self, layer: int) -> list[dict]:
        return self.layer_kwargs[layer] if layer < len(self.layer_kwargs) else self.layer_kwargs[0]

    def head(self, batches: int) -> "BlockInputs":
        """The first ``batches`` batches (hidden states cloned)."""
        return BlockInputs([h.clone() for h in self.hidden[:batches]],
                           [kw[:batches] for kw in self.layer_kwargs])


class _Recorder(nn.Module):
    """Stands in for block ``index`` during capture: records its keyword arguments (and, for block 0,
    its hidden states) and returns the hidden states unchanged."""

    def __init__(self, sink: BlockInputs, index: int):
        super().__init__()
        self.sink, self.index = sink, index

    def forward(self, hidden_states, **kwargs):
        if self.index == 0:
            self.sink.hidden.append(hidden_states)
        self.sink.layer_kwargs[self.index].append({k: kwargs.get(k) for k in CAPTURED_KWARGS})
        return hidden_states


@contextmanager
def _blocks_replaced(mv: ModelView, modules: list[nn.Module]):
    decoder = mv.decoder
    layers = decoder.layers
    decoder.layers = nn.ModuleList(modules)
    try:
        yield
    finally:
        decoder.layers = layers


@torch.no_grad()
def capture_block_inputs(mv: ModelView, tokens: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Inputs of the first block, and every block's keyword arguments, for ``tokens`` (N, T), in
    batches of ``batch_size`` sequences (one pass through the embeddings only)."""
    n = len(mv.layers)
    sink = BlockInputs(layer_kwargs=[[] for _ in range(n)])
    with _blocks_replaced(mv, [_Recorder(sink, i) for i in range(n)]):
        for start in range(0, tokens.shape[0], batch_size):
            mv.decoder(tokens[start:start + batch_size].to(mv.device), use_cache=False)
    return sink


@torch.no_grad()
def run_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch."""
    return [block(h, use_cache=False, **kw) for h, kw in zip(hidden, kwargs)]


PRECISIONS = ("auto", "float64", "mixed")
# CUDA compute capabilities with full-rate float64 (1/2 of float32): P100, V100, A100, H100/H200, B200.
# Consumer and workstation parts (6.1, 7.5, 8.6, 8.9, 12.x), Jetson (8.7) and B300 (10.3) run it at
# 1/32–1/64 or less.
FAST_FLOAT64_CUDA = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
FAST_FLOAT64_ROCM = ("gfx90a", "gfx94", "gfx95")  # MI200, MI300, MI350
_PRECISION: ContextVar[str] = ContextVar("statistics_precision", default="auto")


def precision_for_gpu(capability: tuple[int, int], arch_name: str | None = None) -> str:
    """"float64" on a GPU whose float64 runs at full rate, else "mixed"; ``capability`` is CUDA's
    (major, minor), ``arch_name`` ROCm's gcnArchName when the build is ROCm."""
    if arch_name:
        return "float64" if arch_name.startswith(FAST_FLOAT64_ROCM) else "mixed"
    return "float64" if tuple(capability) in FAST_FLOAT64_CUDA else "mixed"


def precision_for(device: torch.device | str) -> str:
    """The statistics precision ``"auto"`` means on ``device``: mixed on the CPU, float64 on other
    non-CUDA devices, by :func:`precision_for_gpu` on a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return "mixed"
    if device.type != "cuda":
        return "float64"
    props = torch.cuda.get_device_properties(device)
    arch = getattr(props, "gcnArchName", None) if torch.version.hip else None
    return precision_for_gpu((props.major, props.minor), arch)


def resolve_precision(mode: str | None, device: torch.device | str) -> str:
    """``mode`` ("auto", "float64", "mixed"; None: the one set by :func:`statistics_precision`) as
    "float64" or "mixed" on ``device``."""
    mode = mode or _PRECISION.get()
    if mode not in PRECISIONS:
        raise ValueError(f"statistics precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
    return precision_for(device) if mode == "auto" else mode


@contextmanager
def statistics_precision(mode: str | None):
    """Statistics (:class:`Gram`) created inside use ``mode`` (None or "auto": by device). Scoped to
    the current thread or task (a context variable), so concurrent jobs do not see each other's."""
    resolve_precision(mode or "auto", "cpu")  # validate early
    token = _PRECISION.set(mode or "auto")
    try:
        yield
    finally:
        _PRECISION.reset(token)


class Gram:
    """Accumulates XᵀX (in float64) and the token count over batches of rows X (..., d).

    precision: "float64" (each batch's product in float64), "mixed" (each batch's product in float32,
    accumulated in float64) or "auto"/None (see :func:`resolve_precision`)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", precision: str | None = None):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0
        self.precision = resolve_precision(precision, self.xtx.device)
        self._triangle = False  # on the CPU only the lower triangle is accumulated (see add)

    def add(self, x: torch.Tensor) -> None:
        with stage("statistics"):
            x = x.reshape(-1, x.shape[-1])                              # (n, d)
            if self.xtx.device.type == "cpu":  # one triangle by BLAS syrk
                _syrk_lower(self.xtx, x.to(torch.float32 if self.precision == "mixed" else torch.float64))
                self._triangle = True
            elif self.precision == "mixed":
                x = x.to(self.xtx.device, torch.float32)
                self.xtx += (x.T @ x).double()                          # (d, d) fp32 product
            else:
                x = x.to(self.xtx.device, torch.float64)
                self.xtx.addmm_(x.T, x)                                 # in place: no (d, d) temporary
            self.count += x.shape[0]

    @classmethod
    def of(cls, batches: list[torch.Tensor]) -> "Gram":
        """The Gram matrix of all rows of ``batches`` (each (..., d)), on the first batch's device."""
        gram = cls(batches[0].shape[-1], batches[0].device)
        for x in batches:
            gram.add(x)
        return gram

    @property
    def mean(self) -> torch.Tensor:
        """XᵀX / n: the uncentred correlation."""
        if self._triangle:  # mirror the accumulated lower triangle once
            self.xtx = self.xtx.tril() + self.xtx.tril(-1).T
            self._triangle = False
        return self.xtx / max(self.count, 1)


def _syrk_lower(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xᵀx on its lower triangle only (BLAS syrk: half the flops of a matmul, 2× faster than
    ``addmm_`` in float64 on the CPU). acc: (d, d) float64, C-contiguous; x: (n, d), float64 (added
    in place) or float32 (the product in float32, then added in float64: the "mixed" precision).

    In Fortran order the C-ordered acc is accᵀ and x is xᵀ, so syrk's upper triangle of (xᵀ)(xᵀ)ᵀ is
    acc's lower triangle; the other triangle is left untouched (zero in a float32 product)."""
    from scipy.linalg.blas import dsyrk, ssyrk

    a = x.detach().contiguous().numpy()         # (n, d) C-order = (d, n) Fortran order
    c = acc.numpy().T                           # (d, d) Fortran-order view of acc's memory
    if x.dtype == torch.float32:
        c += ssyrk(1.0, a.T, trans=0, lower=0)
        return
    out = dsyrk(1.0, a.T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
    if not (out.ctypes.data == c.ctypes.data):  # the binding copied: write the result back
        acc.copy_(torch.from_numpy(out.T))


@contextmanager
def record_inputs(modules: dict[str, nn.Module]):
    """Accumulate the Gram matrix of each named module's input while the context is open.

    Yields ``{name: Gram}``; hooks are removed on exit.
    """
    grams: dict[str, Gram] = {}
    handles = []

    def hook_for(name):
        def hook(module, args):
            x = args[0]
            if name not in grams:
                grams[name] = Gram(x.shape[-1], x.device)
            grams[name].add(x)
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()


def cosine_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 − cos(x_in, x_out) and the token count (Block Influence, ShortGPT)."""
    a = x_in.reshape(-1, x_in.shape[-1]).double()
    b = x_out.reshape(-1, x_out.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((1.0 - cos).sum()), a.shape[0]


@torch.no_grad()
def block_influence(mv: ModelView, inputs: BlockInputs, progress=None) -> list[float]:
    """Block Influence of every block: 1 − mean cosine between its input and output hidden states.

    Runs the dense model block by block over the calibration inputs (one forward pass in total).
    """
    scores = []
    hidden = inputs.hidden
    blocks = mv.layers
    for i, block in enumerate(blocks):
        outputs = run_block(block, hidden, inputs.kwargs_for(i))
        total, count = 0.0, 0
        for x_in, x_out in zip(hidden, outputs):
            s, n = cosine_influence(x_in, x_out)
            total, count = total + s, count + n
        scores.append(total / count)
        hidden = outputs
        if progress:
            progress((i + 1) / len(blocks), f"block influence {i + 1}/{len(blocks)}")
    return scores


IN_SAMPLE_BATCHES = 2  # calibration batches that stand in for held-out ones when none are given


def dense_block_influence(model, tokens: torch.Tensor, batch_size: int = 8) -> list[float]:
    """The dense model's Block Influence on ``tokens``, as MoDeGPT and Olica measure it (on the
    compressed-format copy, in batches of ``batch_size``): for shipping and checking cached values."""
    from .arch import view
    from .modeling import to_compressed

    mv = view(to_compressed(model))
    return block_influence(mv, capture_block_inputs(mv, tokens, batch_size))


class Probe:
    """Where per-module reconstruction errors are measured, apart from the fitted statistics.

    With held-out batches (preferred) they are pushed through every block beside the calibration
    stream and never enter a Gram matrix, so an error cannot look small just because the fit saw
    the same tokens. Without them the first calibration batches are used and the report says so.
    Call order per block: ``attention`` (before the rewrite), ``attention_error`` (after),
    ``mlp`` (before), ``mlp_error`` (after); the probe stream then moves on to the next block.
    """

    def __init__(self, held_out: BlockInputs | None):
        self.inputs = held_out
        self.hidden = None if held_out is None else held_out.hidden
        self.mid: list[torch.Tensor] | None = None
        self.mlp_new: list[torch.Tensor] | None = None
        self.mlp_in: list[torch.Tensor] | None = None  # the MLP's normalised probe inputs
        self._z: list[torch.Tensor] | None = None  # the dense MLP's probe activations, until its error
        self.where = "calibration (in-sample)" if held_out is None else "held-out"
        # Calibration batches whose dense outputs the methods must keep for in-sample errors.
        self.dense_batches = IN_SAMPLE_BATCHES if held_out is None else 0

    def attention(self, layer) -> list[torch.Tensor] | None:
        if self.hidden is None:
            return None
        kwargs = self.inputs.kwargs_for(layer.self_attn.layer_idx)
        with stage("errors"):
            return [layer.attention_out(h, k) for h, k in zip(self.hidden, kwargs)]

    def attention_error(self, layer, dense_probe, new_fit, dense_fit) -> float:
        with stage("errors"):
            if dense_probe is None:
                return _error(new_fit[:IN_SAMPLE_BATCHES], dense_fit[:IN_SAMPLE_BATCHES])
            new = self.attention(layer)
            self.mid = [h + a for h, a in zip(self.hidden, new)]
            return _error(new, dense_probe)

    def mlp(self, layer) -> list[torch.Tensor] | None:
        """The dense MLP's outputs on the probe; its normalised inputs and activations are kept
        (``mlp_in``, for :meth:`mlp_error`'s ``kept`` and Olica's moments)."""
        if self.mid is None:
            return None
        with stage("errors"):
            self.mlp_in, self._z = _mlp_activations(layer, self.mid)
            return _mlp_outputs(layer, self.mlp_in, self._z)

    def mlp_error(self, layer, dense_probe, new_fit, dense_fit, kept: torch.Tensor | None = None) -> float:
        """kept: the MLP was only cut to these channels (gate/up rows as they were), so its new output
        is the new down_proj on the kept channels of the dense activations: gate/up do not run again."""
        with stage("errors"):
            if dense_probe is None:
                return _error(new_fit[:IN_SAMPLE_BATCHES], dense_fit[:IN_SAMPLE_BATCHES])
            if kept is None:
                self.mlp_in, self._z = _mlp_activations(layer, self.mid)
            self.mlp_new = _mlp_outputs(layer, self.mlp_in, self._z, kept)  # Olica's moments reuse these
            self._z = None
            self.hidden = [x + m for x, m in zip(self.mid, self.mlp_new)]
            return _error(self.mlp_new, dense_probe)


def mlp_activations(layer, mid: list[torch.Tensor]) -> tuple[list, list]:
    """(normalised MLP inputs h, intermediate activations z) of ``layer`` for every calibration batch:
    the MoDeGPT and Olica statistics come from these, and a cut MLP's output from z's kept channels
    (:func:`mlp_outputs`), so gate/up run once per block."""
    with stage("forwards"):
        return _mlp_activations(layer, mid)


def mlp_outputs(layer, h: list, z: list, index: torch.Tensor | None = None) -> list[torch.Tensor]:
    """What ``layer``'s MLP adds to the stream, from :func:`mlp_activations`' (h, z); ``index``: the
    channels the MLP was cut to (z's other channels are skipped)."""
    with stage("forwards"):
        return _mlp_outputs(layer, h, z, index)


def _mlp_activations(layer, mid: list) -> tuple[list, list]:  # untimed: the caller names the stage
    h = [layer.post_attention_layernorm(x) for x in mid]
    return h, [layer.mlp.inner(x) for x in h]


def _mlp_outputs(layer, h: list, z: list, index: torch.Tensor | None = None) -> list[torch.Tensor]:
    if index is not None:
        z = [b[..., index.to(b.device)] for b in z]
    return [layer.mlp_finish(a, b) for a, b in zip(h, z)]


def _error(new: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    return relative_error(torch.cat(new), torch.cat(dense))


@dataclass
class Sequential:
    """What the per-block methods start from (see :func:`prepare_sequential`)."""

    model: nn.Module
    view: ModelView
    inputs: BlockInputs
    probe: Probe
    influence: list[float] | None
    sparsity: list[float]
    seconds: float


def prepare_sequential(model, config, calibration, held_out, progress,
                       influence: list[float] | None = None) -> Sequential:
    """Shared set-up of the per-block methods (MoDeGPT, Olica): convert to the compressed format,
    capture the first block's inputs for the calibration and held-out tokens and plan per-layer
    sparsity (Block Influence only when the allocation needs it; ``influence``: the dense model's,
    already measured on these calibration tokens, saves that dense pass)."""
    import time

    from .arch import view
    from .modeling import to_compressed

    with stage("copy"):
        model = to_compressed(model)
    mv = view(model)
    t0 = time.perf_counter()
    progress(0.0, "calibration: capturing block inputs")
    with stage("capture"):
        inputs = capture_block_inputs(mv, calibration, config.batch_size)
        probe = Probe(None if held_out is None else capture_block_inputs(mv, held_out, config.batch_size))
        if config.allocation != "auto":
            influence = None
        elif influence is None or len(influence) != len(mv.layers):
            influence = block_influence(mv, inputs, lambda f, m: progress(0.2 * f, m))
        else:
            influence = list(influence)
    sparsity = config.sparsities(len(mv.layers), influence)
    return Sequential(model, mv, inputs, probe, influence, sparsity, time.perf_counter() - t0)
