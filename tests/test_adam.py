"""AdamW: the optimizer object, the real run, and AdamW on the tangent model (tangentlab.adam).

Exactness (NOTE [adam on the tangent model]): on a model linear in its weights, the exact
weight-space solver equals a real ``torch.optim.AdamW`` run to round-off, and the
per-tensor function-space solver equals the weight-space simulation of per-tensor Adam.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tangentlab as tl
from tangentlab import dynamics as dyn
from tangentlab.adam import adam_trajectory_of

N, D, C, STEPS = 20, 4, 3, 25


class LinearInWeights(nn.Module):
    """f(x) = A x + a + B tanh(x): exactly linear in its three weight tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, C)
        self.b = nn.Linear(D, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(torch.tanh(x))


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    model = LinearInWeights().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.double)
    y = torch.randint(0, C, (N,), generator=g)
    wst = tl.compute_weight_space_tangent(model, (x, y), progress=False)
    return model, (x, y), wst


# ---- the optimizer object ----------------------------------------------------------------


def test_adamw_object_protocol():
    opt = tl.AdamW(1e-3, betas=(0.9, 0.98), weight_decay=0.1, schedule=tl.Warmup(10))
    assert opt.to_dict() == {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8,
                             "weight_decay": 0.1, "schedule": opt.schedule.to_dict()}
    assert opt.describe() == "AdamW(lr=0.001, betas=(0.9, 0.98), weight_decay=0.1, " \
        "schedule=Warmup(10))"
    assert tl.AdamW(1e-4).describe() == "AdamW(lr=0.0001, weight_decay=0.01)"
    assert opt.replace(lr=0.01).lr == 0.01 and opt.replace(lr=0.01).betas == (0.9, 0.98)
    grid = tl.AdamW.grid(lr=[1e-4, 1e-3], weight_decay=[0.0, 0.01])
    assert [(o.lr, o.weight_decay) for o in grid] == [(1e-4, 0.0), (1e-4, 0.01), (1e-3, 0.0),
                                                     (1e-3, 0.01)]
    assert opt.peak_lr(5) == pytest.approx(1e-3 * 4 / 10)
    assert np.allclose(opt.lr_multipliers(3), [0.0, 0.1, 0.2])
    assert tl.AdamW(1e-3).lr_multipliers(3) is None
    p = [nn.Parameter(torch.zeros(3))]
    torch_opt = opt.torch_optimizer(p)
    assert type(torch_opt) is torch.optim.AdamW
    group = torch_opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) \
        == (1e-3, (0.9, 0.98), 1e-8, 0.1, False)
    assert isinstance(opt.torch_scheduler(torch_opt), torch.optim.lr_scheduler.LambdaLR)
    assert tl.AdamW(1e-3).torch_scheduler(torch_opt) is None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lr=0.0), r"AdamW: lr must be a finite number > 0, got 0.0; e.g. tl.AdamW\(1e-4\)"),
        (dict(lr=1e-3, betas=(0.9, 1.0)), r"AdamW: betas must be two numbers in \[0, 1\)"),
        (dict(lr=1e-3, betas=0.9), r"AdamW: betas must be two numbers"),
        (dict(lr=1e-3, eps=-1.0), r"AdamW: eps must be a finite number >= 0"),
        (dict(lr=1e-3, weight_decay=-0.1), r"AdamW: weight_decay must be a finite number >= 0"),
        (dict(lr=1e-3, schedule="cosine"), r"AdamW"),
    ],
)
def test_adamw_validation(kw, match):
    with pytest.raises(tl.TangentlabError, match=match):
        tl.AdamW(**kw)


def test_adamw_grid_errors():
    with pytest.raises(tl.TangentlabError, match=r"AdamW.grid: give lists for lr"):
        tl.AdamW.grid(momentum=[0.9])


def test_sgd_only_entry_points_refuse_adamw():
    k = tl.Kernel(f0=torch.zeros(4, 2, dtype=torch.double), targets=torch.tensor([0, 1, 0, 1]),
                  theta=torch.eye(8, dtype=torch.double))
    with pytest.raises(tl.TangentlabError, match=r"influence: only tl.SGD is supported here"):
        tl.influence(k, tl.AdamW(1e-3), 5)


