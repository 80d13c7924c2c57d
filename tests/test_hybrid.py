"""The pilot-conditioned steps interval (NOTE [pilot feature] in tangentlab.hybrid) and
``finetune(stop_below=)``, which runs the pilot."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

import tangentlab as tl
from tangentlab.forecast import STEPS_CALIBRATION_PILOT, steps_features, steps_quantiles
from test_headbody import LinearBody, TanhBody, _data


def _net_data(n=24):
    return TanhBody().double().eval(), _data(n=n, dim=4)


def _measured(loss):
    """TanhBody on 24 samples, its head-exact kernel and the pilot of ``loss``."""
    net, data = _net_data()
    hb = tl.compute_head_body_kernel(net, data, progress=False)
    return net, data, hb, tl.measure_pilot(net, data, hb, loss=loss, progress=False)


@pytest.mark.parametrize("batch", [None, 8])
def test_stop_below_stops_at_the_first_step_at_or_below_and_is_a_prefix_of_the_full_run(batch):
    net, data = _net_data()
    opt = tl.SGD(0.2, momentum=0.9)
    kw = dict(loss="ce", batch_size=batch, log_every=1, progress=False)
    full = tl.finetune(net, data, opt, 200, **kw)
    level = 0.6 * float(full.loss[0])
    t = full.steps_to(level)
    run = tl.finetune(net, data, opt, 200, stop_below=level, **kw)
    assert run.stopped and not full.stopped and t is not None
    assert run.steps_to(level) == t and run.steps_done == run.steps[-1] <= t + 1
    np.testing.assert_array_equal(run.loss, full.loss[: run.steps.size])
    assert run.hyperparameters["stop_below"] == level and run.to_dict()["stopped"]
    never = tl.finetune(net, data, opt, 5, stop_below=-1.0, **kw)
    assert not never.stopped and never.steps[-1] == 5
    with pytest.raises(tl.TangentlabError, match="stop_below must be a finite number"):
        tl.finetune(net, data, opt, 5, stop_below=float("nan"), **kw)


def _by_hand(run, fc, drop=0.5):
    """log(T / T̂) by a plain loop over the two curves (real L_0's level)."""
    level = (1 - drop) * run.loss[0]
    t = next(int(s) for s, v in zip(run.steps, run.loss) if v <= level)
    t_hat = next((s for s, v in enumerate(fc.loss) if v <= level), None)
    return t, t_hat, (0.0 if t_hat is None else math.log(max(t, 1) / max(t_hat, 1)))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_measure_pilot_runs_the_calibrated_pilot_and_reads_its_feature(loss):
    _, _, hb, pilot = _measured(loss)
    run, fc = pilot.run, pilot.forecast
    assert run.hyperparameters["batch_size"] is None and run.hyperparameters["momentum"] == 0.9
    assert pilot.lr == tl.stable_lr(hb, momentum=0.9, fraction=0.1, loss=loss)
    assert 0.05 <= fc.stability / 2 <= 0.1 + 1e-12  # stable_lr rounds down
    t, t_hat, feature = _by_hand(run, fc)
    assert (pilot.steps, pilot.forecast_steps) == (t, t_hat)
    assert pilot.feature == pytest.approx(feature, abs=1e-12)
    assert pilot.cost == run.steps_done * 24 and run.stopped
    assert pilot.loss == loss and "drop at step" in str(pilot)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_body_linear_in_its_weights_has_pilot_feature_zero(loss):
    """Where the head-exact model is exact, the pilot's real run is its forecast: p = 0."""
    net, data = LinearBody().double().eval(), _data(n=12)
    hb = tl.compute_head_body_kernel(net, data, progress=False)
    pilot = tl.measure_pilot(net, data, hb, loss=loss, progress=False)
    assert pilot.steps == pilot.forecast_steps and pilot.feature == 0.0 and not pilot.note


def test_steps_interval_with_a_pilot_is_the_eleven_column_calibration():
    _, _, hb, pilot = _measured("mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, tl.SGD(0.05), 400, loss="mse")
    target = 0.5 * float(fc.loss[0])
    t = fc.steps_to(target)
    hit = np.flatnonzero(fc.reference_loss <= target)
    t_tan = int(hit[0]) if hit.size else 2 * 400
    from tangentlab.forecast import curve_features

    stretch, rho50 = curve_features(fc.loss, fc.reference_loss)
    x = steps_features(0.5, momentum=0.0, fraction=fc.stability / 2, rho=t_tan / t, steps=t,
                       stretch=stretch, rho50=rho50, conv=False)
    xp = np.append(x, pilot.feature)
    lo, mid, hi = (float(np.dot(STEPS_CALIBRATION_PILOT[k], xp)) for k in ("lo", "mid", "hi"))
    iv = fc.steps_interval(target, pilot=pilot)
    assert iv.median == round(t * math.exp(mid)) and iv.pilot == pilot.feature
    assert iv.low == math.floor(t * math.exp(min(lo, mid)))
    assert iv.high == math.ceil(t * math.exp(max(hi, mid)))
    assert "with the pilot" in str(iv) and "with the pilot" not in str(fc.steps_interval(target))
    assert steps_quantiles(x, pilot=pilot.feature) == pytest.approx((min(lo, mid), mid,
                                                                     max(hi, mid)))


def test_a_slower_pilot_raises_the_median_estimate():
    """The pilot's column enters the median with a positive weight: a pilot whose real run
    was slower than its forecast moves every estimate of that loss up."""
    x = steps_features(0.8, momentum=0.0, fraction=0.3, rho=3.0, steps=100, stretch=1.0,
                       rho50=2.0, conv=True)
    mids = [steps_quantiles(x, pilot=p)[1] for p in (-0.5, 0.0, 0.5)]
    assert mids[0] < mids[1] < mids[2]


def test_a_pilot_outside_the_calibrations_range_is_noted():
    """PILOT_RANGE: a pilot whose log(T / T̂) lies outside the development pilots' range
    makes the interval an extrapolation: the note and the pilot's own description say so
    and nothing is trusted; inside it, no note."""
    from tangentlab.forecast import PILOT_RANGE

    _, _, hb, pilot = _measured("mse")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, tl.SGD(0.05), 400, loss="mse")
    target = 0.5 * float(fc.loss[0])
    low, high = PILOT_RANGE["default"]
    for p, noted in ((low - 0.1, True), (0.5 * (low + high), False), (high + 0.1, True)):
        iv = fc.steps_interval(target, pilot=dataclasses.replace(pilot, feature=p))
        assert ("a pilot whose real run took" in iv.note) is noted
        if noted:
            assert f"{math.exp(p):.2f}x its forecast's steps" in iv.note and not iv.trusted
            assert "not calibrated for a pilot" in str(iv)
        # the pilot says so itself (tl.measure_pilot and the CLI print it)
        said = str(dataclasses.replace(pilot, feature=p))
        assert ("its intervals extrapolate" in said) is noted


def test_bad_pilots_are_refused_with_the_fix():
    net, data, hb, ce = _measured("ce")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, tl.SGD(0.05), 50, loss="mse")
    with pytest.raises(tl.TangentlabError, match="measure one with loss='mse'"):
        fc.steps_interval(0.5 * fc.loss[0], pilot=ce)
    with pytest.raises(tl.TangentlabError, match="must be a tl.Pilot"):
        fc.steps_interval(0.5 * fc.loss[0], pilot=0.3)
    with pytest.raises(tl.TangentlabError, match="head-exact kernel"):
        tl.measure_pilot(net, data, hb.tangent_kernel(), progress=False)
    with pytest.raises(tl.TangentlabError, match="raise max_steps"):
        tl.measure_pilot(net, data, hb, loss="ce", max_steps=1, progress=False)
    lr = tl.stable_lr(hb, momentum=0.9, fraction=0.1, loss="mse")
    cases = [
        (dict(opt=tl.SGD(lr, momentum=0.9), batch_size=8), "batch size 8"),
        (dict(opt=tl.SGD(lr * 0.9 / 0.9 / 10, momentum=0.0)), "momentum 0"),
        (dict(opt=tl.SGD(lr, momentum=0.9), log_every=2), "log_every=1"),
        (dict(opt=tl.SGD(lr / 10, momentum=0.9)), "of the stability limit"),
    ]
    for kw, match in cases:
        opt = kw.pop("opt")
        run = tl.finetune(net, data, opt, 200, loss="mse", progress=False,
                          **{"log_every": 1, **kw})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tl.errors.ValidityWarning)
            f = tl.forecast(hb, opt, 2000, loss="mse", batch_size=kw.get("batch_size"))
        with pytest.raises(tl.TangentlabError, match=match):
            tl.Pilot.from_run(run, f)
    run = tl.finetune(net, data, tl.SGD(lr, momentum=0.9), 200, loss="mse", log_every=1,
                      progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        other = tl.forecast(hb, tl.SGD(lr, momentum=0.9), 2000, loss="ce")
        short = tl.forecast(hb, tl.SGD(lr, momentum=0.9), 2, loss="mse")
    with pytest.raises(tl.TangentlabError, match="not of the pilot's settings"):
        tl.Pilot.from_run(run, other)
    with pytest.raises(tl.TangentlabError, match="forecast it over at least"):
        tl.Pilot.from_run(run, short)
    with pytest.raises(tl.TangentlabError, match="never dropped by 50%"):
        tl.Pilot.from_run(tl.finetune(net, data, tl.SGD(lr, momentum=0.9), 1, loss="mse",
                                      log_every=1, progress=False), short)


def test_pilot_from_a_run_the_user_made_equals_measure_pilot():
    net, data, hb, pilot = _measured("ce")
    lr = tl.stable_lr(hb, momentum=0.9, fraction=0.1, loss="ce")
    with torch.no_grad():
        l0 = float(torch.nn.functional.cross_entropy(net(data[0]), data[1]))
    run = tl.finetune(net, data, tl.SGD(lr, momentum=0.9), 3000, loss="ce", log_every=1,
                      stop_below=0.5 * l0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, run.optimizer, 10 * run.steps_done, loss="ce")
    mine = tl.Pilot.from_run(run, fc)
    assert (mine.steps, mine.forecast_steps) == (pilot.steps, pilot.forecast_steps)
    assert mine.feature == pytest.approx(pilot.feature)


def test_compare_reads_the_pilot_conditioned_interval():
    net, data, hb, pilot = _measured("mse")
    opt = tl.SGD(tl.stable_lr(hb, loss="mse"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tl.errors.ValidityWarning)
        fc = tl.forecast(hb, opt, 60, loss="mse")
    run = tl.finetune(net, data, opt, 60, loss="mse", log_every=1, progress=False)
    target = 0.5 * float(run.loss[0])
    iv = fc.steps_interval(target, pilot=pilot)
    cmp = tl.compare(fc, run, target_loss=target, pilot=pilot)
    assert cmp.steps_interval == (iv.low, iv.high) and cmp.steps_median == iv.median
    plain = tl.compare(fc, run, target_loss=target)
    assert plain.steps_median == fc.steps_interval(target).median
