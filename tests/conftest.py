"""Shared fixtures: tiny random Llama/Qwen2 checkpoints (sharded safetensors + a byte-level tokenizer).

Two tiers. The fast tier, ``python -m pytest -m "not slow"``, runs every tiny-model test and needs nothing
from ``../shared`` or the model cache. Every test on a real model (SmolLM2-135M, all-MiniLM-L6-v2,
Qwen2.5-Coder) is marked ``@pytest.mark.slow``; ``python -m pytest`` runs both. Two guards keep it so:
collection stops when a test that requests a real-model fixture (:data:`REAL_MODEL_FIXTURES`) is not
marked slow, and every test not marked slow runs with an empty model cache and no package index (see
:func:`_fast_tier_has_no_real_models`), so one that reaches for a real model another way fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from romcomp.errors import RomcompError

pytest_plugins = ["pytester"]  # tests/test_sources.py checks the tier guard below in a pytest of its own

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"
REAL_DATA = DATA_DIR


def in_ci() -> bool:
    """True under CI (``CI=true`` and the like): there the shared data must be present."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_real_data(what: str, where: str = "") -> None:
    """A test that needs real data it cannot find: skipped locally, a FAILURE under CI (``$CI`` set)."""
    where = where or f"the real data sets are expected in {DATA_DIR}, beside the repository"
    message = f"{what} not found; {where}"
    if in_ci():
        pytest.fail(f"{message}; CI is set, so missing real data is an error, not a skip", pytrace=False)
    pytest.skip(message)


def real_model(alias: str) -> Path:
    """The local directory of a real model alias (fetched and converted into the cache on first use); a
    model that cannot be had is a skip locally and a FAILURE under CI, like missing real data."""
    from romcomp import paths
    from romcomp.model.sources import resolve_model

    try:
        return resolve_model(alias).path
    except RomcompError as err:
        error = err
    missing_real_data(f"real model {alias}", f"it is fetched into {paths.cache_dir()} on first use ({error})")
    raise AssertionError("not reached: missing_real_data skips or fails")


REAL_MODEL_FIXTURES = frozenset({"smol_dir", "compressed", "minilm_dir", "smol", "smol_gguf", "smollm2"})
"""Fixtures that load a real model (here and in the test modules): a test requesting one must be slow."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop the session when a test that requests a real-model fixture is not marked ``slow``: it would
    otherwise run (and download, convert, calibrate) in the fast tier. Runs before ``-m`` deselects."""
    del config
    unmarked = [
        item.nodeid
        for item in items
        if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "real-model tests must be marked @pytest.mark.slow (they use one of "
            f"{', '.join(sorted(REAL_MODEL_FIXTURES))}): {', '.join(unmarked)}"
        )


@pytest.fixture(scope="session")
def _empty_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fast-tier-model-cache")


@pytest.fixture(autouse=True)
def _fast_tier_has_no_real_models(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked ``slow`` sees an empty romcomp model cache and no package index, in its own process
    and in the CLI processes it starts: resolving ``smollm2-135m`` or ``all-minilm-l6-v2`` then fails at
    once ("not available offline") instead of quietly loading a real model in the fast tier."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("ROMCOMP_CACHE", str(request.getfixturevalue("_empty_model_cache")))
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", str(request.getfixturevalue("_empty_model_cache")))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``../shared/data``: only for tests about the real data sets (calibration sets, evaluation, SmolLM2)."""
    if not DATA_DIR.is_dir():
        missing_real_data("the shared data directory")
    return DATA_DIR


needs_real_data = pytest.mark.usefixtures("data_dir")
"""Marks a test that reads :data:`REAL_DATA` directly: skipped without it, failed under CI."""

CALIB_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their been has would when if more will so no out up into "
    "than them can only other time new some could these two may first then do any like my now over such "
    "our man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three river city music history "
    "mountain winter garden village market letter station island church forest council engine harbour "
    "season company building language theory animal summer bridge family school student water light road"
).split()


