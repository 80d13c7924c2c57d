"""The holdout benchmarks' leave-one-task-out scoring (benchmarks/holdout_limit.py)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _rows():
    """Targets of three tasks, interleaved (not in sorted task order), one without T̂."""
    spec = [("b", 12, 0.1), ("a", 9, 0.3), ("b", 11, 0.3), ("a", 8, 0.1), ("c", 10, 0.1),
            ("c", 13, 0.3), ("b", 30, 0.3)]  # fmt: skip
    rows = [dict(task=t, hb=10, T=T, drop=0.5, m=0.0, a=a, B=0, rho=1.5, loss="mse",
                 kernel=dict(kind="image" if t == "b" else "text"))
            for t, T, a in spec]  # fmt: skip
    rows[-1]["hb"] = None  # a forecast that never reaches the target
    return rows


def test_left_out_errors_come_back_in_the_order_of_the_targets():
    """Callers zip the results with their rows (the image/text columns of the candidates
    tables): each result must belong to the row at its position, whatever the task order."""
    import holdout_limit as hl

    rows = _rows()
    res = hl._cand_loto(rows, ())
    assert len(res) == len(rows)
    assert [r["task"] for r in res] == [r["task"] for r in rows]
    assert math.isinf(res[-1]["err"]) and not res[-1]["inside"]
    assert all(math.isfinite(r["err"]) for r in res[:-1])


def test_exact_top_band_rule_takes_the_narrowest_level_that_covers_left_out_tasks():
    import twolayer as tw

    # four tasks; residual log(T / T̂) spread ±0.1 on each, one miss on task "d"
    rows = []
    for i, task in enumerate("abcd"):
        for k in range(20):
            t_hat = 100 * math.exp(0.1 * ((k % 5) - 2) / 2 + 0.01 * i)
            rows.append(dict(task=task, loss="mse", batch="full", T=100, et=t_hat))
    rows.append(dict(task="d", loss="mse", batch="full", T=100, et=None))
    res = tw.choose_band(rows)
    assert res["chosen"] in tw.BAND_LEVELS
    t = res["candidates"][res["chosen"]]["table"][("mse", "full")]
    assert t["n"] == 81 and t["loto"] >= tw.BAND_COVER and math.isfinite(t["hi"])
    narrower = [lv for lv in tw.BAND_LEVELS if lv[0] > res["chosen"][0]]
    assert all(not res["candidates"][lv]["ok"] for lv in narrower)


def test_exact_top_steps_band_is_the_rule_on_the_stored_development_grid():
    import twolayer as tw
    from tangentlab.experimental.exact_top import STEPS_BAND, STEPS_BAND_FLAGGED

    res = tw.choose_bands()
    table = res["calm"]["candidates"][res["calm"]["chosen"]]["table"]
    assert len(table) == len(STEPS_BAND) == 4
    for (loss, batch), t in table.items():
        lo, hi = STEPS_BAND[(loss, batch == "full")]
        assert abs(lo - t["lo"]) <= 0.005 and abs(hi - t["hi"]) <= 0.005
    (t,) = res["flagged"]["candidates"][res["flagged"]["chosen"]]["table"].values()
    assert abs(STEPS_BAND_FLAGGED[0] - t["lo"]) <= 0.005
    assert abs(STEPS_BAND_FLAGGED[1] - t["hi"]) <= 0.005 and math.isfinite(t["hi"])
    assert min(t["kinds"].values()) >= tw.BAND_COVER  # misses counted outside


def test_exact_top_vector_calibration_is_the_rule_at_the_cap_on_the_stored_grids():
    """NOTE [exact-top vector z]: DRIFT_VECTOR and STEPS_BAND_VECTOR are the drift and band
    rules at q = min(32C, 128) on the stored development grids and rounds 11-13
    (PLAN-fresh14.md's candidate, frozen as ``twolayer.FRESH14_CAL``); the flagged band,
    which no level reaches there, stays the library's. PLAN-fresh12.md's (at q = 32C, the
    eleventh round beside the development grids) is still its rule's."""
    import twolayer as tw
    from tangentlab.experimental.exact_top import (
        DRIFT_VECTOR,
        STEPS_BAND_FLAGGED,
        STEPS_BAND_VECTOR,
    )

    cal = tw.candidate_calibration("32Cmax128", tw.FRESH14_EXTRA)
    assert cal == tw.FRESH14_CAL
    assert cal["drift"] == DRIFT_VECTOR and cal["bands"] == STEPS_BAND_VECTOR
    assert cal["flagged"] == STEPS_BAND_FLAGGED
    assert tw.candidate_calibration() == tw.FRESH12_CAL


def test_exact_top_advised_band_is_the_rule_on_the_stored_reliable_runs():
    """STEPS_BAND_ADVISED: the band rule on the development targets at reliable_lr's rate;
    a narrower level misses the coverage the rule asks for."""
    import twolayer as tw
    import twolayer_reliable as tr
    from tangentlab.experimental.exact_top import STEPS_BAND_ADVISED

    res = tr.choose_advised_band()
    assert res["n"] >= 70 and res["chosen"] is not None
    c = res["candidates"][res["chosen"]]
    assert abs(STEPS_BAND_ADVISED[0] - c["lo"]) <= 0.005
    assert abs(STEPS_BAND_ADVISED[1] - c["hi"]) <= 0.005
    assert c["loto"] >= tw.BAND_COVER
    narrower = [lv for lv in tw.BAND_LEVELS if lv[0] > res["chosen"][0]]
    assert all(res["candidates"][lv]["loto"] < tw.BAND_COVER for lv in narrower)


def test_exact_top_reliability_threshold_is_the_rule_on_the_stored_development_grid():
    import twolayer as tw
    from tangentlab.experimental.exact_top import REBOUND_MAX

    res = tw.choose_check()
    assert res["chosen"] == REBOUND_MAX
    best = res["table"][REBOUND_MAX]["f1"]
    assert all(s["f1"] <= best for s in res["table"].values())


def test_exact_top_check_rule_takes_the_threshold_of_largest_f1():
    import twolayer as tw

    # bad targets have R in {0.25, 0.4}, good ones R in {0, 0.05, 0.17}: only 0.2 separates them
    rows = [dict(task=t, R=r, bad=r > 0.2) for t in "abc" for r in (0.0, 0.05, 0.17, 0.25, 0.4)]
    res = tw.choose_check(rows)
    assert res["chosen"] == 0.2
    s = res["table"][0.2]
    assert (s["flagged"], s["tp"], s["precision"], s["recall"], s["calm_bad"]) == (6, 6, 1, 1, 0)
    assert res["loto"]["precision"] == 1 and res["loto"]["recall"] == 1
    assert res["table"][0.01]["precision"] == pytest.approx(6 / 12)


def _toy_exact_top():
    """The exact-top kernel of a small tanh body and top on 10 samples, 3 classes; CE at
    lr 2-3 runs past its stability limit and climbs back."""
    import torch
    from torch import nn

    from tangentlab.experimental import exact_top as et

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)).double().eval()
    top = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.arange(10) % 3
    return et.compute_exact_top_kernel(body, top, (x, y), progress=False)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_stored_catapult_paths_are_the_library_forecast(batch_size):
    """benchmarks/twolayer_flagged.py stores the catapult paths that twolayer.grid_rows reads
    for grids made before the catapult: per step, the library's forecast with that β, and
    the T̂ read from them is the forecast's."""
    import math
    import warnings

    import numpy as np

    import tangentlab as tl
    import twolayer as tw
    import twolayer_flagged as tfl
    from tangentlab.experimental import exact_top as et

    etk = _toy_exact_top()
    cell = dict(batch_size=batch_size, lr=2.0, momentum=0.0, loss="ce", fc_steps=40)
    stored = tfl.catapult(etk, cell, stop_below=0.0)[f"beta{et.CATAPULT:g}"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fc = et.forecast_exact_top(etk, tl.SGD(2.0), 40, loss="ce", batch_size=batch_size,
                                   seed=tw.GRID_SEED, log_every=1 if batch_size is None else 2,
                                   progress=False)  # fmt: skip
    assert fc.reliability["catapults"]  # the path shrank
    curve = stored["curve"]
    np.testing.assert_array_equal([curve[int(t)] for t in fc.steps], fc.loss)
    assert all(v is None for t, v in enumerate(curve) if t not in set(fc.steps.tolist()))
    for d in (0.3, 0.5, 0.8):
        assert tw._first_below(curve, (1 - d) * curve[0]) == fc.steps_to_drop(d)
    assert not math.isnan(curve[-1])


def test_rising_catapult_shrinks_again_while_the_loss_still_climbs():
    """benchmarks/twolayer_flagged.py's "rising" candidate: the catapult's first shrink is
    the library's; then it shrinks again at each read step whose loss is above the last."""
    import numpy as np

    from tangentlab.experimental import exact_top as et

    etk = _toy_exact_top()
    lossf = et.as_loss("ce", "test")
    runs = {}
    for rising in (False, True):
        shrunk: list[int] = []
        steps, loss, _, _ = et._path(etk, lossf, np.full(40, 3.0), 0.0, 0.0, None, 1, None,
                                     False, 0.5, shrunk, while_rising=rising)  # fmt: skip
        runs[rising] = (np.asarray(loss), shrunk)
    (once, s_once), (again, s_again) = runs[False], runs[True]
    first = s_once[0]
    assert s_again[0] == first
    np.testing.assert_array_equal(again[: first + 1], once[: first + 1])
    assert len(s_again) > len(s_once)  # the climb went on past the first shrink
    for t in s_again[1:]:  # each further shrink: an excursion, still rising or a new one
        assert again[t] > again[:t].min() + et.REBOUND_MAX * again[0]
        new = again[t - 1] <= again[: t - 1].min() + et.REBOUND_MAX * again[0]
        assert again[t] > again[t - 1] or new


def test_recovering_catapult_is_the_catapult_whose_shrink_wears_off():
    """benchmarks/twolayer_flagged.py's "recover" candidate: the same path up to the first
    shrink; after it, ln(scale) relaxes by 1 − ρ a step, so the path lies between the
    catapult's (ρ = 0) and the fixed kernel's, and ρ = 1 is the fixed kernel itself."""
    import numpy as np

    from tangentlab.experimental import exact_top as et

    etk = _toy_exact_top()
    lossf = et.as_loss("ce", "test")

    def path(beta: float, rho: float) -> tuple[np.ndarray, list[int]]:
        shrunk: list[int] = []
        _, loss, _, _ = et._path(etk, lossf, np.full(40, 3.0), 0.0, 0.0, None, 1, None,
                                 False, beta, shrunk, recover=rho)  # fmt: skip
        return np.asarray(loss), shrunk

    (cat, s_cat), (rec, s_rec) = path(0.5, 0.0), path(0.5, 0.2)
    fixed, _ = path(1.0, 0.0)
    first = s_cat[0]
    assert s_rec[0] == first
    np.testing.assert_array_equal(rec[: first + 1], cat[: first + 1])
    assert not np.allclose(rec[first + 2:], cat[first + 2:])  # it wore off
    np.testing.assert_array_equal(path(0.5, 1.0)[0], fixed)  # scale back to 1 at once


def test_noise_floor_scores_a_rerun_like_a_forecast_of_the_stored_run():
    """benchmarks/twolayer_chaos.py: a perturbed real run, logged every 2 steps and stopped
    at its own 90% drop, is read as a per-step forecast curve of the stored run; the stored
    run itself scores T̂ = T at every drop, and a run 2 steps slower scores T + 2."""
    import holdout as ho
    import twolayer_chaos as tc
    from forecast_accuracy import _targets

    steps = list(range(0, 42, 2))
    loss = [1.0 * 0.9 ** t for t in steps]  # 50% at 8, 80% at 16, 90% at 22
    c = dict(run_steps=steps, run_loss=loss, batch_size=32)
    c["same"] = tc._per_step(steps, loss)
    c["late"] = tc._per_step([s + 2 for s in steps], loss)
    c["late"][0] = loss[0]
    same, late = _targets(c, ho.DROPS, "same"), _targets(c, ho.DROPS, "late")
    assert [same[f"{d:g}"]["T"] for d in ho.DROPS] == [8, 16, 22]
    assert all(same[k]["T_hat"] == same[k]["T"] for k in same)
    assert all(late[k]["T_hat"] == late[k]["T"] + 2 for k in late)
    assert tc._perturbations(c, False) == ["seed", "lr+1%"]
    assert tc._perturbations(c, True) == ["seed"]
    assert tc._perturbations(dict(c, batch_size=None), False) == ["lr+1%"]


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_sharpness_is_the_top_gauss_newton_eigenvalue_in_weight_space(loss):
    """exact_top._Sharpness (benchmarks/twolayer_flagged.py's "pin" candidate): the power
    iteration in (z, θ) gives the top eigenvalue of the Gauss-Newton matrix Aᵀ H_f A of the
    network in its weights (A = ∂f/∂(w_body, θ) by autograd, H_f the mean loss's Hessian in
    the logits), and its block share S_b is s dS/ds, the block's columns of A scaled by √s."""
    import numpy as np
    import torch
    from torch import nn
    from torch.func import functional_call, jacrev

    from tangentlab.experimental import exact_top as et

    torch.manual_seed(1)
    body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double().eval()
    top = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.arange(9) % 3
    etk = et.compute_exact_top_kernel(body, top, (x, y), directions="all", progress=False)
    lossf = et.as_loss(loss, "test")
    bp, tp = dict(body.named_parameters()), dict(top.named_parameters())

    def net(b: dict, t: dict) -> torch.Tensor:
        return functional_call(top, t, (functional_call(body, b, (x,)),))

    jb, jt = jacrev(net, argnums=(0, 1))(bp, tp)
    flat = lambda j: torch.cat([v.reshape(27, -1) for v in j.values()], 1)  # noqa: E731
    a_b, a_t = flat(jb).detach(), flat(jt).detach()
    f0 = net(bp, tp).detach()
    h_f = torch.func.hessian(lambda f: lossf.per_sample(f.reshape(9, 3), y).mean())(
        f0.reshape(-1))  # [27, 27]

    def top_eig(s: float) -> float:
        a = torch.cat([a_b * s**0.5, a_t], 1)
        return float(torch.linalg.eigvalsh(a.T @ h_f @ a)[-1])

    for s in (1.0, 0.3):
        sharp = et._Sharpness(etk, lossf, [tp[k].detach() for k in etk.top_params], warm=300)
        s_all, s_block = sharp.step(etk.z0, s)
        np.testing.assert_allclose(s_all, top_eig(s), rtol=1e-6)
        eps = 1e-5
        np.testing.assert_allclose(s_block, s * (top_eig(s + eps) - top_eig(s - eps)) / (2 * eps),
                                   rtol=1e-4)  # fmt: skip
        assert 0.0 < s_block < s_all


def test_pinned_catapult_holds_the_sharpness_below_its_share_of_the_limit():
    """benchmarks/twolayer_flagged.py's "pin" candidate: the catapult's path up to its first
    shrink; from there the block's scale is at most the catapult's, and lowered wherever
    the sharpness read at a step exceeds c x 2(1 + m)/η and the block can bring it down."""
    import numpy as np

    from tangentlab.experimental import exact_top as et

    etk = _toy_exact_top()
    lossf = et.as_loss("ce", "test")
    shrunk: list[int] = []
    _, cat, _, _ = et._path(etk, lossf, np.full(40, 3.0), 0.0, 0.0, None, 1, None, False,
                            0.5, shrunk)  # fmt: skip
    trace: list[tuple[int, float, float]] = []
    _, pin, _, _ = et._path(etk, lossf, np.full(40, 3.0), 0.0, 0.0, None, 1, None, False,
                            0.5, [], pin=0.5, sharpness=trace)  # fmt: skip
    first = shrunk[0]
    np.testing.assert_array_equal(pin[: first + 1], cat[: first + 1])
    assert trace[0][0] == first
    limit = 0.5 * 2.0 / 3.0
    assert all(s <= 0.5 + 1e-12 for _, _, s in trace)  # at most the catapult's 0.5 (or less)
    shrank = [i for i in range(1, len(trace)) if trace[i][2] < trace[i - 1][2]]
    assert shrank and all(trace[i][1] > limit for i in shrank)  # only where S was above
    assert not np.allclose(pin[first + 2:], cat[first + 2: len(pin)])


def test_twolayer_variant_names_their_q_and_projection():
    """twolayer.py's variants: "<m>C" keeps m C directions of z, "-k<k>" names the
    projection (the 64-px k study, PLAN-fresh9.md), "default" leaves both to the library."""
    import twolayer as tw

    assert tw._q("32C-k1024", 3, 1280) == 96 and tw._projection_of("32C-k1024", 4096) == 1024
    assert tw._q("32C", 3, 1280) == 96 and tw._projection_of("32C", 4096) == 4096
    assert tw._q("default", 3, 1280) is None and tw._projection_of("default", 4096) == 4096
    assert tw._q("32C", 6, 100) == 100  # never more than z's D numbers
    assert tw._q("32Cmax128", 10, 320) == 128 and tw._q("32Cmax128", 2, 320) == 64  # a cap
    assert tw._q("32Cmax128", 10, 100) == 100 and tw._q("32Cmax128-k1024", 4, 320) == 128
    assert tw.ROUND_Q["fresh9_k1024"] == "32C-k1024"


def test_the_second_text_rounds_entries_lose_the_giveaways_of_their_files(tmp_path):
    """twolayer_text2.py: a header every entry of a file carries ("BOFH excuse #N:", a
    Debian hint's header in any language) and an indented "-- author" line at the end are
    removed, so a class is not read off them; the text itself is kept."""
    import twolayer_text2 as t2

    f = tmp_path / "fortunes"
    f.write_text("BOFH excuse #1:\n\nclock speed\n%\nDebian Hint #2: You can use apt.\n%\n"
                 "Astuce Debian n° 3 : vous pouvez\n%\n-- Ora, mamãe!\n-- Sim.\n%\n"
                 "dormitory <--> dirty room\n                -- anagrama\n%\n",
                 encoding="utf-8")  # fmt: skip
    assert t2._entries(f) == ["clock speed", "You can use apt.", "vous pouvez",
                              "-- Ora, mamãe! -- Sim.", "dormitory <--> dirty room"]


def test_frozen_gates_keep_the_block_at_w0_and_drop_only_the_flips():
    """twolayer_weights.py --order gates: each ReLU6 of the trained block becomes its tangent
    at the sample's w0 pre-activation. At w0 and wherever no gate changes state the block is
    unchanged; past a flip it is the linear extension, m·x + 6·1[x0 >= 6]; ``rows`` picks the
    samples' gates; ``restore`` puts the ReLU6 back."""
    import torch
    from torch import nn
    from torch.func import functional_call

    import twolayer_weights as tww

    class Block(nn.Module):  # expand, ReLU6, scale, ReLU6, project: one ReLU6 used twice
        def __init__(self):
            super().__init__()
            self._expand_conv = nn.Linear(3, 5, bias=False)
            self._scale = nn.Parameter(torch.full((5,), 2.0))
            self._project_conv = nn.Linear(5, 2, bias=False)
            self._swish = nn.ReLU6()

        def forward(self, x):
            x = self._swish(self._expand_conv(x))
            return self._project_conv(self._swish(self._scale * x))

    torch.manual_seed(0)
    body = nn.Sequential()
    body.add_module("blk", Block())
    h = 2.0 * torch.randn(7, 3, dtype=torch.float64)
    body = body.double()
    names = ["blk._expand_conv.weight", "blk._scale", "blk._project_conv.weight"]
    w0 = tuple(dict(body.named_parameters())[n].detach().clone() for n in names)
    real = lambda w, x: functional_call(body, dict(zip(names, w)), (x,))  # noqa: E731
    z0 = real(w0, h)
    gates = tww._FrozenGates(body, names, h, w0)
    assert body.blk._swish is gates
    torch.testing.assert_close(real(w0, h), z0)  # unchanged at w0
    gates.rows = torch.tensor([4, 1])
    torch.testing.assert_close(real(w0, h[[4, 1]]), z0[[4, 1]])
    gates.rows = None
    # far from w0 gates flip: the frozen block is the linear extension of each gate
    w = (3.0 * w0[0], w0[1] + 1.0, w0[2])
    pre1 = h @ w0[0].T
    m1, c1 = ((pre1 > 0) & (pre1 < 6)).double(), 6.0 * (pre1 >= 6).double()
    a1 = m1 * (h @ w[0].T) + c1
    pre2 = w0[1] * (m1 * pre1 + c1)
    m2, c2 = ((pre2 > 0) & (pre2 < 6)).double(), 6.0 * (pre2 >= 6).double()
    want = (m2 * (w[1] * a1) + c2) @ w[2].T
    torch.testing.assert_close(real(w, h), want)
    gates.restore()
    assert isinstance(body.blk._swish, nn.ReLU6)
    assert not torch.allclose(real(w, h), want)  # the real block flips: it differs


def test_projected_second_order_is_the_blocks_taylor_series_in_the_subspace():
    """twolayer_weights.py --order 2p: z0 + A c + ½ B[c, c] is the body at w0 + P c to second
    order (the error falls as |c|³), A is the body's Jacobian along P, B is symmetric."""
    import torch
    from torch import nn
    from torch.func import functional_call, jvp

    import twolayer_weights as tww

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    names = ["0.weight", "2.weight"]
    w0 = [dict(body.named_parameters())[n].detach().clone() for n in names]
    h = torch.randn(5, 3, dtype=torch.float64)
    sizes = [v.numel() for v in w0]
    P = torch.linalg.qr(torch.randn(sum(sizes), 3, dtype=torch.float64))[0]
    z0, A, B, _ = tww._projected(body, names, h, P)
    assert A.shape == (5, 2, 3) and B.shape == (5, 2, 3, 3)
    torch.testing.assert_close(B, B.transpose(2, 3))

    def real(c):
        d = (P @ c).split(sizes)
        return functional_call(body, {n: b + e.reshape(b.shape)
                                      for n, b, e in zip(names, w0, d)}, (h,))

    c1 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    torch.testing.assert_close(A @ c1, jvp(real, (torch.zeros(3, dtype=torch.float64),),
                                           (c1,))[1])
    errs = []
    for s in (1e-1, 5e-2):
        c = s * c1
        approx = z0 + A @ c + 0.5 * torch.einsum("ndkl,k,l->nd", B, c, c)
        errs.append(float((real(c) - approx).abs().max()))
    assert errs[1] < errs[0] / 6  # third order: halving c divides the error by about 8


def test_snapshots_keep_at_most_cap_evenly_thinned():
    """twolayer_weights.py --order 2p keeps at most 256 Δw of a long path, every stride-th."""
    import twolayer_weights as tww

    s = tww._Snapshots(cap=4)
    for i in range(11):
        s.append(i)
    assert s.items == [0, 4, 8] and s.stride == 4
    s = tww._Snapshots(cap=4)
    for i in range(4):
        s.append(i)
    assert s.items == [0, 1, 2, 3]
