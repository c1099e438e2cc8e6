"""Method names -> config dataclasses, for the CLI and the app (the library takes configs directly)."""
from __future__ import annotations

import argparse

from .layerdrop import LayerDropConfig
from .modegpt import MoDeGPTConfig
from .olica import OlicaConfig
from .plan import Allocation
from .slicegpt import SliceGPTConfig

METHODS = ("layerdrop", "slicegpt", "modegpt", "olica")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default=None,
                   help="layerdrop: comma-separated block indices to drop (instead of --ratio)")
    p.add_argument("--slicing", type=float, default=None,
                   help="slicegpt: fraction of hidden dimensions deleted (the paper's knob)")
    p.add_argument("--widths", default=None,
                   help="slicegpt: comma-separated kept width per layer (instead of --ratio)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "auto", "manual"),
                   help="modegpt/olica: spread of sparsity over layers")
    p.add_argument("--epsilon", type=float, default=Allocation.epsilon,
                   help="modegpt/olica: softmax temperature of automatic allocation")
    p.add_argument("--layer-sparsity", default=None,
                   help="modegpt/olica: comma-separated per-layer sparsities (allocation manual)")
    p.add_argument("--ridge", type=float, default=None,
                   help="modegpt: leverage-score λ / olica: calibration ridge (relative)")
    p.add_argument("--attn-share", type=float, default=OlicaConfig.attn_share,
                   help="olica: attention sparsity relative to the layer's")
    p.add_argument("--calibrate-layers", type=int, default=OlicaConfig.calibrate_layers,
                   help="olica: layers that get a linear-calibration branch (0: off)")
    p.add_argument("--calibrate-rank", type=int, default=OlicaConfig.calibrate_rank,
                   help="olica: rank of each calibration branch")


def _list(text: str | None, kind=int):
    return None if not text else tuple(kind(x) for x in text.split(",") if x.strip())


def allocation_from_args(args) -> Allocation:
    return Allocation(kind=args.allocation, epsilon=args.epsilon,
                      per_layer=_list(args.layer_sparsity, float))


def config_from_args(args):
    """The method config for parsed CLI arguments; raises ValueError on bad values."""
    if args.method == "layerdrop":
        layers = _list(args.layers)
        if layers is None and args.ratio is None:
            raise ValueError("layerdrop needs --ratio or --layers")
        return LayerDropConfig(ratio=args.ratio, layers=layers)
    if args.method == "slicegpt":
        return SliceGPTConfig(slicing=args.slicing, ratio=args.ratio, widths=_list(args.widths),
                              batch_size=args.calib_batch)
    if args.ratio is None:
        raise ValueError(f"{args.method} needs --ratio")
    if args.method == "modegpt":
        extra = {} if args.ridge is None else {"ridge": args.ridge}
        return MoDeGPTConfig(ratio=args.ratio, allocation=allocation_from_args(args),
                             batch_size=args.calib_batch, **extra)
    if args.method == "olica":
        extra = {} if args.ridge is None else {"ridge": args.ridge}
        return OlicaConfig(ratio=args.ratio, allocation=allocation_from_args(args),
                           attn_share=args.attn_share, calibrate_layers=args.calibrate_layers,
                           calibrate_rank=args.calibrate_rank, batch_size=args.calib_batch, **extra)
    raise ValueError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
