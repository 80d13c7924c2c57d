"""The exact-top sweep (tangentlab.experimental.exact_top.sweep_exact_top): each row is the
forecast of its setting alone, ranked by the estimate (NOTE [exact-top sweep ranking]),
resumable from its cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import tangentlab as tl
from tangentlab.errors import TangentlabError
from tangentlab.experimental.exact_top import (
    ExactTopSweep,
    compute_exact_top_kernel,
    forecast_exact_top,
    sweep_exact_top,
)
from test_exact_top import _data, _net


@pytest.fixture(scope="module")
def etk():
    body, top = _net()
    return compute_exact_top_kernel(body, top, _data(12), progress=False)


def _value(v):
    """A table cell as a number, or None (pandas keeps a missing one as NaN)."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _alone(etk, opt, steps, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return forecast_exact_top(etk, opt, steps, progress=False, **kw)


def test_each_row_is_its_setting_forecast_alone_and_rows_rank_by_the_estimate(etk):
    opts = tl.SGD.grid(lr=[0.02, 0.1, 0.5], momentum=[0.0, 0.9])
    sw = sweep_exact_top(etk, opts, 80, loss="ce", batch_sizes=[4, None], drop=0.5,
                         stop_at_target=False, progress=False)  # fmt: skip
    assert isinstance(sw, ExactTopSweep) and len(sw.table) == 12 == len(sw.forecasts)
    for (_, row), fc in zip(sw.table.iterrows(), sw.forecasts):
        b = None if _value(row["batch_size"]) is None else int(row["batch_size"])
        ref = _alone(etk, tl.SGD(row["lr"], momentum=row["momentum"]), 80, loss="ce",
                     batch_size=b)  # fmt: skip
        np.testing.assert_array_equal(fc.loss, ref.loss)
        assert _value(row["steps_to_target"]) == ref.steps_to_drop(0.5)
        if ref.steps_estimate(0.5) is not None:
            assert row["estimate"] == pytest.approx(ref.steps_estimate(0.5))
            assert (row["interval_low"], row["interval_high"]) == pytest.approx(
                ref.steps_interval(0.5))
        assert row["check"] == ("flagged" if ref.flagged(0.5) else "passed") or (
            row["check"] == "blow-up" and ref.blowup is not None)
    est = sw.table["estimate"].to_numpy(dtype=float)
    reached = est[~np.isnan(est)]
    assert np.all(np.diff(reached) >= 0) and not np.isnan(est[: len(reached)]).any()
    assert list(sw.table["rank"]) == list(range(1, 13))
    assert sw.best is sw.forecasts[0]
    assert json.dumps(sw.to_dict())  # JSON-ready


def test_stop_at_target_keeps_the_ranking_and_the_check(etk):
    opts = tl.SGD.grid(lr=[0.05, 0.2, 2.0])
    kw = dict(loss="ce", batch_sizes=[None], drop=0.5, progress=False)
    whole = sweep_exact_top(etk, opts, 60, stop_at_target=False, **kw)
    short = sweep_exact_top(etk, opts, 60, **kw)
    cols = ["lr", "steps_to_target", "estimate", "check", "rebound"]
    assert whole.table[cols].equals(short.table[cols])
    # the check's 80% drop is read too: stops no earlier than there
    for fc in short.forecasts:
        t = fc.steps_to_drop(0.8)
        assert t is None or fc.steps[-1] == t


def test_flagged_settings_are_not_demoted_and_blowups_rank_last(etk):
    opts = [tl.SGD(1e4), tl.SGD(0.5), tl.SGD(400.0), tl.SGD(2.0)]
    sw = sweep_exact_top(etk, opts, 40, loss="ce", drop=0.5, progress=False)
    t = sw.table.set_index("lr")
    assert t.loc[2.0, "check"] == "flagged" and t.loc[1e4, "check"] == "blow-up"
    assert t.loc[400.0, "check"] == "flagged" and _value(t.loc[400.0, "estimate"]) is None
    assert t.loc[0.5, "check"] == "passed"
    assert t.loc[2.0, "estimate"] < t.loc[0.5, "estimate"]
    # by the estimate, flagged or not; then not reached; the blow-up last
    assert list(sw.table["lr"]) == [2.0, 0.5, 400.0, 1e4]
    assert sw.best_passed == 2  # the safer pick: lr 0.5
    assert sweep_exact_top(etk, [tl.SGD(400.0)], 40, loss="ce", progress=False).best_passed is None