def calibration_text(n_bytes: int = 300_000, seed: int = 0) -> str:
    """Deterministic English-like prose: paragraphs of capitalized sentences from a seeded word list.

    Paragraphs are 400-2000 characters and separated by blank lines, so a ``.txt`` file of it is a
    document corpus whose documents hold several 32-64 byte-token windows each.
    """
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_bytes:
        sentences, length = [], 0
        target = rng.randint(400, 2000)
        while length < target:
            words = rng.choices(CALIB_WORDS, k=rng.randint(5, 18))
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), str(rng.randint(2, 2024)))
            sentence = " ".join(words)
            sentence = sentence[0].upper() + sentence[1:] + rng.choice(".....?!;")
            sentences.append(sentence)
            length += len(sentence) + 1
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(scope="session")
def calib_text():
    """A temporary plain-text calibration file (~300 KB) for tiny-model runs: no dependence on ../shared/data.

    The calibration loader refuses a path containing 'test' (test splits); pytest's own temporary
    directories are named after pytest and the test, so the file lives in a directory of its own.
    """
    for _ in range(20):
        root = Path(tempfile.mkdtemp(prefix="romcomp-calib-"))
        if "test" not in str(root).lower():
            break
        shutil.rmtree(root)
    else:
        pytest.fail(f"no temporary directory without 'test' in its path (TMPDIR={tempfile.gettempdir()})")
    path = root / "calib-english.txt"
    path.write_text(calibration_text(), encoding="utf-8")
    yield path
    shutil.rmtree(root, ignore_errors=True)


def byte_tokenizer():
    """A real fast tokenizer with one token per UTF-8 byte: no hub access, predictable lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>")


def make_tokenizer(path: Path):
    """Save the byte tokenizer beside a tiny model (ids 0-255 bytes, then bos 256, eos 257)."""
    tok = byte_tokenizer()
    tok.save_pretrained(path)
    return tok


def make_tiny_model(
    path: Path, family: str = "llama", layers: int = 3, seed: int = 0, tied: bool = False
) -> Path:
    """A random tiny model saved as sharded safetensors, loadable by transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = cls(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=258,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return save_random(model, path, max_shard_size="150KB")


def save_random(model: torch.nn.Module, path: Path, **save_kwargs) -> Path:
    """Redraw every weight matrix (larger than the default init, so blocks do real work), save the model
    as safetensors and a byte tokenizer beside it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, **save_kwargs)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", "qwen2", tied=True)


@pytest.fixture(autouse=True, scope="session")
def _offline_env():
    """Tests never touch the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ROMCOMP_OFFLINE", "1")


ARGS = ["--ratio", "0.2", "--max-ram", "4GB", "--n-samples", "16", "--threads", "2", "--no-progress"]


def romcomp_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "romcomp.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


_CLI_BATCH = """
import contextlib, io, json, sys, traceback
from romcomp.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code
        except BaseException:  # what the interpreter does with an uncaught exception: traceback, exit 1
            traceback.print_exc()
            code = 1
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def romcomp_cli_batch(
    runs: list[list[str]], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: int = 900
) -> list[subprocess.CompletedProcess]:
    """Each argv through ``romcomp.cli.main`` (what ``python -m romcomp.cli`` runs), in order, in ONE fresh
    interpreter: per run its exit code, stdout and stderr, as :func:`romcomp_cli` would give them. An
    interpreter's start (torch and transformers imported) costs more than a tiny model's compression, so
    a test with many short runs (bad options, help pages) batches them. The interpreter itself must print
    nothing else on stderr (an import-time warning, a message written past ``sys.stderr``), which a
    process of its own per run would have shown among that run's lines."""
    cmd = [sys.executable, "-c", _CLI_BATCH, json.dumps(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(runs)
    return [subprocess.CompletedProcess(argv, *result) for argv, result in zip(runs, results, strict=True)]


def interrupt_after_freeing(monkeypatch, n: int) -> None:
    """The ``n``-th block the runner frees raises KeyboardInterrupt right after it is freed, before the
    pass records it (a Ctrl-C between a block's work and its manifest entry); ``monkeypatch.undo()``
    restores the real ``free_block``."""
    from romcomp.compression.blocks import BlockIO

    real, calls = BlockIO.free_block, []

    def interrupted(self, index: int) -> None:
        real(self, index)
        calls.append(index)
        if len(calls) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(BlockIO, "free_block", interrupted)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Real SmolLM2-135M (tests using it are ``slow``): skipped when it cannot be had, failed under CI."""
    return real_model("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Real all-MiniLM-L6-v2 (tests using it are ``slow``): skipped when it cannot be had, failed under CI."""
    return real_model("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def compressed(smol_dir, data_dir, tmp_path_factory) -> tuple[Path, str]:
    """One CLI run of real SmolLM2-135M at ratio 0.2 (16 x 512 C4): shared by the real-model tests.

    Calibrated on the real C4 sample (``data_dir``: skipped without it locally, a failure under CI)."""
    out = tmp_path_factory.mktemp("smol") / "smol-r0.2"
    proc = romcomp_cli("smollm2-135m", *ARGS, "--data-dir", str(data_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
