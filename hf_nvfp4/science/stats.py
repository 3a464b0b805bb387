"""Small-sample statistics for paired comparisons (Student-t quantiles from scipy).

With n seeds a paired difference has n - 1 degrees of freedom; its 95% interval uses Student's
t (4.30 for n = 3, 2.78 for n = 5), not 2 standard errors (82% confidence at n = 3). An effect is
*resolved* only when its interval excludes 0.

>>> round(t_quantile(0.975, 2), 3), round(t_quantile(0.975, 10), 3)
(4.303, 2.228)
>>> s = paired_summary([0.011, 0.012, 0.010])
>>> s["n"], s["resolved"]
(3, True)
"""

from __future__ import annotations

import math
import statistics

import scipy.stats


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(scipy.stats.t.ppf(p, df))


def paired_summary(diffs: list[float], level: float = 0.95) -> dict:
    """Mean, sd, n and the t-based ``level`` interval of paired differences; ``resolved`` if it excludes 0.

    One difference gives no interval (``lo``/``hi`` NaN, never resolved).
    """
    xs = [float(d) for d in diffs if d == d]
    n = len(xs)
    out = {"n": n, "mean": float("nan"), "sd": float("nan"), "lo": float("nan"), "hi": float("nan"),
           "resolved": False, "n_lower": sum(x < 0 for x in xs)}
    if n == 0:
        return out
    out["mean"] = statistics.fmean(xs)
    if n < 2:
        return out
    sd = statistics.stdev(xs)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    out["resolved"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def format_interval(s: dict, scale: float = 100.0, unit: str = "%", digits: int = 2) -> str:
    """``+1.08% (sd 0.34) [+0.25, +1.91]`` (resolved) or ``... unresolved``; ``-`` without data."""
    if s["n"] == 0:
        return "-"
    m = f"{scale * s['mean']:+.{digits}f}{unit}"
    if s["lo"] != s["lo"]:
        return f"{m} (n=1, no interval)"
    ci = f"(sd {scale * s['sd']:.{digits}f}) [{scale * s['lo']:+.{digits}f}, {scale * s['hi']:+.{digits}f}]"
    return f"{m} {ci}" if s["resolved"] else f"{m} {ci} unresolved"


__all__ = ["format_interval", "paired_summary", "t_quantile"]
