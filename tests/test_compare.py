"""Forecast-vs-run comparison (``tangentlab.compare``) on synthetic curves with known answers,
and ``tangentlab validate`` end to end on the digits example."""

from __future__ import annotations

import base64
import inspect
import json
import math
import re
import traceback
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tangentlab.cli import main
from tangentlab.compare import Comparison, compare
from tangentlab.errors import TangentlabError
from tangentlab.finetune import TrainingRun
from tangentlab.forecast import Forecast

T = np.arange(101)


def fc_of(loss, accuracy=None, band=None, hyper=None) -> Forecast:
    loss = np.asarray(loss, dtype=float)
    return Forecast(
        loss=loss, accuracy=np.zeros_like(loss) if accuracy is None else np.asarray(accuracy),
        loss_band=band, loss_paths=None, accuracy_paths=None,
        diverges=bool(np.isnan(loss).any()), divergence_step=None, stability=math.nan,
        stability_limit=2.0, loss_limit=math.nan, hyperparameters=hyper or {},
    )  # fmt: skip


def run_of(steps, loss, accuracy=None, hyper=None) -> TrainingRun:
    loss = np.asarray(loss, dtype=float)
    return TrainingRun(
        steps=np.asarray(steps), loss=loss,
        accuracy=np.zeros_like(loss) if accuracy is None else np.asarray(accuracy),
        train_seconds=2.0, eval_seconds=1.0, wall_seconds=3.5, hyperparameters=hyper or {},
    )  # fmt: skip


# ---- steps to target -------------------------------------------------------------------


def test_steps_to_target_and_curve_error_when_every_step_is_logged():
    fc, run = fc_of(np.exp(-T / 10)), run_of(T, np.exp(-T / 12))
    c = compare(fc, run)
    # ε = 0.2 L0 = 0.2: T̂ = ceil(10 ln 5) = 17, T = ceil(12 ln 5) = 20
    assert c.target_loss == pytest.approx(0.2)
    assert "80% drop of the run's initial loss" in c.target_note
    assert (c.steps_to_target_forecast, c.steps_to_target_run) == (17, 20)
    assert c.steps_to_target_error == pytest.approx(0.15)
    assert c.steps_resolution == 1
    dev = np.abs(np.exp(-T / 10) - np.exp(-T / 12))
    assert c.curve_error == pytest.approx(dev.mean(), rel=1e-12)
    assert c.curve_error_max == pytest.approx(dev.max(), rel=1e-12)
    assert c.notes == () and c.band_coverage is None and c.final_step == 100


def test_coarse_log_locates_both_steps_on_the_same_grid():
    """Logged every 5 steps, both T's are the first logged step at or below ε."""
    grid = T[::5]
    fc, run = fc_of(np.exp(-T / 10)), run_of(grid, np.exp(-grid / 12))
    c = compare(fc, run)  # exact: T̂ = 17, T = 20; on the grid both are 20
    assert (c.steps_to_target_forecast, c.steps_to_target_run) == (20, 20)
    assert c.steps_to_target_error == 0.0 and c.steps_resolution == 5
    c = compare(fc, run, target_loss=0.25)  # exact 14 and 17 -> grid 15 and 20
    assert (c.steps_to_target_forecast, c.steps_to_target_run) == (15, 20)
    assert c.steps_to_target_error == pytest.approx(0.25) and c.target_note == "given"
    np.testing.assert_array_equal(c.steps, grid)
    np.testing.assert_allclose(c.loss_forecast, np.exp(-grid / 10))


def test_target_outside_either_range_gives_no_error_and_says_why():
    fc = fc_of(np.exp(-np.arange(301) / 10))
    run = run_of(T, 0.6 + 0.4 * np.exp(-T / 5))  # never below 0.6 L0
    c = compare(fc, run)
    assert c.steps_to_target_error is None and c.steps_to_target_run is None
    assert not c.target_missed  # the run does not reach it: not the forecast's failure
    assert c.steps_to_target_forecast == 17
    assert "the run does not reach it by step 100" in c.target_note
    c = compare(fc, run, target_loss=2.0)
    assert c.steps_to_target_error is None and "starts at or below it" in c.target_note
    # the forecast reaches ε only after the run's last step: said, but no error
    c = compare(fc, run_of(T, np.exp(-T / 80)), target_loss=0.5)
    late = compare(fc_of(np.exp(-np.arange(301) / 200)), run_of(T, np.exp(-T / 80)),
                   target_loss=0.5)  # fmt: skip
    assert c.steps_to_target_error is not None and not c.target_missed
    assert late.steps_to_target_error is None and late.target_missed  # a miss, counted
    assert "the forecast reaches it at step 139" in late.target_note


