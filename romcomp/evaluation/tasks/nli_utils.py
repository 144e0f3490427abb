"""SNLI for lm-eval: drop pairs without a gold label and render lm-eval's MNLI prompt (its ``glue/mnli``
``utils.doc_to_text``, restated for SNLI's field names)."""

LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def process_snli(dataset):
    dataset = dataset.filter(lambda doc: doc["gold_label"] in LABELS)
    return dataset.map(lambda doc: {"label": LABELS[doc["gold_label"]]})


def mnli_text(doc) -> str:
    hypothesis = doc["sentence2"].strip()
    return "{}\nQuestion: {} True, False or Neither?\nAnswer:".format(
        doc["sentence1"], hypothesis + ("" if hypothesis.endswith(".") else ".")
    )
