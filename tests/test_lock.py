"""One writer per output folder (issue 16): a second writer is refused, naming the holder; a
lock left by a killed process is taken over; narrate/judge outputs are locked the same way.
The two-builds-into-one-folder test with real processes is in test_build.py."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from dataengine import lock, pack, schema


def start_holder(folder, command="holder-cmd"):
    """A real process that takes the folder's lock and sleeps; returns it once it holds the lock."""
    code = ("import sys, time\n"
            "from dataengine.lock import FolderLock\n"
            f"FolderLock(sys.argv[1], {command!r}).acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out)
    try:
        with pytest.raises(lock.FolderLocked) as caught:
            lock.FolderLock(out, "build-shards").acquire()
        message = str(caught.value)
        assert f"pid {holder.pid}" in message and "'holder-cmd'" in message
        assert socket.gethostname() in message and "started 20" in message
        assert str(out / lock.LOCK_NAME) in message
    finally:
        holder.terminate()
        holder.wait()
    # a holder that ended (any way) leaves the folder free
    with lock.FolderLock(out, "build-shards") as held:
        assert held.held
        holder_line = json.loads((out / lock.LOCK_NAME).read_text())
        assert holder_line["pid"] == os.getpid() and holder_line["command"] == "build-shards"
        with pytest.raises(lock.FolderLocked):  # not reentrant: a second writer in this process too
            lock.FolderLock(out, "narrate").acquire()
    assert not (out / lock.LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path, caplog):
    out = tmp_path / "out"
    holder = start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    left = json.loads((out / lock.LOCK_NAME).read_text())
    assert left["pid"] == holder.pid  # kill -9 cleans nothing up: the file names a dead process
    with caplog.at_level(logging.WARNING, logger="dataengine.lock"):
        with lock.FolderLock(out, "build-shards") as held:
            assert held.took_over["pid"] == holder.pid
    assert f"taking over the lock of 'holder-cmd' (pid {holder.pid}" in caplog.text
    assert "no longer running" in caplog.text


def test_a_lock_from_another_host_is_left_to_the_user(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / lock.LOCK_NAME).write_text(json.dumps({"host": "elsewhere-node", "pid": 4242, "command": "judge",
                                                   "started": "2026-01-01T00:00:00+00:00"}) + "\n")
    with pytest.raises(lock.FolderLocked, match=r"'judge' \(pid 4242 on host elsewhere-node.*delete .*\.vlmr\.lock"):
        lock.FolderLock(out, "narrate").acquire()


# ---------------------------------------------------------------------------- narrate / judge outputs

class _CopyWork:
    """The smallest shard-to-shard pass: every sample out as it came in."""

    command = "copy"

    def process(self, samples):
        from train.shardpass import Outcome, output_members

        for sample in samples:
            yield Outcome(key=sample["key"], outcome="kept", sample=output_members(sample))

    def unit_extras(self):
        return {}

    def merge_extras(self, extras):
        return {}


@pytest.fixture
def tiny_set(tmp_path):
    folder = tmp_path / "in"
    samples = [{"__key__": f"k{i:02d}", "json": {"id": f"k{i:02d}", "answer_tokens": i},
                "feat.npy": np.full((2, 4), i, np.float16)} for i in range(4)]
    stages = pack.write_stages(folder, [("easy", iter(samples))], maxcount=2)
    schema.Manifest(samples=4, stages=stages).save(folder)
    return folder


def run_copy(source, out):
    from train import shardpass

    return shardpass.run_pass(_CopyWork(), source=str(source), out=out, stages=None, out_stage=None,
                                samples_per_shard=2, settings={}, identity={}, fields=("json", "feat"),
                                progress=False, prefetch_bytes=0)


def test_narrate_and_judge_outputs_are_locked_too(tiny_set, tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out, command="build-shards")
    try:
        with pytest.raises(lock.FolderLocked, match=f"pid {holder.pid}"):
            run_copy(tiny_set, out)
        assert list(out.iterdir()) == [out / lock.LOCK_NAME]  # refused before writing anything
    finally:
        holder.terminate()
        holder.wait()
    summary = run_copy(tiny_set, out)
    assert summary.complete and summary.samples_out == 4
    assert not (out / lock.LOCK_NAME).exists()


def test_pass_command_prints_one_line_when_locked(tiny_set, tmp_path, capsys):
    from train import shardpass

    out = tmp_path / "out"
    with lock.FolderLock(out, "judge"):
        def run(config, ranks):
            return run_copy(tiny_set, out)

        code = shardpass.pass_main(_PassConfig, run, [], prog="vlmr copy", headline=lambda c: "done")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"vlmr copy: error: {out} is being written by 'judge' (pid {os.getpid()}")



@dataclass
class _PassConfig:
    """A pass with no settings."""

    seed: int = 0



def test_pass_command_with_an_unusable_out_is_one_line(tiny_set, tmp_path, capsys):
    from train import shardpass

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"

    def run(config, ranks):
        return run_copy(tiny_set, out)

    code = shardpass.pass_main(_PassConfig, run, [], prog="vlmr copy", headline=lambda c: "done")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"vlmr copy: error: {blocker}"), err
