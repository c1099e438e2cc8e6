"""Recovery training ("healing") of a compressed model: a short causal-LM fine-tune on calibration text.

LayerChop (Jha et al., "Just CHOP", arXiv 2305.14864) drops layers and then continues self-supervised
pretraining of what is left; SliceGPT offers a similar recovery fine-tune. :func:`heal` does this for
any model our methods produce (a layer-dropped HF model or a :class:`CompressedForCausalLM`):

- data: consecutive, non-overlapping ``seq_len``-token chunks of the wiki *calibration* split (or a
  given text), starting ``offset`` tokens in and wrapping round to ``offset`` when the budget is larger
  than the text (never back into the skipped prefix). Deterministic; the evaluation split is never read,
  and a custom text that contains evaluation articles is refused.
- optimiser: AdamW, linear warm-up then cosine decay to ``min_lr_frac · lr``, gradient accumulation,
  gradient-norm clipping; next-token cross-entropy (the perplexity protocol's NLL).
- full-parameter (``lora_rank = 0``: every parameter trains, fp32 master weights for half-precision
  models) or LoRA through ``peft`` on the linear layers named in ``lora_targets``, merged back into the
  weights at the end, so the model keeps exactly its parameter names and shapes and saves/loads as
  before.
- device: trains where the model is; bf16 autocast only on CUDA. No checkpoints are written: the model
  is changed in place and comes back in eval mode, same device and dtype, with ``requires_grad`` off.

The budget is in tokens: ``steps = max(1, tokens // (seq_len · batch_size · grad_accum))``; the record's
``tokens`` is what was actually trained on (``steps · seq_len · batch_size · grad_accum``).

Every size has an upper bound checked before any work (the app's ``/heal`` takes them from anyone):
:data:`LIMITS` on construction of :class:`HealConfig`, and :func:`check_fits` against the model (the
sequence length within its context, the LoRA rank within the smallest targeted layer's dimensions).
The training sequences are taken chunk by chunk, so memory does not grow with the token budget.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import CalibrationError, tokenize, wiki_articles, wiki_split

Progress = Callable[[float, str], None]
OnStep = Callable[[int, int, float], None]  # (step, tokens so far, loss of the step)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3}
MAX_STEPS = 100_000  # optimizer steps: the record keeps a loss, a learning rate and a count per step
LIMITS = {  # integer setting -> (lowest, highest) allowed
    "tokens": (1, 1 << 32),          # about 4.3 billion tokens
    "seq_len": (2, 32_768),          # and at most the model's context (check_fits)
    "batch_size": (1, 1024),
    "grad_accum": (1, 1024),
    "lora_rank": (0, 4096),          # and at most the smallest targeted layer's dimension (check_fits)
    "offset": (0, 1 << 40),
}


@dataclass
class HealConfig:
    """Recovery-training settings (validated on construction).

    tokens: training budget in tokens (see the module docstring for the exact step count).
    seq_len, batch_size, grad_accum: sequence length, sequences per micro-batch, micro-batches per step.
    lr: peak learning rate; None picks 1e-4 for full-parameter and 1e-3 for LoRA training.
    weight_decay: AdamW decoupled weight decay (not applied to 1-D parameters: norms, biases).
    warmup_frac: fraction of the steps with linear warm-up; min_lr_frac: the cosine's floor / lr.
    max_grad_norm: gradient-norm clipping (0 disables).
    lora_rank: 0 trains every parameter; r > 0 trains rank-r LoRA adapters on ``lora_targets``.
    lora_alpha: LoRA scaling numerator (None: 2 · rank); lora_dropout: dropout on the adapter input.
    seed: seeds the adapter initialisation (and anything random in training).
    offset: tokens of the calibration text to skip first, e.g. ``calib_samples · calib_len`` to keep
        healing off the tokens that compression calibrated on.
    """

    tokens: int
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    max_grad_norm: float = 1.0
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    offset: int = 0

    def __post_init__(self):
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"heal {name} must be an integer >= {low}, got {value!r}")
            if value > high:
                raise ValueError(f"heal {name} must be at most {high:,}, got {value:,}")
        if self.lr is None:
            self.lr = DEFAULT_LR["lora" if self.lora_rank else "full"]
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"heal lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.weight_decay < 1.0:
            raise ValueError(f"heal weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"heal warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise ValueError(f"heal min_lr_frac must be in [0, 1], got {self.min_lr_frac}")
        if not self.max_grad_norm >= 0.0:
            raise ValueError(f"heal max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"heal lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"heal lora_alpha must be positive, got {self.lora_alpha}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        self.lora_targets = tuple(self.lora_targets)
        if self.lora_rank and not self.lora_targets:
            raise ValueError("heal lora_targets must name at least one module for LoRA")
        if self.tokens < self.tokens_per_step:
            raise ValueError(f"heal budget of {self.tokens} tokens is below one optimizer step "
                             f"(seq_len · batch_size · grad_accum = {self.tokens_per_step})")
        if self.steps > MAX_STEPS:
            raise ValueError(f"heal budget of {self.tokens:,} tokens is {self.steps:,} optimizer steps; the "
                             f"limit is {MAX_STEPS:,} (raise batch_size or grad_accum, or lower tokens)")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
        n, warm = self.steps, round(self.warmup_frac * self.steps)
        if step < warm:
            return self.lr * (step + 1) / (warm + 1)
        span = max(1, n - warm - 1)
        progress = min(1.0, (step - warm) / span)
        floor = self.min_lr_frac * self.lr
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _targeted_linears(model, targets) -> list[torch.nn.Linear]:
    return [m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def check_fits(config: HealConfig, model, context: int | None = None) -> None:
    """ValueError unless ``config`` fits ``model``: the sequence length within the model's context
    (``context`` when given, e.g. the served dense model's, else the model config's
    ``max_position_embeddings``), the LoRA rank at most the smallest in/out dimension of the layers
    it adapts (a larger rank only adds parameters), and some layer to adapt. Cheap: call it before
    starting the job."""
    if context is None:
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and context > 0 and config.seq_len > context:
        raise ValueError(f"heal seq_len {config.seq_len} exceeds the model's {context} positions")
    if config.lora_rank:
        linears = _targeted_linears(model, config.lora_targets)
        if not linears:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"heal lora_targets {list(config.lora_targets)} match no linear layer of "
                             f"the model (it has {names})")
        smallest = min(min(m.in_features, m.out_features) for m in linears)
        if config.lora_rank > smallest:
            raise ValueError(f"heal lora_rank {config.lora_rank} is above the smallest dimension of the "
                             f"layers it adapts ({smallest}); use a rank of at most {smallest}")


# --- data -----------------------------------------------------------------------------------------

def check_not_evaluation(text: str, min_line: int = 80) -> None:
    """Refuse a custom training text that contains any line (>= ``min_line`` chars) of an evaluation
    article: healing on it would leak the perplexity windows into training."""
    from .data import EVAL_EVERY
    from .models import ModelError

    try:
        articles = wiki_articles()
    except (ModelError, OSError):  # the wiki package is absent: there is no evaluation split to leak
        return
    held_out = {line.strip() for i, (_, extract) in enumerate(articles) if i % EVAL_EVERY == 0
                for line in extract.split("\n") if len(line.strip()) >= min_line}
    leaked = held_out.intersection(line.strip() for line in text.split("\n"))
    if leaked:
        raise CalibrationError(
            f"heal: the training text contains {len(leaked)} line(s) of the wiki evaluation split; "
            "heal on the calibration split (text=None) or on other text")


def text_chunks(tokenizer, config: HealConfig, text: str | None = None) -> torch.Tensor:
    """Every full ``seq_len`` chunk of ``text`` (default: the wiki calibration split) after ``offset``."""
    if text is None:
        text = wiki_split("calibration")
    else:
        check_not_evaluation(text)
    ids = tokenize(tokenizer, text)[config.offset:]
    usable = ids.numel() // config.seq_len
    if usable < 1:
        raise CalibrationError(
            f"heal: the text holds {ids.numel()} tokens after offset {config.offset}, fewer than one "
            f"sequence of {config.seq_len}")
    return ids[: usable * config.seq_len].view(usable, config.seq_len)


def training_sequences(tokenizer, config: HealConfig, text: str | None = None,
                       chunks: torch.Tensor | None = None) -> torch.Tensor:
    """The (steps · grad_accum · batch_size, seq_len) token ids :func:`heal` trains on, in order.

    Consecutive non-overlapping chunks of ``text`` (default: the wiki calibration split) from token
    ``config.offset`` on, wrapping round to ``offset`` if the budget needs more than one pass.
    """
    if chunks is None:
        chunks = text_chunks(tokenizer, config, text)
    n = config.steps * config.grad_accum * config.batch_size
    return chunks[torch.arange(n) % chunks.shape[0]]


# --- training -------------------------------------------------------------------------------------

def _next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _wrap_lora(model, config: HealConfig):
    """Inject LoRA adapters (peft) into ``model`` in place; returns the PeftModel wrapper."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    targets = [t for t in config.lora_targets if t in names]
    if not targets:
        raise ValueError(f"heal lora_targets {list(config.lora_targets)} match no linear layer of "
                         f"the model (it has {sorted(names)})")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets, bias="none")
    return get_peft_model(model, lora)


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def heal(model, tokenizer, config: HealConfig, progress: Progress | None = None,
         text: str | None = None, on_step: OnStep | None = None,
         eval_fn: Callable[[torch.nn.Module], float] | None = None) -> dict:
    """Recovery-train ``model`` in place on calibration text; returns the JSON-ready record.

    progress: ``progress(fraction, message)`` (the compression callback), message
        ``"heal step s/n loss x.xxx"``; on_step: ``on_step(step, tokens_so_far, loss)`` after every
        optimizer step (1-based step), for a live loss plot.
    text: train on this text instead of the wiki calibration split (evaluation text is refused).
    eval_fn: ``eval_fn(model) -> perplexity``, called before and after to fill ``ppl_before`` and
        ``ppl_after`` (None leaves them out).

    Record: ``tokens``, ``steps``, ``seconds`` (training only), ``lora_rank``, ``loss`` (one per step),
    ``lr`` and ``tokens_seen`` (cumulative tokens, one per step: the x axis of a loss plot),
    ``tokens_per_second``, ``trainable_params``, ``epochs`` (passes over the
    text), ``device``, ``config`` (the HealConfig as a dict), and ``ppl_before``/``ppl_after`` with
    ``eval_fn``.
    """
    progress = progress or (lambda fraction, message: None)
    params = list(model.parameters())
    device = params[0].device
    check_fits(config, model)
    progress(0.0, "heal: tokenizing")
    chunks = text_chunks(tokenizer, config, text)
    per_step = config.grad_accum * config.batch_size  # sequences of one optimizer step
    record: dict = {"lora_rank": config.lora_rank, "config": asdict(config), "device": str(device)}
    record["config"]["lora_targets"] = list(config.lora_targets)
    if eval_fn is not None:
        model.eval()
        record["ppl_before"] = float(eval_fn(model))

    dtypes = {id(p): p.dtype for p in params}
    torch.manual_seed(config.seed)
    peft_model = None
    ok = False
    try:
        if config.lora_rank:
            for p in params:
                p.requires_grad_(False)
            peft_model = _wrap_lora(model, config)
            runner = peft_model
            trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        else:
            runner = model
            trainable = list(model.named_parameters())  # tied weights appear once
            for _, p in trainable:
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()  # fp32 master weights; cast back at the end
                p.requires_grad_(True)
        optimizer = torch.optim.AdamW(_param_groups(trainable, config.weight_decay), lr=config.lr,
                                      betas=(0.9, 0.95), eps=1e-8,
                                      foreach=device.type == "cuda")
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        record["trainable_params"] = sum(p.numel() for _, p in trainable)
        runner.train()
        losses, lrs = [], []
        t0 = time.perf_counter()
        for step in range(config.steps):
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            rows = torch.arange(step * per_step, (step + 1) * per_step) % chunks.shape[0]  # as training_sequences
            for ids in chunks[rows].view(config.grad_accum, config.batch_size, config.seq_len):
                ids = ids.to(device, non_blocking=True)
                with autocast:
                    loss = _next_token_loss(runner, ids)
                (loss / config.grad_accum).backward()
                total += loss.item()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = total / config.grad_accum
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"heal: loss became {step_loss} at step {step + 1}; "
                                         "lower the learning rate")
            losses.append(step_loss)
            lrs.append(lr)
            done = (step + 1) * config.tokens_per_step
            progress((step + 1) / config.steps,
                     f"heal step {step + 1}/{config.steps} loss {step_loss:.3f}")
            if on_step is not None:
                on_step(step + 1, done, step_loss)
        seconds = time.perf_counter() - t0
        ok = True
    finally:
        if peft_model is not None:
            base = peft_model.merge_and_unload() if ok else peft_model.unload()
            if base is not model:  # peft unloads in place; anything else would be a silent copy
                raise RuntimeError("peft returned a different module after unloading the adapters")
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if attr in model.__dict__:
                    delattr(model, attr)
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
            if p.dtype != dtypes.get(id(p), p.dtype):
                p.data = p.data.to(dtypes[id(p)])
        model.eval()

    tokens = config.steps * config.tokens_per_step
    record.update({
        "tokens": tokens, "steps": config.steps, "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "loss": losses, "lr": lrs,
        "tokens_seen": [(s + 1) * config.tokens_per_step for s in range(config.steps)],
        "epochs": config.steps * per_step / chunks.shape[0],
    })
    if eval_fn is not None:
        record["ppl_after"] = float(eval_fn(model))
    progress(1.0, f"heal done: {config.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return record