def test_target_drop_sets_the_default_target():
    c = compare(fc_of(np.exp(-T / 10)), run_of(T, 2 * np.exp(-T / 12)), target_drop=0.5,
                check_settings=False)  # fmt: skip
    assert c.target_loss == pytest.approx(1.0) and "50% drop" in c.target_note
    assert any("initial losses differ" in n for n in c.notes)


# ---- plateau, final values, band, cost -------------------------------------------------


def test_steps_to_plateau_known_answer():
    t = np.arange(401)
    c = compare(fc_of(0.3 + 0.7 * np.exp(-t / 10)), run_of(t, 0.3 + 0.7 * np.exp(-t / 12)))
    # |L_t - L_inf| < 0.05 * 0.7  <=>  t > tau ln 20: 29.96 -> 30 and 35.95 -> 36
    assert (c.steps_to_plateau_forecast, c.steps_to_plateau_run) == (30, 36)
    assert c.steps_to_plateau_error == pytest.approx(1 / 6)
    c = compare(fc_of(0.3 + 0.7 * np.exp(-t / 10)), run_of(t, 0.3 + 0.7 * np.exp(-t / 12)),
                plateau_rel_eps=0.01)  # fmt: skip
    assert (c.steps_to_plateau_forecast, c.steps_to_plateau_run) == (47, 56)


def test_a_curve_still_moving_has_no_plateau():
    c = compare(fc_of(np.exp(-T / 10)), run_of(T, 1.0 - T / 200))
    assert c.steps_to_plateau_run is None and c.steps_to_plateau_error is None
    assert c.steps_to_plateau_forecast is not None
    assert "run: still moving" in c.plateau_note


def test_final_accuracy_band_coverage_and_cost_ratio():
    mean = np.exp(-T / 20)
    band = (0.9 * mean, 1.1 * mean)
    fc = fc_of(mean, accuracy=np.linspace(0.1, 0.9, 101), band=band)
    real = np.where(T <= 50, mean, 1.5 * mean)  # inside the band at steps 1..50 of 1..100
    run = run_of(T, real, accuracy=np.linspace(0.1, 0.8, 101))
    c = compare(fc, run, forecast_seconds=0.5)
    assert c.final_accuracy_forecast == pytest.approx(0.9)
    assert c.final_accuracy_run == pytest.approx(0.8)
    assert c.final_accuracy_diff == pytest.approx(0.1)
    assert c.band_coverage == pytest.approx(0.5)
    assert c.cost_ratio == pytest.approx(4.0) and c.cost_ratio_with_eval == pytest.approx(7.0)


def test_divergence_and_truncation_are_reported():
    loss = np.exp(-np.arange(61) / 10)
    loss[40:] = np.nan  # the forecast diverges at step 40
    c = compare(fc_of(loss), run_of(T, np.exp(-T / 10)))
    np.testing.assert_array_equal(c.steps, np.arange(61))
    assert c.curve_error == pytest.approx(0.0, abs=1e-15) and c.final_step == 39
    notes = " | ".join(c.notes)
    assert "only to step 60" in notes and "over 40 of 61 steps" in notes
    assert "the forecast diverges but the run does not" in notes
    assert c.steps_to_plateau_forecast is None and "forecast: diverges" in c.plateau_note


# ---- inputs ------------------------------------------------------------------------------


def test_dicts_and_to_dict_outputs_compare_like_the_objects():
    fc = fc_of(np.exp(-T / 10), band=(np.exp(-T / 9), np.exp(-T / 11)))
    fc.loss[90:] = np.nan
    run = run_of(T[::3], np.exp(-T[::3] / 12))
    a = compare(fc, run)
    b = compare(json.loads(json.dumps(fc.to_dict())), json.loads(json.dumps(run.to_dict())))
    c = compare({"loss": list(fc.loss), "loss_band": fc.loss_band},
                {"steps": list(run.steps), "loss": list(run.loss)})  # fmt: skip
    for other in (b, c):
        for key in ("steps_to_target_error", "curve_error", "band_coverage", "final_step",
                    "steps_to_plateau_error", "target_loss"):  # fmt: skip
            assert getattr(other, key) == getattr(a, key), key
    assert c.final_accuracy_diff is None and c.cost_ratio is None
    d = json.loads(json.dumps(a.to_dict(), allow_nan=False))
    assert set(d) == set(Comparison.__dataclass_fields__)
    assert "steps" not in a.summary() and a.summary()["curve_error"] == d["curve_error"]


