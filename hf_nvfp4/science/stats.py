"""Small-sample statistics for paired comparisons, without scipy.

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


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`; exact to ~1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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


__all__ = ["betainc", "format_interval", "paired_summary", "t_cdf", "t_quantile"]
