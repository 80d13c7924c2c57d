"""Learning-rate schedules (tangentlab.schedules): multipliers against torch's own schedulers,
composition, serialization and errors; and the forecast of every solver against real runs
of models linear in their weights, to round-off, for every schedule (NOTE [schedules])."""

from __future__ import annotations

import json
import math
import uuid
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tangentlab as tl
from tangentlab.cli import main
from tangentlab.errors import TangentlabError
from tangentlab.headbody import compute_head_body_kernel
from tangentlab.report import label_of, what_rows
from tangentlab.schedules import from_dict

N, D, C, T = 24, 6, 3, 40
RTOL = 1e-8
# lr = 0.4 lies above the validity region of this kernel: irrelevant to exactness
pytestmark = pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")

SCHEDULES = [
    tl.Warmup(10),
    tl.Warmup(8, start=0.2),
    tl.LinearDecay(T),
    tl.Cosine(30, end=0.1),
    tl.StepDecay(10, gamma=0.5),
    tl.Warmup(5).then(tl.Cosine(T - 5)),
]


def _ids(x):
    if hasattr(x, "describe"):
        return x.describe()
    if isinstance(x, dict):
        return ",".join(f"{k}={v}" for k, v in x.items()) or "gd"
    return None  # pytest's own id


# ---- multipliers ---------------------------------------------------------------------


