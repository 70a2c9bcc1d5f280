"""Progress for the stages people wait on: per item (LoRAs, images, trials) and per training step (pretraining),
each a tqdm bar with rate and ETA.

Each stage writes every item as one file, atomically (a LoRA folder, a PNG, a trial's Parquet), wherever the
item ran: a Ray task, an actor, a Tune trial on another node. So the bar counts files as they appear, from a
thread in the driver, instead of hooking into Ray Tune or Ray Data: one mechanism for in-process and Ray runs,
for fresh and resumed Tune experiments, and it counts only what was really written. Pretraining is one long
task that makes one folder: the task writes its step count and loss to a small JSON file (StepFile), which the
driver's bar reads (StepProgress), by the same polling.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ooc_ray.io import atomic_write_text
from ooc_ray.logs import progress_shown

# Polling cost: one listing per folder and a set lookup per item still to come: 6,600 missing PNGs in one
# folder cost ~3 ms a poll (one failing stat each: 42 ms; measured), so a 2 s period costs ~0.15 % of a core.
POLL_S = 2.0


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


class _PolledBar:
    """A tqdm bar that a driver thread updates every `poll_s` (the subclass's _poll) while the block runs, and
    once more at its end."""

    def __init__(self, total: int, what: str, unit: str, poll_s: float):
        # On a terminal the bar redraws every 0.5 s; in a log (stderr not a terminal) a line every 30 s.
        self.bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0, disable=not total or not progress_shown())
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"progress-{what}", daemon=True)

    def _poll(self) -> None:
        raise NotImplementedError

    def _active(self) -> bool:
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            self._poll()

    def __enter__(self):
        if self._active():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._poll()
        self.bar.close()


class FileProgress(_PolledBar):
    """`with FileProgress(paths, "sample", "image"): ...` shows how many of `paths` have been (re)written.

    A path counts once it exists and its modification time differs from what it was on entry, so an item that
    is re-made because it was damaged counts too. On a terminal the bar redraws every 0.5 s; in a log (stderr not
    a terminal) it writes a line every 30 s, and always its final state."""

    def __init__(self, paths, what: str, unit: str, poll_s: float = POLL_S):
        self._todo = {str(p): _mtime(str(p)) for p in paths}
        super().__init__(len(self._todo), what, unit, poll_s)

    def _poll(self) -> None:
        listings: dict[str, set[str]] = {}
        done = []
        for path, before in self._todo.items():
            if before is None:  # new items: one listing per folder, not one failing stat per item
                folder, name = os.path.split(path)
                if folder not in listings:
                    listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
                if name in listings[folder]:
                    done.append(path)
            elif _mtime(path) != before:  # re-made items (damaged ones)
                done.append(path)
        for p in done:
            del self._todo[p]
        if done:
            self.bar.update(len(done))

    def _active(self) -> bool:
        return bool(self._todo)


# A training task rewrites its step file at most once a second: 0.66 ms a write with its fsync (measured).
STEP_WRITE_S = 1.0


class StepFile:
    """The training task's side: `step(done, loss)` records steps done of `total` and the last loss in `path`
    (atomically, at most every STEP_WRITE_S, and always the last step)."""

    def __init__(self, path: str | Path, total: int):
        self.path, self.total, self._written = Path(path), total, 0.0

    def step(self, done: int, loss: float) -> None:
        now = time.monotonic()
        if done >= self.total or now - self._written >= STEP_WRITE_S:
            atomic_write_text(self.path, json.dumps({"done": done, "total": self.total, "loss": loss}))
            self._written = now


class StepProgress(_PolledBar):
    """`with StepProgress(path, "pretrain", total): ...`: a bar of the training steps a StepFile at `path`
    records, with the last loss; removes the file when done."""

    def __init__(self, path: str | Path, what: str, total: int, poll_s: float = POLL_S):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)  # an earlier, killed attempt's count is not this one's
        super().__init__(total, what, "step", poll_s)

    def _poll(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):  # not written yet (or by an older task without steps)
            return
        self.bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
        self.bar.update(state["done"] - self.bar.n)  # a retried task counts from its own start again

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.path.unlink(missing_ok=True)
