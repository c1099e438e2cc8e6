"""Method names -> config dataclasses, for the CLI and the app (the library takes configs directly)."""
from __future__ import annotations

import argparse

from .layerdrop import LayerDropConfig
from .slicegpt import SliceGPTConfig

METHODS = ("layerdrop", "slicegpt")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default=None,
                   help="layerdrop: comma-separated block indices to drop (instead of --ratio)")
    p.add_argument("--slicing", type=float, default=None,
                   help="slicegpt: fraction of hidden dimensions deleted (the paper's knob)")
    p.add_argument("--widths", default=None,
                   help="slicegpt: comma-separated kept width per layer (instead of --ratio)")


def _int_list(text: str | None):
    return None if not text else tuple(int(x) for x in text.split(",") if x.strip())


def config_from_args(args):
    """The method config for parsed CLI arguments; raises ValueError on bad values."""
    if args.method == "layerdrop":
        layers = _int_list(args.layers)
        if layers is None and args.ratio is None:
            raise ValueError("layerdrop needs --ratio or --layers")
        return LayerDropConfig(ratio=args.ratio, layers=layers)
    if args.method == "slicegpt":
        return SliceGPTConfig(slicing=args.slicing, ratio=args.ratio, widths=_int_list(args.widths),
                              batch_size=args.calib_batch)
    raise ValueError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