# ---- exact AdamW of the tangent model -------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("batch_size", [None, 6])
@pytest.mark.parametrize(
    "opt",
    [
        tl.AdamW(0.05, weight_decay=0.0),
        tl.AdamW(0.1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1,
                 schedule=tl.Warmup(5).then(tl.LinearDecay(20))),
    ],
    ids=["plain", "decay+schedule"],
)
def test_weight_space_forecast_equals_real_adamw_run(linear, loss, batch_size, opt):
    model, data, wst = linear
    fc = tl.forecast(wst, opt, STEPS, loss=loss, batch_size=batch_size, paths=2, seed=3)
    run = tl.finetune(model, data, opt, STEPS, loss=loss, batch_size=batch_size, seed=3,
                      log_every=1, progress=False)
    path0 = fc.loss if batch_size is None else fc.loss_paths[0]  # the run's batches
    assert run.loss[-1] < 0.9 * run.loss[0]  # it trains
    np.testing.assert_allclose(path0, run.loss, rtol=1e-10, atol=0)
    if batch_size is None:
        np.testing.assert_allclose(fc.accuracy, run.accuracy, atol=1e-12)
    else:  # the second path drew other batches
        assert not np.allclose(fc.loss_paths[1], run.loss, rtol=1e-6)
        # 4 paths x B=6 >= N: the gradients of all paths in one pass over J (other branch)
        fc4 = tl.forecast(wst, opt, STEPS, loss=loss, batch_size=batch_size, paths=4, seed=3)
        np.testing.assert_allclose(fc4.loss_paths[:2], fc.loss_paths, rtol=1e-10, atol=0)
    assert fc.method["solver"].startswith("exact AdamW of the tangent model in weight space")
    assert fc.hyperparameters["betas"] == list(opt.betas)
    assert fc.optimizer is opt and not fc.diverges
    assert np.isnan(fc.stability) and "not defined for AdamW" in fc.method["stability"]
    cmp = tl.compare(fc, run)  # the settings agree (optimizer, betas, eps, decay, schedule)
    if batch_size is None:  # (minibatch: compare reads the mean over both paths)
        assert cmp.curve_error < 1e-9
    with pytest.raises(tl.TangentlabError, match=r"different settings: betas"):
        tl.compare(tl.forecast(wst, opt.replace(betas=(0.5, 0.9)), STEPS, loss=loss,
                               batch_size=batch_size, paths=1, seed=3), run)


def test_weight_decay_acts_on_actual_weights(linear):
    """Decoupled decay pulls w (not w - w0) toward 0: a large decay with a tiny rate changes
    the curve exactly as the real run."""
    model, data, wst = linear
    opt = tl.AdamW(1e-3, weight_decay=50.0)
    fc = tl.forecast(wst, opt, 10)
    run = tl.finetune(model, data, opt, 10, log_every=1, progress=False)
    plain = tl.forecast(wst, opt.replace(weight_decay=0.0), 10)
    np.testing.assert_allclose(fc.loss, run.loss, rtol=1e-10)
    assert abs(fc.loss[-1] - plain.loss[-1]) > 1e-3 * plain.loss[0]


def test_nonlinear_net_few_steps_is_close_not_exact(mlp_data):
    """Sanity: on a small nonlinear MLP the tangent model follows real AdamW for a few small
    steps (not exact: the network is not linear in its weights)."""
    from conftest import make_mlp

    model = make_mlp()
    x, y = mlp_data
    wst = tl.compute_weight_space_tangent(model, (x, y), progress=False)
    opt = tl.AdamW(1e-3, weight_decay=0.01)
    fc = tl.forecast(wst, opt, 5, loss="ce")
    run = tl.finetune(model, (x, y), opt, 5, loss="ce", log_every=1, progress=False)
    rel = np.abs(fc.loss - run.loss) / run.loss
    assert rel.max() < 1e-3
    assert rel.max() > 1e-12  # not the same function: the net is nonlinear in its weights


def test_sweep_over_adamw(linear):
    _, _, wst = linear
    opts = tl.AdamW.grid(lr=[0.01, 0.05], weight_decay=[0.0, 0.01])
    sw = tl.sweep(wst, opts, 15, loss="ce", batch_sizes=[None, 8], paths=2)
    assert len(sw.table) == 8 and sw.table["optimizer"].str.startswith("AdamW").all()
    single = tl.forecast(wst, opts[3], 15, loss="ce", batch_size=8, paths=2)
    row = sw.table[(sw.table.lr == 0.05) & (sw.table.weight_decay == 0.01)
                   & (sw.table.batch_size == 8)]
    assert row["final_loss"].iloc[0] == pytest.approx(single.loss[-1], rel=1e-12)


