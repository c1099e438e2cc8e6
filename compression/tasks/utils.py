"""Document preprocessing for the offline lm-eval tasks in this folder.

Copied (same semantics) from lm-eval's own task utilities so that the offline
tasks score exactly like the built-in ones:

* ``hellaswag_process_docs`` = ``lm_eval/tasks/hellaswag/utils.py::process_docs``
* ``winogrande_doc_to_*``    = ``lm_eval/tasks/winogrande/preprocess_winogrande.py``
* ``boolq_doc_to_target``    maps google/boolq's ``answer: bool`` to super_glue's
  ``label`` (0 = "no", 1 = "yes").

``compression.zeroshot.task_dir()`` copies this file next to the rendered YAMLs,
which reference it with ``!function utils.<name>``. It must stay importable on its
own (standard library + ``datasets`` only).
"""

import re


def _hellaswag_preprocess(text):
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    def _process_doc(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


def boolq_doc_to_target(doc):
    return 1 if doc["answer"] else 0
