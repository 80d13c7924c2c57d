"""Tests of the ``tangentlab`` command line (``tangentlab.cli``), run in-process with click's
``CliRunner`` on the fast ``digits-cnn`` example (N = 20).

The digits kernel is computed once per module (``digits_run``); other tests point ``--cache``
at it so they only pay for the forecast.
"""

from __future__ import annotations

import base64
import csv
import inspect
import itertools
import json
import re
import subprocess
import sys
import traceback
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from tangentlab.cli import main
from tangentlab.examples import EXAMPLES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 20
DIGITS = ("--example", "digits-cnn", "--samples", "20")  # progress on: cache reuse is announced
QUIET = (*DIGITS, "--no-progress")
TANGENT = ("--linearize", "all")  # the tangent model (the default, auto, picks head-exact here)


def _runner() -> CliRunner:
    # click < 8.2 mixes stderr into stdout unless mix_stderr=False; click >= 8.2 dropped the
    # argument and always keeps result.stdout / result.stderr apart (result.output = both).
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def invoke(*args: object) -> Result:
    return _runner().invoke(main, [str(a) for a in args])


def ok(res: Result) -> Result:
    """Assert a successful run; show its output and any traceback when it failed."""
    tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{tb}"
    return res


def strict_json(path: Path) -> dict:
    """Parse JSON, refusing the non-standard NaN / Infinity tokens."""

    def bad(token: str):
        raise AssertionError(f"{path.name} contains {token}")

    return json.loads(path.read_text(), parse_constant=bad)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1000


