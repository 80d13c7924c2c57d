"""The exact-top, block-linear model (tangentlab.experimental.exact_top), against a
weight-space simulation of the same model and against real training where it is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

import tangentlab as tl
from tangentlab.errors import ModeSwitchWarning, TangentlabError, ValidityWarning
from tangentlab.experimental.exact_top import (
    STEPS_BAND,
    STEPS_BAND_ADVISED,
    STEPS_BAND_VECTOR,
    compute_exact_top_kernel,
    drift_steps,
    forecast_exact_top,
    reliable_lr,
)


def _net(seed: int = 0, *, linear_body: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    body = (nn.Linear(5, 6, bias=False) if linear_body
            else nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)))  # fmt: skip
    top = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return body.double().eval(), top.double().eval()


def _data(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.arange(n) % 3


def _weight_space(body, top, x, y, opt: tl.SGD, steps: int, *, loss: str,
                  batch_size: int | None, seed: int, catapult: float = 1.0) -> np.ndarray:
    """Autograd on top(z0 + J Δw) in weight space (Δw: the body's, θ: the top's), the
    updates written out as torch SGD with decay toward w0; the full loss at every step.
    ``catapult`` β: the body's loss gradient times β at each rise of the full loss (read
    every step in full batch, every 2nd with minibatches) above its running minimum by
    more than 0.15 L0, once per rise; K = J Jᵀ times β is the body's gradient times β."""
    fn = tl.training.as_loss(loss, "test")
    wb = {k: v.detach() for k, v in body.named_parameters()}
    names = list(wb)
    delta = [torch.zeros_like(v, requires_grad=True) for v in wb.values()]
    th0 = [p.detach().clone() for p in top.parameters()]
    th = [p.clone().requires_grad_(True) for p in th0]
    tnames = [k for k, _ in top.named_parameters()]
    params, params0 = delta + th, [torch.zeros_like(d) for d in delta] + th0
    bufs = [torch.zeros_like(p) for p in params]
    n = len(y)
    batches = None if batch_size is None else tl.dynamics.batch_schedule(
        n, batch_size, steps, sampling="epoch", rng=tl.dynamics.path_rngs(seed, 1)[0])
    rates = opt.lr * opt.schedule.multipliers(steps)

    def logits(rows):
        xb = x if rows is None else x[rows]
        z0, jd = jvp(lambda *v: functional_call(body, dict(zip(names, v)), (xb,)),
                     tuple(wb.values()), tuple(delta))  # fmt: skip
        return functional_call(top, dict(zip(tnames, th)), (z0 + jd,))

    out, scale, armed, every = [], 1.0, True, 1 if batch_size is None else 2
    for t in range(steps + 1):
        with torch.no_grad():
            out.append(float(fn.per_sample(logits(None), y).mean()))
        if t % every == 0:
            rise = out[-1] > min(out[::every]) + 0.15 * out[0]
            scale *= catapult if rise and armed else 1.0
            armed = not rise
        if t == steps:
            break
        rows = None if batches is None else torch.as_tensor(batches[t])
        lb = fn.per_sample(logits(rows), y if rows is None else y[rows]).mean()
        grads = torch.autograd.grad(lb, params)
        with torch.no_grad():
            for i, (p, p0, g, b) in enumerate(zip(params, params0, grads, bufs)):
                g = g * scale if i < len(delta) else g
                b.mul_(opt.momentum).add_(g + opt.weight_decay * (p - p0))
                p.sub_(b, alpha=float(rates[t]))
    return np.asarray(out)


CASES = [
    ("mse", tl.SGD(0.2), None),
    ("ce", tl.SGD(0.3, momentum=0.9), None),
    ("mse", tl.SGD(0.1, momentum=0.5, weight_decay=0.1, decay_to="w0",
                   schedule=tl.Warmup(5).then(tl.Cosine(25))), 4),  # fmt: skip
    ("ce", tl.SGD(0.3), 3),
]


