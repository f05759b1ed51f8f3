"""A resumable shard-to-shard pass over ranks: the machinery under ``vlmr narrate`` and ``vlmr judge``.

A *pass* reads a shard set, turns each sample into zero or one output sample (``PassWork``),
and writes a new shard set with the same layout (stage tars + ``manifest.json`` naming its
source in ``derived_from``, plus ``failures.jsonl`` for every sample left out).

Units of work
-------------
The input is cut into *units* from the manifest alone, the way the reader plans: stages in
the order asked, shards in manifest order, each input shard cut into runs of at most
``samples_per_shard`` consecutive samples (a :class:`Unit` is one ``ReadRange`` of the
reader's plan). Each unit becomes exactly one output shard, named by the unit's index, so
names never collide across ranks and do not depend on how many ranks there are::

    narrate:  easy-000000.tar, easy-000001.tar, ..., hard-000000.tar   (one output stage per input stage)
    judge:    pairs-000000.tar, pairs-000001.tar, ...                  (every unit into one stage)

A unit whose samples are all left out writes no tar (its index is a gap in the names).

Ranks
-----
Pending units are dealt round-robin (``pending[rank::world_size]``), so every rank gets
the same share, also when resuming a partly done run, with any number of ranks. Each rank
reads its units with its own ``ShardReader`` (no shuffle), writes their shards, and after
each one records it in ``OUT/.progress/unit-NNNNNN.json`` (written atomically, after the
tar was renamed into place). After a barrier, rank 0 merges the records in unit order into
``manifest.json`` (written last), ``failures.jsonl`` and ``summary.json``. Ranks share
nothing but the output folder: on several nodes it must be shared storage. Rank 0 holds the
folder's lock (``OUT/.vlmr.lock``, :mod:`dataengine.lock`) from the start to the manifest,
so a second run into the same folder, of this command or any other, is refused.

Resume
------
A unit is done when its record exists and the shard files it lists have the recorded
sizes. Rerunning the same command redoes exactly the units that are not done: a tar
renamed into place whose record was never written is written again under the same name,
temp files of a killed write are deleted, so nothing is lost or duplicated. The settings
that change the output (``identity``: config, input manifest hash, model fingerprint) are
kept in ``OUT/.progress/plan.json``; a rerun with other settings is refused unless
``overwrite`` is set. The progress folder stays after a complete run, so rerunning a
finished pass only rewrites the same manifest.

Outputs are deterministic per unit (a pass must derive any randomness from the unit's
samples, never from the rank), so 1 and N ranks, and a killed-and-resumed run, give the
same samples in the same order.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from tqdm import tqdm

from dataengine import dist, pack, schema
from dataengine.lock import FolderLock, FolderLocked
from dataengine.reader import ShardReader
from dataengine.schema import Manifest, ShardInfo, StageInfo, write_text_atomic

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
PLAN_NAME = "plan.json"
SUMMARY_NAME = "summary.json"
PLAN_FORMAT = "vlmr-shardpass/1"
KEPT = "kept"
UNREADABLE = "unreadable"
# Members the reader names by field; written back under their tar suffix.
_MEMBER_SUFFIX = {"json": schema.JSON, "feat": schema.FEAT, "clips": schema.CLIPS}
_READER_KEYS = ("key", "stage", "shard", "substitute_for")


# ------------------------------------------------------------------------------ ranks

@contextlib.contextmanager
def process_group(ranks: dist.Ranks):
    """The group of ``ranks`` over gloo (barriers only: the passes exchange nothing but files),
    with :mod:`dataengine.dist`'s one timeout. Joins an existing group; destroys only one it created."""
    created = dist.init("gloo") if ranks.world_size > 1 else False
    try:
        yield ranks
    finally:
        if created:
            dist.close()


def pick_device(requested: str, ranks: dist.Ranks) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU (see :func:`dataengine.dist.pick_device`)."""
    return dist.pick_device(requested, ranks.local_rank)


# ------------------------------------------------------------------------------ units

@dataclass(frozen=True)
class Unit:
    """A run of consecutive samples of one input shard; becomes one output shard."""

    index: int
    """Unit number in stream order (0..)."""
    stage: str
    """Input stage."""
    url: str
    """Input shard URL as the manifest resolves it."""
    first: int
    """Index of the unit's first sample within the input shard."""
    count: int
    start: int
    """Stream position (over the stages read) of the unit's first sample."""
    out_stage: str
    out_index: int
    """Index of its output shard within ``out_stage`` (the NNNNNN of ``STAGE-NNNNNN.tar``)."""

    @property
    def out_name(self) -> str:
        return schema.shard_name(self.out_stage, self.out_index)