def assert_self_contained_html(path: Path, png: Path) -> None:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m, "no embedded PNG"
    assert base64.b64decode(m.group(1)) == png.read_bytes()  # the plot itself, inline
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)  # nothing fetched


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """``forecast`` of the tangent model on digits-cnn into a fresh OUT: computes and caches
    the kernel."""
    out = tmp_path_factory.mktemp("digits")
    res = invoke("forecast", *QUIET, *TANGENT, "--steps", STEPS, "--out", out)
    return out, res


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``forecast`` on digits-cnn with every default: --linearize auto picks head-exact."""
    out = tmp_path_factory.mktemp("digits-auto")
    res = invoke("forecast", *QUIET, "--steps", STEPS, "--out", out)
    return out, res


@pytest.fixture
def cache(digits_run) -> Path:
    return digits_run[0] / "kernel"


# --------------------------------------------------------------------------- forecast


def test_forecast_end_to_end(digits_run):
    out, res = digits_run
    ok(res)
    js = strict_json(out / "forecast.json")
    assert {"summary", "forecasts", "kernel"} <= set(js)
    (fc,) = js["forecasts"]
    assert len(fc["loss"]) == STEPS + 1
    assert len(fc["accuracy"]) == STEPS + 1
    assert fc["loss_band"] is None  # full batch is deterministic
    assert fc["loss"][-1] < fc["loss"][0]
    assert js["kernel"]["num_samples"] == 20 and js["kernel"]["num_classes"] == 10
    assert js["info"]["source"] == "digits-cnn"
    assert_png(out / "forecast.png")
    assert_self_contained_html(out / "report.html", out / "forecast.png")

    m = re.search(r"^steps to loss ([0-9.e+-]+): (\d+)$", res.stdout, re.M)
    assert m, res.stdout
    assert int(m.group(2)) == js["summary"][0]["steps_to_target"]
    assert float(m.group(1)) == pytest.approx(js["target_loss"], rel=1e-3)
    # default target: 80% drop of the initial loss
    assert js["target_loss"] == pytest.approx(0.2 * fc["loss"][0])
    assert "--lr not given" in res.stderr  # default lr announced on stderr, not stdout
    # the tangent model's known bias on held-out tasks, and the alternative, said once
    assert res.stdout.count("--linearize body (a final nn.Linear head)") == 1
    # the default lr is rounded down: on the validity boundary, never past it
    assert "Warning:" not in res.stderr and "outside the region" not in res.stderr
    assert js["summary"][0]["stability"] <= 1.0
    assert "DIVERGES" not in res.stdout
    assert f"wrote {out / 'forecast.json'}" in res.stdout
    # timings name every step and add up to the total (the rest is "other")
    t = re.search(r"^time: (.*); total ([0-9.]+) s$", res.stdout, re.M)
    assert t and "kernel" in t.group(1) and "eigendecomposition" in t.group(1)
    parts = [float(v) for v in re.findall(r" ([0-9.]+) s", t.group(1))]
    assert sum(parts) == pytest.approx(float(t.group(2)), abs=0.3)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "What was forecast" in page and "tl.stable_lr" in page and "validity" in page


def test_forecast_minibatch_has_band(cache, tmp_path):
    out = tmp_path / "mb"
    ok(invoke("forecast", *QUIET, "--cache", cache, "--out", out, "--steps", 10, "--lr", 0.003,
              "--batch-size", 8, "--momentum", 0.9, "--paths", 3))  # fmt: skip
    (fc,) = strict_json(out / "forecast.json")["forecasts"]
    hp = fc["hyperparameters"]
    assert (hp["batch_size"], hp["momentum"], hp["paths"]) == (8, 0.9, 3)
    band = fc["loss_band"]
    assert band is not None
    low, high = np.array(band["low"]), np.array(band["high"])
    assert low.shape == high.shape == (11,)
    assert np.all(low <= high + 1e-12)
    assert np.any(high - low > 1e-9)  # the paths really differ
    assert_png(out / "forecast.png")


def test_forecast_too_large_lr_diverges(cache, tmp_path):
    out = tmp_path / "div"
    res = ok(invoke("forecast", *QUIET, "--cache", cache, "--out", out, "--steps", 10,
                    "--lr", 10))  # fmt: skip
    assert re.search(r"^DIVERGES: .*lower the learning rate", res.stdout, re.M), res.stdout
    assert "not reached in 10" in res.stdout
    js = strict_json(out / "forecast.json")  # no NaN / Infinity tokens
    (fc,) = js["forecasts"]
    assert fc["diverges"] is True and js["summary"][0]["diverges"] is True
    assert fc["stability"] > fc["stability_limit"]
    step = fc["divergence_step"]
    assert 1 <= step <= 10
    assert all(v is None for v in fc["loss"][step:])  # NaN -> null, not garbage
    assert all(v is not None and np.isfinite(v) for v in fc["loss"][:step])
    assert fc["loss_limit"] is None
    assert js["summary"][0]["steps_to_target"] is None


def test_default_is_head_exact_with_its_interval(default_run):
    """--linearize auto (the default) keeps digits-cnn's final nn.Linear exact, says so and
    why, and prints the calibrated interval; everything else is as for the tangent model."""
    out, res = default_run
    ok(res)
    assert "--linearize auto: the head 'head' kept exact, the body linearized" in res.stderr
    assert "--linearize all for the tangent model" in res.stderr
    js = strict_json(out / "forecast.json")
    assert js["forecasts"][0]["method"]["model"] == "head-body"
    assert "head exact (head), body linear" in js["info"]["model_of_training"]
    assert js["info"]["linearize"].startswith("auto: the head 'head' kept exact")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "model of training (--linearize)</td><td>auto: the head" in page
    m = re.search(r"^  real run, 80% interval: (\d+)-(\d+) steps, median estimate (\d+) "
                  r"\(forecast (\d+);", res.stdout, re.M)  # fmt: skip
    assert m, res.stdout
    low, high, median, point = map(int, m.groups())
    assert low <= median <= high and point == js["summary"][0]["steps_to_target"]
    assert "--linearize body (a final nn.Linear head)" not in res.stdout  # no tangent note
    assert (out / "kernel" / "head-body" / "block").is_dir()
    assert not (out / "kernel" / "kernel.safetensors").exists()  # no tangent kernel computed
    again = ok(invoke("forecast", *DIGITS, "--steps", STEPS, "--out", out))
    assert "reusing cached kernel" in again.stderr  # the read-out kernels
    assert again.stdout.splitlines()[:3] == res.stdout.splitlines()[:3]
    # the tangent model in the same OUT: its kernel cache sits beside the head-body one
    ok(invoke("forecast", *QUIET, *TANGENT, "--steps", STEPS, "--out", out))
    assert (out / "kernel" / "kernel.safetensors").exists()


@pytest.mark.parametrize(
    "extra, says",
    [
        (("--trace",), "no better: --trace."),
        (("--optimizer", "adamw", "--lr", "0.001"), "no better: --optimizer adamw."),
        (("--subsample", "12"), "no better: --subsample."),
        (("--eval-samples", "10"), "no better: held-out curves (RESULTS.md 'sweeps')."),
    ],
    ids=["trace", "adamw", "subsample", "held-out"],
)
def test_auto_falls_back_to_the_tangent_model_and_says_why(extra, says, tmp_path):
    res = ok(invoke("forecast", *QUIET, "--steps", 5, *extra, "--out", tmp_path))
    assert "--linearize auto: the tangent model, for what the head" in res.stderr
    assert says in res.stderr, res.stderr
    js = strict_json(tmp_path / "forecast.json")
    assert js["forecasts"][0]["method"].get("model") != "head-body"
    assert js["info"]["linearize"].startswith("auto: the tangent model, for ")


def _user_module(tmp_path: Path, monkeypatch, num_classes: int, net: str) -> str:
    """A user's model file ``make(num_classes)`` returning ``net`` (seeded), importable."""
    mod = f"tl_user_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{mod}.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        f"def make(num_classes={num_classes}):\n"
        "    torch.manual_seed(0)\n"
        f"    return {net}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return mod


def test_auto_falls_back_on_a_model_without_a_final_linear_head(tmp_path, monkeypatch):
    mod = _user_module(tmp_path, monkeypatch, 3,
                       "nn.Sequential(nn.Conv1d(1, num_classes, 6), nn.Flatten())")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", X=rng.standard_normal((12, 1, 6)).astype(np.float32),
             y=rng.integers(0, 3, 12))  # fmt: skip
    res = ok(invoke("forecast", "--model", f"{mod}:make", "--data", tmp_path / "d.npz",
                    "--num-classes", 3, "--steps", 5, "--no-progress", "--out", tmp_path / "o"))
    assert "--linearize auto: the tangent model: the model has no nn.Linear" in res.stderr
    assert (tmp_path / "o" / "kernel" / "kernel.safetensors").exists()


def test_second_run_reuses_cached_kernel(digits_run):
    out, first = digits_run
    kfile = out / "kernel" / "kernel.safetensors"
    stamp = kfile.stat().st_mtime_ns
    res = ok(invoke("forecast", *DIGITS, *TANGENT, "--steps", STEPS, "--out", out))
    assert "reusing cached kernel" in res.stderr
    assert "reusing cached kernel" not in first.stderr
    assert kfile.stat().st_mtime_ns == stamp  # not recomputed
    assert res.stdout.splitlines()[:3] == first.stdout.splitlines()[:3]  # same table


# --------------------------------------------------------------------------- sweep


