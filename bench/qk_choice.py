"""Which query-key compression for Olica under RoPE: whole rotary pairs or activation-weighted low rank?

For a few blocks of the real model, at the same parameter budget for q_proj + k_proj, compare the
relative error of the attention output (value/output projections left dense) on calibration inputs:
  pairs:    keep the top rotary pairs per kv group (CR scores, what Olica and MoDeGPT use here);
  low rank: W ≈ A B minimising ‖X(W − AB)‖ for q_proj and k_proj separately (RoPE applied after).

    .venv/bin/python -m bench.qk_choice [--layers 0,7,15,22,29] [--keep 0.75] [--samples 8]
"""
import argparse
import copy
import json

import torch


from compression.arch import view
from compression.calibration import capture_block_inputs, record_inputs, run_block
from compression.data import TextSpec
from compression.modeling import to_compressed
from compression.models import load_model
from compression.olica import weighted_low_rank
from compression.ops import relative_error, set_linear
from compression.rewrite import keep_rotary_pairs


def low_rank_linear(linear, gram, keep: float) -> int:
    """Replace W (out, in) by its input-weighted rank-r reconstruction with r·(in+out) = keep·in·out."""
    out_f, in_f = linear.weight.shape
    rank = int(keep * in_f * out_f / (in_f + out_f))
    a, b = weighted_low_rank(linear.weight.double().T, gram, rank)  # W^T (in, out) ≈ A B
    set_linear(linear, (a @ b).T)
    return rank


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,7,15,22,29")
    ap.add_argument("--keep", type=float, default=0.75)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    model = to_compressed(model)
    mv = view(model)
    inputs = capture_block_inputs(mv, TextSpec(args.samples, 512).batches(tok))
    wanted = {int(x) for x in args.layers.split(",")}
    hidden, rows = inputs.hidden, []
    for i, layer in enumerate(mv.layers):
        if i in wanted:
            with record_inputs({"x": layer.self_attn.q_proj}) as grams:
                dense = [layer.attention_out(h, k) for h, k in zip(hidden, inputs.kwargs)]
            gram = grams["x"].mean
            row = {"layer": i}
            pairs = copy.deepcopy(layer)
            hd = pairs.self_attn.head_dim
            keep_rotary_pairs(pairs.self_attn, gram, round(args.keep * hd / 2))
            out = [pairs.attention_out(h, k) for h, k in zip(hidden, inputs.kwargs)]
            row["pairs"] = relative_error(torch.cat(out), torch.cat(dense))
            lowrank = copy.deepcopy(layer)
            ranks = [low_rank_linear(lowrank.self_attn.q_proj, gram, args.keep),
                     low_rank_linear(lowrank.self_attn.k_proj, gram, args.keep)]
            out = [lowrank.attention_out(h, k) for h, k in zip(hidden, inputs.kwargs)]
            row["low_rank"] = relative_error(torch.cat(out), torch.cat(dense))
            row["ranks_qk"] = ranks
            rows.append(row)
            print(json.dumps(row), flush=True)
        if i >= max(wanted):
            break
        hidden = run_block(layer, hidden, inputs.kwargs_for(i))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("pairs", "low_rank")}
    print(json.dumps({"keep": args.keep, "mean": mean}))


if __name__ == "__main__":
    main()