def plan_units(reader: ShardReader, samples_per_shard: int, out_stage: str | None = None) -> list[Unit]:
    """The units of ``reader``'s stages, in stream order, from the reader's own plan.

    ``reader`` must read everything in stream order (one rank, no shuffle); each of its
    ``ReadRange``s (a run of samples of one shard) is cut into units of at most
    ``samples_per_shard``. ``out_stage`` None keeps each input stage (output index counted
    within the stage); a name sends every unit to that stage (output index = unit index).
    E.g. easy shards of 8 and 5 samples and ``samples_per_shard`` 4 give units of 4, 4, 4, 1
    samples, written as easy-000000.tar .. easy-000003.tar.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be >= 1")
    if reader.world_size != 1 or reader.shuffle != "none":
        raise ValueError("plan_units needs a one-rank reader without shuffle (the whole stream in order)")
    units: list[Unit] = []
    per_stage: collections.Counter = collections.Counter()
    start = 0
    for read in reader.plan(0):
        for first in range(read.first, read.first + read.count, samples_per_shard):
            count = min(samples_per_shard, read.first + read.count - first)
            index = len(units)
            units.append(Unit(index=index, stage=read.stage, url=read.url, first=first, count=count,
                              start=start, out_stage=out_stage or read.stage,
                              out_index=index if out_stage else per_stage[read.stage]))
            per_stage[read.stage] += 1
            start += count
    return units


def source_stages(source: str | os.PathLike) -> list[str]:
    """The non-empty stages of a shard set, in manifest order (read as the reader reads it)."""
    from dataengine.sources import open_manifest

    _, manifest = open_manifest(os.fspath(source))
    return [s.name for s in manifest.stages if s.samples > 0]


# ------------------------------------------------------------------------------ work

@dataclass
class Outcome:
    """What became of one input sample: written (``sample``) or left out (``failure``)."""

    key: str
    outcome: str
    """What happened: ``kept`` (or another name for a written sample, e.g. ``kept_soft``), else
    the reason it was left out (``too_long``, ...). Counted in the summary."""
    sample: dict[str, Any] | None = None
    """The output sample for :class:`dataengine.pack.ShardWriter` (``__key__`` and members);
    None leaves the input sample out, with a failures.jsonl line."""
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra fields for the failures.jsonl line (id, video_id, ...)."""


class PassWork(Protocol):
    """One shard-to-shard pass: input samples in, one :class:`Outcome` per sample out, in order.

    ``process`` gets the samples of one unit (reader dicts: ``key``, ``json``, ``feat``, ...)
    and must yield exactly one outcome per sample, in input order. ``unit_extras`` returns
    JSON-able numbers about the unit just processed (kept in its progress record);
    ``merge_extras`` combines the records' extras into the run's summary.
    """

    command: str

    def process(self, samples: Iterator[dict[str, Any]]) -> Iterator[Outcome]: ...

    def unit_extras(self) -> dict[str, Any]: ...

    def merge_extras(self, extras: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


def output_members(sample: dict[str, Any], *, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A reader sample's members as a :class:`ShardWriter` sample (``feat`` -> ``feat.npy``, ...).

    Tensors become numpy arrays (their dtype kept); members in ``drop`` (reader names, e.g.
    ``clips``) are left out.
    """
    drop = set(drop)
    out: dict[str, Any] = {"__key__": sample["key"]}
    for name, value in sample.items():
        if name in _READER_KEYS or name in drop:
            continue
        if isinstance(value, torch.Tensor):
            value = value.numpy()
        out[_MEMBER_SUFFIX.get(name, name)] = value
    return out


def fingerprint_files(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the names and bytes of the files that exist among ``paths`` (identity of a model)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if path.is_file():
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                while chunk := f.read(4 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def key_seed(seed: int, keys: Sequence[str], attempt: int = 0) -> int:
    """A 63-bit seed from the run's seed, sample keys and an attempt number (never pid or time)."""
    text = json.dumps([seed, list(keys), attempt])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


# ------------------------------------------------------------------------------ the run

@dataclass
class PassSummary:
    """Counts of one run: this rank's (``units_done``...) and, on rank 0, the whole set's."""

    command: str
    samples_in: int = 0
    samples_out: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    units: int = 0
    units_done: int = 0
    """Units processed in this run: by every rank on rank 0 (after the merge), else by this rank."""
    units_resumed: int = 0
    """Units found done by an earlier run and kept."""
    shards: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    complete: bool = False
    """Rank 0 wrote the merged manifest."""

    def lines(self) -> list[str]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items(), key=lambda kv: kv[0] != KEPT))
        extras = ", ".join(f"{k} {v}" for k, v in self.extras.items())
        lines = [f"samples: {self.samples_in} in, {self.samples_out} out ({outcomes or 'none'})",
                 f"units: {self.units} ({self.units_resumed} kept from an earlier run, {self.units_done} done "
                 f"now); shards: {self.shards}; {self.seconds:.1f} s"]
        if extras:
            lines.append(extras)
        return lines

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["outcomes"] = dict(self.outcomes)
        return out


