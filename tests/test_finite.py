"""Corrupt feature data is named, never trained on in silence (issue 16.5).

One flipped byte in a built shard's ``.npy`` can make a float16 NaN: before, the loss went
NaN, DeepSpeed printed "OVERFLOW! Skipping step" and the run exited 0. Now the trainers'
preparers stop at the sample (naming the shard and key), ``--verify`` refuses the shard
before reading it (sha256), and a non-finite loss stops the run naming its batch.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dataengine.models import load_tokenizer
from dataengine.reader import ShardReader
from test_sft import write_shards
from train import finite, ppo, rm, sft


def flip_to_nan(shards: Path, stage: str = "easy") -> tuple[str, str]:
    """Change one byte of the first ``feat.npy`` of the stage's first shard so its first float16
    is NaN (high byte 0x7E: exponent all ones, mantissa not zero). Returns (shard name, key)."""
    tar_path = sorted(shards.glob(f"{stage}-*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".feat.npy"))
    data = bytearray(tar_path.read_bytes())
    header_len = int.from_bytes(data[member.offset_data + 8:member.offset_data + 10], "little")
    first_value = member.offset_data + 10 + header_len
    data[first_value + 1] = 0x7E  # little-endian float16: the second byte holds sign, exponent
    tar_path.write_bytes(bytes(data))
    return tar_path.name, member.name.split(".")[0]


@pytest.fixture
def corrupt(tmp_path):
    shards = write_shards(tmp_path / "shards", n=32)
    name, key = flip_to_nan(shards)
    return shards, name, key


def test_the_flipped_byte_makes_a_nan_the_reader_does_not_see(corrupt):
    shards, name, key = corrupt
    sample = next(s for s in ShardReader(shards, stages=["easy"], shuffle="none", fields=("json", "feat"))
                  if s["key"] == key)
    assert torch.isnan(sample["feat"]).any()  # decodes without error: the reader cannot tell


def test_preparer_names_shard_and_key(corrupt):
    shards, name, key = corrupt
    prepare = sft.SamplePreparer(load_tokenizer("tiny"), 256, "truncate")
    reader = ShardReader(shards, stages=["easy"], shuffle="none", fields=("json", "feat"), guard=prepare)
    with pytest.raises(finite.NonFiniteError) as exc:
        list(reader)
    assert name in str(exc.value) and key in str(exc.value) and "inf or NaN" in str(exc.value)


def test_skip_leaves_the_sample_out_and_counts_it(corrupt):
    shards, _, key = corrupt
    prepare = sft.SamplePreparer(load_tokenizer("tiny"), 256, "truncate", on_error="skip")
    reader = ShardReader(shards, stages=["easy"], shuffle="none", fields=("json", "feat"), guard=prepare)
    samples = list(reader)
    assert [s["substitute_for"] for s in samples if s.get("substitute_for")] == [f"{samples[0]['shard']}#{key}"]


def test_verify_refuses_the_shard_by_its_sha256(corrupt):
    from dataengine.reader import ShardError

    shards, name, _ = corrupt
    with pytest.raises(ShardError, match="sha256"):
        list(ShardReader(shards, stages=["easy"], shuffle="none", fields=("json", "feat"), verify=True))
    assert sft.make_reader(sft.SFTConfig(shards=str(shards), verify=True), "easy", 0,
                           sft_ranks(), None).verify


def sft_ranks():
    from dataengine.dist import Ranks

    return Ranks()


def test_every_trainer_checks_features():
    bad = {"key": "k1", "shard": "pairs-000000.tar", "feat": torch.tensor([[1.0, float("inf")]]),
           "json": {"conversations": [{"from": "human", "value": "<video>\nq"}], "chosen": "a", "rejected": "b"}}
    tok = load_tokenizer("tiny")
    preparers = [sft.SamplePreparer(tok, 64, "truncate"), rm.PairPreparer(tok, rm.RMConfig()),
                 ppo.PromptPreparer(tok, 64, 8)]
    for prepare in preparers:
        with pytest.raises(finite.NonFiniteError, match="pairs-000000.tar, key 'k1': feat holds inf or NaN"):
            prepare(bad)
    assert finite.check_features({"feat": np.zeros((2, 2), np.float16)}, "raise")


def test_non_finite_loss_names_the_batch():
    finite.check_loss(torch.tensor(1.5), step=3, rank=0, keys=["a"])
    with pytest.raises(finite.NonFiniteError, match=r"step 3 on rank 1; the batch held: s0.tar#a, s1.tar#b"):
        finite.check_loss(torch.tensor(float("nan")), step=3, rank=1, keys=["a", "b"], shards=["s0.tar", "s1.tar"])


@pytest.mark.slow
def test_sft_on_a_corrupt_shard_fails_naming_it(corrupt):
    """The whole recipe: exit status not 0, the shard and key in the error (was: exit 0)."""
    import os
    import subprocess
    import sys

    shards, name, key = corrupt
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    result = subprocess.run([sys.executable, str(root / "train" / "sft.py"), "--shards", str(shards), "--output",
                             str(shards.parent / "run"), "--micro-batch", "4", "--max-length", "256",
                             "--shuffle", "none"], cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert f"{name}, key '{key}': feat holds inf or NaN" in result.stderr
