"""The real fine-tuning runner (``tangentlab.finetune``): equivalence with the forecast on
models that are exactly linear in their trainable weights, isolation of the caller's model,
batch-norm modes, logging, divergence, interruption and input errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tangentlab as tl
from conftest import make_cnn, make_transformer, split_settings
from tangentlab.errors import TangentlabError, TangentlabWarning
from tangentlab.finetune import TrainingRun, finetune
from tangentlab.training import SGD

N, D, C = 24, 6, 3  # B = 5 does not divide N: the last batch of an epoch has 4 samples
RTOL = 1e-8


@pytest.fixture(scope="module")
def linear():
    """A model exactly linear in its weights (a linear layer on fixed features), its data
    (float64) and its exact kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.double)
    y = torch.randint(0, C, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(D, C).double().eval()
    kernel = tl.compute_kernel(model, (x, y), progress=False)
    return model, (x, y), kernel


def _run(model, data, lr, steps, **kw):
    opt, kw = split_settings(lr, kw)
    return finetune(model, data, opt, steps, log_every=1, progress=False, **kw)


# ---- equivalence with the forecast -----------------------------------------------------

FULL_BATCH = [
    dict(),
    dict(momentum=0.6, weight_decay=0.05),
    dict(target_scale=2.0, weight_decay=0.1),
    dict(loss="ce"),
    dict(loss="ce", momentum=0.9, weight_decay=0.01),
    dict(momentum=0.5, weight_decay=0.2, decay_to="w0"),  # the run decays toward w0 too
]


@pytest.mark.parametrize("kw", FULL_BATCH, ids=lambda kw: ",".join(map(str, kw.items())) or "gd")
def test_full_batch_matches_forecast(linear, kw):
    model, data, kernel = linear
    opt, fkw = split_settings(0.4, kw)
    fc = tl.forecast(kernel, opt, 40, **fkw)
    run = _run(model, data, 0.4, 40, **kw)
    np.testing.assert_array_equal(run.steps, np.arange(41))
    np.testing.assert_allclose(run.loss, fc.loss, rtol=RTOL)
    np.testing.assert_array_equal(run.accuracy, fc.accuracy)
    assert run.loss[-1] < 0.9 * run.loss[0]  # it did train


MINIBATCH = [
    dict(batch_size=5),
    dict(batch_size=5, sampling="replacement"),
    dict(batch_size=8, momentum=0.8, weight_decay=0.02),
    dict(batch_size=5, loss="ce", momentum=0.5),
    dict(batch_size=5, weight_decay=0.1, decay_to="w0"),
]


@pytest.mark.parametrize("kw", MINIBATCH, ids=lambda kw: ",".join(map(str, kw.items())))
def test_minibatch_run_is_path_zero_of_the_forecast(linear, kw):
    """Same batches as the forecast's path 0 (NOTE [same batches as the forecast]): the
    linear model's real SGD run and that path agree to round-off, step by step."""
    model, data, kernel = linear
    opt, fkw = split_settings(0.3, kw)
    fc = tl.forecast(kernel, opt, 30, paths=3, seed=7, **fkw)
    run = _run(model, data, 0.3, 30, seed=7, **kw)
    np.testing.assert_allclose(run.loss, fc.loss_paths[0], rtol=RTOL)
    np.testing.assert_array_equal(run.accuracy, fc.accuracy_paths[0])
    # the order matters: other paths (other batches) differ
    assert np.abs(fc.loss_paths[1] - run.loss).max() > 1e-4
    other = _run(model, data, 0.3, 30, seed=8, **kw)
    assert np.abs(other.loss - run.loss).max() > 1e-4


def test_frozen_feature_extractor_trains_only_the_head():
    """Trainable head on a frozen nonlinear extractor: linear in the trained weights, so
    forecast and run agree; the extractor's weights do not move."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.double)
    y = torch.randint(0, C, (N,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double().eval()
    head = r"^2\."
    kernel = tl.compute_kernel(model, (x, y), params=head, progress=False)
    fc = tl.forecast(kernel, SGD(0.5, momentum=0.5, weight_decay=0.01), 25, batch_size=6, paths=1)
    run = _run(model, (x, y), 0.5, 25, batch_size=6, momentum=0.5, weight_decay=0.01,
               params=head)  # fmt: skip
    np.testing.assert_allclose(run.loss, fc.loss, rtol=RTOL)
    trained = run.model
    assert torch.equal(trained[0].weight, model[0].weight)
    assert torch.equal(trained[0].bias, model[0].bias)
    assert not torch.equal(trained[2].weight, model[2].weight)
    assert "2 tensors" in run.hyperparameters["trainable"]


def test_chunked_steps_and_dataset_inputs_give_the_same_run(linear):
    model, (x, y), _ = linear
    ref = _run(model, (x, y), 0.4, 10, momentum=0.5)
    chunked = _run(model, (x, y), 0.4, 10, momentum=0.5, chunk_size=7)  # 24 = 7+7+7+3
    np.testing.assert_allclose(chunked.loss, ref.loss, rtol=1e-12)
    ds = _run(model, TensorDataset(x, y), 0.4, 10, momentum=0.5)
    dl = _run(model, DataLoader(TensorDataset(x, y), batch_size=10), 0.4, 10, momentum=0.5)
    np.testing.assert_array_equal(ds.loss, ref.loss)
    np.testing.assert_array_equal(dl.loss, ref.loss)


# ---- the caller's model, batch norm, trainable weights ---------------------------------


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_callers_model_is_never_modified(cnn_data, bn):
    model = make_cnn()
    model[0].weight.requires_grad_(False)  # a flag finetune must not flip on the caller
    model.train()  # and a mode it must not change
    before = _snapshot(model)
    opt = SGD(0.1, momentum=0.9)
    run = finetune(model, cnn_data, opt, 5, batch_size=3, bn=bn, params=None, progress=False)
    after = _snapshot(model)
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    assert before[1:] == after[1:]
    assert run.model is not model and all(p.grad is None for p in model.parameters())
    # params=None follows requires_grad, as the tangent model: conv weight stays fixed
    assert torch.equal(run.model[0].weight, model[0].weight)


def test_bn_frozen_keeps_running_statistics(cnn_data):
    model = make_cnn()
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    frozen = finetune(model, cnn_data, SGD(0.1), 6, batch_size=2, progress=False)
    assert frozen.hyperparameters["bn"] == "frozen"
    assert "running statistics fixed" in frozen.hyperparameters["bn_note"]
    assert torch.equal(frozen.model[1].running_mean, stats[0])
    assert torch.equal(frozen.model[1].running_var, stats[1])
    assert int(frozen.model[1].num_batches_tracked) == int(model[1].num_batches_tracked)
    assert not any(m.training for m in frozen.model.modules())
    assert not torch.equal(frozen.model[1].weight, model[1].weight)  # BN affine is trained

    trained = finetune(model, cnn_data, SGD(0.1), 6, batch_size=2, bn="train", progress=False)
    assert trained.hyperparameters["bn"] == "train"
    assert not torch.equal(trained.model[1].running_mean, stats[0])


def test_bn_train_with_dropout_is_seeded_and_leaves_the_global_rng(cnn_data):
    torch.manual_seed(0)
    model = nn.Sequential(make_cnn(), nn.Dropout(0.5)).eval()
    state = torch.get_rng_state()
    a = finetune(model, cnn_data, SGD(0.1), 4, batch_size=3, bn="train", seed=1, progress=False)
    b = finetune(model, cnn_data, SGD(0.1), 4, batch_size=3, bn="train", seed=1, progress=False)
    c = finetune(model, cnn_data, SGD(0.1), 4, batch_size=3, bn="train", seed=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert not np.array_equal(a.loss, c.loss)


def test_params_restrict_training(cnn_data):
    model = make_cnn()
    run = finetune(model, cnn_data, SGD(0.2), 4, params="^4\\.", progress=False)
    for name, p in run.model.named_parameters():
        same = torch.equal(p, dict(model.named_parameters())[name])
        assert same == (not name.startswith("4.")), name


# ---- logging, outputs, divergence, interruption -----------------------------------------


def test_logged_steps_include_zero_and_last(linear):
    model, data, _ = linear
    run = finetune(model, data, SGD(0.1), 10, log_every=4, progress=False)
    np.testing.assert_array_equal(run.steps, [0, 4, 8, 10])
    auto = finetune(model, data, SGD(0.1), 201, progress=False)  # log_every = ceil(201 / 200)
    assert auto.hyperparameters["log_every"] == 2
    np.testing.assert_array_equal(auto.steps, [*range(0, 201, 2), 201])
    zero = finetune(model, data, SGD(0.1), 0, progress=False)
    np.testing.assert_array_equal(zero.steps, [0])
    assert run.train_seconds > 0 and run.eval_seconds > 0
    assert run.wall_seconds >= run.train_seconds + run.eval_seconds
    d = json.loads(json.dumps(run.to_dict(), allow_nan=False))
    assert d["steps"] == [0, 4, 8, 10] and "model" not in d


def test_steps_to_on_the_logged_steps():
    run = TrainingRun(
        steps=np.array([0, 5, 10]),
        loss=np.array([1.0, 0.5, 0.1]),
        accuracy=np.zeros(3),
        train_seconds=1,
        eval_seconds=1,
        wall_seconds=2,
    )
    assert run.steps_to(0.6) == 5 and run.steps_to(0.5) == 5 and run.steps_to(0.01) is None


def test_dict_inputs_and_logits_outputs(text_data):
    """HF-style keyword inputs (model(**x)) and outputs carrying .logits / ["logits"]."""

    class WithLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_transformer()

        def forward(self, input_ids, attention_mask):
            return {"logits": self.inner(input_ids, attention_mask)}

    model = WithLogits().eval()
    kernel = tl.compute_kernel(model, text_data, params=r"head\.", progress=False)
    fc = tl.forecast(kernel, SGD(0.5), 8, loss="ce")
    run = finetune(
        model, text_data, SGD(0.5), 8, loss="ce", params=r"head\.", log_every=1, progress=False
    )
    np.testing.assert_allclose(run.loss, fc.loss, rtol=1e-8)  # only the head: linear


def test_divergence_stops_the_run(linear):
    model, data, kernel = linear
    lr = 20 * kernel.num_samples / float(kernel.eigh()[0][-1])  # 10x the stability limit
    run = finetune(model, data, SGD(lr), 200, log_every=1, progress=False)
    assert run.diverged and run.divergence_step is not None
    assert run.steps_done < 200 and run.steps[-1] == run.divergence_step
    assert math.isnan(run.loss[-1]) and np.isfinite(run.loss[:-1]).all()
    assert tl.forecast(kernel, SGD(lr), 200).diverges


def test_keyboard_interrupt_returns_the_partial_run(linear):
    _, data, _ = linear

    class StopAfter(nn.Linear):
        calls = 0

        def forward(self, x):
            StopAfter.calls += 1
            if StopAfter.calls == 12:  # 1 probe + evaluations and steps in between
                raise KeyboardInterrupt
            return super().forward(x)

    torch.manual_seed(0)
    model = StopAfter(D, C).double()
    with pytest.warns(TangentlabWarning, match="interrupted after"):
        run = finetune(model, data, SGD(0.1), 50, log_every=1, progress=False)
    assert run.interrupted and 0 < run.steps_done < 50
    assert run.steps[-1] <= run.steps_done and len(run.loss) == len(run.steps)
    assert np.isfinite(run.loss).all()


@pytest.mark.parametrize(
    "kw, says",
    [
        (dict(optimizer=0.1), "optimizer must be a tangentlab optimizer such as tl.SGD"),
        (dict(steps=-1), "steps must be an integer >= 0"),
        (dict(batch_size=0), "batch_size must be a positive integer or None"),
        (dict(loss="hinge"), "loss must be tl.MSE(target_scale=1.0) or tl.CrossEntropy()"),
        (dict(bn="eval"), "bn must be one of ['frozen', 'train']"),
        (dict(log_every=0), "log_every must be a positive integer"),
        (dict(params="nomatch"), "finetune: params='nomatch' selects no parameter"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_settings_name_the_fix(linear, kw, says):
    model, data, _ = linear
    args = dict(optimizer=SGD(0.1), steps=3)
    args.update(kw)
    with pytest.raises(TangentlabError, match="^finetune: ") as exc:
        finetune(model, data, args.pop("optimizer"), args.pop("steps"), progress=False, **args)
    assert says in str(exc.value)


def test_bad_model_and_labels(linear):
    model, (x, y), _ = linear
    with pytest.raises(TangentlabError, match="model must be a torch.nn.Module"):
        finetune(lambda v: v, (x, y), SGD(0.1), 1)
    with pytest.raises(TangentlabError, match=r"labels must lie in \[0, 3\)"):
        finetune(model, (x, y + 5), SGD(0.1), 1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on a clean run
        finetune(model, (x, y), SGD(0.1), 1, progress=False)


def test_full_batch_logs_reuse_the_step_forward_pass(cnn_data):
    """NOTE [full-batch logging]: the loss/accuracy logged at step t of a full-batch run come
    from step t's own forward pass; they equal a fresh evaluation of w_t (the last step of a
    shorter run is always evaluated fresh)."""
    model = make_cnn()
    long = finetune(model, cnn_data, SGD(0.05), 4, log_every=1, progress=False)
    for t in (1, 2, 3):
        short = finetune(model, cnn_data, SGD(0.05), t, log_every=1, progress=False)
        assert short.steps[-1] == t
        np.testing.assert_allclose(long.loss[t], short.loss[-1], rtol=1e-12)  # measured: equal
        assert long.accuracy[t] == short.accuracy[-1]
    assert long.eval_seconds > 0  # steps 0 and 4 are evaluated


def test_same_objects_drive_forecast_and_run(linear):
    """The optimizer and loss objects are recorded on both sides, and the torch optimizer
    that finetune builds is the one they describe."""
    model, data, kernel = linear
    opt, loss = SGD(0.2, momentum=0.5, weight_decay=0.01), tl.MSE(2.0)
    fc = tl.forecast(kernel, opt, 5, loss=loss)
    run = finetune(model, data, opt, 5, loss=loss, progress=False)
    assert fc.optimizer is opt and run.optimizer is opt
    assert fc.loss_function is loss and run.loss_function is loss
    torch_opt = opt.torch_optimizer([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(torch_opt, torch.optim.SGD)
    group = torch_opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["dampening"]) == (
        0.2, 0.5, 0.01, 0.0)  # fmt: skip
    assert run.to_dict()["optimizer"] == opt.to_dict() == fc.to_dict()["optimizer"]
