"""Does a sweep of the exact-top model pick the setting that gets there first? (issue 13;
``tangentlab sweep``'s ranking, ``exact_top.sweep_exact_top``.)

    .venv/bin/python benchmarks/twolayer_sweep.py            # every stored set, RESULTS.md
    .venv/bin/python benchmarks/twolayer_sweep.py --choose   # the rule, development sets only
    .venv/bin/python benchmarks/twolayer_sweep.py --example  # the README's sweep, real runs

``--example``: the README's sweep on the default example (``tangentlab sweep --example
fashion-lite0 --momentum 0,0.9 --batch-size 32,full``: N = 500, 64 px, MSE, 16 settings,
the exact top at k = 1024) and a real run of every setting (``tl.finetune``, the same batch
seed, stopped at the 80% drop or 300 steps; resumable, one setting at a time, in
``benchmarks/results/twolayer/sweep-example.json``): the pick's regret, the rank
correlation, and how many real steps fall inside their intervals. A development example
(the model's choices were made on it, not the ranking rule).

A sweep forecasts several settings and ranks them by the estimated steps to a target; the
user then trains the first. What matters is the real steps of that pick against the best
setting's: the *regret* T(pick) / min T (1 = the pick is the fastest; +∞ where the real run
of the pick never reaches the target). No new run: the stored grids of ``twolayer.py``
(real runs and exact-top forecasts, ``twolayer.grid_rows``) hold every setting of
``holdout.py``'s grid per task: loss MSE or CE, full batch or B = 32, momentum 0 or 0.9,
a = 0.1, 0.3, 1 of the stability limit.

**Groups.** *settings*: per (task, loss, drop), the 12 settings of batch size, momentum
and rate (the question "which of these gets there first"); *rates*: per (task, loss, batch,
momentum, drop), the 3 rates (the question "which learning rate"). Drops 50%, 80%, 90% of
the real L0.

**Rules** (the sweep's ranking):
- ``estimate``: the least estimate T̃ (``ExactTopForecast.steps_estimate``), whatever
  the reliability check says;
- ``passed first``: the least T̃ among the settings whose check passes at the target
  (R <= REBOUND_MAX, NOTE [exact-top reliability check]); all settings if none passes
  (``tl.sweep``'s convention: rows outside the validity region rank last);
- ``head exact``: the least uncalibrated T̂ of the head-exact model (where stored);
- ``a = 1``: always the largest rate (the rates groups only; the naive choice).
A setting the forecast does not reach ranks last. Ties go to the smaller rebound.
**In samples** (``rank_by="samples"``): the settings groups ranked by T̃ B (B = N for full
batch) and scored by the real runs' T B, against the steps ranking's pick and the
head-exact model's T̂ B scored the same way (a fixed rule: nothing chosen).

**Held out.** The rule was chosen on the development sets (``--choose``: the 14 image
tasks at 32 px and the 14 text tasks) and then read once on the held-out rounds, whose
forecasts were scored before (RESULTS.md "twolayer"); the ranking was never looked at
there before.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import holdout as ho  # noqa: E402
import twolayer as tw  # noqa: E402
from _common import write_section  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/twolayer_sweep.py"
DEV = ("dev", "text")
HELD_OUT = ("fresh2", "fresh3", "fresh4", "fresh5", "fresh6", "fresh7_now", "fresh8",
            "fresh9", "fresh10", "text-holdout")  # fmt: skip
RULES = ("estimate", "passed first", "head exact", "a = 1")


def _key(r: dict, col: str) -> tuple[float, float]:
    v = r[col]
    return (math.inf if v is None else float(v), r["R"])


def pick(group: list[dict], rule: str) -> dict | None:
    """The row a sweep ranked first under ``rule`` (None: the rule needs what is not
    stored)."""
    from tangentlab.experimental.exact_top import REBOUND_MAX

    if rule == "estimate":
        return min(group, key=lambda r: _key(r, "et"))
    if rule == "passed first":
        ok = [r for r in group if r["R"] <= REBOUND_MAX and r["et"] is not None]
        return min(ok or group, key=lambda r: _key(r, "et"))
    if rule == "head exact":
        if any(r["hb"] is None and r["hb_stored"] is False for r in group):
            return None
        return min(group, key=lambda r: _key(r, "hb"))
    if rule == "a = 1":
        top = [r for r in group if r["a"] == max(g["a"] for g in group)]
        return top[0] if len(top) == 1 else None
    raise ValueError(rule)


def groups(rows: list[dict], by: str) -> list[list[dict]]:
    """Rows grouped as a sweep would see them: ``by`` "settings" or "rates"."""
    cols = ("task", "loss", "drop") + (("batch", "m") if by == "rates" else ())
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[c] for c in cols), []).append(r)
    return [g for g in out.values() if any(r["T"] is not None for r in g)]


def samples(r: dict, steps: float | None) -> float | None:
    """``steps`` x B, the sample-gradients a run of ``r``'s setting computes in them (B = N
    for full batch; ``rank_by="samples"``'s unit)."""
    if steps is None:
        return None
    n = int(ho.TASKS[r["task"]]["num_samples"])
    return float(steps) * (n if r["batch"] == "full" else min(32, n))