def _torch_lrs(make, steps: int, lr: float = 0.5) -> np.ndarray:
    """The learning rate torch uses at steps 0..steps-1 (scheduler stepped after each step)."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return np.array(out)


LR = torch.optim.lr_scheduler
TORCH_EQUIVALENTS = [
    (tl.Warmup(10, start=0.1), lambda o: LR.LinearLR(o, 0.1, 1.0, total_iters=10), 25),
    (tl.LinearDecay(20, end=0.1), lambda o: LR.LinearLR(o, 1.0, 0.1, total_iters=20), 30),
    (tl.LinearDecay(20), lambda o: LR.LinearLR(o, 1.0, 0.0, total_iters=20), 30),
    (tl.Cosine(20, end=0.1), lambda o: LR.CosineAnnealingLR(o, 20, eta_min=0.05), 21),
    (tl.Cosine(20), lambda o: LR.CosineAnnealingLR(o, 20), 21),
    (tl.StepDecay(5, gamma=0.5), lambda o: LR.StepLR(o, 5, gamma=0.5), 23),
    (
        tl.Warmup(5, start=0.2).then(tl.Cosine(15)),
        lambda o: LR.SequentialLR(
            o, [LR.LinearLR(o, 0.2, 1.0, total_iters=5), LR.CosineAnnealingLR(o, 15)], [5]
        ),
        21,
    ),
]


@pytest.mark.parametrize("sched, make, steps", TORCH_EQUIVALENTS, ids=lambda x: _ids(x))
def test_multipliers_match_torch_schedulers(sched, make, steps):
    np.testing.assert_allclose(0.5 * sched.multipliers(steps), _torch_lrs(make, steps),
                               rtol=1e-12, atol=1e-15)  # fmt: skip
    # finetune's LambdaLR multiplies by exactly these floats
    lam = _torch_lrs(lambda o: LR.LambdaLR(o, sched.multiplier), steps)
    np.testing.assert_array_equal(lam, 0.5 * sched.multipliers(steps))


def test_multiplier_values_and_composition():
    w = tl.Warmup(4)
    np.testing.assert_allclose(w.multipliers(6), [0, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(tl.LinearDecay(4, end=0.2).multipliers(6),
                               [1, 0.8, 0.6, 0.4, 0.2, 0.2])  # fmt: skip
    np.testing.assert_allclose(tl.Cosine(2).multipliers(4), [1, 0.5, 0, 0], atol=1e-16)
    np.testing.assert_allclose(tl.StepDecay(2, gamma=0.5).multipliers(5), [1, 1, 0.5, 0.5, 0.25])
    three = w.then(tl.Constant(), at=2).then(tl.StepDecay(1, gamma=0.5), at=4)
    np.testing.assert_allclose(three.multipliers(7), [0, 0.25, 1, 1, 1, 0.5, 0.25])
    wc = w.then(tl.Cosine(4))
    assert wc.at == 4 and wc.length == 8 and wc.final == 0.0 and wc.rest_step == 8
    assert (w.length, w.final, w.rest_step) == (4, 1.0, None)
    assert tl.StepDecay(3).final == 0.0 and tl.StepDecay(3, gamma=1).final == 1.0
    assert tl.Cosine(5, end=0.3).rest_step is None and tl.LinearDecay(5).rest_step == 5
    assert tl.Constant().is_constant and not w.is_constant
    assert w.peak(2) == 0.25 and w.peak(0) == 0.0 and tl.Cosine(9).peak(3) == 1.0
    assert tl.make_schedule("warmup-cosine", 300, warmup_fraction=0.1) == tl.Warmup(30).then(
        tl.Cosine(270)
    )
    assert tl.make_schedule("warmup-linear", 10, warmup_steps=2) == tl.Warmup(2).then(
        tl.LinearDecay(8)
    )
    assert tl.make_schedule("warmup", 100) == tl.Warmup(10)
    assert tl.make_schedule("step", 100, step_every=30) == tl.StepDecay(30, gamma=0.1)
    assert tl.make_schedule("cosine", 50) == tl.Cosine(50)
    assert tl.make_schedule("linear", 50) == tl.LinearDecay(50)
    assert tl.make_schedule("constant", 50) == tl.Constant()


@pytest.mark.parametrize("sched", [tl.Constant(), *SCHEDULES,
                                   tl.Warmup(3).then(tl.Constant(), at=5).then(tl.Cosine(9), at=8)],
                         ids=_ids)  # fmt: skip
def test_dict_round_trip_and_description(sched):
    d = json.loads(json.dumps(sched.to_dict()))
    assert from_dict(d) == sched and tl.Schedule.from_dict(d) == sched
    again = eval(sched.describe(), {k: getattr(tl, k) for k in tl.__all__})
    assert again == sched  # describe() is the Python that builds it
    opt = tl.SGD(0.1, momentum=0.9, schedule=sched)
    assert opt.to_dict()["schedule"] == sched.to_dict()
    assert json.dumps(opt.to_dict())
    assert ("schedule=" in opt.describe()) == (not sched.is_constant)


def test_optimizer_slot_grid_and_replace():
    opts = tl.SGD.grid(lr=[0.1, 0.2], schedule=[tl.Constant(), tl.Cosine(10)])
    assert [o.schedule for o in opts] == [tl.Constant(), tl.Cosine(10)] * 2
    assert tl.SGD(0.1).schedule == tl.Constant() and tl.SGD(0.1, schedule=None).schedule.is_constant
    opt = tl.SGD(0.1, schedule={"name": "cosine", "steps": 10, "end": 0.0})
    assert opt.schedule == tl.Cosine(10) and opt.replace(lr=0.2).schedule == tl.Cosine(10)
    assert opt.lr_multipliers(3) is not None and tl.SGD(0.1).lr_multipliers(3) is None
    assert tl.SGD(0.4, schedule=tl.Warmup(10)).peak_lr(5) == pytest.approx(0.4 * 0.4)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: tl.Warmup(0), r"^Warmup: steps must be an integer >= 1 .*e\.g\. tl\.Warmup"),
        (lambda: tl.Warmup(2.5), "Warmup: steps must be an integer"),
        (lambda: tl.Warmup(10, start=1.5), r"Warmup: start must lie in \[0, 1\]"),
        (lambda: tl.LinearDecay(10, end=-0.1), r"LinearDecay: end must lie in \[0, 1\]"),
        (lambda: tl.Cosine(0), "Cosine: steps must be an integer >= 1"),
        (lambda: tl.Cosine(10, end=math.nan), "Cosine: end must lie in"),
        (lambda: tl.StepDecay(0), "StepDecay: every must be an integer >= 1"),
        (lambda: tl.StepDecay(10, gamma=0), r"StepDecay: gamma must lie in \(0, 1\]"),
        (lambda: tl.Join(tl.Constant(), 3, 5), "Join: second must be a schedule"),
        (lambda: tl.Constant().then(tl.Cosine(10)), r"Constant\(\)\.then: .*no end.*at=50"),
        (lambda: tl.Warmup(3).then(tl.Cosine(10), at=0), "Join: at must be an integer >= 1"),
        (lambda: tl.SGD(0.1, schedule="cosine"), "SGD: schedule must be a tangentlab schedule"),
        (lambda: from_dict({"name": "nope"}), "from_dict: expected a mapping"),
        (lambda: from_dict({"name": "cosine", "step": 3}), "bad fields for Cosine"),
        (lambda: tl.make_schedule("exp", 10), "make_schedule: kind must be one of"),
        (lambda: tl.make_schedule("step", 10), "needs step_every"),
        (lambda: tl.make_schedule("cosine", 0), "needs steps >= 1"),
        (lambda: tl.make_schedule("warmup-cosine", 10, warmup_steps=10), "shorter than the run"),
        (lambda: tl.make_schedule("cosine", 10, warmup_steps=2), "do not apply to kind='cosine'"),
        (lambda: tl.make_schedule("warmup", 10, warmup_steps=2, warmup_fraction=0.1), "not both"),
        (lambda: tl.make_schedule("warmup", 10, warmup_fraction=1.0), "warmup_fraction must"),
        (lambda: tl.Cosine(5).multipliers(-1), "steps must be an integer >= 0"),
    ],
)
def test_invalid_schedules_name_the_fix(make, match):
    with pytest.raises(TangentlabError, match=match):
        make()


# ---- forecast = real run, to round-off, in every solver ------------------------------


@pytest.fixture(scope="module")
def linear():
    """A model linear in its weights (a linear layer), float64 data, its exact kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.double)
    y = torch.randint(0, C, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(D, C).double().eval()
    return model, (x, y), tl.compute_kernel(model, (x, y), progress=False)


SETTINGS = [  # (forecast/run keywords, optimizer keywords)
    (dict(), dict()),  # full-batch MSE: closed form, per-mode product
    (dict(), dict(momentum=0.9)),  # closed form, heavy-ball modes
    (dict(), dict(momentum=0.5, weight_decay=0.05)),  # closed form with coupled decay
    (dict(), dict(weight_decay=0.1, decay_to="w0")),
    (dict(batch_size=5), dict(momentum=0.5, weight_decay=0.02)),  # exact minibatch simulation
    (dict(loss="ce"), dict(momentum=0.5)),  # exact discrete steps
]


@pytest.mark.parametrize("kw, okw", SETTINGS, ids=lambda x: _ids(x))
@pytest.mark.parametrize("sched", SCHEDULES, ids=_ids)
def test_forecast_equals_real_run_for_every_schedule(linear, sched, kw, okw):
    model, data, kernel = linear
    opt = tl.SGD(0.4, schedule=sched, **okw)
    fc = tl.forecast(kernel, opt, T, paths=1, seed=3, **kw)
    run = tl.finetune(model, data, opt, T, log_every=1, seed=3, progress=False, **kw)
    loss = fc.loss if fc.loss_paths is None else fc.loss_paths[0]
    acc = fc.accuracy if fc.accuracy_paths is None else fc.accuracy_paths[0]
    np.testing.assert_allclose(run.loss, loss, rtol=RTOL)
    np.testing.assert_array_equal(run.accuracy, acc)
    const = tl.forecast(kernel, opt.replace(schedule=tl.Constant()), T, paths=1, seed=3, **kw)
    assert np.abs(const.loss - fc.loss).max() > 1e-4  # the schedule did change the curve
    assert run.hyperparameters["schedule"] == fc.hyperparameters["schedule"] == sched.describe()
    assert sched.describe() in fc.method["schedule"]
    assert tl.compare(fc, run).curve_error < 1e-8


class LinearBody(nn.Module):
    """φ = (A x + a) ⊙ s, then a linear head: the head-body model is exact for it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(5, 6)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x) * self.scale)


@pytest.fixture(scope="module")
def head_body():
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(10, 5, generator=g, dtype=torch.double),
        torch.randint(0, 3, (10,), generator=g),
    )
    net = LinearBody().double().eval()
    return net, data, compute_head_body_kernel(net, data, directions=6, progress=False)


@pytest.mark.parametrize("batch, loss", [(None, "mse"), (4, "ce")])
@pytest.mark.parametrize("sched", SCHEDULES[1:], ids=_ids)
def test_head_body_model_follows_the_schedule_exactly(head_body, sched, batch, loss):
    net, data, hb = head_body
    opt = tl.SGD(0.05, momentum=0.9, weight_decay=0.05, schedule=sched)
    fc = tl.forecast(hb, opt, 25, loss=loss, batch_size=batch, paths=1)
    run = tl.finetune(net, data, opt, 25, loss=loss, batch_size=batch, log_every=1,
                      progress=False)  # fmt: skip
    np.testing.assert_allclose(fc.loss, run.loss, rtol=1e-10, atol=1e-12)
    assert fc.method["model"] == "head-body"


# ---- gradient flow, SDE ------------------------------------------------------------------


@pytest.mark.parametrize("loss, rtol", [("mse", 1e-12), ("ce", 1e-6)])
def test_flow_under_a_schedule_is_the_flow_in_reparametrized_time(linear, loss, rtol):
    """m = 1, 1, 1/2, 1/2, 1/4, 1/4: τ_t = 0, 1, 2, 2.5, 3, 3.25, 3.5 steps at rate η, i.e.
    steps 0, 4, 8, 10, 12, 13, 14 of the constant flow at η/4 (closed form and ODE)."""
    _, _, kernel = linear
    sched = tl.SGD(0.4, momentum=0.5, schedule=tl.StepDecay(2, gamma=0.5))
    fc = tl.forecast(kernel, sched, 6, loss=loss, time="continuous")
    ref = tl.forecast(kernel, tl.SGD(0.1, momentum=0.5), 14, loss=loss, time="continuous")
    np.testing.assert_allclose(fc.loss, ref.loss[[0, 4, 8, 10, 12, 13, 14]], rtol=rtol)
    if loss == "mse":  # the ODE solver agrees with the closed form under the schedule
        ode = tl.forecast(kernel, sched, 6, loss=loss, time="continuous", execution="dual")
        assert "gradient flow" in ode.method["solver"]
        np.testing.assert_allclose(ode.loss, fc.loss, rtol=1e-6)
    zero = tl.forecast(kernel, tl.SGD(0.4, schedule=tl.Warmup(5)), 1, loss=loss,
                       time="continuous", execution="dual")  # fmt: skip
    assert zero.loss[1] == zero.loss[0]  # step 0 has rate 0


def test_sde_steps_with_the_schedule(linear):
    _, _, kernel = linear
    opt = tl.SGD(0.3, momentum=0.5, schedule=tl.Warmup(2).then(tl.LinearDecay(2)))  # 0 .5 1 .5 0
    fc = tl.forecast(kernel, opt, 7, batch_size=5, noise="sde", paths=4, seed=1)
    paths = fc.loss_paths
    assert np.isfinite(paths).all()
    np.testing.assert_array_equal(paths[:, 1], paths[:, 0])  # m(0) = 0: no move
    for t in range(5, 8):  # m = 0 from step 4 on: the buffer no longer moves f
        np.testing.assert_array_equal(paths[:, t], paths[:, 4])
    assert np.abs(paths[:, 4] - paths[:, 0]).min() > 1e-6


# ---- checks at the peak, limits, sweep, compare, reports ---------------------------------


def test_stability_and_divergence_use_the_peak_rate(linear):
    _, _, kernel = linear
    lam = float(kernel.eigh()[0].max()) / N
    const = tl.forecast(kernel, tl.SGD(0.4), 10)
    warm = tl.forecast(kernel, tl.SGD(0.4, schedule=tl.Warmup(100)), 10)  # peak m(9) = 0.09
    assert warm.stability == pytest.approx(0.09 * const.stability)
    assert const.stability == pytest.approx(0.4 * lam)
    big = 2.5 / lam  # unstable at its peak (step 0), even though it decays to 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = tl.forecast(kernel, tl.SGD(big, schedule=tl.Cosine(30)), 30)
        ok = tl.forecast(kernel, tl.SGD(big, schedule=tl.Warmup(100)), 30)  # peak 0.29 * 2.5
    assert fc.diverges and fc.stability >= fc.stability_limit
    assert not ok.diverges and ok.stability < ok.stability_limit


def test_loss_limit_follows_the_schedule(linear):
    _, _, kernel = linear
    fixed = tl.forecast(kernel, tl.SGD(0.4), 10).loss_limit
    assert tl.forecast(kernel, tl.SGD(0.4, schedule=tl.Warmup(5)), 10).loss_limit == fixed
    short = tl.forecast(kernel, tl.SGD(0.4, schedule=tl.Cosine(30)), 12)  # stops at step 30
    full = tl.forecast(kernel, tl.SGD(0.4, schedule=tl.Cosine(30)), 35)
    assert short.loss_limit == pytest.approx(full.loss[30], rel=1e-12)
    np.testing.assert_allclose(full.loss[30:], full.loss[30], rtol=1e-14)
    assert short.loss_limit > fixed and short.method["loss_limit"] == "exact (closed form)"
    hb = tl.forecast(kernel, tl.SGD(0.4, momentum=0.9, schedule=tl.LinearDecay(20)), 25)
    assert hb.loss_limit == pytest.approx(hb.loss[-1], rel=1e-12)
    step = tl.forecast(kernel, tl.SGD(0.4, schedule=tl.StepDecay(5)), 20)
    assert step.method["loss_limit"] == "mean of the last 10% of the horizon"


def test_sweep_compare_and_reports_show_the_schedule(linear, tmp_path):
    model, data, kernel = linear
    opts = tl.SGD.grid(lr=[0.2, 0.4], schedule=[tl.Constant(), tl.Warmup(5).then(tl.Cosine(15))])
    result = tl.sweep(kernel, opts, 20, batch_sizes=[None, 6], paths=2)
    table = result.table
    assert list(table.columns[:7]) == ["optimizer", "lr", "momentum", "weight_decay",
                                       "schedule", "batch_size", "rank"]  # fmt: skip
    assert set(table["schedule"]) == {"Constant()", "Warmup(5).then(Cosine(15))"}
    assert len(table) == 8 and json.dumps(result.to_dict())
    for row, fc in zip(table.itertuples(), result.forecasts):
        assert row.schedule == fc.hyperparameters["schedule"] == fc.optimizer.schedule.describe()

    opt = opts[1]
    fc = tl.forecast(kernel, opt, 20)
    run = tl.finetune(model, data, opt, 20, log_every=1, progress=False)
    other = tl.finetune(model, data, opt.replace(schedule=tl.Cosine(20)), 20, progress=False)
    with pytest.raises(TangentlabError, match=r"different settings: schedule \('Warmup"):
        tl.compare(fc, other)
    assert tl.compare(fc.to_dict(), run.to_dict()).curve_error < 1e-8  # via JSON dicts too
    assert fc.to_dict()["optimizer"]["schedule"] == opt.schedule.to_dict()
    assert label_of(fc).endswith("Warmup(5).then(Cosine(15)), MSE")
    rows = {r["quantity"]: r["value"] for r in what_rows(fc, None, None)}
    assert rows["learning-rate schedule"].startswith("Warmup(5).then(Cosine(15))")
    assert "schedule=Warmup(5).then(Cosine(15))" in rows["optimizer"]


# ---- command line --------------------------------------------------------------------


def _invoke(*args):
    kw = {"mix_stderr": False} if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else {}
    return CliRunner(**kw).invoke(main, [str(a) for a in args])


def _ok(res):
    assert res.exit_code == 0, res.output
    return res


def test_cli_schedules_in_forecast_sweep_and_validate(linear, tmp_path, monkeypatch):
    _, _, kernel = linear
    kfile = kernel.save(tmp_path / "k.safetensors")
    out = tmp_path / "fc"
    res = _ok(_invoke("forecast", "--kernel", kfile, "--steps", 20, "--lr", 0.4, "--schedule",
                      "warmup-cosine", "--warmup-steps", 4, "--out", out))  # fmt: skip
    js = json.loads((out / "forecast.json").read_text())
    (fc,) = js["forecasts"]
    want = tl.forecast(kernel, tl.SGD(0.4, schedule=tl.Warmup(4).then(tl.Cosine(16))), 20)
    np.testing.assert_allclose(fc["loss"], want.loss, rtol=1e-12)
    assert fc["hyperparameters"]["schedule"] == "Warmup(4).then(Cosine(16))"
    assert js["info"]["schedule"] == "Warmup(4).then(Cosine(16))"
    assert "Warmup(4).then(Cosine(16))" in res.stdout  # the setting label
    assert "learning-rate schedule" in (out / "report.html").read_text(encoding="utf-8")

    sw = tmp_path / "sw"
    res = _ok(
        _invoke(
            "sweep",
            "--kernel",
            kfile,
            "--steps",
            20,
            "--lr",
            "0.2,0.4",
            "--schedule",
            "constant,step",
            "--step-every",
            5,
            "--step-gamma",
            0.5,
            "--out",
            sw,
        )
    )
    rows = json.loads((sw / "sweep.json").read_text())["table"]
    assert (
        sorted(r["schedule"] for r in rows) == ["Constant()"] * 2 + ["StepDecay(5, gamma=0.5)"] * 2
    )

    for args, says in [
        (
            ("--schedule", "cosine", "--warmup-steps", 3),
            "--warmup-steps goes with --schedule warmup",
        ),
        (("--schedule", "step"), "--schedule step: kind='step' needs --step-every"),
        (("--schedule", "warmup-linear", "--warmup-steps", 30), "shorter than the run"),
        (("--schedule", "exp"), "'exp' is not one of"),
    ]:
        res = _invoke("forecast", "--kernel", kfile, "--steps", 20, "--lr", 0.4, *args, "--out",
                      tmp_path / "bad")  # fmt: skip
        assert res.exit_code == 2 and says in res.output, res.output

    # validate: a real run of a model linear in its weights under the same schedule
    mod = f"tl_sched_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef make(num_classes=3):\n"
        "    torch.manual_seed(0)\n    return nn.Linear(6, num_classes).eval()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    npz = tmp_path / "train.npz"
    x, y = linear[1]
    np.savez(npz, X=x.float().numpy(), y=y.numpy())  # float32: the CLI's model is float32
    val = tmp_path / "val"
    _ok(_invoke("validate", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                "--params", "all", "--projection", "exact", "--steps", 20, "--lr", 0.4,
                "--schedule", "warmup-linear", "--warmup-fraction", 0.2, "--batch-size", 5,
                "--paths", 1, "--log-every", 1, "--out", val, "--no-progress"))  # fmt: skip
    js = json.loads((val / "validation.json").read_text())
    assert js["forecast"]["hyperparameters"]["schedule"] == "Warmup(4).then(LinearDecay(16))"
    assert js["run"]["hyperparameters"]["schedule"] == "Warmup(4).then(LinearDecay(16))"
    assert js["comparison"]["curve_error"] < 1e-5  # float32 run: round-off of float32