def test_sweep_writes_ranked_table(cache, tmp_path):
    out = tmp_path / "sw"
    res = ok(invoke("sweep", *QUIET, "--cache", cache, "--out", out, "--steps", STEPS,
                    "--paths", 2, "--lr", "0.001,0.003", "--batch-size", "8,full",
                    "--momentum", "0,0.9"))  # fmt: skip
    with open(out / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    assert [int(r["rank"]) for r in rows] == list(range(1, 9))
    combos = [
        (float(r["lr"]), int(float(r["batch_size"])) if r["batch_size"] else None,
         float(r["momentum"]))
        for r in rows
    ]  # fmt: skip
    assert sorted(combos, key=str) == sorted(
        itertools.product([0.001, 0.003], [8, None], [0.0, 0.9]), key=str
    )
    # NOTE [sweep ranking]: valid rows first; within each group reached ones first, ascending
    valid = [r["valid"] == "True" for r in rows]
    assert valid == sorted(valid, reverse=True) and 0 < sum(valid) < len(valid)  # both groups
    for group in (True, False):
        sub = [r for r, v in zip(rows, valid) if v == group]
        reached = [int(r["steps_to_target"]) for r in sub if r["steps_to_target"]]
        assert reached == sorted(reached)
        assert all(r["steps_to_target"] for r in sub[: len(reached)])
    assert any(r["steps_to_target"] for r in rows) and not all(r["steps_to_target"] for r in rows)
    js = strict_json(out / "sweep.json")
    assert len(js["table"]) == 8 and [r["rank"] for r in js["table"]] == list(range(1, 9))
    assert js["target_loss"] > 0 and "outside the validity region" in res.stdout
    assert_png(out / "sweep.png")
    assert_self_contained_html(out / "report.html", out / "sweep.png")
    assert "8 settings from one kernel" in res.stdout


# --------------------------------------------------------------------------- kernel


def test_kernel_command_writes_json_and_kernel_file_is_usable(cache, tmp_path):
    out = tmp_path / "k"
    res = ok(invoke("kernel", *QUIET, *TANGENT, "--cache", cache, "--out", out))
    printed = json.loads(res.stdout)  # stdout is exactly the JSON summary
    saved = strict_json(out / "kernel.json")
    assert printed == saved
    assert saved["num_samples"] == 20 and saved["num_classes"] == 10
    assert saved["lambda_max"] > saved["lambda_min_nonzero"] > 0
    assert saved["info"]["source"] == "digits-cnn"
    kfile = cache / "kernel.safetensors"
    assert str(kfile) in res.stderr

    res = ok(invoke("forecast", "--kernel", kfile, "--steps", 5, "--lr", 0.003, "--out",
                    tmp_path / "fk", "--no-progress"))  # fmt: skip
    assert "loaded kernel" in res.stderr
    js = strict_json(tmp_path / "fk" / "forecast.json")
    assert len(js["forecasts"][0]["loss"]) == 6 and js["kernel"]["num_samples"] == 20


# --------------------------------------------------------------------------- --config


def test_config_sets_options_and_flags_override(cache, tmp_path):
    out = tmp_path / "cfg"
    conf = tmp_path / "run.toml"
    conf.write_text(
        f'example = "digits-cnn"\nsamples = 20\nsteps = 4\nlr = 0.002\nno-progress = true\n'
        f"cache = {json.dumps(str(cache))}\nout = {json.dumps(str(out))}\n"
    )
    ok(invoke("forecast", "--config", conf))
    (fc,) = strict_json(out / "forecast.json")["forecasts"]
    assert len(fc["loss"]) == 5 and fc["hyperparameters"]["lr"] == 0.002
    ok(invoke("forecast", "--config", conf, "--steps", 6, "--lr", 0.001))
    (fc,) = strict_json(out / "forecast.json")["forecasts"]
    assert len(fc["loss"]) == 7 and fc["hyperparameters"]["lr"] == 0.001
    assert fc["hyperparameters"]["num_samples"] == 20


def test_config_lists_for_sweep(cache, tmp_path):
    out = tmp_path / "cfgsw"
    conf = tmp_path / "sweep.toml"
    conf.write_text(
        'example = "digits-cnn"\nsamples = 20\nsteps = 5\nlr = [0.001, 0.003]\n'
        f'batch-size = ["full"]\nno-progress = true\ncache = {json.dumps(str(cache))}\n'
    )
    ok(invoke("sweep", "--config", conf, "--out", out))
    table = strict_json(out / "sweep.json")["table"]
    assert sorted(r["lr"] for r in table) == [0.001, 0.003]
    assert all(r["batch_size"] is None for r in table)


def test_config_unknown_key_is_a_usage_error(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('example = "digits-cnn"\nbogus_key = 1\n')
    res = invoke("forecast", "--config", conf, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "bogus_key" in res.stderr and "unknown keys" in res.stderr
    assert "example" not in res.stderr.split("unknown keys")[1].split("allowed")[0]
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_config_unreadable_is_a_usage_error(tmp_path):
    conf = tmp_path / "broken.toml"
    conf.write_text("lr = = 1\n")
    res = invoke("forecast", "--config", conf)
    assert res.exit_code == 2 and "cannot read TOML config" in res.stderr


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, says",
    [
        (["forecast", *QUIET, "--projection", "abc"], "--projection"),
        (["forecast", *QUIET, "--batch-size", "x"], "--batch-size"),
        (["sweep", *QUIET, "--batch-size", "8,x"], "--batch-size"),
        (["sweep", *QUIET, "--lr", "0.1,abc"], "--lr"),
        (["forecast", *QUIET, "--target-drop", "1.5"], "--target-drop"),
        (["forecast", "--model", "tl_nowhere.mod:make", "--no-progress"], "--data"),
        ("forecast --example digits-cnn --model x.y:z --data d.npz".split(), "--example"),
        (["forecast", "--kernel", "missing.safetensors"], "missing.safetensors"),
        (["forecast", *QUIET, "--momentum", "1"], "momentum must lie in [0, 1)"),
        (["forecast", *QUIET, "--lr", "-0.1"], "lr must be a finite number > 0"),
        (["forecast", *QUIET, "--steps", "-5"], "steps must be an integer >= 0"),
        (["forecast", *QUIET, "--paths", "0"], "paths must be an integer >= 1"),
        (["sweep", *QUIET, "--momentum", "0,1"], "momentum must lie in [0, 1)"),
        (["validate", *QUIET, "--weight-decay", "-1"], "weight_decay must be"),
        (["forecast", *QUIET, "--device", "cuda"], "--device cuda"),
        (["forecast", *QUIET, "--loss", "ce", "--target-scale", "2"], "--target-scale"),
        (["forecast", *QUIET, "--linearize", "body", "--trace"], "cannot be combined"),
        (["forecast", *QUIET, *TANGENT, "--head", "head"], "--head goes with --linearize body"),
        (["forecast", *QUIET, "--linearize", "body", "--optimizer", "adamw"], "adamw"),
        (["forecast", *QUIET, "--head", "features.0"], "nn.Linear"),
        (["forecast", *QUIET, "--linearize", "body", "--head", "features.0"], "nn.Linear"),
    ],
    ids=[
        "projection",
        "batch-size",
        "sweep-batch-size",
        "sweep-lr",
        "target-drop",
        "model-without-data",
        "example-and-model",
        "missing-kernel",
        "momentum-1",
        "negative-lr",
        "negative-steps",
        "paths-0",
        "sweep-momentum-1",
        "validate-weight-decay",
        "cuda-without-cuda",
        "ce-target-scale",
        "linearize-body-trace",
        "head-with-linearize-all",
        "linearize-body-adamw",
        "auto-head-not-linear",
        "head-not-linear",
    ],
)
def test_bad_input_is_one_clear_line(args, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (missing.safetensors) resolve here
    out = tmp_path / "out"
    res = invoke(*args, "--out", out)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)  # handled, not a crash
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], res.stderr
    assert res.stderr.rstrip().endswith(errors[0])  # the error is the last thing said
    assert res.stdout == ""
    assert not (out / "kernel").exists()  # rejected before any kernel work


def test_console_script_exit_code_and_message(tmp_path):
    """The installed entry point, as a real process: exit status 2 and one line on stderr."""
    exe = Path(sys.executable).with_name("tangentlab")
    if not exe.exists():
        pytest.skip("the tangentlab console script is not installed next to this python")
    proc = subprocess.run(
        [str(exe), "forecast", "--kernel", str(tmp_path / "missing.safetensors")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"Error: load_kernel: no such file {str(tmp_path / 'missing.safetensors')!r}."
    ]


# --------------------------------------------------------------------------- --model/--data


def test_model_and_data_specs(tmp_path, monkeypatch):
    net = "nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, num_classes)).eval()"
    mod = _user_module(tmp_path, monkeypatch, 2, net)
    rng = np.random.default_rng(0)
    npz = tmp_path / "train.npz"
    np.savez(npz, X=rng.standard_normal((24, 6)).astype(np.float32),
             y=np.arange(24, dtype=np.int64) % 3)  # fmt: skip
    out = tmp_path / "mine"
    res = ok(invoke("forecast", "--model", f"{mod}:make", "--data", npz, "--num-classes", 3,
                    "--steps", 5, "--lr", 0.1, "--out", out, "--no-progress"))  # fmt: skip
    js = strict_json(out / "forecast.json")
    assert js["kernel"]["num_samples"] == 24 and js["kernel"]["num_classes"] == 3
    assert len(js["forecasts"][0]["loss"]) == 6
    assert js["info"]["source"] == "train.npz"
    assert "steps to loss" in res.stdout

    # the same run from a TOML file keyed by the option names (model, data, num-classes)
    conf = tmp_path / "mine.toml"
    conf.write_text(
        f'model = "{mod}:make"\ndata = {json.dumps(str(npz))}\nnum-classes = 3\n'
        f"steps = 5\nlr = 0.1\nout = {json.dumps(str(out))}\n"
    )
    res = ok(invoke("forecast", "--config", conf))
    assert "reusing cached kernel" in res.stderr  # same model and data as above


# --------------------------------------------------------------------------- examples


def test_examples_lists_the_three_examples():
    res = ok(invoke("examples"))
    lines = res.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["digits-cnn", "fashion-lite0", "rt-minilm"] == list(EXAMPLES)
    for line, name in zip(lines, names):
        assert EXAMPLES[name][:30] in line


# --------------------------------------------------------------------------- environment faults


def test_environment_faults_are_one_line_and_debug_shows_the_traceback(cache, tmp_path):
    """A read-only output folder: one line naming the path (exit 1), no traceback; with
    --debug the traceback."""
    import os

    if os.geteuid() == 0:  # root writes into read-only folders: use a path under a file
        out = tmp_path / "a-file" / "out"
        (tmp_path / "a-file").write_text("not a folder")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "out"
    res = invoke("forecast", *QUIET, "--cache", cache, "--out", out, "--steps", 3,
                 "--lr", 0.001)  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "cannot read or write" in errors[0] and "--debug" in errors[0]
    res = _runner().invoke(main, ["--debug", "forecast", *QUIET, "--cache", str(cache),
                                  "--out", str(out), "--steps", "3", "--lr", "0.001"])
    assert res.exit_code != 0 and isinstance(res.exception, OSError)  # the real exception


def test_wrong_feature_count_and_non_numeric_csv_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),\n"
        "                               torch.nn.Linear(8, 3))\n"
    )  # fmt: skip
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", X=rng.standard_normal((12, 4)), y=rng.integers(0, 3, 12))
    np.savez(tmp_path / "bad.npz", X=rng.standard_normal((12, 5)), y=rng.integers(0, 3, 12))
    # --model module:function imports from the current folder
    ok(invoke("forecast", "--model", "mynet:make", "--data", "ok.npz", "--no-progress",
              "--steps", 5, "--out", tmp_path / "o1"))  # fmt: skip
    res = invoke("forecast", "--model", "mynet:make", "--data", "bad.npz", "--no-progress",
                 "--steps", 5, "--out", tmp_path / "o2")  # fmt: skip
    assert res.exit_code in (1, 2) and "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "shapes" in errors[0], res.stderr
    (tmp_path / "f.csv").write_text("a,b,c,d,label\n1,2,x,4,0\n1,2,3,4,1\n")
    res = invoke("forecast", "--model", "mynet:make", "--data", "f.csv", "--no-progress",
                 "--out", tmp_path / "o3")  # fmt: skip
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "column 'c' is not numeric" in errors[0]
    (tmp_path / "g.csv").write_text("a,b,c,d,label\n" + "".join(
        f"{r[0]:.3f},{r[1]:.3f},{r[2]:.3f},{r[3]:.3f},{i % 3}\n"
        for i, r in enumerate(rng.standard_normal((9, 4)))))  # fmt: skip
    ok(invoke("forecast", "--model", "mynet:make", "--data", "g.csv", "--no-progress",
              "--steps", 5, "--out", tmp_path / "o4"))  # fmt: skip


