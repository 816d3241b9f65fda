"""Choose each method's learning rate the honest way: on held-out training samples, never on dev.

Methods of one bench that differ only in their ``lr=`` key (and ``name=``) form a *family*
(``cached:read:lr=1e-3`` and ``cached:read:lr=3e-3`` are the family ``cached:read``; a method
without ``lr=`` runs at its kind's default and is one more member). With ``--valid-fraction``
every run chose its epoch on the held-out samples (``metrics.json``: ``eval.best`` is dev at
that epoch, ``valid.best`` the held-out scores there); per family the member whose held-out
``score``, averaged over seeds, is highest is chosen (ties: the first listed), and dev is
reported at that choice. Dev at the epoch dev itself picks (``eval.best_on_eval``) comes along
for comparison with papers that report it. Without held-out scores the choice falls back to dev
itself and says so (``chosen_on: "eval"``): an optimistic figure, lr and epoch both picked on
the split reported.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from pipeline.errors import ConfigError

Scores = dict[str, float]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None below two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def lr_family(method: str) -> tuple[str, str | None]:
    """``cached:read:hidden=64,lr=1e-3`` -> ``("cached:read:hidden=64", "1e-3")``; no ``lr=``:
    ``(method, None)``. A ``name=`` (a sweep names each spec, e.g. ``read-1e-3``) is no part of
    the family either. Keys may be joined by ``,`` or ``;`` (as on the command line)."""
    mode, _, spec = method.partition(":")
    kind, _, rest = spec.partition(":")
    lr, others = None, []
    for item in filter(None, (x.strip() for x in re.split("[,;]", rest))):
        key, _, value = item.partition("=")
        if key.strip() == "lr":
            lr = value.strip()
        elif key.strip() != "name":
            others.append(item)
    return f"{mode}:{kind}" + (":" + ",".join(others) if others else ""), lr


def effective_lr(method: str) -> float | None:
    """The learning rate ``method`` trains at (its kind's default where it sets none), or None
    for a spec this installation cannot parse (a report read elsewhere)."""
    mode, _, spec = method.partition(":")
    try:
        if mode == "cached":
            from pipeline.sidenets import parse_spec

            return float(parse_spec(spec).train.lr)
        from pipeline.online.methods import parse_method

        return float(parse_method(spec).train.lr)
    except (ConfigError, ImportError, ValueError):
        return None


def ok_runs(records: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """The finished runs of ``method``, in seed order."""
    done = [r for r in records if r.get("method") == method and "payload" in r]
    return sorted(done, key=lambda r: r.get("seed") or 0)


def dev_scores(run: dict[str, Any]) -> Scores:
    """Dev at the chosen epoch (on validation when the run held samples out)."""
    return dict(run["payload"]["eval"]["best"])


def valid_scores(run: dict[str, Any]) -> Scores | None:
    """The held-out scores at the chosen epoch, or None for a run without ``--valid-fraction``."""
    held = run["payload"].get("valid") or {}
    return dict(held["best"]) if held.get("best") else None


def dev_best_on_eval(run: dict[str, Any]) -> Scores | None:
    """Dev at the epoch dev itself picks: ``eval.best_on_eval``; for a run that chose its epoch
    on dev anyway (no ``chosen_on``, or ``"eval"``) that is ``eval.best``."""
    ev = run["payload"]["eval"]
    if ev.get("best_on_eval") is not None:
        return dict(ev["best_on_eval"])
    return dict(ev["best"]) if ev.get("chosen_on", "eval") == "eval" else None


def stats(per_run: list[Scores]) -> dict[str, dict[str, float | None]]:
    """Per metric present in every run: mean and sample std over the runs."""
    if not per_run:
        return {}
    keys = [k for k in per_run[0] if all(k in s for s in per_run)]
    out = {}
    for key in keys:
        mean, std = mean_std([float(s[key]) for s in per_run])
        out[key] = {"mean": mean, "std": std}
    return out


def families(methods: list[str]) -> dict[str, list[str]]:
    """Family name -> its members, both in the order the methods are listed."""
    out: dict[str, list[str]] = {}
    for method in methods:
        out.setdefault(lr_family(method)[0], []).append(method)
    return out


def candidate(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One member's figures. ``dev_best_on_eval`` (dev at dev's own epoch, mean ± std) and
    ``dev_best_on_eval_max`` (its best single run) are what an oracle, choosing on dev, would
    get: the ceiling of a configuration, not a result."""
    held = [valid_scores(r) for r in runs]
    valid = [float(v["score"]) for v in held if v is not None]
    papers = [s for s in (dev_best_on_eval(r) for r in runs) if s is not None]
    whole = len(papers) == len(runs)
    return {
        "method": method,
        "lr": lr_family(method)[1] or "default",
        "lr_value": effective_lr(method),
        "runs": len(runs),
        "valid_score_mean": mean_std(valid)[0] if len(valid) == len(runs) else None,
        "dev_score_mean": mean_std([float(dev_scores(r)["score"]) for r in runs])[0],
        "dev": stats([dev_scores(r) for r in runs]),
        "dev_best_on_eval": stats(papers) if whole else None,
        "dev_best_on_eval_max": (
            {k: max(float(s[k]) for s in papers) for k in stats(papers)} if whole else None
        ),
    }


def choose_family(name: str, members: list[str], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The family's chosen member and its figures; ``method`` None when no member finished."""
    runs = {m: ok_runs(records, m) for m in members}
    cands = [candidate(m, runs[m]) for m in members if runs[m]]
    on = "valid" if cands and all(c["valid_score_mean"] is not None for c in cands) else "eval"
    entry: dict[str, Any] = {"family": name, "chosen_on": on, "candidates": cands, "method": None}
    if not cands:
        return entry
    key = "valid_score_mean" if on == "valid" else "dev_score_mean"
    best = max(cands, key=lambda c: c[key])  # the first of equals
    chosen = runs[best["method"]]
    held = [v for v in (valid_scores(r) for r in chosen) if v is not None]
    papers = [s for s in (dev_best_on_eval(r) for r in chosen) if s is not None]
    fractions = {(r["payload"].get("valid") or {}).get("fraction", 0.0) for r in chosen}
    entry.update(
        method=best["method"],
        lr=best["lr"],
        lr_value=best["lr_value"],
        runs=len(chosen),
        seeds=[r.get("seed") for r in chosen],
        valid_fraction=sorted(fractions)[0] if len(fractions) == 1 else sorted(fractions),
        valid=stats(held) if on == "valid" else None,
        dev=stats([dev_scores(r) for r in chosen]),
        dev_best_on_eval=stats(papers) if len(papers) == len(chosen) else None,
        best_epoch=[r["payload"]["eval"].get("best_epoch") for r in chosen],
        best_on_eval_epoch=[
            r["payload"]["eval"].get("best_on_eval_epoch", r["payload"]["eval"].get("best_epoch"))
            for r in chosen
        ],
        trainable_params=chosen[0]["payload"].get("trainable_params"),
    )
    return entry


def choose(methods: list[str], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per family of ``methods`` (see the module docstring), in the order listed."""
    return [choose_family(name, members, records) for name, members in families(methods).items()]