def test_settings_must_match_unless_told_otherwise():
    hyper = dict(lr=0.1, batch_size=None, momentum=0.0, loss="mse", num_samples=101)
    fc = fc_of(np.exp(-T / 10), hyper=hyper)
    assert compare(fc, run_of(T, np.exp(-T / 12), hyper={**hyper, "batch_size": 101}))
    with pytest.raises(TangentlabError, match=r"lr \(0.1 vs 0.2\).*check_settings=False"):
        compare(fc, run_of(T, np.exp(-T / 12), hyper={**hyper, "lr": 0.2}))
    with pytest.raises(TangentlabError, match=r"batch_size \(None vs 8\)"):
        compare(fc, run_of(T, np.exp(-T / 12), hyper={**hyper, "batch_size": 8}))
    c = compare(fc, run_of(T, np.exp(-T / 12), hyper={"lr": 0.2}), check_settings=False)
    assert (c.steps_to_target_forecast, c.steps_to_target_run) == (17, 20)  # compared anyway


@pytest.mark.parametrize(
    "run, kw, says",
    [
        ({"steps": [1, 2], "loss": [1.0, 0.5]}, {}, "increase strictly from 0"),
        ({"steps": [0, 2, 2], "loss": [1.0, 0.5, 0.4]}, {}, "increase strictly from 0"),
        ({"steps": [0, 1], "loss": [1.0]}, {}, "one per loss value"),
        ({"loss": [1.0]}, {}, "mapping with 'steps'"),
        ({"steps": [0, 1], "loss": [0.0, 0.0]}, {}, "initial loss must be finite and > 0"),
        ({"steps": [0, 1], "loss": [1.0, 0.5]}, {"plateau_rel_eps": 0}, "plateau_rel_eps"),
        ({"steps": [0, 1], "loss": [1.0, 0.5]}, {"target_drop": 1.0}, "target_drop"),
        ({"steps": [0, 1], "loss": [1.0, 0.5]}, {"target_loss": "x"}, "target_loss"),
        ({"steps": [0, 1], "loss": [1.0, 0.5]}, {"forecast_seconds": 0}, "forecast_seconds"),
    ],
)
def test_bad_inputs_name_the_fix(run, kw, says):
    with pytest.raises(TangentlabError, match="^compare: ") as exc:
        compare(fc_of(np.exp(-T / 10)), run, **kw)
    assert says in str(exc.value)
    with pytest.raises(TangentlabError, match="forecast must be a tangentlab.Forecast"):
        compare([1.0, 0.5], {"steps": [0, 1], "loss": [1.0, 0.5]})


# ---- tangentlab validate ---------------------------------------------------------------


def _invoke(*args):
    kw = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}
    res = CliRunner(**kw).invoke(main, [str(a) for a in args])
    tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
    return res, tb


def test_validate_end_to_end_on_digits(tmp_path):
    out = tmp_path / "v"
    res, tb = _invoke("validate", "--example", "digits-cnn", "--samples", 30, "--steps", 20,
                      "--no-progress", "--out", out)  # fmt: skip
    assert res.exit_code == 0, f"{res.output}\n{tb}"
    js = json.loads((out / "validation.json").read_text(), parse_constant=_no_nan)
    cmp, run, fc = js["comparison"], js["run"], js["forecast"]
    assert run["steps"] == list(range(21)) and len(fc["loss"]) == 21
    assert run["hyperparameters"]["bn"] == "frozen" and run["hyperparameters"]["num_samples"] == 30
    assert cmp["initial_loss"] == pytest.approx(fc["loss"][0], rel=1e-4)  # same model, data
    assert cmp["target_loss"] == pytest.approx(0.2 * run["loss"][0])
    assert not any("differ" in n for n in cmp["notes"])
    assert js["info"]["source"] == "digits-cnn" and js["info"]["cost_ratio"] > 0

    m = re.search(r"^steps-to-target error \|T̂−T\|/T: (\S+)", res.stdout, re.M)
    assert m, res.stdout
    want = cmp["steps_to_target_error"]
    assert m.group(1) == ("-" if want is None else f"{want:.3g}")
    m = re.search(r"^curve error mean\|L̂−L\|/L0: (\S+) ", res.stdout, re.M)
    assert m and float(m.group(1)) == pytest.approx(cmp["curve_error"], rel=1e-2)
    assert cmp["curve_error"] < 0.2  # the digits CNN fine-tunes close to its tangent model
    assert re.search(r"^cost: real run .* ratio real/forecast \S+x", res.stdout, re.M)
    assert f"wrote {out / 'validation.json'}" in res.stdout
    stderr = res.stderr if hasattr(res, "stderr") else res.output
    assert stderr.count("example digits-cnn:") == 1  # described once, loaded twice

    png = (out / "validation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    page = (out / "validation.html").read_text(encoding="utf-8")
    assert base64.b64encode(png).decode() in page and "Forecast vs real run" in page


def test_validate_rejects_bad_options_before_any_work(tmp_path):
    res, _ = _invoke("validate", "--example", "digits-cnn", "--log-every", 0, "--out", tmp_path)
    assert res.exit_code == 2 and "--log-every must be a positive integer" in res.output
    assert not Path(tmp_path / "kernel").exists()


def _no_nan(token: str):
    raise AssertionError(f"validation.json contains {token}")