class PassError(RuntimeError):
    """The output folder cannot be used for this run (other settings, another command...)."""


def _progress_dir(out: Path) -> Path:
    return out / PROGRESS_DIR


def _record_path(out: Path, unit: Unit) -> Path:
    return _progress_dir(out) / f"unit-{unit.index:06d}.json"


def _load_record(out: Path, unit: Unit) -> dict[str, Any] | None:
    """The unit's progress record when the unit is done (record and its shards intact), else None."""
    path = _record_path(out, unit)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # written atomically, so only a foreign file looks like this: redo the unit
    for shard in record.get("shards", []):
        tar = out / shard["url"]
        if not tar.is_file() or tar.stat().st_size != shard["bytes"]:
            return None
    return record


def _clear_outputs(out: Path) -> None:
    """Remove what a pass writes (never anything else in the folder)."""
    shutil.rmtree(_progress_dir(out), ignore_errors=True)
    for name in (schema.MANIFEST_NAME, schema.FAILURES_NAME, SUMMARY_NAME):
        (out / name).unlink(missing_ok=True)
    for path in out.glob("*.tar"):
        path.unlink()


def _remove_temp_files(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)


def prepare_output(out: Path, *, command: str, identity: dict[str, Any], units: int, overwrite: bool,
                   source: str) -> None:
    """Rank 0, before any rank writes: check the folder belongs to this run, or start it."""
    if Path(source).resolve() == out.resolve() or Path(source).resolve() == (out / schema.MANIFEST_NAME).resolve():
        raise PassError(f"--out {out} is the input set; write the output to another folder")
    plan_path = _progress_dir(out) / PLAN_NAME
    plan = {"format": PLAN_FORMAT, "command": command, "units": units, "identity": identity}
    if overwrite:
        _clear_outputs(out)
    elif plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old.get("command") != command or old.get("identity") != identity or old.get("units") != units:
            differ = sorted(k for k in set(identity) | set(old.get("identity", {}))
                            if identity.get(k) != old.get("identity", {}).get(k))
            raise PassError(f"{out} holds a {old.get('command')} run with other settings "
                             f"({', '.join(differ) or 'units'} differ); pass --overwrite to replace it, "
                             "or write to another --out")
    elif (out / schema.MANIFEST_NAME).exists() or any(out.glob("*.tar")):
        raise PassError(f"{out} already holds shards that no {command} run recorded; pass --overwrite "
                         "to replace them, or write to another --out")
    out.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out)
    _remove_temp_files(_progress_dir(out))
    write_text_atomic(plan_path, json.dumps(plan, indent=1) + "\n")


def unit_samples(reader: ShardReader, unit: Unit) -> Iterator[dict[str, Any]]:
    """The unit's samples, read by positioning the reader at the unit's first stream position."""
    state = reader.state_dict()
    state.update(start=unit.start, offset=0, yielded=0)
    reader.load_state_dict(state)
    it = iter(reader)
    try:
        for i in range(unit.count):
            sample = next(it)
            # (A stand-in for a lost sample is a copy of a readable one, maybe of another shard.)
            if sample["shard"] != unit.url and not sample.get("substitute_for"):  # a bug, never data
                raise RuntimeError(f"unit {unit.index}: sample {i} came from {sample['shard']}, expected {unit.url}")
            yield sample
    finally:
        it.close()