@pytest.mark.parametrize("loss,opt,batch", CASES)
def test_all_directions_equal_a_weight_space_simulation_of_the_model(loss, opt, batch):
    body, top = _net()
    x, y = _data()
    ref = _weight_space(body, top, x, y, opt, 30, loss=loss, batch_size=batch, seed=3)
    etk = compute_exact_top_kernel(body, top, (x, y), directions="all", progress=False)
    assert etk.rank == 6 and etk.rest is None
    fc = forecast_exact_top(etk, opt, 30, loss=loss, batch_size=batch, seed=3, progress=False)
    assert ref[-1] < 0.9 * ref[0]  # the runs move
    np.testing.assert_allclose(fc.loss, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch,m", [(None, 0.0), (4, 0.0), (None, 0.5)])
def test_catapult_is_the_body_rate_times_beta_at_each_excursion_in_weight_space(batch, m):
    """NOTE [exact-top catapult]: past CE's stability limit the loss climbs back; from each
    such step on the block's kernel (in weight space: the body's gradient) is times β."""
    body, top = _net()
    x, y = _data()
    opt = tl.SGD(2.0 if m == 0 else 1.0, momentum=m)
    steps = 25  # the path is chaotic: rounding grows ~10x every 2 steps
    ref = _weight_space(body, top, x, y, opt, steps, loss="ce", batch_size=batch, seed=3,
                        catapult=0.5)  # fmt: skip
    fixed = _weight_space(body, top, x, y, opt, steps, loss="ce", batch_size=batch, seed=3)
    etk = compute_exact_top_kernel(body, top, (x, y), directions="all", progress=False)
    with pytest.warns(ValidityWarning):
        fc = forecast_exact_top(etk, opt, steps, loss="ce", batch_size=batch, seed=3,
                                progress=False)  # fmt: skip
    assert fc.settings["catapult"] == 0.5 and fc.reliability["catapults"]
    assert not np.allclose(ref, fixed, rtol=1e-3)  # it shrank
    np.testing.assert_allclose(fc.loss, ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("batch", [None, 4])
def test_catapult_keeps_every_passed_target_and_flags_the_same_ones(batch):
    """The catapult path is the fixed-kernel path up to its first shrink, which is where the
    check flags: passed targets keep T̂, and the check flags the same drops."""
    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    kw = dict(loss="ce", batch_size=batch, seed=3, progress=False)
    with pytest.warns(ValidityWarning):
        fixed = forecast_exact_top(etk, tl.SGD(2.0), 40, catapult=1.0, **kw)
        shrunk = forecast_exact_top(etk, tl.SGD(2.0), 40, **kw)
    first = shrunk.reliability["catapults"][0]
    assert fixed.reliability["catapults"] == []
    k = int(np.nonzero(fixed.steps == first)[0][0])
    np.testing.assert_array_equal(shrunk.loss[: k + 1], fixed.loss[: k + 1])
    assert not np.allclose(shrunk.loss[k + 2: k + 7], fixed.loss[k + 2: k + 7])
    drops = np.linspace(0.05, 0.95, 19)
    assert any(fixed.flagged(d) for d in drops) and any(not fixed.flagged(d) for d in drops)
    for d in drops:
        assert shrunk.flagged(d) == fixed.flagged(d)
        if not fixed.flagged(d):
            assert shrunk.steps_to_drop(d) == fixed.steps_to_drop(d)


@pytest.mark.parametrize("loss,opt,batch", CASES)
def test_a_body_linear_and_isotropic_in_z_is_real_training_for_any_subspace(loss, opt, batch):
    # z = A x: J_i J_jᵀ = (x_i · x_j) I, so M is exact in any Q and κ_⊥ is exact from probes
    body, top = _net(1, linear_body=True)
    x, y = _data(12, 1)
    real = tl.finetune(nn.Sequential(body, top), (x, y), opt, 30, loss=loss, batch_size=batch,
                       seed=5, log_every=1, progress=False)  # fmt: skip
    etk = compute_exact_top_kernel(body, top, (x, y), directions=2, progress=False)
    assert etk.rank == 2 and etk.rest is not None
    fc = forecast_exact_top(etk, opt, 30, loss=loss, batch_size=batch, seed=5, progress=False)
    assert real.loss[-1] < 0.9 * real.loss[0]
    np.testing.assert_allclose(fc.loss, real.loss, rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(fc.accuracy, real.accuracy)


def test_default_subspace_of_a_vector_is_32c_orthonormal_and_holds_the_gradient_rows():
    """NOTE [exact-top vector z]: q = 32C for a vector z, at most VECTOR_MAX_DIRECTIONS
    and at most D."""
    from tangentlab.experimental.exact_top import is_vector

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 120), nn.Tanh()).double().eval()
    top = nn.Linear(120, 3).double().eval()
    x, y = _data(60)  # N >= q/2: z0's 48 principal directions
    etk = compute_exact_top_kernel(body, top, (x, y), progress=False)
    q = etk.basis
    assert q.shape == (120, 96) and etk.rest is not None and is_vector(etk.shape)
    np.testing.assert_allclose((q.T @ q).numpy(), np.eye(96), atol=1e-12)
    w = top.weight.detach().double()  # a linear top: the gradient rows are W's rows
    np.testing.assert_allclose((w @ q @ q.T).numpy(), w.numpy(), atol=1e-10)
    small = nn.Sequential(nn.Linear(5, 20), nn.Tanh()).double().eval()
    etk = compute_exact_top_kernel(small, nn.Linear(20, 3).double().eval(), (x, y),
                                   progress=False)  # fmt: skip
    assert etk.rank == 20 and etk.rest is None  # 32C = 96 > D = 20: all of z
    assert compute_exact_top_kernel(small, nn.Linear(20, 3).double().eval(), (x, y),
                                    directions=6, progress=False).rank == 6  # fmt: skip
    assert is_vector((320, 1, 1)) and not is_vector((320, 2, 2)) and not is_vector((8, 384))
    wide = nn.Sequential(nn.Linear(5, 200), nn.Tanh()).double().eval()
    etk = compute_exact_top_kernel(wide, nn.Linear(200, 5).double().eval(), _data(80),
                                   progress=False)  # N >= 64 principal directions
    assert etk.rank == 128 and etk.rest is not None  # 32C = 160 > 128: the cap


def test_projected_kernel_kept_factored_applies_as_its_gram():
    body, top = _net()
    x, y = _data()
    etk = compute_exact_top_kernel(body, top, (x, y), directions=4, projection=16,
                                   progress=False)  # fmt: skip
    assert etk.features is not None and etk.block is None  # N q = 40 > k = 16
    gram = etk.features @ etk.features.T
    formed = type(etk)(**{**etk.__dict__, "block": gram, "features": None})
    g = torch.randn(3, 6, dtype=torch.float64)
    rows = torch.tensor([1, 4, 7])
    for r, gamma in ((rows, g), (None, torch.randn(10, 6, dtype=torch.float64))):
        np.testing.assert_allclose(etk._apply(gamma, r).numpy(), formed._apply(gamma, r).numpy(),
                                   rtol=1e-10, atol=1e-12)  # fmt: skip


def test_steps_to_a_drop_and_blowups():
    body, top = _net()
    x, y = _data()
    etk = compute_exact_top_kernel(body, top, (x, y), progress=False)
    fc = forecast_exact_top(etk, tl.SGD(0.2), 40, progress=False)
    t = fc.steps_to_drop(0.5)
    assert t is not None and fc.loss[t] <= 0.5 * fc.loss[0] < fc.loss[t - 1]
    assert fc.steps_to(0.0) is None
    with pytest.warns(ValidityWarning, match="blows up"):
        bad = forecast_exact_top(etk, tl.SGD(500.0), 40, progress=False)
    assert bad.blowup is not None and np.isnan(bad.loss[-1]) and len(bad.loss) <= 41
    assert bad.reliability["flagged"] and bad.rebound(0.5) == float("inf")
    with pytest.warns(ValidityWarning, match="blows up"):
        sparse = forecast_exact_top(etk, tl.SGD(500.0), 40, log_every=5, progress=False)
    assert sparse.blowup == bad.blowup == sparse.steps[-1]  # seen between logged steps too
    logged = forecast_exact_top(etk, tl.SGD(0.2), 40, log_every=7, progress=False)
    assert list(logged.steps) == [0, 7, 14, 21, 28, 35, 40]
    np.testing.assert_allclose(logged.loss, fc.loss[logged.steps], rtol=1e-12)
    short = forecast_exact_top(etk, tl.SGD(0.2), 40, stop_below=0.5 * fc.loss[0],
                               progress=False)  # fmt: skip
    assert short.steps[-1] == t and short.steps_to_drop(0.5) == t


@pytest.mark.parametrize("call,match", [
    (lambda e: forecast_exact_top(e, tl.AdamW(1e-3), 5), "only tl.SGD"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1, weight_decay=0.1), 5), "decay_to='w0'"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1), 5, batch_size=0), "batch_size"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1), 5, sampling="x"), "sampling"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1), 5, stop_below="low"), "stop_below"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1), 5, loss="hinge"), "loss must be"),
    (lambda e: forecast_exact_top(object(), tl.SGD(0.1), 5), "compute_exact_top_kernel"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1), 5, catapult=0), r"catapult must be .*\(0, 1\]"),
    (lambda e: forecast_exact_top(e, tl.SGD(0.1), 5, catapult=2.0), "catapult must be"),
    (lambda e: e.steps_to_drop if False else forecast_exact_top(e, tl.SGD(0.1), 2,
     progress=False).steps_to_drop(80), "drop must lie"),  # fmt: skip
])
def test_bad_forecast_requests_are_refused_with_the_fix(call, match):
    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    with pytest.raises(TangentlabError, match=match):
        call(etk)


