"""Exact kernels from layer inputs and output gradients (tangentlab.gram) against a
brute-force per-sample autograd kernel, on every covered layer type."""

import warnings

import pytest
import torch
from torch import nn

import tangentlab as tl
from conftest import make_transformer
from tangentlab import compute, gram, linalg
from tangentlab.errors import VmapFallbackWarning
from tangentlab.structured import Unsupported


def brute_force_theta(model, x, names):
    """Theta [N C, N C] from one autograd.grad call per (sample, output)."""
    params = [p for n, p in model.named_parameters() if n in names]
    n = x["input_ids"].shape[0] if isinstance(x, dict) else x.shape[0]
    rows = []
    for i in range(n):
        xi = {k: v[i : i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i : i + 1]
        out = model(**xi)[0] if isinstance(xi, dict) else model(xi)[0]
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], params, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    jac = torch.stack(rows)
    return jac @ jac.T, jac


class Tokens(nn.Module):
    """Linear layers on [B, L, d] tokens, layer norm, a bias-free linear, a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        return self.head(torch.tanh(self.mix(h)).mean(1))


def _bn(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def conv2d_net():
    return _bn(nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),  # depthwise, dilated
        nn.Conv2d(4, 6, (3, 2), groups=2, bias=False), nn.Tanh(),  # grouped
        nn.Conv2d(6, 5, 1, stride=(1, 2)),  # 1x1 strided
        nn.Flatten(), nn.Linear(5 * 3 * 2, 3),
    ))  # fmt: skip


def conv1d_net():
    return _bn(nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1), nn.BatchNorm1d(4), nn.Tanh(),
        nn.Conv1d(4, 4, 3, padding=2, dilation=2, groups=4),
        nn.Conv1d(4, 5, 2, bias=False), nn.Flatten(), nn.Linear(5 * 5, 3),
    ))  # fmt: skip


def mlp():
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.BatchNorm1d(7), nn.Linear(7, 3))


def _data(shape, seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.double)
    return x, torch.randint(0, 3, (n,), generator=g)


CASES = {
    "mlp": (mlp, (4,)),
    "tokens": (Tokens, (4, 5)),
    "conv2d": (conv2d_net, (2, 9, 10)),
    "conv1d": (conv1d_net, (3, 11)),
}


def _model(name):
    torch.manual_seed(3)
    factory, shape = CASES[name]
    return _bn(factory()).double().eval(), _data(shape)


def _kernel(model, data, **kw):
    return tl.compute_kernel(model, data, progress=False, **kw)


def _gram_kernel(t, data, monkeypatch):
    """The kernel by the gram path, failing if any per-sample Jacobian is formed."""

    def no_jacobians(*args, **kwargs):
        raise AssertionError("the gram path formed per-sample Jacobians")

    monkeypatch.setattr(t, "jacobian_blocks", no_jacobians)
    k = _kernel(t, data)
    assert t.jacobian_mode == "gram"
    return k


@pytest.mark.parametrize("order", [None, "pairs", "grads", "grads-blocks", "pairs-blocks"])
@pytest.mark.parametrize("name", list(CASES))
def test_gram_kernel_equals_brute_force(name, order, monkeypatch):
    """Every layer type, both contraction orders (NOTE [gram contraction order]), with
    f0 and J w0; no [B, C, P] Jacobian is formed. ``grads-blocks``: one-sample gradient
    blocks (NOTE [gram gradient blocks]) and 2-row blocks of the symmetric products;
    ``pairs-blocks``: the symmetric products of dense layers and one-position pairs in
    blocks of one sample (upper triangle, mirrored)."""
    if order in ("grads-blocks", "pairs-blocks"):
        monkeypatch.setattr(gram, "_REFORM_SHARE", 1e9)
        monkeypatch.setattr(linalg, "SYRK_ROWS", 2)
        order = order.split("-")[0]
    if order is not None:
        monkeypatch.setattr(gram, "_choose", lambda *args: order)
    model, (x, y) = _model(name)
    t = tl.Tangent(model)
    k = _gram_kernel(t, (x, y), monkeypatch)
    theta, jac = brute_force_theta(model, x, set(t.param_names))
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(k.jw0, (jac @ w0).reshape(x.shape[0], -1))
    torch.testing.assert_close(k.f0, model(x))


@pytest.mark.parametrize(
    "name,params",
    [
        ("conv2d", r"^(0|3)\."),  # first conv + depthwise (both with bias)
        ("conv2d", r"\.bias$"),  # biases alone: the weights are frozen
        ("tokens", r"^(norm|mix)\."),  # layer norm and a bias-free linear
        ("mlp", r"^(0\.weight|3\.bias)$"),  # a weight without its bias, a lone bias
    ],
)
def test_gram_kernel_of_a_params_subset(name, params):
    model, (x, y) = _model(name)
    t = tl.Tangent(model, params=params)
    k = _kernel(t, (x, y))
    assert t.jacobian_mode == "gram"
    theta, _ = brute_force_theta(model, x, set(t.param_names))
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)


def test_gram_strips_and_chunks_equal_one_pass(monkeypatch):
    """Row strips smaller than N (columns recomputed chunk by chunk) give the same kernel."""
    model, _ = _model("tokens")
    x, y = _data((4, 5), seed=1, n=11)
    whole = _kernel(tl.Tangent(model), (x, y))
    monkeypatch.setattr(gram, "_BLOCK_ELEMENTS", 64)  # sub-blocks inside each contraction
    strips = []

    def counted(*args, **kwargs):
        strips.append(args[3:5])  # (s, e)
        assert kwargs["held"] < 1000  # the plan's room: gradient blocks of a few samples
        return gram.kernel_rows(*args, **kwargs)

    monkeypatch.setattr(compute, "kernel_rows", counted)
    small = _kernel(tl.Tangent(model), (x, y), memory_budget=40_000)
    assert len(strips) > 1 and all(e - s < 11 for s, e in strips)
    torch.testing.assert_close(small.theta, whole.theta, rtol=1e-10, atol=1e-12)
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(small.theta, theta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("trace,order", [(True, None), (True, "pairs"), (True, "grads"), (2, None)])
def test_gram_trace_kernel_equals_the_jacobian_path(trace, order, monkeypatch):
    """The trace kernel contracts the outputs' diagonal blocks only (gram._folded)."""
    model, (x, y) = _model("conv2d")
    if order is not None:
        monkeypatch.setattr(gram, "_choose", lambda *args: order)
    k = _kernel(tl.Tangent(model), (x, y), trace=trace)
    ref = _kernel(tl.Tangent(model, jacobian_mode="structured"), (x, y), trace=trace)
    assert k.is_trace and k.theta.shape == (5, 5)
    torch.testing.assert_close(k.theta, ref.theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k.jw0, ref.jw0)
    if trace is True:  # the exact trace kernel: tr(Theta_ij) / C
        theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
        blocks = theta.view(5, 3, 5, 3).diagonal(dim1=1, dim2=3).sum(-1) / 3
        torch.testing.assert_close(k.theta, blocks, rtol=1e-10, atol=1e-12)


