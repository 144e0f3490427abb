"""Shared fixtures: tiny random Llama/Qwen2 checkpoints (sharded safetensors + a byte-level tokenizer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from romcomp.errors import RomcompError

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / "shared" / "data"
REAL_DATA = DATA_DIR
needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} not present")


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
    with torch.no_grad():  # larger than the default init so blocks do real work
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, max_shard_size="150KB")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


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


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from romcomp.sources import resolve_model

    try:
        return resolve_model("smollm2-135m").path
    except RomcompError as err:
        pytest.skip(f"smollm2-135m not available: {err}")


@pytest.fixture(scope="session")
def compressed(smol_dir, tmp_path_factory) -> tuple[Path, str]:
    """One CLI run of real SmolLM2-135M at ratio 0.2 (16 x 512 C4): shared by the real-model tests."""
    out = tmp_path_factory.mktemp("smol") / "smol-r0.2"
    proc = romcomp_cli("smollm2-135m", *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout
