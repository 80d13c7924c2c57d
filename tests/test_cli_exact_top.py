"""``tangentlab forecast --linearize top``: the exact-top model from the command line
(tangentlab.experimental.exact_top), on a user's model and split and on the image example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tangentlab.cli import TOP_PROJECTION
from test_cli import assert_png, assert_self_contained_html, invoke, ok, strict_json

NET = '''
import torch
from torch import nn


def make(num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, num_classes)).eval()


def split(model):
    return model[:2], model[2:]


def wrong(model):
    return model[:2], model[3:]


def single(model):
    return model
'''


@pytest.fixture()
def user(tmp_path):
    """(module file, data file) of a small user model with a split function."""
    mod = tmp_path / "mynet.py"
    mod.write_text(NET)
    rng = np.random.default_rng(0)
    npz = tmp_path / "train.npz"
    np.savez(npz, X=rng.standard_normal((24, 6)).astype(np.float32),
             y=np.arange(24, dtype=np.int64) % 3)  # fmt: skip
    return mod, npz


def _args(user, *more):
    mod, npz = user
    return ("forecast", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
            "--linearize", "top", "--split", f"{mod}:split", "--no-progress", *more)


def test_forecast_top_is_the_python_api_and_writes_its_reports(user, tmp_path):
    from tangentlab.experimental.exact_top import compute_exact_top_kernel, forecast_exact_top
    from tangentlab.specs import load_data_spec, load_model_spec

    out = tmp_path / "top"
    res = ok(invoke(*_args(user, "--lr", 0.4, "--steps", 200, "--out", out)))
    assert "importing and running that code" in res.stderr  # user code: said so
    js = strict_json(out / "forecast.json")
    assert len(js["forecasts"]) == 1 and js["drop"] == 0.8
    got = js["forecasts"][0]
    # the same forecast from Python: the split, kernel (k = 1024, as --projection auto) and path
    mod, npz = user
    model = load_model_spec(f"{mod}:make", num_classes=3).eval()
    body, top = model[:2], model[2:]
    data = load_data_spec(str(npz))
    etk = compute_exact_top_kernel(body, top, data, projection=TOP_PROJECTION, progress=False)
    import tangentlab as tl

    fc = forecast_exact_top(etk, tl.SGD(0.4), 200, progress=False)
    np.testing.assert_allclose(got["loss"], fc.loss, rtol=1e-6)
    est = fc.steps_estimate(0.8)
    assert est is not None and got["drops"]["0.8"]["estimate"] == pytest.approx(est)
    assert got["drops"]["0.8"]["interval"] == pytest.approx(list(fc.steps_interval(0.8)))
    assert f"real run: estimate {est:.0f} steps" in res.stdout
    assert "check passed" in res.stdout and "advice" not in res.stdout
    assert_png(out / "forecast.png")
    assert_self_contained_html(out / "report.html", out / "forecast.png")
    assert js["info"]["model_of_training"].startswith("exact top, block linear")


def test_forecast_top_default_lr_is_half_the_models_limit(user, tmp_path):
    from tangentlab.experimental import exact_top as et
    from tangentlab.specs import load_data_spec, load_model_spec

    out = tmp_path / "lr"
    res = ok(invoke(*_args(user, "--momentum", 0.5, "--steps", 10, "--out", out)))
    mod, npz = user
    model = load_model_spec(f"{mod}:make", num_classes=3).eval()
    etk = et.compute_exact_top_kernel(model[:2], model[2:], load_data_spec(str(npz)),
                                      projection=TOP_PROJECTION, progress=False)  # fmt: skip
    lr = et.stable_lr(etk, loss="mse", momentum=0.5)
    assert f"using lr = {lr:.4g} (exact_top.stable_lr" in res.stderr
    assert strict_json(out / "forecast.json")["forecasts"][0]["settings"]["lr"] == lr


def test_forecast_top_flagged_gets_the_advice_of_reliable_lr(user, tmp_path):
    out = tmp_path / "hot"
    res = ok(invoke(*_args(user, "--loss", "ce", "--lr", 2.5, "--steps", 100, "--out", out)))
    js = strict_json(out / "forecast.json")
    first = js["forecasts"][0]
    assert first["reliability"]["flagged"] or first["blowup"] is not None
    assert "warning:" in res.stderr and "reliable_lr" in res.stderr
    assert "advice:" in res.stdout
    if len(js["forecasts"]) == 2:  # a rate passed: its forecast is in the report
        safe = js["forecasts"][1]
        assert safe["settings"]["lr"] < 2.5 and not safe["reliability"]["flagged"]
        assert safe["label"].startswith("advised: lr")
        assert f"{safe['settings']['lr']:.4g}" in res.stdout


def test_validate_top_compares_the_forecast_with_the_real_run(user, tmp_path):
    import tangentlab as tl
    from tangentlab.specs import load_data_spec, load_model_spec

    mod, npz = user
    out = tmp_path / "val"
    res = ok(invoke("validate", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                    "--linearize", "top", "--split", f"{mod}:split", "--lr", 0.4, "--steps", 200,
                    "--no-progress", "--out", out))  # fmt: skip
    js = strict_json(out / "validation.json")
    cmp = js["info"]["comparison"]
    # the real run, independently: the same model, data and SGD in torch
    run = tl.finetune(load_model_spec(f"{mod}:make", num_classes=3).eval(),
                      load_data_spec(str(npz)), tl.SGD(0.4), 200, progress=False)  # fmt: skip
    want = run.steps_to(0.2 * float(run.loss[0]))
    assert want is not None and cmp["real_steps"] == want
    np.testing.assert_allclose(js["measured"][0]["loss"], run.loss, rtol=1e-6)
    est, (lo, hi) = cmp["estimate"], cmp["interval"]
    assert cmp["steps_error"] == pytest.approx(abs(est - want) / want)
    assert cmp["inside"] == (lo <= want <= hi)
    assert f"real run {want}," in res.stdout and "curve error" in res.stdout
    assert_png(out / "validation.png")
    assert_self_contained_html(out / "validation.html", out / "validation.png")
    res = invoke("validate", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--linearize", "top", "--split", f"{mod}:split", "--bn", "train", "--lr", 0.4,
                 "--steps", 5, "--no-progress", "--out", tmp_path / "bn")  # fmt: skip
    assert res.exit_code != 0 and "drop --bn train" in res.output


def test_validate_cached_trunk_says_where_it_cannot_cut(user, tmp_path):
    """--cached-trunk needs the exact top's split and a trunk split_trunk can cut."""
    mod, npz = user
    res = invoke("validate", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--linearize", "top", "--split", f"{mod}:split", "--lr", 0.4, "--steps", 5,
                 "--cached-trunk", "--no-progress", "--out", tmp_path / "a")  # fmt: skip
    assert res.exit_code != 0 and "no frozen layers below the trained weights" in res.output
    assert "drop --cached-trunk" in res.output
    res = invoke("validate", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--linearize", "all", "--lr", 0.4, "--steps", 5, "--cached-trunk",
                 "--no-progress", "--out", tmp_path / "b")  # fmt: skip
    assert res.exit_code != 0 and "does not use the exact top (--linearize all)" in res.output
    assert "or drop --cached-trunk" in res.output


@pytest.mark.slow
def test_validate_cached_trunk_is_the_same_real_run(tmp_path):
    """fashion-lite0 at 32 px: the real run on cached trunk outputs logs the network's run."""
    runs = {}
    for tag, more in (("whole", ()), ("cached", ("--cached-trunk",))):
        out = tmp_path / tag
        res = ok(invoke("validate", "--example", "fashion-lite0", "--samples", 32,
                        "--image-size", 32, "--steps", 8, "--log-every", 1, "--out", out,
                        "--no-progress", *more))  # fmt: skip
        runs[tag] = strict_json(out / "validation.json")
    cmp = runs["cached"]["info"]["comparison"]
    assert cmp["real_run_on"] == "cached trunk outputs" and cmp["real_trunk_seconds"] > 0
    assert runs["whole"]["info"]["comparison"]["real_run_on"] == "the network"
    np.testing.assert_allclose(runs["cached"]["measured"][0]["loss"],
                               runs["whole"]["measured"][0]["loss"], rtol=1e-4)  # fmt: skip
    assert "on cached trunk outputs (+" in res.stdout


def test_forecast_top_flagged_with_a_decaying_schedule_says_to_lower_the_rate(user, tmp_path):
    from tangentlab.errors import TangentlabError
    from tangentlab.experimental import exact_top as et

    res = ok(invoke(*_args(user, "--loss", "ce", "--lr", 2.5, "--steps", 100, "--schedule",
                           "warmup-cosine", "--out", tmp_path / "cos")))  # fmt: skip
    assert "needs a schedule that ends at the full rate" in res.stderr
    assert "advice: lower --lr" in res.stdout
    assert len(strict_json(tmp_path / "cos" / "forecast.json")["forecasts"]) == 1
    with pytest.raises(TangentlabError, match="decays"):  # the library says the same
        import tangentlab as tl

        et.reliable_lr(None, tl.SGD(1.0, schedule=tl.Cosine(10)), 10)


@pytest.mark.parametrize("extra,message", [
    (("--split", "{mod}:wrong"), "differs from the model's output"),
    (("--split", "{mod}:single"), "expected a pair (body, top)"),
    (("--split", "{mod}:nope"), "has no attribute 'nope'"),
    (("--weight-decay", "0.1"), "cannot be combined with --weight-decay"),
    (("--head", "4"), "cannot be combined with --head"),
    (("--target-loss", "1e9"), "must lie between 0 and the initial loss"),
])
def test_forecast_top_refuses_bad_input_with_the_fix(user, tmp_path, extra, message):
    mod, _ = user
    args = list(_args(user, "--steps", 5, "--lr", 0.1, "--out", tmp_path / "x"))
    if extra[0] == "--split":
        args[args.index("--split") + 1] = extra[1].format(mod=mod)
    else:
        args += list(extra)
    res = invoke(*args)
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert "Traceback" not in res.output


def test_linearize_top_is_for_forecast_validate_sweep_and_needs_a_known_split(user, tmp_path):
    mod, npz = user
    res = invoke("kernel", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--linearize", "top", "--no-progress", "--out", tmp_path / "k")
    assert res.exit_code != 0 and "tangentlab kernel: --linearize top" in res.output
    assert "available for forecast, validate and sweep" in res.output
    res = invoke("forecast", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--split", f"{mod}:split", "--linearize", "all", "--lr", 0.1, "--steps", 5,
                 "--no-progress")  # fmt: skip
    assert res.exit_code != 0 and "--split goes with --linearize top (or auto)" in res.output
    res = invoke("forecast", "--example", "digits-cnn", "--samples", 20, "--linearize", "top",
                 "--lr", 0.1, "--steps", 5, "--no-progress", "--out", tmp_path / "d")
    assert res.exit_code != 0
    assert "--split 'pkg.module:function'" in res.output and "Traceback" not in res.output


def test_top_projection_is_1024():
    """--projection auto of the exact top (PLAN-fresh10.md: k = 1024 as accurate as 4096)."""
    assert TOP_PROJECTION == 1024


def test_auto_takes_the_exact_top_for_a_split_and_says_why(user, tmp_path):
    """--linearize auto (the default) with --split: the exact top, the same forecast as
    --linearize top, and the reason in the report."""
    mod, npz = user
    base = ("forecast", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
            "--split", f"{mod}:split", "--lr", 0.4, "--steps", 50, "--no-progress")
    res = ok(invoke(*base, "--out", tmp_path / "auto"))
    top = ok(invoke(*base, "--linearize", "top", "--out", tmp_path / "top"))
    a, t = (strict_json(tmp_path / d / "forecast.json") for d in ("auto", "top"))
    assert a["info"]["linearize"] == "auto: the exact top, for --split"
    assert "linearize" not in t["info"] and "split" in res.stderr and "split" in top.stderr
    np.testing.assert_allclose(a["forecasts"][0]["loss"], t["forecasts"][0]["loss"], rtol=1e-12)


def test_auto_falls_back_where_the_model_has_no_known_split(user, tmp_path):
    """--linearize auto on a model split_model does not know: not the exact top, saying why
    and how to get it, then the usual choice (head exact here)."""
    mod, npz = user
    out = tmp_path / "fb"
    res = ok(invoke("forecast", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                    "--lr", 0.4, "--steps", 20, "--no-progress", "--out", out))
    assert "not the exact top (no known split of a Sequential" in res.stderr
    assert "--linearize top --split" in res.stderr
    assert strict_json(out / "forecast.json")["info"]["linearize"].startswith(
        "auto: the head '4' kept exact")


def test_top_out_of_memory_names_the_cheaper_options(user, tmp_path):
    """Φ [N q, k] over the memory budget: one line naming a smaller projection and the
    head-exact model, no traceback."""
    res = invoke(*_args(user, "--lr", 0.4, "--steps", 5, "--memory-budget", "100000",
                        "--out", tmp_path / "m"))
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "memory budget" in res.output and "--linearize body" in res.output
    assert "--projection 256" in res.output and "fewer --directions" in res.output


@pytest.mark.parametrize("extra, why", [
    (("--optimizer", "adamw", "--lr", "1e-3"), "adamw"),
    (("--weight-decay", "0.01"), "weight decay"),
    (("--head", "_fc"), "--head"),
    (("--directions", "4"), "--directions"),
])
def test_auto_keeps_the_other_models_for_their_options(extra, why):
    """Options of the other models keep --linearize auto off the exact top, with no model
    loaded to decide (cli._auto_top)."""
    from tangentlab.cli import _auto_top

    o = {"linearize": "auto", "model_spec": None, "data_spec": None, "example": None,
         "optimizer_name": "adamw" if "adamw" in extra else "sgd",
         "weight_decay": 0.01 if why == "weight decay" else None,
         "head": "_fc" if why == "--head" else None,
         "directions": "4" if why == "--directions" else None}
    assert not _auto_top(o) and o["linearize"] == "auto"
    clean = {**o, "optimizer_name": "sgd", "weight_decay": None, "head": None,
             "directions": None}
    assert _auto_top(dict(clean))  # the default example splits
    assert not _auto_top({**clean, "example": "digits-cnn"})  # a plain CNN: no known split
    assert not _auto_top({**clean, "bn": "train"})


@pytest.mark.slow
def test_forecast_top_on_the_image_example(tmp_path):
    """fashion-lite0 by default (--linearize auto): split by split_lite, the default rate; the
    estimate within its interval."""
    out = tmp_path / "lite"
    res = ok(invoke("forecast", "--example", "fashion-lite0", "--samples", 32, "--steps", 30,
                    "--out", out, "--no-progress"))  # fmt: skip
    assert "split_lite" in res.stderr and "exact_top.stable_lr" in res.stderr
    assert "the frozen layers below them run once (split_trunk)" in res.stderr
    assert (out / "kernel" / "exact-top" / "after-trunk" / "block" / "kernel.safetensors").exists()
    js = strict_json(out / "forecast.json")
    assert js["info"]["linearize"].startswith("auto: the exact top (split_lite")
    assert js["kernel"]["trunk"] == "_LiteTrunk"  # NOTE [frozen trunk]
    d = js["forecasts"][0]["drops"]["0.8"]
    assert d["steps"] is not None and d["interval"][0] <= d["estimate"] <= d["interval"][1]
    assert js["kernel"]["directions"] == 320 and js["info"]["num_samples"] == 32  # 2C x (2 x 2)²
    assert math.isfinite(js["forecasts"][0]["loss"][-1])


@pytest.mark.slow
def test_auto_takes_the_exact_top_on_the_text_example(tmp_path):
    """rt-minilm by default (--linearize auto): split by split_minilm, tokenized inputs."""
    out = tmp_path / "text"
    res = ok(invoke("forecast", "--example", "rt-minilm", "--samples", 16, "--steps", 10,
                    "--out", out, "--no-progress"))  # fmt: skip
    assert "split_minilm" in res.stderr and "run once (split_trunk)" in res.stderr
    js = strict_json(out / "forecast.json")
    assert js["info"]["linearize"].startswith("auto: the exact top (split_minilm")
    assert js["kernel"]["trunk"] == "_BertTrunk"  # NOTE [frozen trunk]
    assert js["info"]["num_samples"] == 16 and math.isfinite(js["forecasts"][0]["loss"][-1])


def _sweep(user, out, *more):
    mod, npz = user
    return ok(invoke("sweep", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                     "--split", f"{mod}:split", "--no-progress", "--out", out, *more))


def test_sweep_auto_takes_the_exact_top_and_ranks_like_the_python_api(user, tmp_path):
    """sweep with --split (auto): the exact top's sweep, every row the Python API's, ranked
    by the estimate; its reports written; a rerun restores every setting from the cache."""
    import tangentlab as tl
    from tangentlab.experimental.exact_top import compute_exact_top_kernel, sweep_exact_top
    from tangentlab.specs import load_data_spec, load_model_spec

    out = tmp_path / "sw"
    res = _sweep(user, out, "--lr", "0.1,0.4", "--momentum", "0,0.9", "--batch-size", "8,full",
                 "--steps", 150, "--target-drop", 0.5)  # fmt: skip
    js = strict_json(out / "sweep.json")
    assert js["info"]["linearize"] == "auto: the exact top, for --split" and js["drop"] == 0.5
    rows = js["table"]
    assert len(rows) == 8 and [r["rank"] for r in rows] == list(range(1, 9))
    mod, npz = user
    model = load_model_spec(f"{mod}:make", num_classes=3).eval()
    etk = compute_exact_top_kernel(model[:2].eval(), model[2:].eval(), load_data_spec(str(npz)),
                                   projection=TOP_PROJECTION, progress=False)  # fmt: skip
    ref = sweep_exact_top(etk, tl.SGD.grid(lr=[0.1, 0.4], momentum=[0, 0.9]), 150,
                          batch_sizes=[8, None], drop=0.5, progress=False)  # fmt: skip
    for got, (_, want) in zip(rows, ref.table.iterrows()):
        assert (got["lr"], got["momentum"]) == (want["lr"], want["momentum"])
        assert got["estimate"] == pytest.approx(want["estimate"], nan_ok=True) or (
            got["estimate"] is None and want["estimate"] != want["estimate"])
        assert got["check"] == want["check"]
    assert "ranked by the estimated real steps" in res.stdout
    top = rows[0]
    b = "full" if top["batch_size"] is None else top["batch_size"]
    assert (f"tangentlab validate (the same model and data options) --lr {top['lr']:g} "
            f"--momentum {top['momentum']:g} --batch-size {b}") in res.stdout
    for name in ("sweep.csv", "report.html"):
        assert (out / name).exists()
    assert_png(out / "sweep.png") and assert_png(out / "sweep-ranking.png")
    assert_self_contained_html(out / "report.html", out / "sweep-ranking.png")  # the first
    again = _sweep(user, out, "--lr", "0.1,0.4", "--momentum", "0,0.9", "--batch-size",
                   "8,full", "--steps", 150, "--target-drop", 0.5)  # fmt: skip
    assert strict_json(out / "sweep.json")["info"]["restored_settings"] == 8
    assert again.stdout.splitlines()[:9] == res.stdout.splitlines()[:9]  # the same table


def test_sweep_top_default_rates_are_fractions_of_the_limit_at_each_momentum(user, tmp_path):
    from tangentlab.cli import TOP_SWEEP_FRACTIONS

    out = tmp_path / "d"
    res = _sweep(user, out, "--momentum", "0,0.9", "--steps", 40)
    assert "of the exact-top model's stability limit 2(1 - m)/S" in res.stderr
    rows = strict_json(out / "sweep.json")["table"]
    assert len(rows) == 2 * len(TOP_SWEEP_FRACTIONS)
    by_m = {m: sorted(r["lr"] for r in rows if r["momentum"] == m) for m in (0.0, 0.9)}
    ratios = np.array(by_m[0.0]) / by_m[0.0][-1]
    np.testing.assert_allclose(ratios, np.array(TOP_SWEEP_FRACTIONS) / TOP_SWEEP_FRACTIONS[-1],
                               rtol=2e-2)  # fmt: skip
    np.testing.assert_allclose(np.array(by_m[0.9]) / np.array(by_m[0.0]), 0.1, rtol=2e-2)


@pytest.mark.parametrize("extra, message", [
    (("--weight-decay", "0,0.1"), "cannot be combined with --weight-decay"),
    (("--target-loss", "1e9"), "must lie between 0 and the initial loss"),
])
def test_sweep_top_refuses_bad_input_with_the_fix(user, tmp_path, extra, message):
    mod, npz = user
    res = invoke("sweep", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--split", f"{mod}:split", "--linearize", "top", "--lr", "0.1", "--steps", 5,
                 "--no-progress", "--out", tmp_path / "x", *extra)  # fmt: skip
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output


def test_sweep_top_names_the_safer_pick_when_the_first_is_flagged(user, tmp_path):
    out = tmp_path / "f"
    res = _sweep(user, out, "--lr", "0.446,0.668", "--steps", 200)
    rows = strict_json(out / "sweep.json")["table"]
    assert rows[0]["lr"] == 0.668 and rows[0]["check"] == "flagged"
    assert "the first is flagged; the fastest whose check passes is rank 2" in res.stdout
    assert strict_json(out / "sweep.json")["best_passed"] == 2


def test_sweep_weight_decay_zero_keeps_auto_on_the_exact_top():
    from tangentlab.cli import _decays

    assert not _decays(None) and not _decays("0") and not _decays("0,0.0") and not _decays(0.0)
    assert _decays("0,0.01") and _decays(0.1)


@pytest.mark.slow
def test_sweep_takes_the_exact_top_on_the_image_example(tmp_path):
    """fashion-lite0 by default: sweep --linearize auto is the exact top's sweep."""
    out = tmp_path / "lite-sweep"
    res = ok(invoke("sweep", "--example", "fashion-lite0", "--samples", 32, "--steps", 20,
                    "--momentum", "0.9", "--out", out, "--no-progress"))  # fmt: skip
    assert "split_lite" in res.stderr and "ranked by the estimated real steps" in res.stdout
    js = strict_json(out / "sweep.json")
    assert js["info"]["linearize"].startswith("auto: the exact top (split_lite")
    assert len(js["table"]) == 4 and js["kernel"]["directions"] == 320
    assert "--steps" in res.stdout and "--cached-trunk (the same run" in res.stdout


def test_sweep_top_ranks_by_samples_and_refuses_it_elsewhere(user, tmp_path):
    out = tmp_path / "s"
    res = _sweep(user, out, "--lr", "0.0668", "--momentum", "0.9", "--batch-size", "8,full",
                 "--steps", 200, "--rank-by", "samples")  # fmt: skip
    assert "to check the pick" in res.stdout and "--cached-trunk" not in res.stdout  # no trunk
    rows = strict_json(out / "sweep.json")["table"]
    assert [r["batch_size"] for r in rows] == [8, None]  # 8 x T̃(8) < 24 x T̃(full)
    assert rows[0]["samples_to_target"] < rows[1]["samples_to_target"]
    assert "ranked by the estimated sample-gradients" in res.stdout
    mod, npz = user
    base = ("sweep", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3, "--lr",
            "0.4", "--steps", 5, "--no-progress", "--out", tmp_path / "x")  # fmt: skip
    res = invoke(*base, "--linearize", "body", "--rank-by", "samples")
    assert res.exit_code != 0 and "--rank-by samples ranks the exact top's sweep" in res.output
    res = invoke(*base, "--linearize", "top", "--split", f"{mod}:split", "--rank-by",
                 "eval_accuracy")  # fmt: skip
    assert res.exit_code != 0 and "which the exact top does not forecast" in res.output
    assert "Traceback" not in res.output


def test_an_interrupted_sweep_resumes_from_its_finished_settings(user, tmp_path, monkeypatch):
    """Ctrl-C in the second setting: exit 130, the first setting kept; the rerun restores
    it and computes the rest."""
    from tangentlab.experimental import exact_top as et

    real, calls = et.forecast_exact_top, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(et, "forecast_exact_top", interrupted)
    out = tmp_path / "i"
    args = ("--lr", "0.1,0.4", "--steps", 60)
    mod, npz = user
    res = invoke("sweep", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                 "--split", f"{mod}:split", "--no-progress", "--out", out, *args)
    assert res.exit_code == 130 and "a sweep's settings" in res.output
    assert len(list((out / "kernel" / "exact-top-sweep").glob("*.json"))) == 1
    monkeypatch.setattr(et, "forecast_exact_top", real)
    _sweep(user, out, *args)
    assert strict_json(out / "sweep.json")["info"]["restored_settings"] == 1
