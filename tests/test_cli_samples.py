"""``tangentlab information`` and ``tangentlab influence`` on the digits example (N = 20)."""

from __future__ import annotations

import inspect
import json
import traceback

import pytest
from click.testing import CliRunner

from tangentlab.cli import main

QUIET = ("--example", "digits-cnn", "--samples", "20", "--no-progress", "--projection", "128")


def _invoke(*args):
    kw = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}
    res = CliRunner(**kw).invoke(main, [str(a) for a in args])
    return res


def _ok(res):
    tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
    assert res.exit_code == 0, f"exit {res.exit_code}\n{res.output}\n{tb}"
    return res


def test_information_and_influence_commands(tmp_path):
    out = tmp_path / "run"
    res = _ok(_invoke("information", *QUIET, "--flip-labels", "0.2", "--steps", "30",
                      "--eval-samples", "5", "--out", out))  # fmt: skip
    assert "flipped labels found in the top 20% by weights information" in res.stdout
    data = json.loads((out / "information.json").read_text())
    assert len(data["weights"]) == 20 and len(data["flipped"]) == 4
    assert data["functional_on"] == "eval" and data["num_eval"] == 5
    assert sorted(data["ranking_weights"]) == list(range(20))
    page = (out / "information.html").read_text()
    assert "Most informative samples" in page and "data:image/png;base64," in page
    assert "(flipped)" in page and (out / "information.csv").read_text().startswith("sample,")
    # the kernel cached by the first command is reused by the second
    res = _ok(_invoke("influence", *QUIET, "--flip-labels", "0.2", "--steps", "30",
                      "--checkpoints", "0,10,20", "--out", out))  # fmt: skip
    assert "reusing cached kernel" in res.stderr
    assert "flipped labels found in the top 20% by self-influence" in res.stdout
    data = json.loads((out / "influence.json").read_text())
    assert data["steps"] == [0, 10, 20] and len(data["self_influence"]) == 20
    assert "Highest self-influence" in (out / "influence.html").read_text()


@pytest.mark.slow
def test_influence_command_compares_with_real_checkpoints(tmp_path):
    res = _ok(_invoke("influence", *QUIET, "--steps", "30", "--checkpoints", "0,30", "--real",
                      "--eval-samples", "4", "--out", tmp_path))  # fmt: skip
    assert "tangent TracIn vs real TracInCP" in res.stdout
    data = json.loads((tmp_path / "influence.json").read_text())
    assert data["info"]["tracincp_pearson"] > 0.5 and len(data["train_to_eval"]) == 4


def test_sample_commands_refuse_bad_options(tmp_path):
    res = _invoke("information", *QUIET, "--loss", "ce", "--out", tmp_path)
    assert res.exit_code == 2 and "--loss mse" in res.output
    res = _invoke("information", *QUIET, "--noise", "sgd", "--out", tmp_path)
    assert res.exit_code == 2 and "--batch-size B" in res.output
    res = _invoke("influence", *QUIET, "--flip-labels", "1.5", "--out", tmp_path)
    assert res.exit_code == 2 and "--flip-labels" in res.output
    res = _invoke("influence", *QUIET, "--checkpoints", "a,b", "--out", tmp_path)
    assert res.exit_code == 2 and "--checkpoints" in res.output
    res = _invoke("information", *QUIET, "--time", "soon", "--out", tmp_path)
    assert res.exit_code == 2 and "--time" in res.output