def test_bad_kernel_requests_are_refused_with_the_fix():
    body, top = _net()
    x, y = _data()
    with pytest.raises(TangentlabError, match="top's trained weights"):
        compute_exact_top_kernel(body, nn.Identity().eval(), (x, y), progress=False)  # no θ
    flat = nn.Sequential(nn.Linear(6, 12), nn.Unflatten(1, (3, 4))).double().eval()
    with pytest.raises(TangentlabError, match=r"logits \[B, C\]"):
        compute_exact_top_kernel(body, flat, (x, y), progress=False)
    with pytest.raises(TangentlabError, match="directions"):
        compute_exact_top_kernel(body, top, (x, y), directions=0, progress=False)
    with pytest.raises(TangentlabError, match=r"lie in \[0, 3\)"):
        compute_exact_top_kernel(body, top, (x, y + 5), progress=False)
    with pytest.raises(TangentlabError, match="integer class"):
        compute_exact_top_kernel(body, top, (x, y + 0.5), progress=False)
    with pytest.raises(TangentlabError, match="nn.Module"):
        compute_exact_top_kernel(lambda v: v, top, (x, y), progress=False)
    with pytest.raises(TangentlabError, match="body's trained weights"):
        compute_exact_top_kernel(body, top, (x, y), params="nothing-matches", progress=False)


def test_a_top_in_training_mode_is_switched_to_eval_with_a_warning():
    body, top = _net()
    top.train()
    with pytest.warns(ModeSwitchWarning, match="top.train"):
        compute_exact_top_kernel(body, top, _data(), progress=False)
    assert not top.training


def test_split_lite_is_the_model_and_its_exact_top_model_is_real_training_where_exact():
    from efficientnet_lite_pytorch import EfficientNet

    from tangentlab.examples import split_lite

    torch.manual_seed(0)
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=3, image_size=32)
    for mod in model.modules():  # running statistics of one batch, so activations are O(1)
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 1.0
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32))
    model.eval()
    body, top = split_lite(model)
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    with torch.no_grad():
        torch.testing.assert_close(top(body(x)), model(x))
    # z is affine in the last block's final BN weights (eval mode), so training them and the
    # top (head conv, BN, fc) is exactly the exact-top model with all of z kept
    body_w, top_w = r"^_blocks\.15\._bn2\.", r"^(?:_conv_head\.|_bn1\.|_fc\.)"
    opt = tl.SGD(0.002, momentum=0.9)
    real = tl.finetune(model, (x, y), opt, 12, loss="ce", params=f"{body_w}|{top_w}",
                       log_every=1, progress=False)  # fmt: skip
    etk = compute_exact_top_kernel(body, top, (x, y), params=body_w, top_params=top_w,
                                   directions="all", progress=False)  # fmt: skip
    assert etk.z0.shape == (6, 320) and etk.shape == (320, 1, 1)
    fc = forecast_exact_top(etk, opt, 12, loss="ce", progress=False)
    assert real.loss[-1] < 0.5 * real.loss[0]
    np.testing.assert_allclose(fc.loss, real.loss, rtol=2e-5)


