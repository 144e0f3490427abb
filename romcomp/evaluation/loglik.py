"""Memory-bounded log-likelihoods for lm-evaluation-harness: ``romcomp eval``'s zero-shot and MMLU path.

lm-eval's ``HFLM`` scores a batch of (context, continuation) requests by running the whole model, which
materializes the logits of every position of every request (``batch x padded length x vocab``) and then
a log-softmax copy of them. For SmolLM2 (vocabulary 49,152) at batch 4 and a 1,000-token BoolQ passage
that is two 786 MB float32 tensors; the full zero-shot suite peaked at 6-7 GiB for a 135M model.

:class:`BoundedHFLM` (built by :func:`bounded_hflm`) keeps everything of ``HFLM`` that decides a number:
tokenization, left truncation to ``max_length``, the longest-first order, the one-token-continuation
cache (requests sharing a context are run once), which positions are scored, the greedy-match rule, the
result order and the cache hook. It changes how a batch is computed:

- *Scoring*: the decoder runs to its final hidden states (:func:`~romcomp.evaluation.perplexity.final_hidden`,
  the same code as perplexity) and the LM head (``get_output_embeddings()``) is applied only at a
  request's continuation positions, :data:`LOGIT_CHUNK` positions at a time, with the model's post-head
  logit scaling (:func:`~romcomp.evaluation.perplexity.head_logits`). Log-softmax is float32 (lm-eval's
  ``softmax_dtype`` when set); for a float32 model that is exactly lm-eval's computation, for a bf16 one
  it is more precise than lm-eval's bf16 log-softmax.
- *Batching*: a batch holds at most ``batch_size`` requests *and* at most as many padded tokens as
  :func:`batch_token_budget` allows for the activation budget (``ACTIVATION_BUDGET_BYTES``); a single
  request longer than that runs alone. Memory thus no longer grows with batch x length x vocab, and it
  does not grow with the number of requests either.

Differences from stock HFLM are float round-off only (other batch shapes, a head on fewer rows): the
tests compare both on a tiny random model request by request.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from romcomp.evaluation.perplexity import final_hidden, head_logits, output_head

LOGIT_CHUNK = 256
"""Continuation positions whose full-vocabulary logits exist at once (256 x 49,152 x 4 B = 50 MB)."""

ACTIVATION_BUDGET_BYTES = 256 << 20
"""Estimated activation bytes one forward may use; bounds the padded tokens of a request batch."""

_LOG = logging.getLogger(__name__)


def activation_bytes_per_token(config: Any, element_size: int, length: int) -> int:
    """Rough bytes of live activations per token of a forward at ``length`` tokens (one layer at a time).

    Residual stream, norms, q/k/v/o (about 8 x hidden) and the MLP's gate, up and product (about 4 x
    intermediate) in the weights' dtype, plus float32 attention scores and their softmax (2 x heads x
    length) when the model runs eager attention (SDPA's CPU kernels need no ``length x length`` matrix).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inter = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 0) or 1)
    per_token = element_size * (8 * hidden + 4 * inter)
    if getattr(config, "_attn_implementation", None) == "eager":
        per_token += 4 * 2 * heads * length
    return max(per_token, 1)


def batch_token_budget(model: nn.Module, length: int, budget_bytes: int = ACTIVATION_BUDGET_BYTES) -> int:
    """Padded tokens a batch of requests ``length`` tokens long may hold within ``budget_bytes``."""
    param = next(model.parameters(), None)
    element = param.element_size() if param is not None else 4
    per_token = activation_bytes_per_token(model.config, element, length)
    return max(budget_bytes // per_token, 1)


def split_batches(lengths: list[int], max_requests: int, max_tokens: Any) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges over ``lengths`` (sorted longest first): at most ``max_requests`` requests
    and, unless a single request is longer, at most ``max_tokens(padded length)`` padded tokens each."""
    ranges = []
    start = 0
    while start < len(lengths):
        padded = lengths[start]  # the longest of its batch
        count = max(1, min(max_requests, max_tokens(padded) // max(padded, 1), len(lengths) - start))
        ranges.append((start, start + count))
        start += count
    return ranges


def score_continuations(
    model: nn.Module, rows: torch.Tensor, conts: list[list[int]], chunk: int = LOGIT_CHUNK,
    softmax_dtype: torch.dtype | None = None,
) -> list[tuple[float, bool]]:  # fmt: skip
    """(sum of log-probs, greedy) of each continuation in ``conts`` at the hidden ``rows`` [n, H].

    HFLM's rule, to the letter: a continuation of ``k`` tokens takes its log-probs from rows ``0..k-1``
    and is greedy when the argmax of the *last* ``k`` rows equals it (the two coincide unless requests
    grouped by the one-token cache have continuations of different lengths). Full-vocabulary log-probs
    exist for at most ``chunk`` rows at a time.
    """
    head = output_head(model)
    count = rows.shape[0]
    greedy = torch.empty(count, dtype=torch.long)
    picked = [torch.empty(len(toks), dtype=softmax_dtype or torch.float32) for toks in conts]
    targets = [torch.tensor(toks, dtype=torch.long) for toks in conts]
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        logp = F.log_softmax(head_logits(model, head, rows[start:stop]), dim=-1, dtype=softmax_dtype)
        greedy[start:stop] = logp.argmax(dim=-1).cpu()
        for target, out in zip(targets, picked, strict=True):
            end = min(stop, target.numel())
            if start < end:
                index = target[start:end].to(logp.device)
                at = torch.arange(end - start, device=logp.device)
                out[start:end] = logp[at, index].to(out.dtype).cpu()
        del logp
    return [
        (float(out.sum()), bool((greedy[count - target.numel() :] == target).all()))
        for out, target in zip(picked, targets, strict=True)
    ]


@functools.cache
def _bounded_class() -> type:
    """``BoundedHFLM``, defined on first use so that importing romcomp does not import lm_eval."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator
    from lm_eval.models.utils_hf import pad_and_concat
    from tqdm import tqdm

    class BoundedHFLM(HFLM):
        """HFLM whose log-likelihoods never hold a batch's full logits (see the module docstring)."""

        activation_budget: int = ACTIVATION_BUDGET_BYTES
        logit_chunk: int = LOGIT_CHUNK

        def _loglikelihood_tokens(
            self, requests: list[Any], disable_tqdm: bool = False, override_bs: int | None = None
        ) -> list[tuple[float, bool]]:
            if self.backend != "causal":
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

            def by_length(req: Any) -> tuple[int, tuple[int, ...]]:  # HFLM's _collate: longest first
                toks = req[1] + req[2]
                return -len(toks), tuple(toks)

            def one_token_key(req: Any) -> list[int]:  # HFLM's _lookup_one_token_cont
                return req[-2] + req[-1][:-1]

            group_by = "contexts" if self.logits_cache else None
            order = Collator(requests, sort_fn=by_length, group_by=group_by, group_fn=one_token_key)
            ordered = next(iter(order.get_batched(n=0)), [])  # n=0: everything, in HFLM's order
            inputs = [self._input_ids(ctx, cont) for _, ctx, cont in ordered]
            max_requests = self.batch_size if isinstance(self.batch_size, int) else (override_bs or 1)
            budget = functools.partial(batch_token_budget, self.model, budget_bytes=self.activation_budget)
            ranges = split_batches([len(ids) for ids in inputs], max(int(max_requests), 1), budget)
            res: list[tuple[float, bool]] = []
            bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                       desc="Running loglikelihood requests")  # fmt: skip
            with torch.inference_mode():
                for start, stop in ranges:
                    for answer in self._score_batch(order, ordered[start:stop], inputs[start:stop]):
                        res.append(answer)
                        bar.update(1)
            bar.close()
            return order.get_original(res)

        def _score_batch(self, order: Any, items: list[Any], inputs: list[list[int]]) -> list[Any]:
            """Answers of one batch of requests (and of those the one-token cache groups with them), in
            the order ``order.get_cache`` hands them out, as HFLM appends them."""
            batch = [torch.tensor(ids, dtype=torch.long, device=self.device) for ids in inputs]
            hidden = final_hidden(self.model, pad_and_concat(len(batch[0]), batch, padding_side="right"))
            answers = []
            for row, (req_str, ctx, cont), ids in zip(hidden, items, inputs, strict=True):
                hits = order.get_cache(req_str=req_str, cxt_toks=ctx, cont_toks=cont, logits=row[None])
                members = list(hits)  # consumed whole: the Collator records the result order here
                rows = row[len(ids) - len(cont) : len(ids)]  # HFLM: logits[inplen - contlen : inplen]
                conts = [list(toks) for _, toks, _ in members]
                scored = score_continuations(self.model, rows, conts, self.logit_chunk, self.softmax_dtype)
                for (member_str, _, _), answer in zip(members, scored, strict=True):
                    if member_str is not None:
                        self.cache_hook.add_partial("loglikelihood", member_str, answer)
                    answers.append(answer)
            return answers

        def _input_ids(self, context: list[int], continuation: list[int]) -> list[int]:
            """HFLM's causal input: context + continuation without its last token, cut from the left."""
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError("lm-eval request with an empty context/continuation or one over max_length")
            if len(context) + len(continuation) > self.max_length + 1:
                _LOG.warning(
                    "context (%d) + continuation (%d) tokens exceed max_length %d: truncated from the left",
                    len(context), len(continuation), self.max_length,
                )  # fmt: skip
            return (context + continuation)[-(self.max_length + 1) :][:-1]

    return BoundedHFLM


def bounded_hflm(
    model: nn.Module, tokenizer: Any, batch_size: int, max_length: int | None,
    activation_budget: int = ACTIVATION_BUDGET_BYTES,
) -> Any:  # fmt: skip
    """A :class:`BoundedHFLM` around an already loaded model (see the module docstring)."""
    lm = _bounded_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    lm.activation_budget = activation_budget
    return lm