def test_cache_resumes_a_sweep_and_refuses_nothing_silently(etk, tmp_path):
    opts = tl.SGD.grid(lr=[0.05, 0.2])
    kw = dict(loss="mse", batch_sizes=[3, None], drop=0.8, cache=tmp_path, progress=False)
    first = sweep_exact_top(etk, opts[:1], 50, **kw)  # "interrupted" after one optimizer
    assert len(list(tmp_path.glob("*.json"))) == 2 and not first.table["cached"].any()
    full = sweep_exact_top(etk, opts, 50, **kw)
    assert full.table["cached"].sum() == 2 and len(list(tmp_path.glob("*.json"))) == 4
    fresh = sweep_exact_top(etk, opts, 50, **dict(kw, cache=None))
    cols = ["lr", "batch_size", "steps_to_target", "estimate", "check", "final_loss"]
    assert full.table[cols].equals(fresh.table[cols])
    for a, b in zip(full.forecasts, fresh.forecasts):
        np.testing.assert_array_equal(a.loss, b.loss)
    # another kernel (other top weights) or setting is not read from the same folder
    body, top = _net(seed=1)
    other = compute_exact_top_kernel(body, top, _data(12), progress=False)
    again = sweep_exact_top(other, opts, 50, **kw)
    assert not again.table["cached"].any() and len(list(tmp_path.glob("*.json"))) == 8
    # a damaged file is computed again, not trusted
    victim = sorted(tmp_path.glob("*.json"))[0]
    victim.write_text("{not json")
    sweep_exact_top(other, opts, 50, **kw)
    sweep_exact_top(etk, opts, 50, **kw)
    assert json.loads(victim.read_text())["model"] == "exact top, block linear"


@pytest.mark.parametrize("call, match", [
    (lambda k: sweep_exact_top(k, [], 10), "non-empty list of tl.SGD"),
    (lambda k: sweep_exact_top(k, [tl.AdamW(1e-3)], 10), "non-empty list of tl.SGD"),
    (lambda k: sweep_exact_top(k, [tl.SGD(0.1)], 10, drop=1.0), "drop must be"),
    (lambda k: sweep_exact_top(k, [tl.SGD(0.1)], 10, batch_sizes=[]), "at least one size"),
    (lambda k: sweep_exact_top(k, [tl.SGD(0.1)], 10, batch_sizes=[0]), "batch_size must"),
    (lambda k: sweep_exact_top(k, [tl.SGD(0.1)], -1), "steps"),
    (lambda k: sweep_exact_top(torch.eye(3), [tl.SGD(0.1)], 10), "compute_exact_top_kernel"),
])  # fmt: skip
def test_bad_sweep_requests_are_refused_with_the_fix(etk, call, match):
    with pytest.raises(TangentlabError, match=match):
        call(etk)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_initial_loss_is_every_forecasts_first_loss(etk, loss):
    fc = _alone(etk, tl.SGD(0.1), 3, loss=loss)
    assert etk.initial_loss(loss) == pytest.approx(float(fc.loss[0]), rel=1e-12)


def test_rank_by_samples_orders_by_estimate_times_batch(etk):
    opts = tl.SGD.grid(lr=[0.1, 0.5])
    kw = dict(loss="ce", batch_sizes=[3, None], drop=0.5, progress=False)
    by_steps = sweep_exact_top(etk, opts, 80, **kw)
    by_samples = sweep_exact_top(etk, opts, 80, rank_by="samples", **kw)
    t = by_samples.table
    for _, row in t.iterrows():
        b = 12 if _value(row["batch_size"]) is None else int(row["batch_size"])
        if _value(row["estimate"]) is not None:
            assert row["samples_to_target"] == pytest.approx(row["estimate"] * b)
    reached = t["samples_to_target"].dropna().to_numpy()
    assert np.all(np.diff(reached) >= 0)
    assert sorted(map(tuple, by_steps.table[["lr", "batch_size"]].fillna(-1).values)) == sorted(
        map(tuple, t[["lr", "batch_size"]].fillna(-1).values))  # the same rows, reordered
    assert by_samples.to_dict()["rank_by"].startswith("estimate x batch size")
    with pytest.raises(TangentlabError, match="rank_by must be 'steps' or 'samples'"):
        sweep_exact_top(etk, opts, 10, rank_by="eval_accuracy", progress=False)