def test_choose_linearization_offers_the_exact_top_where_it_applies():
    """choose_linearization(exact_top=True), the command line's --linearize auto of forecast
    and validate: "top" for a network split_model knows whose body has trained weights, SGD
    without weight decay; the usual choice otherwise (and always without exact_top)."""
    from efficientnet_lite_pytorch import EfficientNet

    from tangentlab.examples import LITE0_DEFAULT_PARAMS

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=3, image_size=32).eval()
    p = LITE0_DEFAULT_PARAMS
    choice = tl.choose_linearization(model, params=p, exact_top=True)
    assert (choice.model, choice.head) == ("top", None) and "split_lite" in choice.reason
    assert tl.choose_linearization(model, params=p, exact_top=True,
                                   optimizer=tl.SGD(0.1, momentum=0.9)).model == "top"
    assert tl.choose_linearization(model, params=p).model == "body"  # exact_top=False
    for opt in (tl.SGD(0.1, weight_decay=0.01), tl.AdamW(1e-3)):
        assert tl.choose_linearization(model, params=p, exact_top=True,
                                       optimizer=opt).model != "top"
    assert tl.choose_linearization(model, params=p, exact_top=True, head="_fc").model == "body"
    head_only = tl.choose_linearization(model, params=r"^_fc\.", exact_top=True)
    assert head_only.model == "all" and "only the head" in head_only.reason  # linear probing
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    assert tl.choose_linearization(plain, exact_top=True).model == "body"


def test_kernel_cache_restores_the_same_kernel_and_its_cost(tmp_path):
    """cache=DIR: the read-out kernels in DIR/block and DIR/rest (compute_kernel's cache),
    restored the same by a second call, which counts their cost when computed; a request
    that differs is refused, not reused."""
    from tangentlab.errors import CacheMismatchError

    body, top = _net()
    data = _data(n=12)
    a = compute_exact_top_kernel(body, top, data, directions=4, projection=16,
                                 cache=tmp_path / "c", progress=False)  # fmt: skip
    assert (tmp_path / "c" / "block" / "kernel.safetensors").exists()
    assert (tmp_path / "c" / "rest" / "kernel.safetensors").exists()
    b = compute_exact_top_kernel(body, top, data, directions=4, projection=16,
                                 cache=tmp_path / "c", progress=False)  # fmt: skip
    assert a.features is not None
    for u, v in ((a.features, b.features), (a.rest, b.rest), (a.basis, b.basis)):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    then = sum(float(tl.load_kernel(tmp_path / "c" / part / "kernel.safetensors")
                     .metadata["seconds"]) for part in ("block", "rest"))  # fmt: skip
    assert then > 0 and b.metadata["seconds"] >= then  # what the parts cost, not ~0
    with pytest.raises(CacheMismatchError):
        compute_exact_top_kernel(body, top, data, directions=4, projection=32,
                                 cache=tmp_path / "c", progress=False)  # fmt: skip


def test_split_lite_refuses_other_models():
    from tangentlab.examples import split_lite

    with pytest.raises(TangentlabError, match="by hand"):
        split_lite(nn.Linear(3, 2))


def test_steps_interval_is_the_calibrated_band_around_the_estimate():
    import math

    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    for loss, batch in (("mse", None), ("ce", 4)):
        fc = forecast_exact_top(etk, tl.SGD(0.2), 60, loss=loss, batch_size=batch,
                                progress=False)  # fmt: skip
        assert fc.settings["z_vector"]  # z [6]: a vector's calibration (NOTE [exact-top vector z])
        t = fc.steps_estimate(0.5)
        assert t == pytest.approx(drift_steps(fc.steps_to_drop(0.5), loss, vector=True))
        lo, hi = STEPS_BAND_VECTOR[(loss, batch is None)]
        assert t is not None and not fc.reliability["flagged"]  # the passed targets' band
        assert fc.steps_interval(0.5) == pytest.approx((t * math.exp(lo), t * math.exp(hi)))
        assert fc.steps_interval(0.999999) is None  # not reached: no interval
        assert fc.steps_estimate(0.999999) is None
        fc.settings["z_vector"] = False  # a map's (or a forecast stored before the rule)
        t = fc.steps_estimate(0.5)
        assert t == pytest.approx(drift_steps(fc.steps_to_drop(0.5), loss))
        lo, hi = STEPS_BAND[(loss, batch is None)]
        assert fc.steps_interval(0.5) == pytest.approx((t * math.exp(lo), t * math.exp(hi)))


