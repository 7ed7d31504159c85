"""Sharded batch prediction: N processes, one output folder, one merged table.

``brainbag predict DATA --out OUT --shard K/N`` runs shard K of N (1-based). The rule: the
inputs are sorted by their output path relative to ``OUT`` (unique per input, and the same
whatever order the files were listed or found in), and shard K takes the inputs at positions
K-1, K-1+N, K-1+2N, ... of that order. Every shard of the same inputs therefore agrees on the
split without talking to the others, the shards differ in size by at most one input, and a
re-run of a shard gets the same inputs. Adding or removing inputs moves others between shards:
every shard records a hash of the whole input set and ``brainbag merge`` refuses shards that ran
on different sets.

A shard writes its inputs' subject folders into ``OUT`` as an ordinary run does (distinct for
every input, so shards never write the same file), its rows into
``OUT/shards/predictions.K-of-N.tsv`` and its state into ``OUT/shards/K-of-N.json``. When the last
shard finishes it merges; ``brainbag merge OUT`` does the same by hand: ``OUT/predictions.tsv``
and ``OUT/index.html`` with every input exactly once, checked for one weights file and one set of
result-affecting settings, with ``missing`` rows for inputs no shard finished.

``--shard auto`` reads K and N from a Slurm job array (``SLURM_ARRAY_TASK_ID``,
``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_STEP``, ``SLURM_ARRAY_TASK_COUNT``) or from torchrun
(``RANK``, ``WORLD_SIZE``; ``LOCAL_RANK`` picks the GPU).
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainbag.errors import BrainbagError, UsageError
from brainbag.files import write_json_atomic
from brainbag.run.discover import ScanInput
from brainbag.run.outputs import TSV_COLUMNS, write_tsv_atomic

SHARDS_DIR = "shards"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``, and where that came from."""

    index: int
    count: int
    source: str = "--shard"
    local_rank: int | None = None

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def table(self, out: Path) -> Path:
        return Path(out) / SHARDS_DIR / f"predictions.{self.name}.tsv"

    def state(self, out: Path) -> Path:
        return Path(out) / SHARDS_DIR / f"{self.name}.json"


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"--shard auto: ${name} is {env[name]!r}, not a whole number") from None


def parse_shard(text: str, env: Mapping[str, str] | None = None) -> Shard:
    """``K/N`` or ``auto`` (Slurm array, else torchrun) -> :class:`Shard`."""
    env = os.environ if env is None else env
    text = text.strip()
    if text == "auto":
        if "SLURM_ARRAY_TASK_ID" in env:
            task = _int(env, "SLURM_ARRAY_TASK_ID")
            if "SLURM_ARRAY_TASK_COUNT" not in env:
                raise UsageError("--shard auto: $SLURM_ARRAY_TASK_ID is set but "
                                 "$SLURM_ARRAY_TASK_COUNT is not; give --shard K/N")
            count = _int(env, "SLURM_ARRAY_TASK_COUNT")
            low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            offset = task - low
            if step < 1 or offset < 0 or offset % step:
                raise UsageError(f"--shard auto: Slurm array task {task} is not on the array "
                                 f"{low}, {low + step}, ...; give --shard K/N")
            shard = Shard(offset // step + 1, count,
                          f"Slurm array task {task} (min {low}, step {step}, count {count})")
        elif "RANK" in env and "WORLD_SIZE" in env:
            rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
            local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
            shard = Shard(rank + 1, world, f"torchrun rank {rank} of {world}", local)
        else:
            raise UsageError("--shard auto found neither a Slurm job array "
                             "($SLURM_ARRAY_TASK_ID) nor torchrun ($RANK, $WORLD_SIZE); give "
                             "--shard K/N")
    else:
        parts = text.split("/")
        try:
            index, count = (int(p) for p in parts)
        except ValueError:
            raise UsageError(f"--shard {text!r}: expected K/N (e.g. 2/8) or auto") from None
        shard = Shard(index, count, f"--shard {text}")
    if shard.count < 1 or not 1 <= shard.index <= shard.count:
        raise UsageError(f"--shard: shard {shard.index} of {shard.count} does not exist "
                         f"({shard.source}); K runs from 1 to N")
    return shard


def input_key(item: ScanInput) -> str:
    """The key that orders and identifies an input across shards: its prediction.json path
    relative to the output folder."""
    return item.location.relative("prediction").as_posix()


def input_set_sha256(items: Sequence[ScanInput]) -> str:
    return hashlib.sha256("\n".join(sorted(input_key(i) for i in items)).encode()).hexdigest()


def assign(items: Sequence[ScanInput], shard: Shard) -> list[ScanInput]:
    """The inputs of ``shard``: every N-th of the inputs sorted by key, in their given order."""
    ordered = sorted(input_key(i) for i in items)
    mine = set(ordered[shard.index - 1::shard.count])
    return [i for i in items if input_key(i) in mine]


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class ShardState:
    """``OUT/shards/K-of-N.json``: what a shard was given and how far it got."""

    shard: int
    count: int
    input_set_sha256: str
    inputs: int
    assigned: dict[str, str]  # input key -> absolute input path
    weights_sha256: str | None = None
    weights_id: str | None = None
    settings_fingerprint: str | None = None
    state: str = "running"  # running | complete | interrupted
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=_now)
    finished: str | None = None
    source: str = ""
    png: bool = False

    @property
    def name(self) -> str:
        return Shard(self.shard, self.count).name

    def save(self, out: Path) -> None:
        write_json_atomic(Shard(self.shard, self.count).state(out), self.__dict__)

    def finish(self, out: Path) -> None:
        """Mark the shard complete, now, and save its state."""
        self.state, self.finished = "complete", _now()
        self.save(out)

    @classmethod
    def load(cls, path: Path) -> ShardState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError) as exc:
            raise MergeError(f"shard state {path} is not readable ({exc}); rerun that shard "
                             "with --resume") from exc


