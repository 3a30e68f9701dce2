"""`fastsample tune`'s quality target (--target, --within) and budget (--budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError

SLACK = 1.15  # FID margin for a setting measured with fewer samples than the full count
ACC_SLACK = 0.02  # accuracy margin likewise
METRICS = ("fid", "accuracy", "precision", "recall")


@dataclass(frozen=True)
class Target:
    """The quality a recipe must meet: FID at most `within` x the reference recipe's (measured
    with the same seeds and sample count) and/or the absolute bounds (fid: at most; accuracy,
    precision, recall: at least)."""

    within: float | None = None  # 0.1: FID <= 1.1 x the reference's
    bounds: tuple[tuple[str, float], ...] = ()

    def describe(self) -> str:
        parts = [f"FID within {self.within:.0%} of the reference recipe's"] if self.within \
            is not None else []  # fmt: skip
        for metric, value in self.bounds:
            parts.append(f"{metric} {'<=' if metric == 'fid' else '>='} {value:g}")
        return " and ".join(parts)

    def meets(self, fig: dict, ref: dict, ref_top: dict, full: bool) -> bool:
        """Whether figures `fig` meet the target; ref: the reference's figures at the same
        sample count, ref_top at the full count. Not `full`: with the noise margin."""
        slack, acc_slack = (1.0, 0.0) if full else (SLACK, ACC_SLACK)
        if self.within is not None and fig["fid"] > (1 + self.within) * ref["fid"] * slack:
            return False
        for metric, value in self.bounds:
            if metric == "fid":  # an absolute FID, scaled to this sample count
                if fig["fid"] > value * ref["fid"] / ref_top["fid"] * slack:
                    return False
            elif metric not in fig:
                raise InputError(f"--target {metric}: this extractor does not measure it")
            elif fig[metric] < value - (acc_slack if metric == "accuracy" else 0):
                return False
        return True


def parse_target(target: str | None, within: str | None) -> Target:
    """--target fid=X[,accuracy=Y,...] and --within P% (default: --within 10%)."""
    bounds = []
    if target is not None:
        for part in target.split(","):
            metric, _, value = part.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if metric not in METRICS or not math.isfinite(number) or number < 0:
                raise InputError(
                    f"--target {target!r}: expected metric=value pairs such as fid=10 or "
                    f"fid=10,accuracy=0.95 (metrics: {', '.join(METRICS)})"
                )
            bounds.append((metric, number))
    share = None
    if within is not None:
        text = within.strip()
        try:
            share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            share = math.nan
        if not math.isfinite(share) or share < 0:
            raise InputError(f"--within {within!r}: expected a share such as 10% or 0.1")
    elif not bounds:
        share = 0.1
    return Target(share, tuple(bounds))


def parse_budget(text: str) -> float:
    """'90s', '20m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"--budget {text!r}: expected a duration such as 90s, 20m or 1.5h")
    return seconds