def test_drift_shortens_long_runs_only_and_keeps_their_order():
    """NOTE [exact-top drift]: T̃ = T̂ exp(min(0, a + b ln T̂)), T̂ kept below e^(-a/b)."""
    import math

    from tangentlab.experimental.exact_top import DRIFT, DRIFT_VECTOR

    a, b = DRIFT["ce"]
    assert b < 0 < a  # long CE runs: the real run is faster
    short = math.floor(math.exp(-a / b))
    assert drift_steps(short, "ce") == short and drift_steps(1, "ce") == 1
    steps = np.arange(1, 5000)
    est = np.array([drift_steps(t, "ce") for t in steps])
    assert est[999] == pytest.approx(1000 * math.exp(a + b * math.log(1000)))
    assert np.all(np.diff(est) > 0) and np.all(est <= steps)  # monotone, never later
    assert drift_steps(300, "hinge") == 300  # no calibration: T̂
    a, b = DRIFT_VECTOR["ce"]  # a vector z's (NOTE [exact-top vector z]): the same form
    assert drift_steps(1000, "ce", vector=True) == pytest.approx(
        1000 * math.exp(a + b * math.log(1000)))


def test_rebound_is_the_largest_rise_above_the_running_minimum():
    import math

    from tangentlab.experimental.exact_top import rebound

    assert rebound(np.array([2.0, 1.5, 1.0, 0.5])) == 0.0  # monotone: no rebound
    # rises: 1.0 -> 1.4 (0.4 above the minimum 1.0), then 0.6 -> 0.9 (0.3): the larger / L0
    assert rebound(np.array([2.0, 1.0, 1.4, 0.6, 0.9, 0.2])) == pytest.approx(0.4 / 2.0)
    assert math.isinf(rebound(np.array([2.0, 1.0, np.nan])))  # a blow-up
    assert rebound(np.array([3.0])) == 0.0


def _oscillating(etk, **kw):
    """SGD past the stability limit of the CE loss at w0: the forecast's loss bounces up to
    3x L0 and then comes down (50% drop at step 28, 80% at 32)."""
    return forecast_exact_top(etk, tl.SGD(2.0), 40, loss="ce", progress=False, **kw)


def test_reliability_check_flags_a_forecast_whose_loss_climbs_back():
    import math

    from tangentlab.experimental.exact_top import REBOUND_MAX, STEPS_BAND_FLAGGED

    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    with pytest.warns(ValidityWarning, match="climbs back"):
        fc = _oscillating(etk)
    r = fc.reliability
    assert r["flagged"] and max(r["rebound"].values()) > REBOUND_MAX
    assert all(fc.flagged(float(d)) == (v > REBOUND_MAX) for d, v in r["rebound"].items())
    # the rebound up to the target, by hand from the logged path
    for d, v in r["rebound"].items():
        t = fc.steps_to_drop(float(d))
        path = fc.loss if t is None else fc.loss[: int(np.nonzero(fc.steps == t)[0][0]) + 1]
        assert v == pytest.approx(max(path[i] - path[: i + 1].min() for i in range(len(path)))
                                  / path[0])  # fmt: skip
    d = next(float(k) for k, v in r["rebound"].items()
             if v > REBOUND_MAX and fc.steps_to_drop(float(k)) is not None)  # fmt: skip
    lo, hi = fc.steps_interval(d)
    assert lo == pytest.approx(fc.steps_estimate(d) * math.exp(STEPS_BAND_FLAGGED[0]))
    assert hi == pytest.approx(fc.steps_estimate(d) * math.exp(STEPS_BAND_FLAGGED[1]))
    assert STEPS_BAND_FLAGGED[0] < 0 < STEPS_BAND_FLAGGED[1] < math.inf  # wide, finite


def test_reliability_check_passes_a_smooth_forecast_silently():
    import warnings

    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc = forecast_exact_top(etk, tl.SGD(0.05), 60, loss="ce", progress=False)
    assert not fc.reliability["flagged"]
    assert all(v <= 1e-12 for v in fc.reliability["rebound"].values())


def test_minibatch_check_reads_the_steps_it_was_calibrated_on():
    """The same path logged every step or every 2 steps gets the same rebound (read on the
    even steps, as the threshold was chosen)."""
    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    kw = dict(loss="ce", batch_size=4, seed=3, progress=False)
    with pytest.warns(ValidityWarning):
        every, even = (forecast_exact_top(etk, tl.SGD(2.0), 40, log_every=k, **kw)
                       for k in (1, 2))  # fmt: skip
    for d in (0.3, 0.5, 0.8):
        assert every.rebound(d) == pytest.approx(even.rebound(d), abs=1e-12)
    assert any(every.rebound(d) > 0 for d in (0.3, 0.5, 0.8))


def test_plot_exact_top_draws_flagged_and_passed_forecasts(tmp_path):
    from tangentlab.report import plot_exact_top

    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    calm = forecast_exact_top(etk, tl.SGD(0.05), 60, loss="ce", progress=False)
    with pytest.warns(ValidityWarning):
        flagged = _oscillating(etk)
    real = (np.arange(41), flagged.loss * 0.9, None)  # any measured curve
    out = plot_exact_top([("lr 0.05", calm), ("lr 2", flagged)], tmp_path / "et.png",
                         drop=0.5, measured=[("real", *real)])  # fmt: skip
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_exact_top([("lr 0.05", calm)], tmp_path / "none.png", drop=None).exists()


def _tiny_bert(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=24,
                                  max_position_embeddings=16, num_labels=3,
                                  attn_implementation="eager")  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (12, 8), generator=g)
    mask = torch.ones(12, 8, dtype=torch.int64)
    mask[::3, 6:] = 0  # some padding
    return model, {"input_ids": ids, "attention_mask": mask,
                   "token_type_ids": torch.zeros_like(ids)}, torch.arange(12) % 3  # fmt: skip