def test_library_warnings_are_one_line_for_cli_users(cache, tmp_path):
    """A forecast outside the validity region warns in one line, without a source path."""
    res = ok(invoke("forecast", *QUIET, "--cache", cache, "--out", tmp_path / "w",
                    "--steps", 5, "--lr", 0.01, "--momentum", 0.9))  # fmt: skip
    lines = [line for line in res.stderr.splitlines() if "outside the region" in line]
    assert len(lines) == 1 and lines[0].startswith("Warning: forecast:"), res.stderr
    assert ".py:" not in res.stderr


# --------------------------------------------------------------------------- --linearize body


def test_validate_with_the_head_exact_body_linear_model(tmp_path):
    """``--linearize body``: the head-exact model through the CLI, its kernels cached."""
    out = tmp_path / "hb"
    args = ("validate", *QUIET, "--linearize", "body", "--loss", "ce", "--steps", 15,
            "--log-every", 1, "--out", out)  # fmt: skip
    res = ok(invoke(*args))
    js = strict_json(out / "validation.json")
    assert js["forecast"]["method"]["model"] == "head-body"
    assert js["kernel"]["model"].startswith("head exact")
    assert "head exact (head), body linear" in js["info"]["model_of_training"]
    assert "kernel (head exact, body linear)" in res.stdout
    # the calibrated interval for the real steps (NOTE [steps interval]) and its verdict
    assert "vs the forecast's 80% interval" in res.stdout
    fc = ok(invoke("forecast", *QUIET, "--linearize", "body", "--loss", "ce", "--steps", 15,
                   "--out", tmp_path / "hbf", "--cache", out / "kernel"))  # fmt: skip
    assert "real run, 80% interval:" in fc.stdout and "sooner than the tangent" not in fc.stdout
    assert re.search(r"real loss at step 15: (unknown|at most \S+|at least \S+|\S+-\S+) \(band",
                     fc.stdout)  # NOTE [loss interval]
    row = strict_json(tmp_path / "hbf" / "forecast.json")["summary"][0]
    if row["steps_to_target"] is None:  # beyond the horizon: a lower bound only
        assert row["steps_low"] >= 1 and row["steps_median"] is None is row["steps_high"]
    else:
        assert row["steps_low"] <= row["steps_median"] <= row["steps_high"]
        assert row["steps_low"] <= row["steps_to_target"] <= row["steps_high"]
        assert isinstance(row["steps_trusted"], bool)
    lo, hi = js["comparison"]["steps_interval"]
    inside = js["comparison"]["steps_in_interval"]
    t = js["comparison"]["steps_to_target_run"]
    assert inside is None if t is None else inside == (lo <= t and (hi is None or t <= hi))
    # the band for the real loss (NOTE [loss interval]): its coverage, printed when it has
    # two-sided steps; the forecast's JSON carries the band itself
    cov = js["comparison"]["loss_interval_coverage"]
    assert (cov is None) == ("forecast's band for it" not in res.stdout)
    assert cov is None or f"band for it (calibrated) at {cov:.0%} of the steps" in res.stdout
    band = strict_json(tmp_path / "hbf" / "forecast.json")["loss_intervals"][0]
    assert len(band["low"]) == len(band["high"]) == 16 and band["drops"] == [0.3, 0.95]
    assert (out / "kernel" / "head-body" / "block" / "kernel.safetensors").exists()
    again = ok(invoke(*args[:-1], tmp_path / "hb2", "--cache", out / "kernel"))
    assert "reusing cached kernel" in again.stderr