class RawWeight(nn.Module):
    """A trainable weight used by ``torch.matmul`` (not a covered call), then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w))


def test_partly_covered_model_is_split(monkeypatch):
    """A trainable weight used by ``torch.matmul`` (not covered): auto computes Theta as
    the gram kernel of the covered weights plus the Jacobian kernel of that one weight."""
    torch.manual_seed(0)
    model = RawWeight().double().eval()
    x, y = _data((4,), n=6)
    seen = []
    real = tl.Tangent.jacobian_blocks
    monkeypatch.setattr(
        tl.Tangent, "jacobian_blocks", lambda t, xb: seen.append(t.param_names) or real(t, xb)
    )
    t = tl.Tangent(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmapFallbackWarning)
        k = _kernel(t, (x, y))
    assert seen and all(names == ["w"] for names in seen)  # Jacobians of "w" alone
    theta, jac = brute_force_theta(model, x, {"w", "head.weight", "head.bias"})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(k.jw0, (jac @ w0).reshape(6, 3))
    tr = _kernel(tl.Tangent(model), (x, y), trace=True)  # the trace kernel, split too
    blocks = theta.view(6, 3, 6, 3).diagonal(dim1=1, dim2=3).sum(-1) / 3
    torch.testing.assert_close(tr.theta, blocks, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr.jw0, k.jw0)


def test_transformer_with_embedding_is_split_and_exact(text_data):
    """nn.MultiheadAttention's fused in-projection is not covered: it goes to the Jacobian
    part; the embedding, head, feed-forward and norms to the gram part."""
    x, y = text_data
    model = make_transformer()
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    t = tl.Tangent(model, jacobian_mode="gram")
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmapFallbackWarning)
        k = _kernel(t, (x, y))
    assert t.jacobian_mode == "gram"
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)


def test_nothing_covered_falls_back_to_jacobians():
    """Only a weight used by ``torch.matmul`` trainable: auto takes the Jacobian path
    silently; an explicit "gram" says so and falls back; both exact."""
    torch.manual_seed(0)
    model = RawWeight().double().eval()
    x, y = _data((4,), n=5)
    theta, _ = brute_force_theta(model, x, {"w"})
    auto = tl.Tangent(model, params=r"^w$")
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmapFallbackWarning)
        k = _kernel(auto, (x, y))
    assert auto.jacobian_mode not in ("gram", "auto")
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
    asked = tl.Tangent(model, params=r"^w$", jacobian_mode="gram")
    with pytest.warns(VmapFallbackWarning, match="'gram' does not cover"):
        k = _kernel(asked, (x, y))
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)


def test_contraction_order_follows_the_cost_model():
    """Few positions: position pairs; long sequences of wide layers: per-layer gradients
    (arguments: samples of the two chunks, their positions, d_in, d_out, C)."""
    assert gram._choose(64, 64, 1, 1, 129, 128, 10) == "pairs"  # MLP layer
    assert gram._choose(64, 64, 4, 4, 321, 1280, 10) == "pairs"  # 2x2 feature map
    assert gram._choose(64, 64, 64, 64, 385, 384, 2) == "grads"  # 64 tokens, MiniLM width
    assert gram._choose(64, 64, 1, 40, 385, 384, 2) == "pairs"  # one side a single token
    assert gram._choose(64, 64, 4, 4, 7, 6, 3) == "grads"  # narrow layer, 4 tokens


def test_positions_without_gradient_are_dropped():
    """Only token 0 reaches the head: the factors keep one position, the kernel is exact."""

    class FirstToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.inp(x))[:, 0])

    torch.manual_seed(0)
    model = FirstToken().double().eval()
    x, y = _data((7, 5), n=4)
    t = tl.Tangent(model)
    fac = t.gram_factors(x)
    assert [layer.u.shape[1] for layer in fac.layers] == [1, 1]
    k = _kernel(t, (x, y))
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)


def test_zero_columns_differing_between_chunks():
    """Per-sample gradients with columns zero in one chunk only (dead ReLU inputs of a
    depthwise convolution; 8 of its 9 taps see padding on a 1x1 map): chunks keep
    different columns, their products use the common ones, exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Flatten(), nn.Linear(4, 3)
    ).double().eval()  # fmt: skip
    x, y = _data((4, 1, 1), n=6)
    x[:3, 0] = -x[:3, 0].abs()  # channel 0 dead in the first chunk
    x[3:, 1] = -x[3:, 1].abs()  # channel 1 dead in the second
    t = tl.Tangent(model)
    first, second = t.gram_factors(x[:3]), t.gram_factors(x[3:])
    assert first.layers[0].cols.tolist() != second.layers[0].cols.tolist()
    k = _kernel(t, (x, y), batch_size=3)
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
    tr = _kernel(tl.Tangent(model), (x, y), batch_size=3, trace=True)
    blocks = theta.view(6, 3, 6, 3).diagonal(dim1=1, dim2=3).sum(-1) / 3
    torch.testing.assert_close(tr.theta, blocks, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("fashion-lite0", {"image_size": 32}),
                                          ("rt-minilm", {"seq_len": 16})])  # fmt: skip