@pytest.mark.parametrize("exact", ["ffn", "pooler"])
def test_split_minilm_is_the_model_and_keeps_its_weight_names(exact):
    import re

    from tangentlab.examples import MINILM_DEFAULT_PARAMS, split_minilm

    model, x, _ = _tiny_bert()
    body, top = split_minilm(model, exact=exact)
    with torch.no_grad():
        torch.testing.assert_close(top(body(**x)), model(**x).logits, rtol=1e-12, atol=1e-12)
    names = {n for n, _ in model.named_parameters()}
    b, t = ({n for n, _ in m.named_parameters()} for m in (body, top))
    assert b | t == names and not b & t  # every weight once, under its own name
    last = "bert.encoder.layer.1."  # the tiny model's last layer
    ffn = {n for n in names if n.startswith((last + "intermediate.", last + "output."))}
    assert (ffn <= t) == (exact == "ffn") and (ffn <= b) == (exact == "pooler")
    tiny = MINILM_DEFAULT_PARAMS.replace(r"layer\.5", r"layer\.1")  # MiniLM's last: 5
    assert tiny != MINILM_DEFAULT_PARAMS and all(re.search(tiny, n) for n in t)
    with pytest.raises(TangentlabError, match="by hand"):
        split_minilm(nn.Linear(3, 2))
    with pytest.raises(TangentlabError, match="exact must be one of"):
        split_minilm(model, exact="head")


@pytest.mark.parametrize("exact,norm", [("ffn", "attention.output.LayerNorm"),
                                        ("pooler", "output.LayerNorm")])  # fmt: skip
def test_exact_top_on_a_bert_is_real_training_where_the_body_is_affine(exact, norm):
    """Trained body weights: the LayerNorm that ends the body (z, its [CLS] state, is affine
    in them), plus the whole top: the exact-top model is then the network itself."""
    from tangentlab.examples import split_minilm

    model, x, y = _tiny_bert(1)
    body, top = split_minilm(model, exact=exact)
    last = r"bert\.encoder\.layer\.1\."
    top_part = rf"{last}(?:intermediate|output)\.|" if exact == "ffn" else ""
    params = rf"^(?:{last}{norm.replace('.', chr(92) + '.')}\.|{top_part}bert\.pooler\.|" \
        r"classifier\.)"  # fmt: skip
    etk = compute_exact_top_kernel(body, top, (x, y), params=params, top_params=params,
                                   directions="all", progress=False)  # fmt: skip
    opt = tl.SGD(0.05, momentum=0.9)
    fc = forecast_exact_top(etk, opt, 30, loss="ce", progress=False)
    real = tl.finetune(model, (x, y), opt, 30, loss="ce", params=params, progress=False)
    np.testing.assert_allclose(fc.loss, real.loss, rtol=1e-8)


def test_top_weights_the_top_does_not_use_get_no_update():
    """A chosen top weight outside the top's computation (e.g. one shared with the body's
    module tree) gets no gradient: it stays put, as in torch, instead of an autograd error."""
    body, top = _net()
    holder = nn.Module()
    holder.top, holder.spare = top, nn.Linear(2, 2).double()
    holder.eval()
    holder.forward = top.forward  # the spare layer is a weight of holder, not in its output
    x, y = _data()
    etk = compute_exact_top_kernel(body, holder, (x, y), progress=False)
    assert "spare.weight" in etk.top_params
    fc = forecast_exact_top(etk, tl.SGD(0.2), 20, progress=False)
    ref = forecast_exact_top(compute_exact_top_kernel(body, top, (x, y), progress=False),
                             tl.SGD(0.2), 20, progress=False)  # fmt: skip
    np.testing.assert_allclose(fc.loss, ref.loss, rtol=1e-12)