def test_divergence_message_names_the_cause(capsys):
    """Unstable at w0 / blown up later; for the head-exact model stable at w0, the head x
    body growth and what real runs tend to do there."""
    from types import SimpleNamespace

    from tangentlab.cli import _print_divergence
    from tangentlab.forecast import STABILIZED_REACHED

    def said(**kw):
        fc = SimpleNamespace(**{"stability_limit": 2.0, "divergence_step": 96, "method": {},
                                **kw})
        _print_divergence(fc)
        return capsys.readouterr().out

    assert said(stability=2.3).startswith("DIVERGES: η̃·λ_max/N = 2.3 ≥ 2; lower")
    assert said(stability=0.9).startswith("DIVERGES: the loss blows up after step 96; lower")
    out = said(stability=0.99, method={"model": "head-body"})
    assert "head-exact model's loss blows up after step 96" in out
    got, total = STABILIZED_REACHED
    assert "stable at w0" in out and "spike and" in out and f"reached {got} of the {total}" in out
    assert "interval below" not in out  # no rerun: nothing to read
    rerun = said(stability=0.99, method={"model": "head-body", "stabilized": {"factor": 0.5}},
                 stabilized=object())  # fmt: skip
    assert "read from the forecast at 0.5 x the rate" in rerun


def test_pilot_conditions_the_head_exact_intervals(tmp_path):
    """``--pilot`` (NOTE [pilot feature]): one real pilot run, said on stderr and recorded in
    the report; the intervals then carry it; the tangent model refuses it."""
    out = tmp_path / "p"
    res = ok(invoke("sweep", *QUIET, "--linearize", "body", "--loss", "ce", "--steps", 15,
                    "--lr", "0.05,0.2", "--pilot", "--out", out))  # fmt: skip
    assert "pilot: fine-tuning for real" in res.stderr and "50% drop at step" in res.stderr
    js = strict_json(out / "sweep.json")
    assert js["info"]["pilot"]["cost"] > 0 and js["info"]["pilot"]["steps"] >= 1
    fc = ok(invoke("forecast", *QUIET, "--linearize", "body", "--loss", "ce", "--steps", 15,
                   "--pilot", "--out", tmp_path / "f", "--cache", out / "kernel"))  # fmt: skip
    assert "band with the pilot" in fc.stdout or "more than" in fc.stdout
    val = ok(invoke("validate", *QUIET, "--linearize", "body", "--loss", "ce", "--steps", 15,
                    "--log-every", 1, "--pilot", "--out", tmp_path / "v", "--cache",
                    out / "kernel"))  # fmt: skip
    assert "80% interval with the pilot" in val.stdout
    assert strict_json(tmp_path / "v" / "validation.json")["info"]["pilot"]["steps"] >= 1
    bad = invoke("forecast", *QUIET, *TANGENT, "--steps", 5, "--pilot", "--out", tmp_path / "t")
    assert bad.exit_code != 0 and "--pilot conditions the head-exact" in bad.output