def test_gram_kernel_on_the_real_tops(name, options):
    """EfficientNet-Lite0 (block 15 + head) and MiniLM (layer 5 + pooler + classifier),
    float64: the gram kernel equals the structured Jacobians' kernel."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _split import cached_inputs
    from tangentlab.examples import load_example

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = load_example(name, num_samples=6, **options)
    top, xt, _ = cached_inputs(name, ex.model, ex.X)
    top = top.double()
    xt = {k: v.double() for k, v in xt.items()} if isinstance(xt, dict) else xt.double()
    t = tl.Tangent(top, params=ex.default_params)
    k = _kernel(t, (xt, ex.y))
    assert t.jacobian_mode == "gram"
    jac = tl.Tangent(top, params=ex.default_params, jacobian_mode="structured").jacobian(xt)
    j2 = jac.reshape(-1, jac.shape[-1])
    torch.testing.assert_close(k.theta, j2 @ j2.T, rtol=1e-10, atol=1e-10)


class Embeddings(nn.Module):
    """Word (with ``padding_idx``), position and token-type embeddings summed, a layer
    norm, a token-wise linear and a head on token 0 and the mean: BERT's input layer."""

    def __init__(self, vocab: int = 9, length: int = 6, pad: int = 0) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, 5, padding_idx=pad)
        self.pos = nn.Embedding(length, 5)
        self.segment = nn.Embedding(2, 5)
        self.norm = nn.LayerNorm(5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(10, 3)

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        h = self.norm(self.word(input_ids) + self.pos(pos) + self.segment(token_type_ids))
        h = torch.tanh(self.mix(h))
        return self.head(torch.cat([h[:, 0], h.mean(1)], dim=1))


def _token_data(n=7, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 5, (n, length), generator=g)  # few ids: many repeats and matches
    ids[:, -2:] = 0  # padding (padding_idx = 0): no gradient into that row
    ids[0, 1] = 0
    types = torch.randint(0, 2, (n, length), generator=g)
    return {"input_ids": ids, "token_type_ids": types}, torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("pad", [0, -9, None])
def test_embeddings_in_the_gram_path_equal_brute_force(pad, monkeypatch):
    """Word / position / token-type embeddings (NOTE [gram embeddings]): repeated ids in a
    sample, ids shared across samples, padding_idx (also negative, and none); Theta, J w0,
    and the trace kernel, with no Jacobian formed; row strips and small match blocks too."""
    torch.manual_seed(4)
    model = Embeddings(pad=pad if pad is not None else 0).double().eval()
    if pad is None:
        model.word.padding_idx = None
    x, y = _token_data()
    t = tl.Tangent(model)
    k = _gram_kernel(t, (x, y), monkeypatch)
    theta, jac = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(k.jw0, (jac @ w0).reshape(7, 3))
    tr = _kernel(tl.Tangent(model), (x, y), trace=True)
    blocks = theta.view(7, 3, 7, 3).diagonal(dim1=1, dim2=3).sum(-1) / 3
    torch.testing.assert_close(tr.theta, blocks, rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(gram, "_BLOCK_ELEMENTS", 16)  # a few matched rows per block
    strips = []
    real = gram.kernel_rows
    monkeypatch.setattr(
        compute, "kernel_rows", lambda *a, **kw: strips.append(a[3:5]) or real(*a, **kw)
    )
    small = _kernel(tl.Tangent(model), (x, y), memory_budget=40_000)
    assert len(strips) > 1  # strips of a few samples against later chunks
    torch.testing.assert_close(small.theta, theta, rtol=1e-10, atol=1e-12)


def test_embedding_structured_jacobian_equals_autograd():
    """The structured mode's per-sample embedding gradient (ids scattered to rows)."""
    torch.manual_seed(4)
    model = Embeddings().double().eval()
    x, y = _token_data(n=4)
    k = _kernel(tl.Tangent(model, jacobian_mode="structured"), (x, y))
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}])
def test_embedding_options_outside_the_gram_path_are_split_off(option):
    """max_norm (renormalizes the weight in place) and scale_grad_by_freq (batch
    dependent) are not covered: that embedding's part comes from the Jacobian path."""
    torch.manual_seed(4)
    model = Embeddings().double().eval()
    for key, value in option.items():
        setattr(model.pos, key, value)
    x, y = _token_data(n=4)
    t = tl.Tangent(model)
    covered = t.gram_covered({k: v[:1] for k, v in x.items()})
    assert "pos.weight" not in covered and "word.weight" in covered
    if "max_norm" in option:  # renormalization is not differentiable per sample here
        return
    k = _kernel(t, (x, y))
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)