def run_unit(work: PassWork, reader: ShardReader, unit: Unit, out: Path, ranks: dist.Ranks,
             bar: tqdm) -> dict[str, Any]:
    """Process one unit into its shard (temp name, then rename), then write its record."""
    started = time.perf_counter()
    outcomes: collections.Counter = collections.Counter()
    failures: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []

    def readable() -> Iterator[dict[str, Any]]:
        for sample in unit_samples(reader, unit):
            bar.update(1)
            if sample.get("substitute_for"):  # the reader's stand-in for a sample it could not read
                unreadable.append({"key": sample["substitute_for"], "reason": UNREADABLE, "samples": 1,
                                   "message": "the reader skipped it (on_error=skip); see its log"})
                continue
            yield sample

    writer = pack.ShardWriter(out, unit.out_stage, maxcount=unit.count, maxsize=1 << 62,
                              start_index=unit.out_index)
    with writer:
        for outcome in work.process(readable()):
            outcomes[outcome.outcome] += 1
            if outcome.sample is not None:
                writer.write(outcome.sample)
            else:
                failures.append({"key": outcome.key, **outcome.info, "reason": outcome.outcome,
                                 "message": outcome.message, "samples": 1})
    for shard in writer.info.shards:
        # ShardWriter's temp file is created 0600; shards are meant to be read by others.
        os.chmod(out / shard.url, 0o644)
    outcomes[UNREADABLE] += len(unreadable)
    failures += unreadable
    if outcomes[UNREADABLE] == 0:
        del outcomes[UNREADABLE]
    seen = sum(outcomes.values())
    if seen != unit.count:
        raise RuntimeError(f"{work.command}: unit {unit.index} ({unit.url}) gave {seen} outcomes for "
                           f"{unit.count} samples; every sample must have one")
    record = {"unit": unit.index, "out_stage": unit.out_stage,
              "source": {"stage": unit.stage, "url": unit.url, "first": unit.first, "count": unit.count},
              "shards": [dataclasses.asdict(s) for s in writer.info.shards],
              "outcomes": dict(outcomes), "failures": failures, "extras": work.unit_extras(),
              "rank": ranks.rank, "seconds": round(time.perf_counter() - started, 3)}
    write_text_atomic(_record_path(out, unit), json.dumps(record) + "\n")
    return record


def merge(out: Path, units: Sequence[Unit], work: PassWork, *, settings: dict[str, Any],
          derived_from: str, summary: PassSummary) -> Manifest:
    """Rank 0: the unit records, in unit order, into manifest.json (last), failures.jsonl, summary.json."""
    stages: dict[str, StageInfo] = {}
    failures: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    outcomes: collections.Counter = collections.Counter()
    missing = []
    for unit in units:
        stages.setdefault(unit.out_stage, StageInfo(name=unit.out_stage))
        record = _load_record(out, unit)
        if record is None:
            missing.append(unit.index)
            continue
        stages[unit.out_stage].shards += [ShardInfo(**s) for s in record["shards"]]
        failures += record["failures"]
        extras.append(record["extras"])
        outcomes.update(record["outcomes"])
    if missing:
        raise RuntimeError(f"{out}: units {missing[:10]} are not done after every rank finished "
                           "(did a rank fail?); rerun the same command to finish them")
    manifest = Manifest(settings=settings, samples=sum(s.samples for s in stages.values()),
                        failures=len(failures), stages=list(stages.values()), derived_from=derived_from)
    summary.outcomes = outcomes
    summary.samples_in = sum(u.count for u in units)
    summary.samples_out = manifest.samples
    summary.shards = sum(len(s.shards) for s in stages.values())
    summary.extras = work.merge_extras(extras)
    summary.units_done = len(units) - summary.units_resumed
    summary.complete = True
    write_text_atomic(out / schema.FAILURES_NAME, "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
    write_text_atomic(out / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=1) + "\n")
    pack.remove_stale_shards(out, keep=[s.url for st in stages.values() for s in st.shards])
    manifest.save(out)
    return manifest