def pick_samples(group: list[dict], rule: str) -> dict | None:
    """The row a sweep ranked first in samples: ``rule`` "estimate" (the least T̃ B,
    ``rank_by="samples"``), "steps" (the least T̃: the default ranking's pick, scored in
    samples) or "head exact" (the least T̂ B of the head-exact model)."""
    if rule == "steps":
        return pick(group, "estimate")
    col = {"estimate": "et", "head exact": "hb"}[rule]
    if col == "hb" and any(r["hb"] is None and r["hb_stored"] is False for r in group):
        return None
    return min(group, key=lambda r: (math.inf if r[col] is None else samples(r, r[col]),
                                     r["R"]))  # fmt: skip


def regret(group: list[dict], chosen: dict, unit: str = "steps") -> float:
    cost = (lambda r: r["T"]) if unit == "steps" else (lambda r: samples(r, r["T"]))
    best = min(cost(r) for r in group if r["T"] is not None)
    return math.inf if chosen["T"] is None else cost(chosen) / best


def score(gs: list[list[dict]], rule: str, unit: str = "steps") -> dict | None:
    regrets = []
    for g in gs:
        c = pick(g, rule) if unit == "steps" else pick_samples(g, rule)
        if c is None:
            return None
        regrets.append(regret(g, c, unit))
    r = np.array(regrets)
    return dict(n=len(r), hit=float(np.mean(r <= 1.0)), within=float(np.mean(r <= 1.25)),
                median=float(np.median(r)), p90=float(np.quantile(r, 0.9)),
                worst=float(r.max()))  # fmt: skip


def rows_of(which: str) -> list[dict]:
    rows = tw.grid_rows(which, unreached=True)
    stored = all(key for _, key in tw._task_set(which)[1].values())
    for r in rows:
        r["hb_stored"] = stored
    return rows


def _fmt(s: dict | None) -> str:
    if s is None:
        return "-"
    w = "∞" if math.isinf(s["worst"]) else f"{s['worst']:.2f}"
    p90 = "∞" if math.isinf(s["p90"]) else f"{s['p90']:.2f}"
    return f"{s['hit']:.0%} / {s['within']:.0%} / {p90} / {w}"


