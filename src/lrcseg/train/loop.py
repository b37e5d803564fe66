"""The step loop both training kinds share: progress, interruption, the non-finite check, and
the log / checkpoint cadence. What a step computes stays with its owner (``train/pretrain.py``,
``train/finetune.py``); this module only decides *when* things happen:

    while step < steps:
        Ctrl-C or SIGTERM?  -> check finite, checkpoint at this step boundary,
                               TrainingInterrupted (a KeyboardInterrupt)
        loss, samples = step_fn(step); step += 1
        log step or checkpoint step?  -> one host sync: raise TrainingDiverged on NaN/inf
        log step?                      -> log_fn(step, slices per second)
        after_step(step)               (e.g. learning-curve snapshots)
        checkpoint step / stop_at?     -> save(step)  (and leave at stop_at)
    save(steps, final=True)

Every step's randomness comes from the step number (``train.common.step_generator``), so a
checkpoint at any step boundary resumes exactly.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from lrcseg.errors import TrainingDiverged

#: step_fn(step) -> (loss of the step as a scalar tensor, slices it consumed over all ranks)
StepFn = Callable[[int], tuple[Tensor, int]]
#: log_fn(step, slices_per_s) -> the loss shown beside the progress bar
LogFn = Callable[[int, float], float]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal (a KeyboardInterrupt, so code that catches Ctrl-C still does).

    signum: the first signal (SIGINT or SIGTERM; the CLI exits 128 + signum).
    checkpoint_step: the step of the last checkpoint this run folder holds, None if it holds
    none (a rerun then starts over); run_dir: the run folder. ``str()`` says what was saved.
    """

    def __init__(self, message: str, signum: int, checkpoint_step: int | None, run_dir: Path):
        super().__init__(message)
        self.signum, self.checkpoint_step, self.run_dir = signum, checkpoint_step, run_dir

    @property
    def resumable(self) -> bool:
        """True if ``--resume`` can continue the run."""
        return self.checkpoint_step is not None


class GracefulInterrupt:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what schedulers and ``kill`` send before a
    kill) into a flag that the loop checks between steps.

    The loop then saves a checkpoint at a step boundary (never mid-step, when the weights,
    optimiser or MoCo queue may already hold part of the next step) and raises
    TrainingInterrupted; ``--resume`` continues exactly. A second signal stops at once
    (``forced``, KeyboardInterrupt wherever the loop is, a checkpoint write included: the write
    is abandoned and the previous checkpoint stands). Outside the main thread it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not installed from Python
                signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.forced = True
            raise KeyboardInterrupt
        self.signum = signum


def _all_true(flag: bool, device: torch.device) -> bool:
    return flag