def test_reliable_lr_is_the_first_rate_down_the_grid_whose_check_passes():
    """Past CE's edge of stability the check flags; reliable_lr walks η s^k down to the
    first rate it passes at, with the horizon η_k T_k kept, and says None when none does."""
    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    kw = dict(loss="ce", seed=3)
    with pytest.warns(ValidityWarning):
        assert forecast_exact_top(etk, tl.SGD(2.0), 40, progress=False, **kw).flagged(0.5)
    fc = reliable_lr(etk, tl.SGD(2.0), 40, progress=False, **kw)
    assert fc is not None and fc.settings["lr"] < 2.0
    k = round(math.log(fc.settings["lr"] / 2.0) / math.log(0.8))
    assert fc.settings["lr"] == pytest.approx(2.0 * 0.8**k)
    assert fc.settings["steps"] == math.ceil(40 / 0.8**k)
    assert not fc.flagged(0.5) and not fc.flagged(0.8) and fc.blowup is None
    assert fc.settings["advised"] == k >= 1  # a lowered rate carries its own band
    t = fc.steps_estimate(0.5)
    lo, hi = STEPS_BAND_ADVISED
    assert fc.steps_interval(0.5) == pytest.approx((t * math.exp(lo), t * math.exp(hi)))
    calm_lo, calm_hi = STEPS_BAND_VECTOR[("ce", True)]  # z [6]: NOTE [exact-top vector z]
    assert lo < calm_lo and hi > calm_hi  # wider than the grid's passed CE full-batch band
    with pytest.warns(ValidityWarning):  # the rate just above it on the grid is flagged
        above = forecast_exact_top(etk, tl.SGD(2.0 * 0.8 ** (k - 1)),
                                   math.ceil(40 / 0.8 ** (k - 1)), progress=False, **kw)
    assert above.flagged(0.5) or above.flagged(0.8) or above.blowup is not None
    calm = reliable_lr(etk, tl.SGD(fc.settings["lr"]), 40, progress=False, **kw)
    assert calm.settings["lr"] == fc.settings["lr"]  # a passing rate is its own answer
    assert "advised" not in calm.settings  # not lowered: the grid's passed band
    lo, hi = STEPS_BAND_VECTOR[("ce", True)]
    t = calm.steps_estimate(0.5)
    assert calm.steps_interval(0.5) == pytest.approx((t * math.exp(lo), t * math.exp(hi)))
    assert reliable_lr(etk, tl.SGD(2.0), 40, tries=1, progress=False, **kw) is None
    l0 = float(fc.loss[0])  # stopping past the deepest checked drop: the same rate, faster
    short = reliable_lr(etk, tl.SGD(2.0), 40, progress=False, stop_below=0.19 * l0, **kw)
    assert short.settings["lr"] == fc.settings["lr"] and short.steps[-1] <= fc.steps[-1]
    assert short.steps_to_drop(0.8) == fc.steps_to_drop(0.8)
    for bad, match in ((dict(shrink=1.0), "shrink"), (dict(tries=0), "tries"),
                       (dict(drops=(0.5, 1.5)), "drops"), (dict(momentum=0.9), "unknown"),
                       (dict(steps_="x"), "unknown")):  # fmt: skip
        with pytest.raises(TangentlabError, match=match):
            reliable_lr(etk, tl.SGD(2.0), 40, progress=False, **bad)
    with pytest.raises(TangentlabError, match="steps"):
        reliable_lr(etk, tl.SGD(2.0), -1, progress=False)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sharpness_is_the_top_eigenvalue_of_the_explicit_gauss_newton_matrix(loss):
    """exact_top.sharpness against λ_max(Jᵀ H_f J) of the network top(body(x)) in all its
    trained weights, by autograd (the model is exact there: every direction of z, no
    projection); stable_lr is half the limit 2/S, rounded down to 3 digits."""
    from torch.func import jacrev

    from tangentlab.experimental.exact_top import sharpness, stable_lr

    body, top = _net()
    x, y = _data()
    etk = compute_exact_top_kernel(body, top, (x, y), directions="all", progress=False)
    named = {**{"b." + k: v.detach() for k, v in body.named_parameters()},
             **{"t." + k: v.detach() for k, v in top.named_parameters()}}  # fmt: skip

    def logits(*ws):
        d = dict(zip(named, ws))
        z = functional_call(body, {k[2:]: v for k, v in d.items() if k[:2] == "b."}, (x,))
        return functional_call(top, {k[2:]: v for k, v in d.items() if k[:2] == "t."}, (z,))

    jac = jacrev(logits, argnums=tuple(range(len(named))))(*named.values())
    j = torch.cat([a.reshape(len(y) * 3, -1) for a in jac], dim=1)  # [N C, P]
    fn = tl.training.as_loss(loss, "test")
    f0 = logits(*named.values()).detach()
    h = torch.autograd.functional.hessian(
        lambda f: fn.per_sample(f.reshape(len(y), 3), y).mean(), f0.reshape(-1))
    want = float(torch.linalg.eigvalsh(j.T @ h @ j).max())
    got = sharpness(etk, loss=loss)
    assert got == pytest.approx(want, rel=1e-4)
    lr = stable_lr(etk, loss=loss, momentum=0.5)
    assert 0.99 * 0.5 / want <= lr <= 0.5 / want  # 0.5 x 2 (1 - m) / S, rounded down
    with pytest.raises(TangentlabError, match="momentum must lie in"):
        stable_lr(etk, momentum=1.0)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sharpness_lanczos_agrees_with_a_long_power_iteration_on_a_projected_block(loss):
    """With the block projected (k < the body's weights, so P = diag(K, I) is rank
    deficient) and q < D, sharpness's Lanczos gives the top eigenvalue that a power
    iteration of the same product reaches after many more iterations (independent of the
    Lanczos code: exact_top._Sharpness), and it stops long before ``max_iter``."""
    from tangentlab.experimental.exact_top import _gn_apply, _Sharpness, sharpness

    body, top = _net(1)
    x, y = _data(24, seed=1)
    etk = compute_exact_top_kernel(body, top, (x, y), directions=2, projection=16,
                                   progress=False)  # fmt: skip
    assert etk.features is not None  # N q = 48 > k: P is rank deficient
    fn = tl.training.as_loss(loss, "test")
    w = dict(etk.top.named_parameters())
    th = [w[a].detach() for a in etk.top_params]
    power = _Sharpness(etk, fn, th, warm=300)
    want, _ = power.step(etk.z0.detach(), 1.0)
    calls = {"n": 0}
    real = _gn_apply

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    import tangentlab.experimental.exact_top as mod

    mod._gn_apply = counted
    try:
        got = sharpness(etk, loss=loss, tol=1e-9)
    finally:
        mod._gn_apply = real
    assert got == pytest.approx(want, rel=1e-7)
    assert calls["n"] < 60


def test_split_model_says_how_to_split_an_unknown_model_and_mismatch_is_measured():
    from tangentlab.examples import split_model
    from tangentlab.experimental.exact_top import split_mismatch

    with pytest.raises(TangentlabError, match="--split 'pkg.module:function'"):
        split_model(nn.Linear(3, 2))
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    body, top = net[:2], net[2:]
    x = _data()[0].float()
    assert split_mismatch(net, body, top, x) < 1e-6  # eval mode: dropout off in both
    assert split_mismatch(net, net[:1], top, x) > 0.01  # the Tanh dropped
    assert split_mismatch(net, body, nn.Linear(6, 4), x) == math.inf  # another shape
    assert all(m.training for m in net.modules())  # every module's own mode restored