def table(sets: tuple[str, ...], by: str) -> list[str]:
    lines = [f"| set ({by}) | groups | " + " | ".join(RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    pooled: list[list[dict]] = []
    for which in sets:
        gs = groups(rows_of(which), by)
        pooled += gs
        cells = [_fmt(score(gs, rule) if rule != "a = 1" or by == "rates" else None)
                 for rule in RULES]  # fmt: skip
        lines.append(f"| {which} | {len(gs)} | " + " | ".join(cells) + " |")
    cells = [_fmt(score(pooled, rule) if rule != "a = 1" or by == "rates" else None)
             for rule in RULES]  # fmt: skip
    lines.append(f"| **all** | {len(pooled)} | " + " | ".join(cells) + " |")
    return lines


SAMPLE_RULES = ("estimate", "steps", "head exact")


def samples_table(sets: tuple[str, ...]) -> list[str]:
    """The settings groups ranked and scored in samples (T B): ``rank_by="samples"``."""
    lines = ["| set (settings, in samples) | groups | by T̃ B (rank_by samples) | by T̃ "
             "(rank_by steps) | head exact (T̂ B) |", "|---|---|---|---|---|"]
    pooled: list[list[dict]] = []
    for which in sets:
        gs = groups(rows_of(which), "settings")
        pooled += gs
        lines.append(f"| {which} | {len(gs)} | "
                     + " | ".join(_fmt(score(gs, r, "samples")) for r in SAMPLE_RULES) + " |")
    lines.append(f"| **all** | {len(pooled)} | "
                 + " | ".join(_fmt(score(pooled, r, "samples")) for r in SAMPLE_RULES) + " |")
    return lines


def report() -> list[str]:
    lines = [f"Command: `{COMMAND}`. No new run: the stored real runs and exact-top forecasts "
             "of `twolayer.py`'s sets. Per group the rule's pick and its regret T(pick) / "
             "min T over the group's real runs; entries: *picked the fastest* / *within "
             "25% of it* / p90 regret / worst (∞: the pick's real run never reached the "
             "target). *settings*: the 12 settings of a task and loss (batch size, momentum, "
             "rate); *rates*: the 3 rates of a task, loss, batch size and momentum. Drops "
             "50 / 80 / 90%. The rule was chosen on the development sets; the held-out rows "
             "are a first look at the ranking (their forecasts were scored before).", "",
             "Development (the choice):", ""]
    for by in ("settings", "rates"):
        lines += table(DEV, by) + [""]
    lines += ["Held out:", ""]
    for by in ("settings", "rates"):
        lines += table(HELD_OUT, by) + [""]
    lines += ["**Ranked by samples** (`rank_by=\"samples\"`, `--rank-by samples`: the least "
              "T̃ B, B = N for full batch; a fixed rule, not chosen on these sets). The "
              "settings groups scored in samples: regret (T B)(pick) / min T B over the "
              "group's real runs. A first look at both the development and the held-out "
              "sets.", "", "Development:", "", *samples_table(DEV), "", "Held out:", "",
              *samples_table(HELD_OUT)]
    lines += ["", "**At q = 32C for a vector z** (the default since PLAN-fresh12.md, NOTE "
              "[exact-top vector z]). Its drift is monotone in T̂ within a loss, so the "
              "picks are those of the forecasts' T̂: the same rules on the 32-px image and "
              "the text development grids at q = 2C and at 32C (`twolayer.py --grid --q`, "
              "`--text --text-split ffn --q 32C`), and on the eleventh and twelfth rounds "
              "(second looks: their forecasts were scored before; 12 settings groups each).",
              ""]
    for by in ("settings", "rates"):
        lines += table(Q32_SETS, by) + [""]
    lines += ["**At the library's q now, min(32C, 128), for a vector z** (since "
              "PLAN-fresh14.md): the development grids at the cap (images at 32 px, text), "
              "the thirteenth round (scored before the cap was chosen on it) and two held-out "
              "rounds scored once before this table was first drawn: the fourteenth (images, "
              "ten classes) and the second text round (`twolayer_text2.py`); the ranking of "
              "those two is a first look.", ""]
    for by in ("settings", "rates"):
        lines += table(CAP_SETS, by) + [""]
    return lines


CAP_SETS = ("dev32_q32Cmax128", "text-ffn_q32Cmax128", "fresh13_q32Cmax128",
            "fresh14_q32Cmax128", "text2_q32Cmax128")  # fmt: skip
Q32_SETS = ("dev32_q2C", "dev32_q32C", "text-ffn", "text-ffn_q32C", "fresh11_q2C",
            "fresh11_q32C", "fresh12_q2C", "fresh12_q32C")  # fmt: skip


EXAMPLE_OUT = tw.OUT / "sweep-example.json"
CACHE = Path(os.environ.get("TANGENTLAB_CACHE", Path.home() / ".cache" / "tangentlab"))


def example() -> list[str]:
    """The README's sweep on the default example against a real run of each setting."""
    import json
    import warnings

    from scipy.stats import spearmanr

    import tangentlab as tl
    from _common import machine
    from tangentlab.cli import TOP_PROJECTION, TOP_SWEEP_FRACTIONS
    from tangentlab.examples import LITE0_DEFAULT_PARAMS, load_example, split_model
    from tangentlab.experimental import exact_top as et

    warnings.simplefilter("ignore")
    n, steps, sizes = 500, 300, [32, None]
    ex = load_example("fashion-lite0", num_samples=n)
    body, top, _ = split_model(ex.model.eval())
    etk = et.compute_exact_top_kernel(
        body, top, ex.data, params=LITE0_DEFAULT_PARAMS, top_params=LITE0_DEFAULT_PARAMS,
        projection=TOP_PROJECTION, cache=CACHE / "sweep-example" / "kernel",
        progress=False)  # fmt: skip
    limit = et.stable_lr(etk, loss="mse", fraction=1.0)
    opts = [tl.SGD(float(f"{f * limit * (1.0 - m):.3g}"), momentum=m)
            for m in (0.0, 0.9) for f in TOP_SWEEP_FRACTIONS]  # fmt: skip
    sw = et.sweep_exact_top(etk, opts, steps, batch_sizes=sizes, progress=True,
                            cache=CACHE / "sweep-example" / "sweep")  # fmt: skip
    target = 0.2 * etk.initial_loss("mse")
    store = json.loads(EXAMPLE_OUT.read_text()) if EXAMPLE_OUT.exists() else {}
    rows = []
    for _, row in sw.table.iterrows():
        b = None if row["batch_size"] != row["batch_size"] else int(row["batch_size"])
        key = f"{row['optimizer']}, batch {'full' if b is None else b}"
        if key not in store:
            opt = tl.SGD(float(row["lr"]), momentum=float(row["momentum"]))
            run = tl.finetune(load_example("fashion-lite0", num_samples=n).model.eval(),
                              ex.data, opt, steps, params=LITE0_DEFAULT_PARAMS, batch_size=b,
                              log_every=1, stop_below=target, progress=False)  # fmt: skip
            store[key] = dict(T=run.steps_to(target), seconds=run.train_seconds,
                              l0=float(run.loss[0]))  # fmt: skip
            EXAMPLE_OUT.write_text(json.dumps(dict(store, machine=machine()), indent=1))
            print(f"{key}: real {store[key]['T']}, estimate {row['estimate']:.1f}",
                  file=sys.stderr, flush=True)  # fmt: skip
        rows.append(dict(key=key, rank=int(row["rank"]), est=row["estimate"],
                         lo=row["interval_low"], hi=row["interval_high"], check=row["check"],
                         **store[key]))  # fmt: skip
    real = [r["T"] if r["T"] is not None else math.inf for r in rows]
    best = min(real)
    est = [r["est"] if r["est"] == r["est"] else math.inf for r in rows]
    rho = spearmanr(est, real).statistic
    inside = [r["lo"] <= r["T"] <= r["hi"] for r in rows
              if r["T"] is not None and r["est"] == r["est"]]  # fmt: skip
    err = [abs(r["est"] - r["T"]) / r["T"] for r in rows
           if r["T"] is not None and r["est"] == r["est"]]  # fmt: skip
    lines = [f"Command: `{COMMAND} --example`. Machine: {store.get('machine', machine())}. "
             f"The README's sweep on the default example (N = {n}, 64 px, MSE, target an 80% "
             f"drop of L0 = {rows[0]['l0']:.4g}), every setting also trained for real "
             f"(`tl.finetune`, the sweep's batch seed, stopped at the target or {steps} "
             "steps). Ranked as the sweep ranks them:", "",
             "| rank | setting | estimate | interval | check | real steps |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        e = "not reached" if r["est"] != r["est"] else f"{r['est']:.1f}"
        iv = "-" if r["lo"] != r["lo"] else f"{r['lo']:.0f}-{r['hi']:.0f}"
        lines.append(f"| {r['rank']} | {r['key']} | {e} | {iv} | {r['check']} | "
                     f"{'not reached' if r['T'] is None else r['T']} |")
    lines += ["", f"The pick's real steps {real[0]} against the fastest real run's {best} "
              f"(regret {real[0] / best:.2f}); Spearman ρ between the estimates and the real "
              f"steps {rho:.3f}; |T̃ − T|/T median {np.median(err):.1%}, max {max(err):.1%}; "
              f"{sum(inside)} of {len(inside)} real steps inside their intervals. The real "
              f"runs took {sum(r['seconds'] for r in rows):.0f} s of training."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--choose", action="store_true", help="development sets only")
    ap.add_argument("--example", action="store_true", help="the README's sweep, real runs")
    args = ap.parse_args()
    if args.example:
        lines = example()
        print("\n".join(lines))
        write_section("twolayer-sweep-example", "\n".join(lines))
        return
    if args.choose:
        for by in ("settings", "rates"):
            print("\n".join(table(DEV, by)), "\n")
        return
    lines = report()
    print("\n".join(lines))
    write_section("twolayer-sweep", "\n".join(lines))


if __name__ == "__main__":
    main()