class TrainingLoop:
    """Runs ``step_fn`` from ``start`` to ``steps`` with the cadence described above.

    save(step, final): write the checkpoint of the state after ``step`` steps.
    log_every, checkpoint_every: cadences in steps (the last step always logs and saves).
    also_log(step): extra log steps (e.g. online-probe steps), after the step is counted.
    stop_at: leave with a checkpoint once this step is reached, as an interruption would.
    check_each_step: the non-finite check after every step (one host sync per step) instead
        of at log and checkpoint steps only.
    start >= steps (a resume with a smaller budget) trains nothing and writes the final
    checkpoint at ``start``.
    all_true(flag, device): agree on a flag across ranks (identity in a single process).
    """

    def __init__(self, run_dir: Path, steps: int, start: int, save: Callable[[int, bool], None],
                 *, log_every: int, checkpoint_every: int, device: torch.device,
                 stop_at: int | None = None, also_log: Callable[[int], bool] | None = None,
                 desc: str = "train", progress: bool = True, check_each_step: bool = False,
                 all_true: Callable[[bool, torch.device], bool] = _all_true):
        if steps < 1 or start < 0:
            raise ValueError(f"need start ({start}) >= 0 and steps ({steps}) >= 1")
        if log_every < 1 or checkpoint_every < 1:
            raise ValueError(f"cadences must be >= 1 (log_every {log_every}, "
                             f"checkpoint_every {checkpoint_every})")
        self.run_dir, self.steps, self.step, self.save = run_dir, steps, start, save
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.stop_at, self.also_log, self.all_true = stop_at, also_log, all_true
        self.desc, self.progress, self.check_each_step = desc, progress, check_each_step
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self._checked = start
        self._saved = start if start > 0 else None  # the step of the last complete checkpoint
        self._saving: int | None = None  # the step being saved, during a save

    def check_finite(self) -> None:
        """Raise if any loss since the last check was NaN/inf (one host sync, not per step)."""
        if not self.all_true(not bool(self._nonfinite), self._nonfinite.device):
            raise TrainingDiverged(
                f"non-finite loss between steps {self._checked} and {self.step}; the last good "
                f"checkpoint in {self.run_dir} is untouched. Lower --lr or check the data.")
        self._checked = self.step

    def _logging(self, step: int) -> bool:
        return (step % self.log_every == 0 or step == self.steps
                or (self.also_log is not None and self.also_log(step)))

    def _stopping(self, step: int) -> bool:
        return self.stop_at is not None and self.stop_at <= step < self.steps

    def run(self, step_fn: StepFn, log_fn: LogFn,
            after_step: Callable[[int], None] | None = None) -> bool:
        """Train until the budget (final checkpoint; True) or ``stop_at`` (False).

        A first Ctrl-C / SIGTERM raises TrainingInterrupted after the checkpoint of the current
        step boundary; a second one raises it at once, saying which checkpoint stands.
        """
        bar = tqdm(total=self.steps, initial=self.step, desc=self.desc,
                   disable=not self.progress, dynamic_ncols=True)
        interrupt = GracefulInterrupt()
        try:
            with interrupt:
                try:
                    return self._run(step_fn, log_fn, after_step, bar, interrupt)
                except BaseException:
                    if interrupt.forced:  # whatever broke did so because of the second signal
                        raise self._stopped_at_once(interrupt) from None
                    raise
        finally:
            bar.close()

    def _run(self, step_fn: StepFn, log_fn: LogFn, after_step: Callable[[int], None] | None,
             bar: tqdm, interrupt: GracefulInterrupt) -> bool:
        t_last, samples = time.perf_counter(), 0
        while self.step < self.steps:
            if interrupt.requested:
                self._stop_for(interrupt.signum)
            loss, n = step_fn(self.step)
            self._nonfinite |= ~torch.isfinite(loss.detach())
            self.step += 1
            step, samples = self.step, samples + n
            bar.update(1)
            saving = (step % self.checkpoint_every == 0 or step == self.steps
                      or self._stopping(step))
            logging = self._logging(step)
            if logging or saving or self.check_each_step:
                self.check_finite()
            if logging:
                shown = log_fn(step, samples / max(time.perf_counter() - t_last, 1e-9))
                bar.set_postfix(loss=f"{shown:.3f}")
                t_last, samples = time.perf_counter(), 0
            if after_step is not None:
                after_step(step)
            if step % self.checkpoint_every == 0 and step < self.steps:
                self._save(step, False)
            if self._stopping(step):
                self._save(step, False)
                return False
        self._save(self.step, True)
        return True

    def _save(self, step: int, final: bool) -> None:
        self._saving = step
        self.save(step, final)
        self._saving, self._saved = None, step

    def _stop_for(self, signum: int) -> None:
        """Checkpoint this step boundary (unless just saved) and raise TrainingInterrupted."""
        self.check_finite()
        if self._saved != self.step:
            self._save(self.step, False)
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {self.step} of {self.steps}: the checkpoint "
            f"of step {self.step} is saved in {self.run_dir}", signum, self.step, self.run_dir)

    def _stopped_at_once(self, interrupt: GracefulInterrupt) -> TrainingInterrupted:
        """What a second signal left: the write it cut short was abandoned (writes go to a
        temporary file, renamed when complete), the last complete checkpoint stands."""
        first = signal.Signals(interrupt.signum).name
        if self._saving is not None:
            what = (f"a second signal while the checkpoint of step {self._saving} was written: "
                    "that write was abandoned, nothing half-written is left")
        else:
            what = f"a second signal at step {self.step}: stopped at once"
        if self._saved is not None:
            kept = f"the checkpoint of step {self._saved} in {self.run_dir} stands"
        else:
            kept = f"no checkpoint was saved in {self.run_dir}, a rerun starts over"
        return TrainingInterrupted(f"{first}, then {what}; {kept}", interrupt.signum,
                                   self._saved, self.run_dir)