# ---- per-tensor Adam in function space -----------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("sampling", [None, "epoch", "replacement"])
def test_block_kernel_equals_weight_space_per_tensor_adam(linear, loss, sampling):
    _, _, wst = linear
    bk = wst.block_kernel()
    assert bk.thetas.shape == (3, N * C, N * C)
    torch.testing.assert_close(bk.thetas.sum(0), wst.jacobian.reshape(N * C, -1)
                               @ wst.jacobian.reshape(N * C, -1).T)
    opt = tl.AdamW(0.05, weight_decay=0.1, schedule=tl.Warmup(4))
    batches = None if sampling is None else [
        dyn.batch_schedule(N, 6, STEPS, sampling=sampling, rng=r) for r in dyn.path_rngs(0, 2)]
    kw = dict(loss=loss, scale=1.0, steps=STEPS, batches=batches, blowup_loss=np.inf)
    weight_space = adam_trajectory_of(wst, opt, per_tensor=True, **kw)
    function_space = adam_trajectory_of(bk, opt, **kw)
    exact = adam_trajectory_of(wst, opt, **kw)
    np.testing.assert_allclose(function_space.loss, weight_space.loss, rtol=1e-10)
    assert np.max(np.abs(exact.loss - weight_space.loss)) > 1e-4  # a different optimizer
    fc = tl.forecast(bk, opt, STEPS, loss=loss, batch_size=None if sampling is None else 6,
                     sampling=sampling or "epoch", paths=2, seed=0)
    np.testing.assert_allclose(fc.loss, function_space.loss.mean(0), rtol=1e-12)
    assert "per-tensor Adam" in fc.method["solver"]


# ---- refusals -------------------------------------------------------------------------------


def test_plain_kernel_refuses_adamw_naming_what_to_compute(linear):
    _, _, wst = linear
    jac = wst.jacobian.reshape(N * C, -1)
    k = tl.Kernel(f0=wst.f0, targets=wst.targets, theta=jac @ jac.T)
    with pytest.raises(tl.TangentlabError, match=r"forecast: AdamW\(lr=0.001, weight_decay="
                       r"0.01\) cannot be forecast from a Kernel.*compute_weight_space_tangent"):
        tl.forecast(k, tl.AdamW(1e-3), 10)
    with pytest.raises(tl.TangentlabError, match=r"sweep: .*cannot be forecast from a Kernel"):
        tl.sweep(k, [tl.SGD(0.1), tl.AdamW(1e-3)], 10)


def test_weight_space_tangent_refuses_sgd_and_other_solvers(linear):
    _, _, wst = linear
    with pytest.raises(tl.TangentlabError, match=r"WeightSpaceTangent forecasts tl.AdamW, got "
                       r"SGD\(lr=0.1\).*tl.compute_kernel"):
        tl.forecast(wst, tl.SGD(0.1), 10)
    with pytest.raises(tl.TangentlabError, match=r"noise='sde' is not available for AdamW"):
        tl.forecast(wst, tl.AdamW(1e-3), 10, batch_size=4, noise="sde")
    with pytest.raises(tl.TangentlabError, match=r"time='continuous' is not available"):
        tl.forecast(wst, tl.AdamW(1e-3), 10, time="continuous")
    with pytest.raises(tl.TangentlabError, match=r"dataset_size is not available"):
        tl.forecast(wst, tl.AdamW(1e-3), 10, dataset_size=100)


def test_memory_budget_refusal_names_size_and_alternatives(linear):
    model, data, _ = linear
    with pytest.raises(tl.MemoryBudgetError, match=r"J \[N\*C, P\] = \[60, 27\] needs "
                       r"12,960 bytes .* but the memory budget is .*params=.*per-tensor"):
        tl.compute_weight_space_tangent(model, data, memory_budget=1000, progress=False)


def test_divergence_is_reported(linear):
    _, _, wst = linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = tl.forecast(wst, tl.AdamW(1e3, weight_decay=0.0), 40, loss="mse")
    assert fc.diverges and fc.divergence_step is not None
    assert np.isnan(fc.loss[-1])


