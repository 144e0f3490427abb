"""``romcomp eval``: perplexity (WikiText-2, PTB, held-out C4) and zero-shot accuracy via lm-eval.

Submodules: :mod:`.perplexity` (the one perplexity implementation: texts, windows, chunked LM head),
:mod:`.quality` (the compress command's before/after perplexity line), :mod:`.zeroshot`
(lm-evaluation-harness with romcomp's offline task YAMLs), :mod:`.loglik` (the harness's memory-bounded
log-likelihoods: chunked LM head, token-bounded request batches), :mod:`.mmlu`, :mod:`.nli_head` and
:mod:`.features` (heads on frozen features), :mod:`.efficiency` (size, memory, speed), :mod:`.plan` (the
validated invocation), :mod:`.run` (models one at a time), :mod:`.report` (JSON record and markdown
table) and :mod:`.plots`. The typer
command is :mod:`romcomp.cli.evaluate`. Nothing heavy is imported here, so ``romcomp --help`` stays fast
and works without the optional ``romcomp[eval]`` extra.
"""
