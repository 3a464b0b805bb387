"""Intervals, tests and multiple-comparison corrections for the mechanism experiments (scipy).

Every test of a results page is one row with a two-sided p-value; :func:`correct` adjusts them
all together (Holm by default, Benjamini-Hochberg on request), and a row is "resolved" only if
its adjusted p-value is below ``alpha``.

>>> [round(p, 3) for p in holm([0.01, 0.04, 0.03])]
[0.03, 0.06, 0.06]
>>> [round(p, 3) for p in bh([0.01, 0.04, 0.03])]
[0.03, 0.04, 0.04]
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def holm(pvals: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input's order."""
    p = np.asarray(pvals, dtype=float)
    m = len(p)
    order = np.argsort(p)
    adj = np.empty(m)
    run = 0.0
    for rank, i in enumerate(order):
        run = max(run, (m - rank) * p[i])
        adj[i] = min(1.0, run)
    return adj.tolist()


def bh(pvals: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input's order."""
    p = np.asarray(pvals, dtype=float)
    m = len(p)
    order = np.argsort(p)[::-1]
    adj = np.empty(m)
    run = 1.0
    for k, i in enumerate(order):
        rank = m - k
        run = min(run, p[i] * m / rank)
        adj[i] = run
    return adj.tolist()


def t_row(values, level: float = 0.95, **fields) -> dict:
    """One test row: mean, sd, n, the Student-t interval and the two-sided p-value against 0."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    n = len(x)
    row = dict(fields)
    row.update(n=n, mean=float(x.mean()) if n else float("nan"))
    if n >= 2:
        sd = float(x.std(ddof=1))
        se = sd / math.sqrt(n)
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
        p = float(2 * stats.t.sf(abs(row["mean"]) / se, n - 1)) if se > 0 else (0.0 if row["mean"] else 1.0)
        row.update(sd=sd, lo=row["mean"] - half, hi=row["mean"] + half, p=p)
    else:
        row.update(sd=float("nan"), lo=float("nan"), hi=float("nan"), p=float("nan"))
    return row


def regression_row(x, y, level: float = 0.95, **fields) -> dict:
    """Least-squares slope of ``y`` on ``x`` with its t-interval and p-value (scipy's linregress)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x == x) & (y == y)
    x, y = x[ok], y[ok]
    row = dict(fields)
    n = len(x)
    if n < 3 or np.ptp(x) == 0:
        row.update(n=n, mean=float("nan"), lo=float("nan"), hi=float("nan"), p=float("nan"), intercept=float("nan"))
        return row
    r = stats.linregress(x, y)
    half = float(stats.t.ppf(0.5 + level / 2, n - 2)) * r.stderr
    row.update(
        n=n,
        mean=float(r.slope),
        lo=float(r.slope - half),
        hi=float(r.slope + half),
        p=float(r.pvalue),
        intercept=float(r.intercept),
        r=float(r.rvalue),
    )
    return row


def correct(tables: list[dict], method: str = "holm", alpha: float = 0.05) -> int:
    """Adjust every row with a p-value across all ``tables`` (each ``{"rows": [...]}``) together.

    Sets ``p_adj`` and ``resolved`` on each row (rows without a p-value: ``resolved=None``);
    returns the family size.
    """
    if method not in ("holm", "bh"):
        raise ValueError(f"correct: method must be 'holm' or 'bh', got {method!r}")
    rows = [r for t in tables for r in t["rows"] if r.get("p") is not None and r["p"] == r["p"]]
    adj = (holm if method == "holm" else bh)([r["p"] for r in rows]) if rows else []
    for r, a in zip(rows, adj, strict=True):
        r["p_adj"], r["resolved"] = a, bool(a < alpha)
    for t in tables:
        for r in t["rows"]:
            r.setdefault("p_adj", None)
            r.setdefault("resolved", None)
    return len(rows)


__all__ = ["bh", "correct", "holm", "regression_row", "t_row"]