def run_pass(work: PassWork, *, source: str, out: str | os.PathLike, stages: Sequence[str] | None,
              out_stage: str | None, samples_per_shard: int, settings: dict[str, Any],
              identity: dict[str, Any], fields: Sequence[str] | None, on_error: str = "raise",
              ranks: dist.Ranks | None = None, overwrite: bool = False, progress: bool = True,
              prefetch_bytes: int = 32 << 20,
              after_unit: Callable[[Unit, dict[str, Any]], None] | None = None) -> PassSummary:
    """Run ``work`` over every pending unit of this rank, then (rank 0) merge the manifest.

    A collective call: every rank calls it with the same arguments. ``stages`` None reads
    every stage of the input in manifest order. ``identity`` holds what makes the output
    what it is (checked on resume); ``settings`` is saved in the manifest. ``after_unit``
    is called after each unit's record is written (tests use it to stop a run).
    """
    ranks = ranks or dist.Ranks()
    out = Path(out)
    started = time.perf_counter()
    stages = list(stages) if stages else source_stages(source)
    reader = ShardReader(source, stages=list(stages), rank=0, world_size=1, batch_size=1, shuffle="none",
                         fields=fields, on_error=on_error, prefetch_bytes=prefetch_bytes)
    units = plan_units(reader, samples_per_shard, out_stage)
    source_hash = hashlib.sha256(json.dumps(reader.manifest.to_dict(), sort_keys=True).encode()).hexdigest()
    identity = {**identity, "source_manifest_sha256": source_hash, "stages": list(stages),
                "samples_per_shard": samples_per_shard, "out_stage": out_stage}
    summary = PassSummary(command=work.command, units=len(units))

    # Rank 0 holds the output folder's lock until the manifest is written: a second run
    # into the same --out (any command) is refused before it touches anything.
    with FolderLock(out, command=work.command) if ranks.is_main else contextlib.nullcontext():
        if ranks.is_main:
            prepare_output(out, command=work.command, identity=identity, units=len(units), overwrite=overwrite,
                           source=os.fspath(source))
        ranks.barrier()
        done = {u.index for u in units if _load_record(out, u) is not None}
        pending = [u for u in units if u.index not in done]
        mine = pending[ranks.rank::ranks.world_size]
        summary.units_resumed = len(done)
        if done and ranks.is_main:
            log.info("%s: resuming %s: %d of %d units already done", work.command, out, len(done), len(units))
        if pending and ranks.is_main:
            # It will describe tars about to be (re)written: the folder is complete again only
            # when the new manifest is written.
            (out / schema.MANIFEST_NAME).unlink(missing_ok=True)

        with tqdm(total=sum(u.count for u in mine), desc=f"{work.command} rank {ranks.rank}", unit="sample",
                  disable=not (progress and ranks.is_main), dynamic_ncols=True) as bar:
            for unit in mine:
                record = run_unit(work, reader, unit, out, ranks, bar)
                summary.units_done += 1
                if after_unit is not None:
                    after_unit(unit, record)
        ranks.barrier()
        summary.seconds = time.perf_counter() - started
        if ranks.is_main:
            merge(out, units, work, settings={"command": work.command, **settings, "identity": identity},
                  derived_from=reader.manifest_url, summary=summary)
        ranks.barrier()  # every rank returns with the set complete (a next pass may read it at once)
    return summary


# ------------------------------------------------------------------------------ reading outputs

def read_set(folder: str | os.PathLike, fields: Sequence[str] | None = ("json", "feat")) -> list[dict[str, Any]]:
    """Every sample of a shard set in stream order (small sets: tests, inspection)."""
    manifest = Manifest.load(folder)
    stages = [s.name for s in manifest.stages if s.samples > 0]
    if not stages:
        return []
    return list(ShardReader(folder, stages=stages, shuffle="none", fields=fields, prefetch_bytes=0))


# ------------------------------------------------------------------------------ command

def in_alias(argv: Sequence[str]) -> list[str]:
    """``--in X`` / ``--in=X`` as ``--input`` (``in`` cannot be a dataclass field name)."""
    out = []
    for arg in argv:
        if arg == "--in":
            arg = "--input"
        elif arg.startswith("--in="):
            arg = "--input=" + arg[len("--in="):]
        out.append(arg)
    return out


def pass_main(config_cls: type, run: Callable[..., "PassSummary"], argv: Sequence[str] | None, prog: str,
               headline: Callable[[Any], str]) -> int:
    """The command of a shard-to-shard pass: parse, join the process group, run, summarise."""
    from dataengine import config as cfg

    config = cfg.parse_config(config_cls, in_alias(sys.argv[1:] if argv is None else argv), prog=prog)
    ranks = dist.Ranks.from_env()
    with process_group(ranks):
        try:
            summary = run(config, ranks=ranks)
        except (PassError, FolderLocked, ValueError) as exc:  # ShardError is a ValueError
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # a path that cannot be read or written, a full disk: one line
            where = f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc)
            print(f"{prog}: error: {where}", file=sys.stderr)
            return 1
    if ranks.is_main:
        print(headline(config))
        for line in summary.lines():
            print("  " + line)
    return 0
