"""The stage phase timer: laps from the process start, one line or one line per phase, MLflow names."""
from __future__ import annotations

import time

from cifarpipe.pipeline.phases import Phases, process_age, timed


def test_laps_add_up_to_the_time_since_the_process_started(monkeypatch):
    age = process_age()
    assert 0 < age < 3600  # this process started a moment ago, not at boot
    phases = Phases("train")
    time.sleep(0.05)
    assert phases.lap("load data") >= 0.05
    phases.lap("load data")  # a repeated name adds up
    timed(lambda: time.sleep(0.02), phases.background, "warm-up")
    assert list(phases.seconds) == ["start", "load data"] and phases.seconds["start"] >= age
    assert phases.background["warm-up"] >= 0.02
    assert abs(phases.total - sum(phases.seconds.values())) < 1e-9
    metrics = phases.metrics()
    assert set(metrics) == {"seconds/train/start", "seconds/train/load_data", "seconds/train/background_warm-up"}

    monkeypatch.delenv("CIFARPIPE_TIMINGS", raising=False)
    line = phases.report()
    assert line.startswith(f"train stage: {phases.total:.1f} s = start ") and "\n" not in line
    assert "warm-up" in line and "in the background" in line
    monkeypatch.setenv("CIFARPIPE_TIMINGS", "1")
    table = phases.report(exclude="start").splitlines()
    assert len(table) == 1 + 1 + 1 + 1  # heading, load data, warm-up, total
    assert not any(l.split()[0] == "start" for l in table[1:])
