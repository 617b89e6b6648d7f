"""A trial's per-example validation losses: stored compactly, out of sight of Optuna's tools.

The paired rule (recommend.py) needs every complete trial's per-example losses of its final
evaluation: hundreds of numbers. As a user attribute (the first studies kept them so, and are
still read) they filled every line of `optuna trials` (4,000-9,000 characters) and widened
optuna-dashboard's trial page. They live in the trial's Optuna *system* attributes instead:
the storage still shares them between nodes (trial folders are not always shared), while
`optuna trials`, `optuna best-trial` and the dashboard's trial page show user attributes only.
The value is one short string: the losses as the worker rounds them (4 decimals) in integer
units of 1e-4, zlib-compressed, base64; decoding gives back exactly the rounded floats.
"""

from __future__ import annotations

import base64
import math
import zlib
from array import array
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial

KEY = "ranksearch:val_losses"  # the system attribute
OLD_KEY = "val_losses"  # the user attribute of studies recorded before
SCALE = 10_000  # the worker rounds each loss to 4 decimals


def encode(losses: Sequence[float]) -> str:
    units = array("q", (round(x * SCALE) for x in losses))
    return base64.b64encode(zlib.compress(units.tobytes(), 9)).decode("ascii")


def decode(text: str) -> list[float]:
    units = array("q")
    units.frombytes(zlib.decompress(base64.b64decode(text)))
    return [u / SCALE for u in units]


def rank_key(rank: int) -> str:
    """The system attribute of a nested trial's per-example losses at one of its ranks."""
    return f"{KEY}:r{rank}"


def store(trial: optuna.Trial, losses: Sequence[float], rank: int | None = None) -> None:
    """Keep a running trial's per-example losses (none where one is not finite: such a trial
    fails, and no paired comparison could use them); `rank`: a nested trial's at that rank."""
    if losses and all(math.isfinite(x) for x in losses):
        key = KEY if rank is None else rank_key(rank)
        trial.study._storage.set_trial_system_attr(trial._trial_id, key, encode(losses))


def per_example(t: FrozenTrial) -> list[float] | None:
    """The trial's per-example losses, from either place a study may hold them."""
    if KEY in t.system_attrs:
        return decode(t.system_attrs[KEY])
    return t.user_attrs.get(OLD_KEY) or None
