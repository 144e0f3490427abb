"""Kill-and-resume benchmark: SIGKILL ``romcomp`` at random points, rerun it, check the output bytes.

Why: the README promises that a compression killed at any moment and rerun with the same command continues
from the last finished block and ends in a **bit-identical** output. This script measures that promise
many times over instead of at one hand-picked point: it makes one uninterrupted reference run, then
repeatedly starts the same command in a fresh directory, ``SIGKILL``s it (``os.kill``, no chance to clean
up), reruns it without a kill until it completes, and compares every output file (everything except the
``.romcomp/`` work files) with the reference, byte for byte.

Usage (from the repository root; the C4 sample is read from ``../shared/data`` or ``$ROMCOMP_DATA_DIR``)::

    python tools/bench_kill_loop.py                     # 20 kills on a tiny random 8-layer Llama (minutes)
    python tools/bench_kill_loop.py --kills 3 --seed 1
    python tools/bench_kill_loop.py --chain 3           # 3 kills on the same output before it may finish
    python tools/bench_kill_loop.py --model smollm2-135m --kills 20 --n-samples 8 --seq-len 128

Where the kills land. Python start-up (importing torch and transformers) is most of a tiny model's wall
time and nothing is written during it, so by default a kill is timed from the moment the run creates its
manifest (its first durable write): the delay is uniform in [0.05, 0.95] x the reference run's span from
that moment to its last write (the manifest marked complete). ``--anchor start`` instead draws from
[0.05, 0.95] x the reference's whole wall time, counted from process start. Besides the random kills
there are event kills, fired the moment a file appears: the manifest (very early: block 0's calibration
inputs), a middle block's shard ``.tmp`` (inside a shard write), the index and the top-level shard
(finalizing). Every kill is followed by a rerun of the same command, repeated until the output is
complete. A run that finishes before its kill is not counted: it is reported, compared (a free
determinism check) and retried at a new time. The phase column is read from the output directory after
the kill: the manifest's finished blocks and which shards, ``.tmp`` files, index and config.json this
process had written. With ``--chain K`` a rerun is killed again, up to K kills per output, before the
final rerun to completion; a rerun's kill is timed from the moment it holds the output's lock (read,
never taken, from ``/proc/locks``), since its manifest exists from the start.

The romcomp and calib packages are copied into the work directory before the first run (``--live``
runs the checkout itself), so that edits made to the repository while the benchmark runs cannot make
the reference and a resumed run use different code. Exit status: 0 when every output is identical to the
reference, 1 otherwise (the table names the files that differ).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = ".romcomp"
MANIFEST = f"{WORK}/manifest.json"
LOCK = f"{WORK}/lock"
LOCK_HELD = "<output lock held>"  # a trigger anchor: the run has opened its output (resumed runs)
INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
POLL_S = 0.001  # how often a waiting kill looks at the output directory
MAX_MISSES = 10  # consecutive runs that finish before their kill before the benchmark gives up


# --------------------------------------------------------------------------- set-up


def log(msg: str) -> None:
    """Progress to stderr, keeping stdout for the report."""
    print(f"[kill-loop {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def freeze_code(dst: Path) -> Path:
    """Copy the packages a run imports, so that concurrent edits of the checkout cannot leak in."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("romcomp", "calib"):
        shutil.rmtree(dst / pkg, ignore_errors=True)
        shutil.copytree(REPO_ROOT / pkg, dst / pkg, ignore=ignore)
    return dst


