"""Held-out (eval) curves (NOTE [held-out curves] in tangentlab.forecast): on a model linear
in its weights the forecast's held-out loss and accuracy, carried by the cross kernel
Θ(X_eval, X), equal those of real fine-tuning to round-off, in every stepped solver."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import tangentlab as tl
from tangentlab.errors import TangentlabError

N, M, D, C = 24, 10, 6, 3
RTOL = 1e-8
# exactness holds at any rate; some cases run outside the validity region on purpose
pytestmark = pytest.mark.filterwarnings("ignore::tangentlab.errors.ValidityWarning")


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.double)
    return x, torch.randint(0, C, (n,), generator=g)


@pytest.fixture(scope="module")
def linear():
    """A model exactly linear in its weights, its train / held-out data, kernel, cross kernel."""
    train, held = _data(N, 0), _data(M, 1)
    torch.manual_seed(0)
    model = nn.Linear(D, C).double().eval()
    kernel = tl.compute_kernel(model, train, progress=False)
    cross = tl.compute_cross_kernel(model, held, kernel, train_data=train)
    return model, train, held, kernel, cross


def _pair(linear, opt, steps, **kw):
    model, train, held, kernel, cross = linear
    fc = tl.forecast(kernel, opt, steps, eval_data=cross, paths=2, seed=5, **kw)
    run = tl.finetune(model, train, opt, steps, eval_data=held, log_every=1, progress=False,
                      seed=5, **kw)  # fmt: skip
    return fc, run


CASES = {
    "mse closed form": (tl.SGD(0.4), {}),
    "mse closed form, momentum, decay to 0": (tl.SGD(0.3, momentum=0.6, weight_decay=0.05), {}),
    "ce steps, momentum, decay to 0": (
        tl.SGD(0.5, momentum=0.9, weight_decay=0.01), {"loss": "ce"}),
    "minibatch, momentum, decay to 0": (
        tl.SGD(0.3, momentum=0.8, weight_decay=0.02), {"batch_size": 5}),
    "minibatch ce, decay to w0": (
        tl.SGD(0.4, momentum=0.5, weight_decay=0.1, decay_to="w0"),
        {"batch_size": 5, "loss": "ce"}),
    "minibatch with replacement": (tl.SGD(0.3), {"batch_size": 7, "sampling": "replacement"}),
    "schedule, full batch mse, decay to w0": (
        tl.SGD(0.6, momentum=0.5, weight_decay=0.05, decay_to="w0",
               schedule=tl.Warmup(5).then(tl.Cosine(25))), {}),
    "schedule, minibatch ce": (
        tl.SGD(0.8, schedule=tl.Warmup(5).then(tl.Cosine(25))), {"batch_size": 6, "loss": "ce"}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_forecast_eval_curves_equal_real_finetuning(linear, name):
    opt, kw = CASES[name]
    fc, run = _pair(linear, opt, 30, **kw)
    stochastic = "batch_size" in kw
    loss = fc.eval_loss_paths[0] if stochastic else fc.eval_loss
    acc = fc.eval_accuracy_paths[0] if stochastic else fc.eval_accuracy
    np.testing.assert_array_equal(run.steps, np.arange(31))
    np.testing.assert_allclose(run.eval_loss, loss, rtol=RTOL)
    np.testing.assert_array_equal(run.eval_accuracy, acc)
    # the held-out curve is not the training curve, and it moved
    assert np.abs(run.eval_loss - run.loss).max() > 1e-3
    assert abs(run.eval_loss[-1] - run.eval_loss[0]) > 1e-3
    if "closed form" in name:
        assert fc.method["solver"].startswith("closed form")
        assert "eval_solver" in fc.method
    if stochastic:  # minibatch: a band over paths, the mean of the paths
        lo, hi = fc.eval_loss_band
        assert np.all(lo <= hi + 1e-15)
        np.testing.assert_allclose(fc.eval_loss, fc.eval_loss_paths.mean(axis=0))
        assert np.abs(fc.eval_loss_paths[1] - run.eval_loss).max() > 1e-6
    assert fc.method["eval"]["num_eval"] == M and fc.method["eval"]["cost_flops"] > 0
    assert fc.best_step == int(np.nanargmin(fc.eval_loss))
    if not stochastic:
        assert fc.best_step == run.best_step


def test_primal_cross_kernel_equals_dense():
    """A projected kernel: the held-out step through the features Φ_e Φ^T equals the one
    through the dense cross kernel."""
    train, held = _data(N, 0), _data(M, 1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double().eval()
    kernel = tl.compute_kernel(model, train, projection=16, progress=False)
    cross = tl.compute_cross_kernel(model, held, kernel, train_data=train)
    assert cross.features is not None
    opt = tl.SGD(0.5 * tl.stable_lr(kernel), momentum=0.5, weight_decay=0.01)
    kw = dict(batch_size=5, paths=2, loss="ce", eval_data=cross)
    primal = tl.forecast(kernel, opt, 20, execution="primal", **kw)
    dual = tl.forecast(kernel, opt, 20, execution="dual", **kw)
    assert primal.method["eval"]["operator"] == "primal"
    assert dual.method["eval"]["operator"] == "dual"
    np.testing.assert_allclose(primal.eval_loss_paths, dual.eval_loss_paths, rtol=1e-10)


def test_best_step_and_steps_to_on_eval(linear):
    """Overfitting the held-out set (a large rate on MSE with shuffled held-out labels):
    the forecast's best step is the real run's, and steps_to reads the held-out curves."""
    model, train, held, kernel, _ = linear
    rng = np.random.default_rng(0)
    bad = (held[0], torch.as_tensor(rng.permutation(held[1].numpy())))
    cross = tl.compute_cross_kernel(model, bad, kernel, train_data=train)
    opt = tl.SGD(0.4)
    fc = tl.forecast(kernel, opt, 60, eval_data=cross)
    run = tl.finetune(model, train, opt, 60, eval_data=bad, log_every=1, progress=False)
    assert fc.best_step == run.best_step
    assert fc.best_step is not None
    target = float(np.nanmax(fc.eval_accuracy))
    assert fc.steps_to(target, on="eval_accuracy") == run.steps_to(target, on="eval_accuracy")
    lvl = 0.5 * (fc.eval_loss[0] + np.nanmin(fc.eval_loss))
    assert fc.steps_to(lvl, on="eval_loss") == run.steps_to(lvl, on="eval_loss")
    assert fc.steps_to(fc.loss[5]) == 5 == fc.steps_to(fc.loss[5], on="train_loss")
    with pytest.raises(TangentlabError, match="on must be one of"):
        fc.steps_to(0.1, on="accuracy")
    plain = tl.forecast(kernel, opt, 10)
    assert plain.eval_loss is None and plain.best_step is None
    with pytest.raises(TangentlabError, match="needs held-out curves"):
        plain.steps_to(0.5, on="eval_loss")
    d = json.loads(json.dumps(fc.to_dict()))
    assert d["eval"]["best_step"] == fc.best_step
    assert len(d["eval"]["loss"]) == 61 and plain.to_dict()["eval"] is None
    rd = json.loads(json.dumps(run.to_dict()))
    assert rd["eval"]["best_step"] == run.best_step


def test_logged_every_k_steps_matches(linear):
    """log_every > 1 with full-batch reuse of the training forward pass: the held-out loss
    is evaluated at w_t (before the step moves it), at the logged steps."""
    model, train, held, kernel, cross = linear
    opt = tl.SGD(0.4, momentum=0.5)
    fc = tl.forecast(kernel, opt, 20, eval_data=cross)
    run = tl.finetune(model, train, opt, 20, eval_data=held, log_every=3, progress=False)
    np.testing.assert_allclose(run.eval_loss, fc.eval_loss[run.steps], rtol=RTOL)


def test_mismatched_or_unsupported_eval_data(linear):
    model, train, held, kernel, cross = linear
    opt = tl.SGD(0.3)
    other = tl.compute_kernel(model, _data(N - 4, 3), progress=False)
    wrong = tl.compute_cross_kernel(model, held, other, train_data=_data(N - 4, 3))
    with pytest.raises(TangentlabError, match="cross kernel is"):
        tl.forecast(kernel, opt, 5, eval_data=wrong)
    same_n = tl.compute_kernel(model, _data(N, 4), progress=False)
    with pytest.raises(TangentlabError, match="another kernel"):
        tl.forecast(same_n, opt, 5, eval_data=cross)
    with pytest.raises(TangentlabError, match="must be a cross kernel"):
        tl.forecast(kernel, opt, 5, eval_data=held)
    with pytest.raises(TangentlabError, match="noise='sde'"):
        tl.forecast(kernel, opt, 5, eval_data=cross, batch_size=4, noise="sde")
    with pytest.raises(TangentlabError, match="continuous"):
        tl.forecast(kernel, opt, 5, eval_data=cross, time="continuous")
    with pytest.raises(TangentlabError, match="dataset_size"):
        tl.forecast(kernel, opt, 5, eval_data=cross, dataset_size=2 * N)
    unlabeled = copy.copy(cross)
    unlabeled.targets = None
    with pytest.raises(TangentlabError, match="no labels"):
        tl.forecast(kernel, opt, 5, eval_data=unlabeled)
    with pytest.raises(TangentlabError, match="labels must lie"):
        tl.finetune(model, train, opt, 2, eval_data=(held[0], held[1] + C), progress=False)


def test_compare_reports_held_out_errors(linear):
    model, train, held, kernel, cross = linear
    opt = tl.SGD(0.3, momentum=0.5)
    fc, run = _pair(linear, opt, 25, loss="ce")
    cmp = tl.compare(fc, run)
    ev = cmp.eval
    assert ev["final_step"] == 25 and ev["best_step_run"] == ev["best_step_forecast"]
    assert abs(ev["final_accuracy_error_points"]) < 1e-9 and ev["curve_error"] < 1e-8
    assert ev["run_loss_regret_at_forecast_best"] == 0.0
    # from the JSON forms too, and None when one side has no held-out curves
    again = tl.compare(json.loads(json.dumps(fc.to_dict())), json.loads(json.dumps(run.to_dict())))
    assert again.eval["best_step_forecast"] == ev["best_step_forecast"]
    assert json.loads(json.dumps(cmp.to_dict()))["eval"]["best_step_run"] == ev["best_step_run"]
    assert tl.compare(tl.forecast(kernel, opt, 25, loss="ce"), run).eval is None


def test_reports_show_both_curves(linear, tmp_path):
    from tangentlab.report import write_forecast_report, write_validation_report

    _, _, _, kernel, _ = linear
    fc, run = _pair(linear, tl.SGD(0.3), 12, batch_size=6)
    paths = write_forecast_report(tmp_path / "f", [fc], kernel)
    data = json.loads(paths["json"].read_text())
    assert data["forecasts"][0]["eval"]["best_step"] == fc.best_step
    assert data["summary"][0]["best_step (min held-out loss)"] == fc.best_step
    assert "early stopping" in paths["html"].read_text()
    paths = write_validation_report(tmp_path / "v", fc, run, tl.compare(fc, run), kernel)
    data = json.loads(paths["json"].read_text())
    assert data["run"]["eval"]["best_step"] == run.best_step
    assert "held-out: best_step_forecast" in paths["html"].read_text()
    assert paths["png"].stat().st_size > 1000


def _cli():
    import inspect

    from click.testing import CliRunner

    from tangentlab.cli import main

    kw = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}
    return lambda *args: CliRunner(**kw).invoke(main, [str(a) for a in args])


CLI_QUIET = ("--example", "digits-cnn", "--samples", "20", "--no-progress", "--projection", "128")


@pytest.mark.slow  # a real fine-tuning run of the digits CNN (~15-25 s on 2 cores)
def test_cli_validate_with_held_out_set(tmp_path):
    """Smoke test: ``validate --eval-samples`` logs, compares and reports both curves."""
    invoke = _cli()
    out = tmp_path / "val"
    res = invoke("validate", *CLI_QUIET, "--cache", tmp_path / "k", "--steps", 8,
                 "--eval-samples", 6, "--log-every", 1, "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "best step (min held-out loss)" in res.stdout
    data = json.loads((out / "validation.json").read_text())
    assert data["comparison"]["eval"]["final_step"] == 8
    assert len(data["run"]["eval"]["loss"]) == 9 and len(data["forecast"]["eval"]["loss"]) == 9
    assert "held-out: best_step_run" in (out / "validation.html").read_text()


def test_cli_forecast_with_held_out_set(tmp_path):
    """Smoke test: ``forecast --eval-samples`` prints the best step and writes both curves;
    options without held-out curves are refused before anything is computed."""
    invoke = _cli()
    res = invoke("forecast", *CLI_QUIET, "--steps", 5, "--eval-samples", 4, "--optimizer",
                 "adamw", "--lr", "1e-3", "--out", tmp_path / "x")  # fmt: skip
    assert res.exit_code == 2 and "held-out curves" in res.output
    out = tmp_path / "fc"
    res = invoke("forecast", *CLI_QUIET, "--steps", 15, "--batch-size", 8, "--eval-samples", 6,
                 "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "held-out (6 samples): best step" in res.stdout
    data = json.loads((out / "forecast.json").read_text())
    ev = data["forecasts"][0]["eval"]
    assert len(ev["loss"]) == 16 and ev["loss_band"] is not None and ev["best_step"] is not None
    assert data["info"]["eval_samples"] == 6
    assert "early stopping" in (out / "report.html").read_text()


def test_adamw_and_head_body_refuse_eval_data(linear):
    """Not exact through a cross kernel at w0: refused with a message."""
    model, train, _, _, cross = linear
    wst = tl.compute_weight_space_tangent(model, train, progress=False)
    with pytest.raises(TangentlabError, match="AdamW"):
        tl.forecast(wst, tl.AdamW(1e-2), 5, eval_data=cross)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double().eval()
    hb = tl.compute_head_body_kernel(net, train, directions=2, progress=False)
    with pytest.raises(TangentlabError, match="HeadBodyKernel"):
        tl.forecast(hb, tl.SGD(0.1), 5, eval_data=cross)


def test_sweep_ranks_by_held_out_accuracy(linear):
    """``sweep(eval_data=)``: every row's held-out columns equal its own forecast (and so the
    real run, by the exactness above), and the rows are ranked by them."""
    model, train, held, kernel, cross = linear
    opts = tl.SGD.grid(lr=[0.02, 0.3, 1.0], momentum=[0.0, 0.8])
    res = tl.sweep(kernel, opts, 30, loss="ce", batch_sizes=[6, None], eval_data=cross, paths=2)
    t = res.table
    assert res.rank_by == "eval_accuracy" and len(t) == 12
    valid = t[t["valid"]]
    assert (np.diff(valid["eval_accuracy"].to_numpy()) <= 1e-12).all()  # highest first
    for (_, row), fc in zip(t.iterrows(), res.forecasts):
        assert row["eval_accuracy"] == pytest.approx(fc.eval_accuracy[-1])
        assert row["best_eval_accuracy"] == pytest.approx(np.max(fc.eval_accuracy))
        assert row["best_step"] == fc.best_step
    # the best full-batch row against a real run of the same setting (deterministic)
    row = t[t["batch_size"].isna()].iloc[0]
    opt = tl.SGD(float(row["lr"]), momentum=float(row["momentum"]))
    run = tl.finetune(model, train, opt, 30, loss="ce", eval_data=held, log_every=1,
                      progress=False)  # fmt: skip
    assert run.eval_accuracy[-1] == pytest.approx(row["eval_accuracy"], abs=1e-12)
    assert run.best_step == row["best_step"]
    for key in ("best_eval_accuracy", "eval_loss"):
        again = tl.sweep(kernel, opts, 30, loss="ce", batch_sizes=[6, None], eval_data=cross,
                         paths=2, rank_by=key)  # fmt: skip
        v = again.table[again.table["valid"]][key].to_numpy()
        assert again.rank_by == key
        assert (np.diff(v) <= 1e-12).all() if key != "eval_loss" else (np.diff(v) >= -1e-12).all()
    assert json.loads(json.dumps(res.to_dict()))["rank_by"] == "eval_accuracy"


def test_sweep_rank_by_errors(linear):
    _, _, _, kernel, cross = linear
    with pytest.raises(TangentlabError, match="pass eval_data"):
        tl.sweep(kernel, [tl.SGD(0.1)], 5, rank_by="eval_accuracy")
    with pytest.raises(TangentlabError, match="rank_by must be one of"):
        tl.sweep(kernel, [tl.SGD(0.1)], 5, eval_data=cross, rank_by="accuracy")
    with pytest.raises(TangentlabError, match="noise='sde'"):
        tl.sweep(kernel, [tl.SGD(0.1)], 5, eval_data=cross, batch_sizes=[4], noise="sde")
    plain = tl.sweep(kernel, [tl.SGD(0.1)], 5)
    assert plain.rank_by == "steps" and "eval_accuracy" not in plain.table.columns


def test_cli_sweep_ranked_by_held_out_accuracy(tmp_path):
    """Smoke test: ``sweep --eval-samples`` ranks by held-out accuracy and reports it;
    ``--rank-by eval_accuracy`` without a held-out set is refused before any work."""
    invoke = _cli()
    res = invoke("sweep", *CLI_QUIET, "--steps", 5, "--rank-by", "eval_accuracy",
                 "--out", tmp_path / "x")  # fmt: skip
    assert res.exit_code == 2 and "--eval-samples" in res.output
    out = tmp_path / "sw"
    res = invoke("sweep", *CLI_QUIET, "--steps", 12, "--lr", "0.05,0.5", "--momentum", "0,0.9",
                 "--batch-size", "8,full", "--eval-samples", 6, "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "ranked by held-out accuracy" in res.stdout
    data = json.loads((out / "sweep.json").read_text())
    assert data["info"]["rank_by"] == "eval_accuracy" and data["info"]["eval_samples"] == 6
    rows = data["table"]
    assert len(rows) == 8 and {"eval_accuracy", "best_step"} <= set(rows[0])
    valid = [r["eval_accuracy"] for r in rows if r["valid"]]
    assert valid == sorted(valid, reverse=True)
    assert "held-out accuracy at the last step" in (out / "report.html").read_text()


def test_cli_forecast_head_body_with_held_out_set(tmp_path):
    """Smoke test: ``--linearize body --eval-samples`` forecasts the head-exact model's
    held-out curves (tl.compute_head_body_cross_kernel); a projected one is refused."""
    invoke = _cli()
    res = invoke("forecast", "--example", "digits-cnn", "--samples", "20", "--no-progress",
                 "--projection", "64", "--linearize", "body", "--eval-samples", 6,
                 "--out", tmp_path / "x")  # fmt: skip
    assert res.exit_code == 2 and "--projection exact" in res.output
    out = tmp_path / "hb"
    res = invoke("forecast", "--example", "digits-cnn", "--samples", "20", "--no-progress",
                 "--linearize", "body", "--steps", 10, "--batch-size", 8, "--eval-samples", 6,
                 "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "held-out (6 samples): best step" in res.stdout
    data = json.loads((out / "forecast.json").read_text())
    ev = data["forecasts"][0]["eval"]
    assert len(ev["loss"]) == 11 and data["forecasts"][0]["method"]["model"] == "head-body"