def test_directions_all_keeps_every_feature_direction_exact(tmp_path):
    """--directions all: Q spans every training feature (r = N + C), recorded in the JSON;
    --directions with the tangent model, or a bad value, is refused with the fix."""
    out = tmp_path / "all"
    ok(invoke("forecast", *QUIET, "--steps", STEPS, "--linearize", "body", "--directions",
              "all", "--out", out))  # fmt: skip
    js = strict_json(out / "forecast.json")
    assert "r = 30," in js["info"]["model_of_training"]  # N = 20 samples + C = 10 classes
    assert js["forecasts"][0]["method"]["subspace"]["spans_features"] is True
    # with a pilot, a convolutional body's full span reads its own calibration (round 9):
    # no "calibrated with the defaults" note
    res = ok(invoke("forecast", *QUIET, "--steps", 150, "--linearize", "body", "--directions",
                    "all", "--pilot", "--loss", "ce", "--out", tmp_path / "p"))  # fmt: skip
    assert "band with the pilot" in res.stdout and "directions=" not in res.stdout
    res = invoke("forecast", *QUIET, *TANGENT, "--directions", "all", "--out", tmp_path / "t")
    assert res.exit_code != 0 and "--directions goes with --linearize body" in res.output
    res = invoke("forecast", *QUIET, "--directions", "most", "--out", tmp_path / "b")
    assert res.exit_code != 0 and "--directions must be an integer >= 0 or 'all'" in res.output
