"""``romcomp eval``: perplexity (WikiText-2, PTB, held-out C4) and zero-shot accuracy via lm-eval.

Submodules: :mod:`.ppl` (memory-bounded perplexity), :mod:`.zeroshot` (lm-evaluation-harness with
romcomp's offline task YAMLs), :mod:`.report` (JSON record and markdown table), :mod:`.cli` (the typer
command, added to the main app by ``register``). Nothing heavy is imported here, so ``romcomp --help``
stays fast and works without the optional ``romcomp[eval]`` extra.
"""