def test_compute_block_kernel_exact_and_projected(linear):
    model, data, wst = linear
    ref = wst.block_kernel()
    bk = tl.compute_block_kernel(model, data, progress=False)
    assert bk.sizes == wst.sizes == (12, 3, 12) and bk.names == wst.names
    torch.testing.assert_close(bk.thetas, ref.thetas, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bk.jw0, wst.jw0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bk.f0, wst.f0)
    # k = 4 < 12: the two weight matrices are projected (unbiased), the bias (3) stays exact
    proj = tl.compute_block_kernel(model, data, projection=4, seed=1, progress=False)
    torch.testing.assert_close(proj.thetas[1], ref.thetas[1], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(proj.thetas[0], ref.thetas[0])
    rel = float((proj.thetas[0] - ref.thetas[0]).norm() / ref.thetas[0].norm())
    assert rel < 1.5  # a k=4 sketch of a 12-column block: rough but of the right size
    with pytest.raises(tl.MemoryBudgetError, match=r"compute_block_kernel: 3 per-tensor"):
        tl.compute_block_kernel(model, data, memory_budget=1000, progress=False)


# ---- command line ---------------------------------------------------------------------------


def _cli(*args):
    from click.testing import CliRunner

    from tangentlab.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, says",
    [
        (["forecast", "--optimizer", "adamw"], "--optimizer adamw needs --lr"),
        (["forecast", "--optimizer", "adamw", "--lr", "1e-3", "--momentum", "0.9"],
         "AdamW's first-moment decay is β1 of --betas"),
        (["forecast", "--optimizer", "adamw", "--lr", "1e-3", "--betas", "0.9"],
         "--betas must be two numbers"),
        (["forecast", "--optimizer", "adamw", "--lr", "1e-3", "--betas", "0.9,1.5"],
         "AdamW: betas must be two numbers in [0, 1)"),
        (["forecast", "--lr", "0.1", "--eps", "1e-6"], "--eps go with --optimizer adamw"),
        (["sweep", "--optimizer", "adamw", "--lr", "1e-3", "--subsample", "10"],
         "cannot be combined with --subsample"),
        (["information", "--optimizer", "adamw", "--lr", "1e-3"],
         "--optimizer adamw is available for forecast, sweep, validate"),
    ],
)
def test_cli_adamw_options_are_checked_before_any_computation(args, says, tmp_path):
    res = _cli(*args, "--example", "digits-cnn", "--samples", "8", "--no-progress",
               "--out", tmp_path)
    assert res.exit_code == 2, res.output
    assert says in res.output


@pytest.mark.slow  # ~15 s on 2 loaded cores (Jacobian strategy timing)
def test_cli_validate_adamw_end_to_end(tmp_path):
    import json

    res = _cli("validate", "--example", "digits-cnn", "--samples", "12", "--optimizer", "adamw",
               "--lr", "3e-3", "--betas", "0.9,0.99", "--steps", "6", "--batch-size", "4",
               "--loss", "ce", "--log-every", "1", "--no-progress", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "validation.json").read_text())
    fc, run = out["forecast"], out["run"]
    assert fc["optimizer"] == run["optimizer"] == {
        "name": "adamw", "lr": 3e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01,
        "schedule": {"name": "constant"}}
    assert fc["method"]["solver"].startswith("exact AdamW of the tangent model")
    assert out["comparison"]["curve_error"] < 0.2  # float32 CNN: close, not exact


def test_replacement_sampling_equals_real_run(linear):
    """Batches drawn with replacement (duplicates count twice in the batch mean)."""
    model, data, wst = linear
    opt = tl.AdamW(0.05, weight_decay=0.05)
    for paths in (1, 4):  # 1 x 8 < N: rows of J per batch; 4 x 8 >= N: one pass over J
        fc = tl.forecast(wst, opt, 15, loss="ce", batch_size=8, sampling="replacement",
                         paths=paths, seed=5)
        run = tl.finetune(model, data, opt, 15, loss="ce", batch_size=8, sampling="replacement",
                          seed=5, log_every=1, progress=False)
        np.testing.assert_allclose(fc.loss_paths[0], run.loss, rtol=1e-10, atol=0)