def start_state(out: Path, shard: Shard, items: Sequence[ScanInput], mine: Sequence[ScanInput],
                weights_sha256: str, weights_id: str, fingerprint: str, png: bool
                ) -> ShardState:
    state = ShardState(shard.index, shard.count, input_set_sha256(items), len(items),
                       {input_key(i): str(i.path.resolve()) for i in mine}, weights_sha256,
                       weights_id, fingerprint, source=shard.source, png=png)
    state.save(out)
    return state


class MergeError(BrainbagError):
    """Shard outputs that cannot be merged into one table (exit 2: a usage problem)."""

    exit_code = 2


@dataclass
class MergeResult:
    rows: list[dict[str, Any]]
    shards: int
    missing: list[str]  # input paths no shard finished
    failed: list[str]
    running: list[str]  # shards still marked running

    @property
    def complete(self) -> bool:
        return not self.missing and not self.running


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def shard_states(out: Path) -> list[ShardState]:
    folder = Path(out) / SHARDS_DIR
    return [ShardState.load(p) for p in sorted(folder.glob("*-of-*.json"))]


def all_finished(out: Path, states: Sequence[ShardState] | None = None) -> bool:
    """True when every shard of the one shard count in ``out`` has finished (``states``: the
    states already read from ``out``)."""
    states = shard_states(out) if states is None else states
    if not states or len({s.count for s in states}) != 1:
        return False
    return ({s.shard for s in states} == set(range(1, states[0].count + 1))
            and all(s.state == "complete" for s in states))


def merge(out: Path, write: bool = True) -> MergeResult:
    """Check the shards in ``out`` against each other and build ``predictions.tsv`` (and
    ``index.html`` when any PNG exists) with every input exactly once."""
    out = Path(out)
    states = shard_states(out)
    if not states:
        raise MergeError(f"{out} holds no shards ({out / SHARDS_DIR}/*-of-*.json); run "
                         "`brainbag predict ... --out {out} --shard K/N` first")
    counts = sorted({s.count for s in states})
    if len(counts) > 1:
        raise MergeError(f"{out / SHARDS_DIR} holds shards of {' and '.join(map(str, counts))} "
                         "shard runs; keep one set (delete the others' files) and merge again")
    count = counts[0]
    first = states[0]
    for s in states[1:]:
        name = s.name
        if s.input_set_sha256 != first.input_set_sha256 or s.inputs != first.inputs:
            raise MergeError(
                f"shard {name} ran on a different set of inputs ({s.inputs}) than shard "
                f"{first.name} ({first.inputs}); rerun it on the same inputs with "
                "--resume (or --overwrite)")
        if s.weights_sha256 != first.weights_sha256:
            raise MergeError(
                f"shard {name} used weights {s.weights_id} (sha256 {str(s.weights_sha256)[:12]}"
                f"...) but shard {first.name} used {first.weights_id} (sha256 "
                f"{str(first.weights_sha256)[:12]}...); rerun it with the same --weights and "
                "--overwrite")
        if s.settings_fingerprint != first.settings_fingerprint:
            raise MergeError(
                f"shard {name} ran with other result-affecting settings than shard "
                f"{first.name}; rerun it with the same options and --overwrite")
    seen: dict[str, str] = {}
    for s in states:
        for key in s.assigned:
            if key in seen:
                raise MergeError(f"input {s.assigned[key]} is assigned to shards {seen[key]} and "
                                 f"{s.name}; rerun the shards on the same inputs")
            seen[key] = s.name
    rows: dict[str, dict[str, Any]] = {}
    key_to_path = {key: path for s in states for key, path in s.assigned.items()}
    path_to_key = {path: key for key, path in key_to_path.items()}
    for s in states:
        shard = Shard(s.shard, count)
        for row in _read_rows(shard.table(out)):
            row_key = path_to_key.get(row.get("path") or "")
            if row_key is None or seen[row_key] != shard.name:
                raise MergeError(f"{shard.table(out)} has a row for {row.get('path')}, which is "
                                 f"not one of shard {shard.name}'s inputs; rerun it with "
                                 "--overwrite")
            if row.get("status") == "ok" and row.get("weights_sha256") != first.weights_sha256:
                raise MergeError(
                    f"{shard.table(out)}: {row.get('path')} was predicted with weights sha256 "
                    f"{str(row.get('weights_sha256'))[:12]}..., not the shards' "
                    f"{str(first.weights_sha256)[:12]}...; rerun shard {shard.name} with "
                    "--overwrite")
            rows[row_key] = row
    missing = []
    merged: list[dict[str, Any]] = []
    for key in sorted(seen):
        found = rows.get(key)
        if found is None or found.get("status") == "skipped":
            path = key_to_path[key]
            missing.append(path)
            found = {**(found or {}), "path": path, "status": "missing",
                     "error": (found or {}).get("error") or (
                         f"no shard finished this input (shard {seen[key]}); rerun it with "
                         "--resume")}
        merged.append({c: found.get(c, "") for c in TSV_COLUMNS})
    present = {s.shard for s in states}
    absent = [f"{k}-of-{count}" for k in range(1, count + 1) if k not in present]
    if absent:
        missing.append(f"shards never started: {', '.join(absent)} (their inputs are unknown "
                       "until they run)")
    result = MergeResult(
        merged, count, missing,
        [r["path"] for r in merged if r.get("status") == "failed"],
        [s.name for s in states if s.state != "complete"])
    if write:
        write_tsv_atomic(out / "predictions.tsv", merged)
        if any(s.png for s in states):
            from brainbag.run.report import write_index

            write_index(out, merged)
    return result
