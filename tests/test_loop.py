"""TrainingLoop: the cadence of logs and checkpoints, stop_at, the non-finite check."""

from __future__ import annotations

import pytest
import torch

from lrcseg.errors import TrainingDiverged
from lrcseg.train.loop import TrainingLoop


def make(tmp_path, steps=10, start=0, **kw):
    saves, logs = [], []
    loop = TrainingLoop(tmp_path, steps, start, lambda step, final: saves.append((step, final)),
                        log_every=kw.pop("log_every", 3), checkpoint_every=kw.pop("ckpt", 4),
                        device=torch.device("cpu"), progress=False, **kw)
    return loop, saves, logs


def test_cadence_of_logs_checkpoints_and_after_step(tmp_path):
    loop, saves, logs = make(tmp_path, also_log=lambda s: s == 5)
    seen, after = [], []

    def step_fn(step):
        seen.append(step)
        return torch.tensor(1.0), 2

    def log_fn(step, rate):
        logs.append(step)
        assert rate > 0
        return 1.0

    assert loop.run(step_fn, log_fn, after.append) is True
    assert seen == list(range(10)) and after == list(range(1, 11))
    assert logs == [3, 5, 6, 9, 10]
    assert saves == [(4, False), (8, False), (10, True)]


def test_stop_at_saves_and_leaves_and_a_resumed_loop_finishes(tmp_path):
    loop, saves, _ = make(tmp_path, stop_at=6)
    assert loop.run(lambda s: (torch.tensor(0.5), 1), lambda s, r: 0.5) is False
    assert saves == [(4, False), (6, False)] and loop.step == 6
    again, saves2, _ = make(tmp_path, start=6)
    seen = []
    assert again.run(lambda s: (seen.append(s), (torch.tensor(0.5), 1))[1], lambda s, r: 0.5)
    assert seen == [6, 7, 8, 9] and saves2 == [(8, False), (10, True)]


def test_a_nan_loss_stops_at_the_next_check_before_any_save(tmp_path):
    loop, saves, _ = make(tmp_path, log_every=5, ckpt=5)
    losses = [1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(TrainingDiverged, match="between steps 0 and 5"):
        loop.run(lambda s: (torch.tensor(losses[s]), 1), lambda s, r: 1.0)
    assert saves == []


def test_check_each_step_stops_at_the_first_nan(tmp_path):
    loop, saves, _ = make(tmp_path, log_every=5, ckpt=5, check_each_step=True)
    losses = [1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(TrainingDiverged, match="between steps 1 and 2"):
        loop.run(lambda s: (torch.tensor(losses[s]), 1), lambda s, r: 1.0)
    assert saves == []


def test_a_budget_below_the_resumed_step_only_writes_the_final_checkpoint(tmp_path):
    loop, saves, _ = make(tmp_path, steps=5, start=8)
    assert loop.run(lambda s: pytest.fail("no step to train"), lambda s, r: 1.0) is True
    assert saves == [(8, True)]


@pytest.mark.parametrize("steps,start,log_every", [(0, 0, 1), (5, -1, 1), (5, 0, 0)])
def test_invalid_budgets_are_refused(tmp_path, steps, start, log_every):
    with pytest.raises(ValueError):
        make(tmp_path, steps=steps, start=start, log_every=log_every)