class BroadcastPositions(Embeddings):
    """BERT's layout: position ids ``[1, S]``, their embedding broadcast across samples."""

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)  # [1, S]: no batch dimension
        h = self.norm(self.word(input_ids) + self.pos(pos) + self.segment(token_type_ids))
        h = torch.tanh(self.mix(h))
        return self.head(torch.cat([h[:, 0], h.mean(1)], dim=1))


def test_layer_on_a_tensor_broadcast_across_samples_is_split_off():
    """An embedding of ids [1, S] (one output shared by every sample) has no per-sample
    output gradient: its part of Theta comes from Jacobians; never a silent mix of the
    samples' gradients. Two samples are needed to see it (one looks batched)."""
    torch.manual_seed(4)
    model = BroadcastPositions().double().eval()
    x, y = _token_data(n=5)
    t = tl.Tangent(model)
    assert "pos.weight" in t.gram_covered({k: v[:1] for k, v in x.items()})
    assert "pos.weight" not in t.gram_covered({k: v[:2] for k, v in x.items()})
    with pytest.raises(Unsupported, match="first dimension is not the batch"):
        t.gram_factors({k: v[:2] for k, v in x.items()})
    k = _kernel(t, (x, y))
    theta, jac = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(k.jw0, (jac @ w0).reshape(5, 3))


class SequenceFirst(nn.Module):
    """A token-wise linear applied in a sequence-first layout ``[S, B, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):  # x [B, S, 5]
        h = torch.tanh(self.mix(x.transpose(0, 1)))  # [S, B, 6]
        return self.head(h.mean(0))


@pytest.mark.parametrize("mode", ["auto", "structured"])
def test_sequence_first_layout_is_exact(mode):
    """A layer whose output is [S, B, d] is not read as [B, S, d] (that would mix the
    samples' gradients silently): its weights take the Jacobian path, Theta is exact."""
    torch.manual_seed(0)
    model = SequenceFirst().double().eval()
    x, y = _data((4, 5), n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VmapFallbackWarning)
        k = _kernel(tl.Tangent(model, jacobian_mode=mode), (x, y))
    theta, _ = brute_force_theta(model, x, {n for n, _ in model.named_parameters()})
    torch.testing.assert_close(k.theta, theta, rtol=1e-10, atol=1e-12)