def child_env(code_root: Path) -> dict[str, str]:
    """Offline, the frozen code first on the path, and the data directory the checkout would find."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code_root), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("ROMCOMP_OFFLINE", "1")
    data = REPO_ROOT.parent / "shared" / "data"
    if not env.get("ROMCOMP_DATA_DIR") and data.is_dir():
        env["ROMCOMP_DATA_DIR"] = str(data)
    return env


def build_tiny_model(path: Path, layers: int, hidden: int, seed: int) -> Path:
    """A seeded random Llama in several safetensors shards, with the tests' byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.conftest import make_tokenizer

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=(hidden * 8 // 3 + 15) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=2,
        vocab_size=258,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger than the default init so that blocks do real work
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    block_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    model.save_pretrained(path, max_shard_size=f"{max(block_bytes // 1000, 100)}KB")
    make_tokenizer(path)
    return path


def compress_cmd(model: str, out: Path, args: argparse.Namespace) -> list[str]:
    """The one command every run uses (the reference, the killed runs and their reruns)."""
    opts = {"--ratio": args.ratio, "--out": out, "--n-samples": args.n_samples, "--seq-len": args.seq_len,
            "--calib": args.calib, "--max-ram": args.max_ram, "--threads": args.threads}  # fmt: skip
    cmd = [sys.executable, "-m", "romcomp.cli", model]
    for flag, value in opts.items():
        cmd += [flag, str(value)]
    return [*cmd, "--no-progress"]


# --------------------------------------------------------------------------- the output directory


def shard(index: int, n_blocks: int) -> str:
    """romcomp's 1-based shard names: blocks are 1..n, the top-level tensors n+1."""
    return f"model-{index + 1:05d}-of-{n_blocks + 1:05d}.safetensors"


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def fresh(path: Path, since: float) -> bool:
    """``path`` exists and was written by the process started at wall time ``since``."""
    try:
        return path.stat().st_mtime >= since - 0.01
    except OSError:
        return False


def holds_lock(pid: int, out: Path) -> bool | None:
    """Whether ``pid`` holds the output's flock, from ``/proc/locks`` (None where that is unreadable).

    Read-only on purpose: trying the lock ourselves could make the run see a competitor and refuse.
    """
    try:
        inode, text = (out / LOCK).stat().st_ino, Path("/proc/locks").read_text()
    except FileNotFoundError:
        return False if Path("/proc/locks").exists() else None
    except OSError:
        return None
    for line in text.splitlines():  # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        f = line.split()
        if len(f) >= 6 and "->" not in f and f[1] == "FLOCK" and f[4] == str(pid):
            if f[5].rsplit(":", 1)[-1] == str(inode):
                return True
    return False


def phase(out: Path, n_blocks: int, since: float, locked: bool | None) -> str:
    """Where a run was when it died, read from the files it left (``since``: its wall-clock start;
    ``locked``: whether it held the output lock then, None if unknown)."""
    manifest = read_manifest(out)
    if manifest is None:
        return "startup (no manifest yet)"
    if manifest.get("status") == "complete":
        return "exiting (manifest marked complete)"
    if locked is False:
        return "startup (resumed run, output not opened yet)"

    def first_new(candidates: tuple[tuple[str, str], ...]) -> str | None:
        return next((label for name, label in candidates if fresh(out / name, since)), None)

    n, done = n_blocks, len(manifest.get("blocks_done", []))
    final = first_new(
        (
            ("config.json", "config.json written, cleaning up"),
            ("config.json.tmp", "writing config.json"),
            (INDEX, "index written"),
            (INDEX + ".tmp", "writing the index"),
            (shard(n, n), "top-level shard written, copying tokenizer/code"),
        )
    )
    if final:
        return f"finalizing: {final}"
    if done >= n:
        return "top-level shard: " + (
            first_new(((shard(n, n) + ".tmp", "writing file"),)) or "gathering tensors"
        )
    acts = f"{WORK}/acts-{done + 1:05d}.bin"
    step = first_new(
        (
            (f"{MANIFEST}.tmp", "saving manifest"),
            (acts, "saving manifest"),
            (acts + ".tmp", "committing next block's inputs"),
            (shard(done, n), "shard written"),
            (shard(done, n) + ".tmp", "writing shard"),
        )
    )
    if step:
        return f"block {done + 1} of {n}: {step}"
    if done == 0 and not (out / WORK / "acts-00000.bin").exists():
        committing = fresh(out / WORK / "acts-00000.bin.tmp", since)
        return f"block 1 of {n}: " + (
            "committing its inputs" if committing else "capturing calibration inputs"
        )
    return f"block {done + 1} of {n} in progress (calibration/decomposition)"


def digest(out: Path) -> dict[str, str]:
    """sha256 of every output file, by relative path; the work directory and lock files are skipped."""
    sums = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if rel.parts[0] == WORK or not path.is_file() or path.name.endswith(".lock"):
            continue
        sums[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def differences(ref: dict[str, str], got: dict[str, str]) -> list[str]:
    """Names of files that differ from, are missing from or are extra to the reference."""
    out = [f"differs: {n}" for n in sorted(ref.keys() & got.keys()) if ref[n] != got[n]]
    out += [f"missing: {n}" for n in sorted(ref.keys() - got.keys())]
    return out + [f"extra: {n}" for n in sorted(got.keys() - ref.keys())]


def has_top_shard(out: Path) -> bool:
    """The last shard (``model-N-of-N``, the top-level tensors) is there: blocks are all written."""
    for path in out.glob("model-*-of-*.safetensors"):
        m = SHARD_RE.fullmatch(path.name)
        if m and m.group(1) == m.group(2):
            return True
    return False


def is_finished(out: Path) -> bool:
    try:
        return (
            json.loads((out / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
            == "romcomp"
        )
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- runs


@dataclass
class Timeline:
    """When the reference run reached each milestone, in seconds after its start."""

    wall: float = 0.0
    manifest: float | None = None
    blocks: list[float] = field(default_factory=list)
    top_shard: float | None = None
    index: float | None = None
    config: float | None = None
    complete: float | None = None  # the manifest marked complete: the run's last write

    @property
    def active(self) -> float:
        """From the first durable write to the last: the span where a kill can leave something behind."""
        return self.remaining(0)

    def remaining(self, blocks_done: int) -> float:
        """The reference's time from ``blocks_done`` finished blocks to its last write."""
        start = self.blocks[blocks_done - 1] if 0 < blocks_done <= len(self.blocks) else self.manifest
        return (self.complete or self.wall) - (start or 0.0)


def reference_run(cmd: list[str], env: dict[str, str], out: Path) -> Timeline:
    """The uninterrupted run, watched every few milliseconds to time its milestones."""
    tl, seen_mtime = Timeline(), 0
    err = out.with_name(out.name + ".stderr")
    t0 = time.perf_counter()
    with open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=fe)
        while proc.poll() is None:
            now = time.perf_counter() - t0
            try:
                mtime = (out / MANIFEST).stat().st_mtime_ns
            except OSError:
                mtime = 0
            if mtime and mtime != seen_mtime:
                seen_mtime, tl.manifest = mtime, tl.manifest if tl.manifest is not None else now
                manifest = read_manifest(out) or {}
                tl.blocks += [now] * (len(manifest.get("blocks_done", [])) - len(tl.blocks))
                if tl.complete is None and manifest.get("status") == "complete":
                    tl.complete = now
            for attr, name in (("index", INDEX), ("config", "config.json")):
                if getattr(tl, attr) is None and (out / name).exists():
                    setattr(tl, attr, now)
            if tl.top_shard is None and tl.blocks and has_top_shard(out):
                tl.top_shard = now
            time.sleep(0.002)
    tl.wall = time.perf_counter() - t0
    if proc.returncode != 0 or not is_finished(out):
        sys.stderr.write(err.read_text(errors="replace")[-3000:])
        raise SystemExit(f"bench: the reference run failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return tl


@dataclass
class Trigger:
    """Kill ``delay`` seconds after ``anchor`` (a file appearing in the output, or process start)."""

    label: str
    anchor: str | None
    delay: float
    event: bool = False  # fired by a file appearing: retried as such when the run outpaces the poll


@dataclass
class Attempt:
    """What became of one started run: killed at ``t_kill``, or finished (or crashed) first."""

    t_kill: float | None
    returncode: int
    phase: str
    error: str = ""


def anchor_reached(anchor: str, pid: int, out: Path) -> bool:
    if anchor == LOCK_HELD:
        return bool(holds_lock(pid, out))
    return (out / anchor).exists()


def start_and_kill(cmd: list[str], env: dict[str, str], out: Path, trig: Trigger, n_blocks: int) -> Attempt:
    """Start the command, SIGKILL it when the trigger fires, and say where it was."""
    err = out.with_name(out.name + ".stderr")
    since, t0 = time.time(), time.perf_counter()
    with open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=fe)
        anchored = t0 if trig.anchor is None else None
        t_kill, locked = None, None
        while proc.poll() is None:
            now = time.perf_counter()
            if anchored is None and anchor_reached(trig.anchor, proc.pid, out):
                anchored = now
            if anchored is not None and now >= anchored + trig.delay:
                locked = holds_lock(proc.pid, out)
                os.kill(proc.pid, signal.SIGKILL)
                t_kill = now - t0
                break
            wait = POLL_S if anchored is None else min(POLL_S * 5, anchored + trig.delay - now)
            time.sleep(max(wait, 0.0))
        proc.wait()
    if proc.returncode == -signal.SIGKILL:
        return Attempt(t_kill, proc.returncode, phase(out, n_blocks, since, locked))
    if proc.returncode == 0:
        return Attempt(None, 0, "finished before kill (not counted)")
    tail = (err.read_text(errors="replace").strip().splitlines() or ["(no stderr)"])[-1]
    return Attempt(None, proc.returncode, f"crashed before kill (exit {proc.returncode})", tail)


def rerun(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, int, str]:
    """One rerun without a kill: (exit status, blocks it resumed, last stderr line if it failed)."""
    try:
        p = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, 0, f"timed out after {timeout:.0f} s"
    m = re.search(r"\((\d+) blocks resumed", p.stdout)
    error = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1] if p.returncode else ""
    return p.returncode, int(m.group(1)) if m else 0, error


# --------------------------------------------------------------------------- the loop


@dataclass
class Row:
    """One line of the table: a kill (``number`` > 0) or a run that ended before its kill (``number`` 0)."""

    number: int
    round: int
    trigger: str
    t_kill: float | None
    phase: str
    reruns: int | None = None
    resumed: int | None = None
    identical: bool | None = None
    detail: str = ""


@dataclass
class Loop:
    """Everything the kill loop needs, built once after the reference run."""

    cmd: list[str]
    env: dict[str, str]
    out: Path
    ref: dict[str, str]
    timeline: Timeline
    n_blocks: int
    args: argparse.Namespace
    rng: random.Random
    rows: list[Row] = field(default_factory=list)
    kills: int = 0
    outputs: list[bool] = field(default_factory=list)  # one per round: final output identical?
    side_checks: list[bool] = field(default_factory=list)  # runs that finished before their kill

    def random_trigger(self, resumed_from: int | None = None) -> Trigger:
        """A random kill time; for a rerun (``resumed_from`` blocks done) within the work it has left."""
        u = self.rng.uniform(0.05, 0.95)
        tl = self.timeline
        if self.args.anchor == "start":
            return Trigger(f"random {u:.2f} x wall", None, u * tl.wall)
        if resumed_from is None:
            return Trigger(f"random {u:.2f} x span", MANIFEST, u * tl.active)
        span = tl.remaining(resumed_from)
        if Path("/proc/locks").exists():  # the manifest is there already: time from taking the lock
            return Trigger(f"random {u:.2f} x rest", LOCK_HELD, u * span)
        return Trigger(f"random {u:.2f} x rest", None, (tl.manifest or 0.0) + u * span)  # past start-up

    def finish(self, min_reruns: int = 1) -> bool:
        """Rerun to completion (at least ``min_reruns``, at most ``--max-reruns`` times), compare, and
        fill in the last row. A kill is always followed by a rerun, even when the output already looks
        finished: the user's next step after a kill is to run the same command again."""
        row, reruns, resumed, error = self.rows[-1], 0, 0, ""
        while reruns < self.args.max_reruns and (reruns < min_reruns or not is_finished(self.out)):
            reruns += 1
            rc, blocks, error = rerun(self.cmd, self.env, 10 * self.timeline.wall + 60)
            resumed = blocks if rc == 0 else resumed
        row.reruns, row.resumed = reruns, resumed
        if not is_finished(self.out):
            row.identical, row.detail = False, f"rerun failed {reruns}x: {error}"
        else:
            diff = differences(self.ref, digest(self.out))
            row.identical = not diff
            row.detail = "; ".join(x for x in (row.detail, *diff) if x)
        shutil.rmtree(self.out, ignore_errors=True)
        return row.identical

    def add_kill(self, round_no: int, trig: Trigger, att: Attempt) -> None:
        self.kills += 1
        self.rows.append(Row(self.kills, round_no, trig.label, att.t_kill, att.phase))

    def fresh_kill(self, planned: Trigger, round_no: int) -> None:
        """Kill a run started from scratch; a run that ends first is reported, compared and retried."""
        trig, misses = planned, 0
        while True:
            shutil.rmtree(self.out, ignore_errors=True)
            att = start_and_kill(self.cmd, self.env, self.out, trig, self.n_blocks)
            if att.t_kill is not None:
                self.add_kill(round_no, trig, att)
                return
            misses += 1
            log(f"  {trig.label}: {att.phase} {att.error}")
            self.rows.append(Row(0, round_no, trig.label, None, att.phase, detail=att.error))
            self.side_checks.append(self.finish(min_reruns=0))
            if misses >= MAX_MISSES:
                raise SystemExit(f"bench: {misses} runs in a row ended before their kill; giving up")
            trig = trig if trig.event and misses < 3 else self.random_trigger()

    def chained_kills(self, round_no: int, count: int) -> None:
        """Kill reruns of the same output ``count`` more times; a rerun that finishes ends the chain."""
        for _ in range(count):
            manifest = read_manifest(self.out) or {}
            if manifest.get("status") == "complete":
                return  # nothing left to interrupt; the final rerun follows
            trig = self.random_trigger(resumed_from=len(manifest.get("blocks_done", [])))
            att = start_and_kill(self.cmd, self.env, self.out, trig, self.n_blocks)
            if att.t_kill is None:  # the final rerun below still runs the command once more
                self.rows.append(Row(0, round_no, "chained " + trig.label, None, att.phase, detail=att.error))
                return
            self.add_kill(round_no, Trigger("chained " + trig.label, None, 0.0), att)

    def run(self, planned: list[Trigger]) -> None:
        """Rounds of: a fresh run killed once (plus chained kills), reruns to completion, comparison."""
        round_no = 0
        while self.kills < self.args.kills:
            round_no += 1
            trig = planned[round_no - 1] if round_no <= len(planned) else self.random_trigger()
            self.fresh_kill(trig, round_no)
            self.chained_kills(round_no, min(self.args.chain - 1, self.args.kills - self.kills))
            ok = self.finish()
            self.outputs.append(ok)
            r = next(r for r in reversed(self.rows) if r.number)
            log(
                f"kill {r.number}/{self.args.kills} at {r.t_kill:.2f} s ({r.phase}): "
                f"identical {'yes' if ok else 'NO: ' + self.rows[-1].detail}"
            )


def planned_triggers(n_rounds: int, n_blocks: int, loop: Loop) -> list[Trigger]:
    """First kill of each round: event kills (very early, in a shard write, finalizing) around random ones."""
    early = Trigger("manifest appears", MANIFEST, 0.0, event=True)
    late = [Trigger("top-level shard appears", shard(n_blocks, n_blocks), 0.0, event=True)]
    if n_rounds >= 8:
        mid = n_blocks // 2
        late = [
            Trigger(f"shard {mid + 1} .tmp appears", shard(mid, n_blocks) + ".tmp", 0.0, event=True),
            Trigger("index appears", INDEX, 0.0, event=True),
            *late,
        ]
    special = [early, *late][:n_rounds]
    randoms = [loop.random_trigger() for _ in range(n_rounds - len(special))]
    return special[:1] + randoms + special[1:]


# --------------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        torch = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = "?"
    py = platform.python_version()
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, Python {py}, torch {torch}"


def table(rows: list[Row], chain: bool) -> list[str]:
    """Markdown: one row per kill (and per run that ended before its kill); numbers right-aligned."""
    head = ["kill #", *(["round"] if chain else []), "trigger", "killed at (s)", "phase at kill", "reruns",
            "resumed blocks", "identical"]  # fmt: skip
    numeric = ("kill #", "round", "killed at (s)", "reruns", "resumed blocks")
    lines = [head, ["---:" if h in numeric else "---" for h in head]]
    for r in rows:
        same = "" if r.identical is None else "yes" if r.identical else "**NO**"
        cells = [
            str(r.number) if r.number else "–",
            *([str(r.round)] if chain else []),
            r.trigger,
            "–" if r.t_kill is None else f"{r.t_kill:.2f}",
            r.phase,
            "" if r.reruns is None else str(r.reruns),
            "" if r.resumed is None else str(r.resumed),
            same + (f" ({r.detail})" if r.detail else ""),
        ]
        lines.append(cells)
    return ["| " + " | ".join(c) + " |" for c in lines]


def timeline_line(tl: Timeline) -> str:
    def fmt(t: float | None) -> str:
        return "–" if t is None else f"{t:.2f}"

    blocks = ", ".join(f"{t:.2f}" for t in tl.blocks)
    return (
        f"{tl.wall:.2f} s wall; manifest at {fmt(tl.manifest)} s; blocks done at {blocks} s; "
        f"top-level shard {fmt(tl.top_shard)} s, index {fmt(tl.index)} s, config.json {fmt(tl.config)} s, "
        f"manifest complete {fmt(tl.complete)} s"
    )


# --------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", help="directory or alias (default: a tiny random Llama built here)")
    p.add_argument("--kills", type=int, default=20, help="kills to make (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    p.add_argument("--chain", type=int, default=1, help="kills on the same output before it may finish")
    p.add_argument(
        "--anchor",
        choices=("manifest", "start"),
        default="manifest",
        help="time random kills from the manifest's creation (default) or process start",
    )
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--calib", default="c4")
    p.add_argument("--max-ram", default="2GB")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=8, help="tiny model: decoder blocks")
    p.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size (multiple of 32)")
    p.add_argument("--max-reruns", type=int, default=3, help="reruns after a kill before it counts as failed")
    p.add_argument("--live", action="store_true", help="run the checkout's code, not a frozen copy")
    p.add_argument("--work-dir", type=Path, help="where models and outputs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p


def report(loop: Loop, args: argparse.Namespace, check: str, command: str, total: float) -> str:
    """Settings, the reference timeline, the table, the summary line, then machine and command."""
    model = args.model or f"tiny random Llama ({args.layers} layers, hidden {args.hidden})"
    lines = [
        "## romcomp kill-and-resume benchmark",
        "",
        f"- model: {model}, {loop.n_blocks} blocks; ratio {args.ratio:g}, "
        f"{args.n_samples} x {args.seq_len} {args.calib} tokens, {args.threads} thread(s)",
        f"- reference run: {timeline_line(loop.timeline)}",
        f"- kill times: {args.anchor}-anchored, seed {args.seed}"
        + (f", up to {args.chain} kills per output" if args.chain > 1 else ""),
        "",
        *table(loop.rows, args.chain > 1),
        "",
        f"{loop.kills} kills, {sum(loop.outputs)} identical outputs"
        + (f" (of {len(loop.outputs)} outputs)" if args.chain > 1 else ""),
    ]
    if loop.side_checks:
        lines.append(
            f"({len(loop.side_checks)} runs ended before their kill, not counted; "
            f"{sum(loop.side_checks)} of their outputs identical to the reference)"
        )
    if check:
        lines.append(f"determinism check (an uninterrupted second run): {check}")
    frozen = "" if args.live else " (frozen copy of romcomp)"
    return "\n".join(
        [
            *lines,
            "",
            f"- machine: {machine()}",
            f"- compress command: `{shlex.join(loop.cmd)}`{frozen}",
            f"- command: `{command}`",
            f"- total time: {total / 60:.1f} min ({total:.0f} s)",
        ]
    )


def determinism_check(loop: Loop) -> str:
    """After a difference: is an uninterrupted rerun identical to the reference at all?"""
    shutil.rmtree(loop.out, ignore_errors=True)
    rc, _, error = rerun(loop.cmd, loop.env, 10 * loop.timeline.wall + 60)
    if rc != 0:
        return f"an uninterrupted second run failed: {error}"
    diff = differences(loop.ref, digest(loop.out))
    shutil.rmtree(loop.out, ignore_errors=True)
    return "identical to the reference" if not diff else "it differs too (" + "; ".join(diff) + ")"


def main() -> None:
    args = parser().parse_args()
    if args.kills < 1 or args.chain < 1:
        raise SystemExit("bench: --kills and --chain must be positive")
    t_start = time.perf_counter()
    command = shlex.join([sys.executable, *sys.argv])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-kill-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        code = REPO_ROOT if args.live else freeze_code(work / "code")
        model = args.model
        if model is None:
            log(f"building a tiny random Llama ({args.layers} layers, hidden {args.hidden})")
            model = str(build_tiny_model(work / "tiny-llama", args.layers, args.hidden, seed=0))
        env = child_env(code)
        ref_out, out = work / "reference", work / "run"
        for stale in (ref_out, out):  # a reused --work-dir: start both outputs from nothing
            shutil.rmtree(stale, ignore_errors=True)
        log(f"reference run: {shlex.join(compress_cmd(model, ref_out, args))}")
        tl = reference_run(compress_cmd(model, ref_out, args), env, ref_out)
        n_blocks = json.loads((ref_out / "config.json").read_text())["num_hidden_layers"]
        log(f"reference: {timeline_line(tl)}")
        loop = Loop(cmd=compress_cmd(model, out, args), env=env, out=out, ref=digest(ref_out), timeline=tl,
                    n_blocks=n_blocks, args=args, rng=random.Random(args.seed))  # fmt: skip
        loop.run(planned_triggers(-(-args.kills // args.chain), n_blocks, loop))
        bad = not all(loop.outputs) or not all(loop.side_checks)
        check = determinism_check(loop) if bad else ""
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(report(loop, args, check, command, time.perf_counter() - t_start), flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
