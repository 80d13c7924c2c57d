"""TracIn on the tangent model against TracInCP on real fine-tuning checkpoints."""

import numpy as np
import pytest
import torch
from torch import nn

import tangentlab as tl
from tangentlab.errors import TangentlabError

HEAD = r"^2\."


def _linear_model(classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes)).double().eval()


def _data(n, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.double)
    return x, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize(
    ("loss", "batch_size", "momentum", "checkpoints"),
    [("mse", None, 0.0, None), ("ce", 3, 0.9, [0, 4, 9, 15, 20])],
)
def test_tangent_tracin_equals_tracincp_on_real_checkpoints(loss, batch_size, momentum,
                                                            checkpoints):  # fmt: skip
    """On a model linear in its trained weights the tangent model's trajectory is the real
    one, so TracIn from the kernel equals TracInCP from the real run's checkpoints."""
    model = _linear_model()
    train, ev = _data(8, 0), _data(3, 1)
    steps = 20
    k = tl.compute_kernel(model, train, params=HEAD, progress=False)
    ck = tl.compute_cross_kernel(model, ev, k, train_data=train)
    opt = tl.SGD(0.5 * tl.stable_lr(k), momentum=momentum)
    inf = tl.influence(k, opt, steps, eval_data=ck, loss=loss, batch_size=batch_size, seed=3,
                       checkpoints=checkpoints)  # fmt: skip
    kept = list(range(steps)) if checkpoints is None else checkpoints
    run = tl.finetune(model, train, opt, steps, loss=loss, batch_size=batch_size, seed=3,
                      params=HEAD, checkpoints=kept, progress=False)  # fmt: skip
    assert sorted(run.checkpoints) == kept
    assert set(run.checkpoints[0]) == {"2.weight", "2.bias"}
    cp = tl.tracin_checkpoints(run, train, eval_data=ev)
    assert inf.steps.tolist() == cp.steps.tolist() == kept
    np.testing.assert_allclose(inf.self_influence, cp.self_influence, rtol=1e-8)
    np.testing.assert_allclose(inf.train_to_eval, cp.train_to_eval, rtol=1e-8, atol=1e-12)
    assert inf.train_to_eval.shape == (3, 8) and np.all(inf.self_influence > 0)


def test_projected_tracincp_is_the_projected_gradient_product():
    model = _linear_model()
    train = _data(6, 0)
    opt = tl.SGD(0.1)
    run = tl.finetune(model, train, opt, 4, params=HEAD, checkpoints=[0, 4], progress=False)
    proj = tl.Projection(12, kind="gaussian", seed=2)
    cp = tl.tracin_checkpoints(run, train, projection=proj)
    exact = tl.tracin_checkpoints(run, train)
    # reference: sum over checkpoints of lr * |R^T g_i|^2 with autograd gradients
    net = run.model
    ref = np.zeros(6)
    for step in (0, 4):
        with torch.no_grad():
            net[2].weight.copy_(run.checkpoints[step]["2.weight"])
            net[2].bias.copy_(run.checkpoints[step]["2.bias"])
        t = tl.Tangent(net, params=HEAD, projection=proj)
        r = t.projector.matrix(t.param_names)
        for i in range(6):
            out = tl.MSE().per_sample(net(train[0][i : i + 1]), train[1][i : i + 1]).sum()
            g = torch.autograd.grad(out, [net[2].weight, net[2].bias])
            g = torch.cat([v.reshape(-1) for v in g])
            ref[i] += 0.1 * float(((g @ r) ** 2).sum())
    np.testing.assert_allclose(cp.self_influence, ref, rtol=1e-8)
    assert not np.allclose(cp.self_influence, exact.self_influence)


def test_self_influence_finds_flipped_labels():
    """Mislabeled samples have large self-influence: on 40 samples labelled by a linear
    teacher with 4 flipped labels, checking the top 20% finds most of them."""
    model = _linear_model(seed=1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 4, generator=g, dtype=torch.double)
    with torch.no_grad():
        y = model(x).argmax(1)
    flipped = [3, 11, 22, 35]
    y[flipped] = (y[flipped] + 1) % 3
    k = tl.compute_kernel(model, (x, y), params=HEAD, progress=False)
    inf = tl.influence(k, tl.SGD(tl.stable_lr(k)), 100)
    curve = tl.detection_curve(inf.self_influence, flipped)
    found_at_20 = curve["found"][8]  # 8 of 40 samples checked
    assert found_at_20 >= 0.75 and curve["auc"] > 0.8
    frame = inf.to_frame()
    assert list(frame["sample"]) == inf.ranking().tolist()
    assert inf.to_dict()["ranking_self"] == inf.ranking().tolist()


def test_influence_refuses_bad_input():
    model = _linear_model()
    train = _data(5, 0)
    k = tl.compute_kernel(model, train, params=HEAD, progress=False)
    opt = tl.SGD(0.1)
    with pytest.raises(TangentlabError, match="checkpoints must be"):
        tl.influence(k, opt, 10, checkpoints=[0, 11])
    with pytest.raises(TangentlabError, match="weight decay"):
        tl.influence(k, tl.SGD(0.1, weight_decay=0.1), 10)
    with pytest.raises(TangentlabError, match="cross kernel"):
        tl.influence(k, opt, 10, eval_data=train)
    with pytest.raises(TangentlabError, match="diverges"):
        tl.influence(k, tl.SGD(1e4 * tl.stable_lr(k)), 2000)
    run = tl.finetune(model, train, opt, 2, params=HEAD, progress=False)
    with pytest.raises(TangentlabError, match="kept no checkpoints"):
        tl.tracin_checkpoints(run, train)
    with pytest.raises(TangentlabError, match="checkpoints must be"):
        tl.finetune(model, train, opt, 2, params=HEAD, checkpoints=[3], progress=False)
    with pytest.raises(TangentlabError, match="by='eval' needs"):
        tl.influence(k, opt, 3).ranking("eval")
