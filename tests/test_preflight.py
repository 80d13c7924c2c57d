"""Tangent.preflight: models that mix samples or whose selected weights do nothing are refused."""

import warnings

import pytest
import torch
from torch import nn

import tangentlab as tl
from conftest import make_cnn, make_mlp, make_transformer
from tangentlab.errors import TangentlabError, TangentlabWarning


def refused(t: tl.Tangent, x, match: str) -> str:  # one line, starting with the name
    with pytest.raises(TangentlabError, match=match) as info:
        t.preflight(x)
    msg = str(info.value)
    assert msg.startswith("Tangent.preflight: ") and "\n" not in msg
    return msg


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_mode_batchnorm_cnn_passes(cnn_data, dtype):
    x, _ = cnn_data
    t = tl.Tangent(make_cnn().to(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero-gradient warning either
        report = t.preflight(x.to(dtype))
    assert report.samples == 4 and report.zero_gradient == ()
    assert report.batch_difference is not None
    assert report.batch_difference <= report.tolerance
    assert report.tolerance == torch.finfo(dtype).eps ** 0.5


def test_keyword_inputs_pass(text_data):
    x, _ = text_data
    assert tl.Tangent(make_transformer()).preflight(x).samples == 4


def test_batchnorm_back_in_training_mode_is_refused(cnn_data):
    x, _ = cnn_data
    model = make_cnn()
    t = tl.Tangent(model)
    model.train()  # after the Tangent switched it to eval: batch statistics again
    refused(t, x, r"in training mode \(e.g. 1 \(BatchNorm2d\);.*Call model.eval\(\) first")


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.lin(x - x.mean(0))


def test_model_centering_over_the_batch_is_refused(mlp_data):
    x, _ = mlp_data
    msg = refused(tl.Tangent(Centered().eval()), x, "depend on the other samples")
    assert "x - x.mean(0)" in msg


def test_messages_start_with_the_callers_name(mlp_data):
    x, _ = mlp_data
    with pytest.raises(TangentlabError, match=r"^compute_kernel: the model's outputs depend"):
        tl.Tangent(Centered().eval()).preflight(x, where="compute_kernel")


def test_one_sample_skips_the_batch_check(mlp_data):
    x, _ = mlp_data
    report = tl.Tangent(make_mlp()).preflight(x[:1])
    assert report.samples == 1 and report.batch_difference is None


class WithUnused(nn.Module):
    def __init__(self, detach: bool = False):
        super().__init__()
        self.used = nn.Linear(4, 3).double()
        self.unused = nn.Linear(4, 3).double()
        self.detach = detach

    def forward(self, x):
        out = self.used(x)
        return out.detach() if self.detach else out


def test_selected_weights_that_do_nothing_are_refused_with_the_ones_that_do(mlp_data):
    x, _ = mlp_data
    t = tl.Tangent(WithUnused().eval(), params=r"^unused\.")
    msg = refused(t, x, r"params='\^unused\\\\.'.*do not affect the outputs")
    assert "unused.weight, unused.bias" in msg
    assert "Parameters that do affect them: used.weight, used.bias" in msg


def test_detached_outputs_are_refused(mlp_data):
    x, _ = mlp_data
    refused(tl.Tangent(WithUnused(detach=True).eval()), x, "No parameter of the model affects them")


def test_some_selected_weights_without_effect_are_warned(mlp_data):
    x, _ = mlp_data
    t = tl.Tangent(WithUnused().eval())
    with pytest.warns(TangentlabWarning, match="2 of the 4 selected .*unused.weight, unused.bias"):
        report = t.preflight(x)
    assert report.zero_gradient == ("unused.weight", "unused.bias")


class NanGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()
        self.a = nn.Parameter(torch.ones((), dtype=torch.double))

    def forward(self, x):
        return self.lin(x) + torch.sqrt(self.a * 0.0)  # d/da sqrt(0 a) = inf * 0 = NaN


def test_non_finite_gradients_are_refused(mlp_data):
    x, _ = mlp_data
    refused(tl.Tangent(NanGrad().eval()), x, "'a' is not finite")


def test_non_finite_outputs_are_refused(mlp_data):
    x, _ = mlp_data
    x = x.clone()
    x[2, 0] = float("nan")
    with pytest.raises(TangentlabError, match="Tangent.preflight: the model produced non-finite"):
        tl.Tangent(make_mlp()).preflight(x)


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_mlp()
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


def test_preflight_is_two_forward_passes_on_at_most_four_samples():
    model = Counting()
    x = torch.randn(50, 4, dtype=torch.double)
    tl.Tangent(model.eval()).preflight(x)
    assert model.batches == [4, 1]


@pytest.mark.slow
def test_lite0_float32_passes_quietly():
    """EfficientNet-Lite0 in eval mode, float32: batched convolutions round differently
    (~1e-6) from single-sample ones, far below the float32 tolerance (3.5e-4)."""
    from tangentlab.examples import load_example

    ex = load_example("fashion-lite0", num_samples=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = tl.Tangent(ex.model, params=ex.default_params).preflight(ex.data[0])
    assert report.batch_difference < 1e-5 and report.zero_gradient == ()


class Squeezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.lin(x).squeeze()


def test_outputs_that_lose_the_batch_of_one_are_refused(mlp_data):
    x, _ = mlp_data
    refused(tl.Tangent(Squeezed().eval()), x, r"shape \[batch, C\] = \[1, C\], got \(3,\)")
