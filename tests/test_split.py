"""The seeded split: a partition; `course` gives the course's random_split indices, `hash` is torch-free."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import random_split

from conftest import REPO, run, stage_cmd
from cifarpipe.config import UserError, load_params, parse_params
from cifarpipe.data.split import course_parts, from_json, make_split, split_hash, to_json


def torch_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The course's call, by torch's own function: the Subsets' indices, in their order."""
    train, val = random_split(range(n), (1 - val_fraction, val_fraction), generator=torch.Generator().manual_seed(seed))
    return train.indices, val.indices


# 50,000: CIFAR-10's training set; 101: a small set whose floored lengths (85 + 15) leave one index
# over, which random_split hands to the first (train) part.
@pytest.mark.parametrize("n", [50000, 101])
@pytest.mark.parametrize("seed", [2025, 7])
def test_course_method_gives_torch_random_split_indices(n, seed):
    want_train, want_val = torch_split(n, 0.15, seed)
    assert course_parts(n, 0.15, seed) == (want_train, want_val)  # the Subsets' permutation order
    s = make_split(n, 0.15, seed, method="course")
    assert set(s.val) == set(want_val) and set(s.train) == set(want_train)
    assert s.val == sorted(want_val) and s.train == sorted(want_train)  # stored ascending, like `hash`


def test_course_method_matches_the_course_call_as_written():
    # The literal fractions of the course's code, not 1 - 0.15 computed.
    train, val = random_split(range(50000), (0.85, 0.15), generator=torch.Generator().manual_seed(2025))
    s = make_split(50000, 0.15, 2025, method="course")
    assert (len(s.train), len(s.val)) == (42500, 7500)
    assert s.val == sorted(val.indices) and s.train == sorted(train.indices)


@pytest.mark.parametrize("n, val_fraction", [(7, 0.5), (10, 0.15), (13, 0.3)])
def test_course_method_hands_out_the_remainder_like_torch(n, val_fraction):
    # 7 x 0.5: 3 + 3 floored, the 7th index goes to train (4/3); round() would give validation 4.
    want_train, want_val = torch_split(n, val_fraction, 3)
    assert course_parts(n, val_fraction, 3) == (want_train, want_val)


def test_the_default_split_is_pinned():
    # The split params.yaml configures, on 50,000 images: a change of the default method, seed or
    # fraction, or of torch's randperm, changes this hash and every run's validation set.
    p = load_params(REPO / "params.yaml").split
    assert (p.method, p.val_fraction, p.seed) == ("course", 0.15, 2025)
    s = make_split(50000, p.val_fraction, p.seed, p.method)
    assert s.val[:5] == [0, 6, 29, 34, 36]
    assert split_hash(to_json(s)) == "70b49934ce109e38"


def test_hash_method_is_todays_split_machine_and_version_independent():
    # Pinned values: sha256 ordering depends on no RNG implementation, so these never change.
    s = make_split(50000, 0.15, 2025, method="hash")
    assert s.val[:5] == [1, 4, 5, 7, 11]
    assert split_hash(to_json(s)) == "6586d35e03f40859"


@pytest.mark.parametrize("method", ["course", "hash"])
def test_every_index_lands_in_exactly_one_list(method):
    s = make_split(50000, 0.15, 2025, method=method)
    assert len(s.val) == 7500 and len(s.train) == 42500
    assert sorted(s.train + s.val) == list(range(50000))
    assert not set(s.train) & set(s.val)


@pytest.mark.parametrize("method", ["course", "hash"])
def test_same_seed_same_bytes_other_seed_other_split(method):
    a, b = to_json(make_split(1000, 0.15, 7, method)), to_json(make_split(1000, 0.15, 7, method))
    assert a == b
    assert make_split(1000, 0.15, 8, method).val != make_split(1000, 0.15, 7, method).val


def test_round_trip_and_inconsistent_file_rejected():
    s = make_split(100, 0.2, 1, method="course")
    assert from_json(to_json(s)) == s
    broken = to_json(s).replace(f"[{s.val[0]},", "[", 1)
    with pytest.raises(ValueError, match="exactly one"):
        from_json(broken)


@pytest.mark.parametrize("method", ["course", "hash"])
def test_impossible_fraction_is_refused(method):
    with pytest.raises(ValueError, match="empty train or validation"):
        make_split(3, 0.01, 0, method)


def test_config_rejects_an_unknown_method_naming_the_key():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["split"]["method"] = "random"
    with pytest.raises(UserError, match=r"split\.method = 'random': Input should be 'course' or 'hash'"):
        parse_params(raw)
    del raw["split"]["method"]
    with pytest.raises(UserError, match="missing key 'split.method'"):
        parse_params(raw)


def test_importing_the_split_module_loads_no_torch():
    # from_json (train, benchmarks) and the hash method need no torch; course imports it when called.
    code = "import sys, cifarpipe.data.split; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_stage_writes_the_course_split_of_the_data(tmp_path):
    # The real stage with the real params.yaml on a 500-image training set: validation = the
    # course's random_split, stored ascending, and its hash beside it.
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data/cifar10.npz", train_labels=np.zeros(500, dtype=np.uint8))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    cmd = [sys.executable, str(REPO / "stages/split.py"), "--params", str(tmp_path / "params.yaml"),
           *stage_cmd(REPO, "split")[2:]]
    out = run(cmd, tmp_path).stdout
    assert "(method course, seed 2025)" in out
    written = json.loads((tmp_path / "data/split.json").read_text())
    train, val = random_split(range(500), (0.85, 0.15), generator=torch.Generator().manual_seed(2025))
    assert written["val"] == sorted(val.indices) and written["train"] == sorted(train.indices)
    text = (tmp_path / "data/split.json").read_text()
    assert (tmp_path / "data/split_hash.txt").read_text() == split_hash(text) + "\n"