def test_default_subspace_is_2c_p_squared_for_a_map():
    """z [channels, h, w] (a conv map of P = h w positions): q = 2C P² by default, at most D
    (32C for a vector z, above)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.Tanh()).double().eval()
    top = nn.Sequential(nn.Conv2d(24, 4, 1), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2))
    top = top.double().eval()
    x = torch.randn(40, 1, 2, 2, dtype=torch.float64)  # N >= q/2: z0's 32 principal directions
    etk = compute_exact_top_kernel(body, top, (x, torch.arange(40) % 2), progress=False)
    assert etk.shape == (24, 2, 2) and etk.rank == 2 * 2 * 4 * 4 and etk.rest is not None
    small = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh()).double().eval()
    top8 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2))
    etk = compute_exact_top_kernel(small, top8.double().eval(), (x, torch.arange(40) % 2),
                                   progress=False)  # fmt: skip
    assert etk.rank == 8 * 4 and etk.rest is None  # 2C P² = 64 > D = 32: all of z
    assert compute_exact_top_kernel(body, top, (x, torch.arange(40) % 2), directions=3,
                                    progress=False).rank == 3  # fmt: skip


def test_top_jacobians_are_the_per_sample_jacobians_across_chunks(monkeypatch):
    """The basis's gradient rows: C reverse passes a chunk of samples equal a per-sample
    ``vmap(jacrev)`` of the top (float64: to rounding), chunks of 3 of 10 samples."""
    from torch.func import jacrev, vmap

    from tangentlab.experimental import exact_top as et

    torch.manual_seed(0)
    top = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.Tanh(), nn.Flatten(),
                        nn.Linear(24, 3)).double().eval()  # fmt: skip
    with torch.no_grad():
        top[1].running_mean.normal_(), top[1].running_var.uniform_(0.5, 2.0)
    z = torch.randn(10, 16, dtype=torch.float64)
    monkeypatch.setattr(et, "_CHUNK", 3)
    got = et._top_jacobians(top, z, (4, 2, 2))
    ref = vmap(jacrev(lambda zi: top(zi[None])[0]))(z.reshape(-1, 4, 2, 2)).reshape(10, 3, 16)
    assert got.shape == (10, 3, 16)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [None, 4])
def test_stop_if_flagged_stops_at_the_first_excursion_the_check_reads(batch):
    """A forecast flagged at a drop d stops at the first rise the check reads before the
    loss reaches (1 − d) L0: the same path up to there, still flagged; one that passes at d
    runs in full, step for step the same."""
    import warnings

    from tangentlab.experimental.exact_top import CHECK_EVERY_MINIBATCH, REBOUND_MAX

    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ValidityWarning)
        full = _oscillating(etk, batch_size=batch)
        cut = _oscillating(etk, batch_size=batch, stop_if_flagged=0.8)
    assert full.flagged(0.8) and cut.flagged(0.8) and cut.settings["stop_if_flagged"] == 0.8
    every = 1 if batch is None else CHECK_EVERY_MINIBATCH
    read = [i for i, t in enumerate(full.steps) if t % every == 0]
    low, stop = math.inf, None  # the first read step that rises above the running minimum
    for i in read:
        if full.loss[i] > low + REBOUND_MAX * full.loss[0]:
            stop = i
            break
        low = min(low, full.loss[i])
    t80 = full.steps_to_drop(0.8)
    assert stop is not None and (t80 is None or t80 > full.steps[stop])
    assert len(cut.steps) == stop + 1 < len(full.steps)
    np.testing.assert_array_equal(cut.steps, full.steps[: stop + 1])
    np.testing.assert_allclose(cut.loss, full.loss[: stop + 1], rtol=1e-12)
    calm = forecast_exact_top(etk, tl.SGD(0.05), 40, loss="ce", batch_size=batch,
                              progress=False)  # fmt: skip
    same = forecast_exact_top(etk, tl.SGD(0.05), 40, loss="ce", batch_size=batch,
                              progress=False, stop_if_flagged=0.8)  # fmt: skip
    assert not calm.flagged(0.8)
    np.testing.assert_array_equal(same.loss, calm.loss)
    for bad in (0.0, 1.0, "0.8", True):
        with pytest.raises(TangentlabError, match="stop_if_flagged"):
            forecast_exact_top(etk, tl.SGD(0.05), 4, progress=False, stop_if_flagged=bad)


def test_reliable_lr_with_stopped_tries_is_the_walk_of_full_forecasts():
    """reliable_lr's tries stop at a certain flag: the rate and forecast it returns are those
    of a walk down the grid with every try run in full."""
    import warnings

    body, top = _net()
    etk = compute_exact_top_kernel(body, top, _data(), progress=False)
    kw = dict(loss="ce", seed=3)
    fc = reliable_lr(etk, tl.SGD(2.0), 40, progress=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ValidityWarning)
        for k in range(10):
            ref = forecast_exact_top(etk, tl.SGD(2.0 * 0.8**k), math.ceil(40 / 0.8**k),
                                     progress=False, **kw)  # fmt: skip
            if ref.blowup is None and not ref.flagged(0.5) and not ref.flagged(0.8):
                break
    assert fc.settings["lr"] == ref.settings["lr"]
    np.testing.assert_array_equal(fc.loss, ref.loss)
