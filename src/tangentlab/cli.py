"""``tangentlab`` command line: parse -> call the Python API -> write JSON/PNG/HTML.

No mathematics here: every step is a public function (``load_example`` /
``specs.load_model_spec`` / ``specs.load_data_spec``, ``compute_kernel``, ``forecast``,
``sweep``, ``report.write_*``).

Examples::

    tangentlab forecast --example fashion-lite0 --out runs/demo
    tangentlab forecast --example digits-cnn --lr 0.5 --batch-size 32 --momentum 0.9
    tangentlab sweep --example digits-cnn --lr 0.1,0.3,1 --batch-size 16,full --momentum 0,0.9
    tangentlab forecast --model mypkg.models:make_net --weights w.safetensors \\
        --data train.npz --params '^head\\.' --out runs/mine
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import click

from tangentlab.errors import TangentlabError
from tangentlab.projection import DEFAULT_KIND

_EXAMPLE_NAMES = ("digits-cnn", "fashion-lite0", "rt-minilm")

# Sizes the built-in examples run with when the user gives none (minutes on 2 CPU cores).
_EXAMPLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits-cnn": {"samples": 200, "steps": 300},
    "fashion-lite0": {"samples": 500, "steps": 300},
    "rt-minilm": {"samples": 300, "steps": 300},
}


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config file.toml``: its keys (option names, ``-`` or ``_``) become defaults."""
    if not value:
        return value
    try:
        with open(value, "rb") as fh:
            conf = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read TOML config {value!r}: {exc}") from None
    # a key is an option's flag (``model``, ``batch-size``) or its parameter name (``model_spec``)
    known = {p.name: p.name for p in ctx.command.params}
    for p in ctx.command.params:
        known.update({o.lstrip("-").replace("-", "_"): p.name for o in p.opts})
    defaults, unknown = {}, []
    for key, v in conf.items():
        if isinstance(v, list):
            v = ",".join("full" if x in ("full", None) else str(x) for x in v)
        name = known.get(key.replace("-", "_"))
        if name is None:
            unknown.append(key)
        else:
            defaults[name] = v
    if unknown:
        allowed = sorted({o.lstrip("-") for p in ctx.command.params for o in p.opts} - {"config"})
        raise click.BadParameter(f"unknown keys {sorted(unknown)} in {value!r}; allowed: {allowed}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _source_options(fn):
    """Model, data and kernel options shared by every command (one block, not copies)."""
    opts = [
        click.option("--config", type=click.Path(dir_okay=False), callback=_load_config,
                     is_eager=True, expose_value=False,
                     help="TOML file whose keys are option names (flags override it)."),
        click.option("--example", type=click.Choice(_EXAMPLE_NAMES), default=None,
                     help="Built-in model + data (default: fashion-lite0 when no --model)."),
        click.option("--model", "model_spec", default=None, metavar="SPEC",
                     help="'pkg.module:factory' returning an nn.Module (imports and runs "
                     "that code), or a local Hugging Face model directory."),
        click.option("--weights", default=None, metavar="FILE",
                     help="Weights for --model: .safetensors or a torch file "
                     "(loaded with weights_only=True)."),
        click.option("--data", "data_spec", default=None, metavar="SPEC",
                     help="Data for --model: .npz with X and y, an image folder "
                     "(root/<class>/*.png), a CSV of text,label, or a saved HF dataset."),
        click.option("--tokenizer", default=None, metavar="DIR",
                     help="Tokenizer directory for text data (default: the model directory)."),
        click.option("--num-classes", type=int, default=None, help="C (for --model)."),
        click.option("--samples", type=int, default=None,
                     help="N: number of training samples (examples: default per example)."),
        click.option("--seq-len", type=int, default=64, show_default=True,
                     help="Tokens per text sample."),
        click.option("--image-size", type=int, default=None,
                     help="Resize images to this side (fashion-lite0: 64)."),
        click.option("--params", default=None, metavar="REGEX",
                     help="Trainable weights: regex on parameter names, or 'all' "
                     "(default: the example's choice, else all)."),
        click.option("--projection", default="auto", show_default=True,
                     help="'exact', a dimension k (e.g. 2048), or 'auto' (exact when all "
                     "Jacobians fit in memory, else k=4096)."),
        click.option("--trace", "trace_kernel", is_flag=True,
                     help="Trace kernel Θ ≈ K ⊗ I_C, K = tr(Θ_ij)/C: N×N memory instead of "
                     "(NC)×(NC), ignores cross-class structure (see README)."),
        click.option("--probes", type=int, default=None, metavar="S",
                     help="Trace kernel estimated with S random output probes (S backward "
                     "passes per sample instead of C; implies --trace; S >= C is exact)."),
        click.option("--projection-kind",
                     type=click.Choice(["tensor", "sparse", "gaussian", "rademacher"]),
                     default=DEFAULT_KIND.value, show_default=True,
                     help="Random projection (see README: tensor sketch is the fastest)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the example's head/subset, the projection and SGD noise."),
        click.option("--memory-budget", default=None,
                     help="Bytes or e.g. '4GB' (default: 50%% of free RAM, 80%% of GPU)."),
        click.option("--device", default=None, help="e.g. cpu, cuda (default: the model's)."),
        click.option("--kernel-batch-size", type=int, default=None,
                     help="Samples per Jacobian chunk (default: planned from the budget)."),
        click.option("--cache", default=None, metavar="DIR",
                     help="Kernel cache directory (default: OUT/kernel); resumable."),
        click.option("--kernel", "kernel_file", default=None, metavar="FILE",
                     help="Use a saved kernel (.safetensors) instead of computing one."),
        click.option("--out", default="runs/tangentlab", show_default=True,
                     help="Output directory for JSON, PNG and HTML."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _hyper_options(*, lists: bool):
    """Training hyper-parameters; comma-separated lists for ``sweep``."""
    kind = str if lists else None
    many = " (comma-separated list)" if lists else ""

    def deco(fn):
        opts = [
            click.option("--lr", type=kind or float, default=None,
                         help=f"Learning rate η{many} (default: per example)."),
            click.option("--steps", type=int, default=None,
                         help="Forecast horizon in optimizer steps (default: per example)."),
            click.option("--batch-size", default="full", show_default=True,
                         help=f"Batch size B or 'full'{many}."),
            click.option("--momentum", type=kind or float, default="0" if lists else 0.0,
                         show_default=True, help=f"SGD momentum m{many}."),
            click.option("--weight-decay", type=kind or float, default="0" if lists else 0.0,
                         show_default=True, help=f"Coupled L2 as torch SGD{many}."),
            click.option("--loss", "loss_name", type=click.Choice(["mse", "ce"]), default="mse",
                         show_default=True, help="½‖f − s·onehot(y)‖² or cross-entropy."),
            click.option("--target-scale", type=float, default=1.0, show_default=True,
                         help="s, the MSE target scale."),
            click.option("--paths", type=int, default=10, show_default=True,
                         help="Sample paths of a minibatch forecast."),
            click.option("--target-loss", type=float, default=None,
                         help="ε of steps-to-target (default: (1 − target-drop)·L0)."),
            click.option("--target-drop", type=float, default=0.8, show_default=True,
                         help="Relative drop of the loss that defines the default target."),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def _subsample_option(fn):
    """``--subsample n``: kernel on n random samples, forecast for all N (forecast, sweep)."""
    return click.option(
        "--subsample", type=int, default=None, metavar="n",
        help="Compute the kernel on a seeded random subset of n of the N (--samples) "
        "samples and forecast full-batch MSE training on all N from its spectrum "
        "(accuracy: on the n points).",
    )(fn)  # fmt: skip


class _InputError(click.ClickException):
    """``Error: <message>`` on one line (no usage block), exit code 2 like a usage error."""

    exit_code = 2


def _errors_as_usage(fn):
    """Library errors become one clear line and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TangentlabError as exc:
            raise _InputError(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted; finished kernel chunks are kept in the cache and "
                       "the next run resumes from them.", err=True)
            sys.exit(130)

    return wrapper


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def _resolve(o: dict[str, Any], *, quiet: bool = False):
    """Load model and data (example or specs); returns (model, data, C, params, name, info)."""
    from tangentlab.examples import load_example
    from tangentlab.specs import load_data_spec, load_model_spec

    if o["model_spec"] is None and o["data_spec"] is None:
        name = o["example"] or "fashion-lite0"
        d = _EXAMPLE_DEFAULTS[name]
        opts: dict[str, Any] = {}
        if name == "fashion-lite0" and o["image_size"]:
            opts["image_size"] = o["image_size"]
        if name == "rt-minilm":
            opts["seq_len"] = o["seq_len"]
        ex = load_example(name, num_samples=o["samples"] or d["samples"], seed=o["seed"], **opts)
        if not quiet:
            _echo(f"tangentlab: example {name}: {ex.description}")
        params = ex.default_params if o["params"] is None else o["params"]
        return ex.model, ex.data, ex.num_classes, params, name, d
    if o["example"] is not None:
        raise TangentlabError("tangentlab: give either --example or --model/--data, not both.")
    if o["model_spec"] is None or o["data_spec"] is None:
        raise TangentlabError(
            "tangentlab: --model and --data go together (or use --example NAME)."
        )
    model = load_model_spec(o["model_spec"], num_classes=o["num_classes"], weights=o["weights"])
    tok = o["tokenizer"] or (o["model_spec"] if os.path.isdir(o["model_spec"]) else None)
    data = load_data_spec(
        o["data_spec"], tokenizer_dir=tok, seq_len=o["seq_len"], image_size=o["image_size"],
        num_samples=o["samples"], seed=o["seed"],
    )  # fmt: skip
    return model, data, o["num_classes"], o["params"], Path(o["data_spec"]).name, {}


def _trace(o: dict[str, Any]) -> bool | int:
    """``--trace`` / ``--probes S`` -> ``compute_kernel(trace=...)``."""
    probes = o.get("probes")
    if probes is not None:
        if probes < 1:
            raise TangentlabError(
                f"tangentlab: --probes must be a positive integer (random output probes of "
                f"the trace kernel), got {probes}; or use --trace for the exact trace kernel."
            )
        return int(probes)
    return bool(o.get("trace_kernel"))


def _projection(o: dict[str, Any], model, data, params):
    from tangentlab.memory import default_budget, parse_bytes
    from tangentlab.projection import Projection
    from tangentlab.tangent import select_params

    spec = str(o["projection"]).strip().lower()
    if spec == "exact":
        return None
    if spec == "auto":
        import torch

        from tangentlab.data import num_rows

        names = select_params(model, None if params == "all" else params)
        named = dict(model.named_parameters())
        p = sum(named[n].numel() for n in names)
        n = num_rows(data[0]) if isinstance(data, tuple) else 1000
        c = o["num_classes"] or 10
        dev = torch.device(o["device"] or "cpu")
        budget = parse_bytes(o["memory_budget"]) or default_budget(dev)
        trace = _trace(o)
        # a trace kernel holds Jacobians of S <= C probed outputs and an N x N kernel
        outs = c if trace is True or trace is False else min(int(trace), c)
        kernel_bytes = (n * n * 4) if trace is not False else 0
        if n * outs * p * 4 * 2 + kernel_bytes <= budget:  # all Jacobians, room to work
            return None
        return Projection(4096, kind=o["projection_kind"], seed=o["seed"])
    try:
        k = int(spec)
    except ValueError:
        raise TangentlabError(
            f"tangentlab: --projection must be 'exact', 'auto' or an integer k, got {spec!r}."
        ) from None
    return Projection(k, kind=o["projection_kind"], seed=o["seed"])


def _kernel(o: dict[str, Any]):
    """Load or compute the kernel described by the options; returns (kernel, seconds, info)."""
    import tangentlab as tl

    t0 = time.perf_counter()
    trace = _trace(o)
    if o["kernel_file"]:
        kernel = tl.load_kernel(o["kernel_file"])
        if trace is not False and not kernel.is_trace:
            raise TangentlabError(
                f"tangentlab: --trace/--probes asks for a trace kernel but {o['kernel_file']} "
                "holds a full kernel; drop --trace/--probes to use it, or compute a trace "
                "kernel (without --kernel)."
            )
        _echo(f"tangentlab: loaded kernel {o['kernel_file']} (N={kernel.num_samples}, "
              f"C={kernel.num_classes}{', trace kernel' if kernel.is_trace else ''})")
        return kernel, time.perf_counter() - t0, {}, {"kernel": o["kernel_file"]}
    model, data, c, params, name, defaults = _resolve(o)
    if params == "all":
        params = None
    dataset_size = None
    if o.get("subsample") is not None:
        data, dataset_size = _subset(data, o["subsample"], o["seed"])
    proj = _projection({**o, "num_classes": c}, model, data, params)
    t0 = time.perf_counter()
    kernel = tl.compute_kernel(
        model, data, num_classes=c, projection=proj, params=params,
        memory_budget=o["memory_budget"], device=o["device"],
        batch_size=o["kernel_batch_size"], seed=o["seed"], trace=trace,
        cache=o["cache"] or Path(o["out"]) / "kernel", progress=not o["no_progress"],
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    info = {"source": name, "params": str(params), "projection": kernel.metadata["projection"],
            "num_samples": kernel.num_samples, "num_classes": kernel.num_classes,
            "kernel_seconds": round(seconds, 2)}  # fmt: skip
    if kernel.is_trace:
        info["trace"] = kernel.metadata.get("trace", "exact")
    if dataset_size is not None:
        info.update(dataset_size=dataset_size, subsample=kernel.num_samples)
    return kernel, seconds, defaults, info


def _subset(data, n: int, seed: int):
    """A seeded random subset of n of the N samples (the kernel's cache fingerprint covers
    it); returns ``((X_n, y_n), N)``."""
    import torch

    from tangentlab.data import as_arrays, num_rows, take

    x, y = as_arrays(data, where="tangentlab --subsample")
    total = num_rows(x)
    if n > total:
        raise TangentlabError(
            f"tangentlab: --subsample {n} exceeds the {total} samples loaded; give "
            "--samples N >= n (N is the data set size the forecast is for)."
        )
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    _echo(f"tangentlab: kernel on a random subset of {n} of the {total} samples")
    return (take(x, idx), y[idx]), total


def _batch(value: str | int | None) -> int | None:
    if value is None or str(value).strip().lower() in ("full", "none", ""):
        return None
    try:
        b = int(value)
    except ValueError:
        raise TangentlabError(
            f"tangentlab: --batch-size must be an integer or 'full', got {value!r}."
        ) from None
    return b


def _floats(value: str, name: str) -> list[float]:
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise TangentlabError(
            f"tangentlab: --{name} must be a comma-separated list of numbers, got {value!r}."
        ) from None


def _default_lr(kernel, momentum: float) -> float:
    """Half the stability limit: η̃ λ_max / N = 1 with η̃ = η / (1 − m) (DESIGN.md §3)."""
    lam_max = float(kernel.eigh()[0].max())
    lr = (1.0 - momentum) * kernel.num_samples / lam_max
    # 3 significant digits, rounded down: never past the boundary of the validity region
    digits = 2 - math.floor(math.log10(lr))
    lr = math.floor(lr * 10**digits) / 10**digits
    _echo(f"tangentlab: --lr not given: using lr = {lr:.4g}, half the stability limit "
          f"(λ_max/N = {lam_max / kernel.num_samples:.4g}, momentum {momentum:g}).")  # fmt: skip
    return float(f"{lr:.3g}")  # lr is already on 3 digits: drops float noise


def _target(o: dict[str, Any], initial_loss: float) -> float:
    if o["target_loss"] is not None:
        return float(o["target_loss"])
    if not 0 < o["target_drop"] < 1:
        raise TangentlabError(
            f"tangentlab: --target-drop must be in (0, 1), got {o['target_drop']!r}."
        )
    return (1.0 - o["target_drop"]) * initial_loss


def _check_hyper(o: dict[str, Any], *, lists: bool) -> None:
    """Reject malformed hyper-parameter options before the (possibly long) kernel computation."""
    sizes = str(o["batch_size"]).split(",") if lists else [o["batch_size"]]
    for b in sizes:
        _batch(b)
    if lists:
        for name in ("lr", "momentum", "weight_decay"):
            if o[name] is not None:
                _floats(o[name], name.replace("_", "-"))
    _target(o, 1.0)
    sub = o.get("subsample")
    if sub is not None:
        if sub < 1:
            raise TangentlabError(f"tangentlab: --subsample must be a positive integer, got {sub}.")
        if o["kernel_file"]:
            raise TangentlabError(
                "tangentlab: --subsample computes the kernel on n of the N samples; it cannot "
                "be combined with --kernel."
            )
        if any(_batch(b) is not None for b in sizes) or o["loss_name"] != "mse":
            raise TangentlabError(
                "tangentlab: --subsample forecasts full-batch MSE only (--batch-size full, "
                "--loss mse); minibatch noise and cross-entropy need the kernel on all N."
            )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tangentlab")
def main() -> None:
    """Forecast fine-tuning of pre-trained PyTorch networks from their tangent model,
    without training."""
    warnings.filterwarnings("default", category=UserWarning, module="tangentlab")


@main.command()
@_source_options
@_hyper_options(lists=False)
@_subsample_option
@_errors_as_usage
def forecast(**o: Any) -> None:
    """Forecast the loss/accuracy curves of SGD fine-tuning and the steps to a target loss.

    \b
    Example:
      $ tangentlab forecast --example digits-cnn --lr 0.5 --steps 200 --out runs/d
      setting           steps_to_target  ...  final_accuracy  diverges
      lr=0.5, full ...  41               ...  0.985           False
    """
    import tangentlab as tl
    from tangentlab.report import format_table, summary_row, write_forecast_report

    _check_hyper(o, lists=False)
    kernel, k_sec, defaults, info = _kernel(o)
    lr = o["lr"] if o["lr"] is not None else _default_lr(kernel, o["momentum"])
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    t0 = time.perf_counter()
    fc = tl.forecast(
        kernel, lr, steps, batch_size=_batch(o["batch_size"]), momentum=o["momentum"],
        weight_decay=o["weight_decay"], loss=o["loss_name"], target_scale=o["target_scale"],
        paths=o["paths"], seed=o["seed"], dataset_size=info.get("dataset_size"),
    )  # fmt: skip
    f_sec = time.perf_counter() - t0
    target = _target(o, float(fc.loss[0]))
    info.update(forecast_seconds=round(f_sec, 3), target_loss=target)
    paths = write_forecast_report(o["out"], [fc], kernel, target_loss=target,
                                  title=f"tangentlab forecast: {info.get('source', '')}",
                                  info=info)  # fmt: skip
    click.echo(format_table([summary_row(fc, target)]))
    if fc.diverges:
        if fc.stability >= fc.stability_limit:
            why = f"η̃·λ_max/N = {fc.stability:.3g} ≥ {fc.stability_limit:g}"
        else:
            why = f"the loss blows up after step {fc.divergence_step}"
        click.echo(f"DIVERGES: {why}; lower the learning rate.")
    t = fc.steps_to(target)
    click.echo(
        f"steps to loss {target:.4g}: {t if t is not None else f'not reached in {steps}'}"
        f"  (kernel {k_sec:.1f} s, forecast {f_sec:.2f} s)"
    )
    click.echo(f"wrote {paths['json']}, {paths['png']}, {paths['html']}")


@main.command()
@_source_options
@_hyper_options(lists=True)
@_subsample_option
@_errors_as_usage
def sweep(**o: Any) -> None:
    """Forecast every combination of comma-separated hyper-parameters from ONE kernel,
    ranked by predicted steps to the target loss.

    \b
    Example:
      $ tangentlab sweep --example digits-cnn --lr 0.1,0.5 --batch-size 16,full
      lr   batch_size  rank  steps_to_target  final_loss ...
    """
    import tangentlab as tl
    from tangentlab.report import write_sweep_report

    _check_hyper(o, lists=True)
    kernel, k_sec, defaults, info = _kernel(o)
    if o["lr"] is not None:
        lrs = _floats(o["lr"], "lr")
    else:
        base = _default_lr(kernel, max(_floats(o["momentum"], "momentum")))
        lrs = [base * f for f in (0.1, 0.3, 1.0, 1.5)]
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    grid = {
        "lr": lrs,
        "batch_size": [_batch(b) for b in str(o["batch_size"]).split(",")],
        "momentum": _floats(o["momentum"], "momentum"),
        "weight_decay": _floats(o["weight_decay"], "weight-decay"),
    }
    t0 = time.perf_counter()
    first = tl.forecast(kernel, lrs[0], 0, loss=o["loss_name"], target_scale=o["target_scale"])
    target = _target(o, float(first.loss[0]))
    table = tl.sweep(
        kernel, grid, target_loss=target, steps=steps, loss=o["loss_name"],
        target_scale=o["target_scale"], paths=o["paths"], seed=o["seed"],
        dataset_size=info.get("dataset_size"),
    )  # fmt: skip
    s_sec = time.perf_counter() - t0
    info.update(sweep_seconds=round(s_sec, 3), settings=len(table), target_loss=target)
    paths = write_sweep_report(o["out"], table, kernel, info=info,
                               title=f"tangentlab sweep: {info.get('source', '')}")  # fmt: skip
    shown = table.drop(columns=["forecast", "target_loss", "loss_limit"])
    with _pd_display():
        click.echo(shown.to_string(index=False))
    click.echo(f"target loss {target:.4g}; {len(table)} settings from one kernel "
               f"(kernel {k_sec:.1f} s, sweep {s_sec:.2f} s)")  # fmt: skip
    click.echo(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}, {paths['html']}")


class _pd_display:
    def __enter__(self):
        import pandas as pd

        self._ctx = pd.option_context("display.width", 160, "display.precision", 4)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@main.command()
@_source_options
@_errors_as_usage
def kernel(**o: Any) -> None:
    """Compute (or load from the cache) the kernel and print its summary as JSON."""
    import json

    from tangentlab.report import write_json

    kernel, k_sec, _, info = _kernel(o)
    kernel.eigh()
    summary = {**kernel.describe(), "info": info}
    path = write_json(summary, Path(o["out"]) / "kernel.json")
    click.echo(json.dumps(summary, indent=1, default=str))
    click.echo(f"kernel in {k_sec:.1f} s; wrote {path} (kernel file: "
               f"{Path(o['cache'] or Path(o['out']) / 'kernel') / 'kernel.safetensors'})",
               err=True)  # fmt: skip


@main.command()
@_source_options
@_hyper_options(lists=False)
@click.option("--log-every", type=int, default=None,
              help="Log the real run's full training loss every this many steps "
              "(default: ceil(steps/200)); 1 gives exact steps-to-target.")
@click.option("--bn", type=click.Choice(["frozen", "train"]), default="frozen",
              show_default=True,
              help="Batch norm in the real run: frozen (eval mode, as the tangent model) "
              "or train (batch statistics, running statistics updated, dropout on).")
@_errors_as_usage
def validate(**o: Any) -> None:
    """Forecast, then really fine-tune the same model on the same data with the same
    settings (a fresh copy, torch.optim.SGD), and compare the two.

    Prints the steps-to-target error |T̂ − T|/T, the curve error mean|L̂ − L|/L0, the
    plateau and final-accuracy differences and the cost ratio (real run / kernel +
    forecast); writes validation.json, validation.png (overlay) and validation.html.

    \b
    Example:
      $ tangentlab validate --example digits-cnn --samples 30 --steps 20 --out runs/v
      quantity                 forecast  real run  error
      steps to loss 0.3064     14        18        0.222
      ...
      curve error mean|L̂−L|/L0: 0.0226 (max 0.0286) over 21 logged steps
    """
    import tangentlab as tl
    from tangentlab.compare import compare
    from tangentlab.finetune import finetune
    from tangentlab.report import format_table, write_validation_report

    _check_hyper(o, lists=False)
    if o["log_every"] is not None and o["log_every"] < 1:
        raise TangentlabError(
            f"tangentlab: --log-every must be a positive integer, got {o['log_every']!r}."
        )
    kernel, k_sec, defaults, info = _kernel(o)
    lr = o["lr"] if o["lr"] is not None else _default_lr(kernel, o["momentum"])
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    batch = _batch(o["batch_size"])
    hyper = dict(batch_size=batch, momentum=o["momentum"], weight_decay=o["weight_decay"],
                 loss=o["loss_name"], target_scale=o["target_scale"])  # fmt: skip
    t0 = time.perf_counter()
    fc = tl.forecast(kernel, lr, steps, paths=o["paths"], seed=o["seed"], **hyper)
    f_sec = time.perf_counter() - t0

    # The real run starts from a freshly loaded model: the kernel's is left as it was.
    model, data, _, params, _, _ = _resolve(o, quiet=True)  # already described
    if params == "all":
        params = None
    _check_same_source(kernel, model, data, params)
    _echo(f"tangentlab: fine-tuning for real: {steps} steps of torch.optim.SGD "
          f"(BN {o['bn']}) ...")  # fmt: skip
    run = finetune(model, data, lr, steps, params=params, seed=o["seed"],
                   log_every=o["log_every"], bn=o["bn"], device=o["device"],
                   progress=not o["no_progress"], **hyper)  # fmt: skip
    if run.steps.size == 0:  # interrupted before the initial loss: nothing to compare
        raise KeyboardInterrupt
    # a kernel reused from the cache costs ~0 s now: count what it cost when computed
    k_cost = max(k_sec, float(kernel.metadata.get("seconds", 0.0) or 0.0))
    cmp = compare(fc, run, target_loss=o["target_loss"], target_drop=o["target_drop"],
                  forecast_seconds=k_cost + f_sec)
    target = cmp.target_loss
    info.update(
        forecast_seconds=round(f_sec, 3), kernel_seconds_counted=round(k_cost, 3),
        run_train_seconds=round(run.train_seconds, 3),
        run_eval_seconds=round(run.eval_seconds, 3),
        run_wall_seconds=round(run.wall_seconds, 3), cost_ratio=cmp.cost_ratio,
        target_loss=target, lr=lr, bn=o["bn"], log_every=run.hyperparameters["log_every"],
    )  # fmt: skip
    paths = write_validation_report(o["out"], fc, run, cmp, kernel, info=info,
                                    title=f"tangentlab validate: {info.get('source', '')}")

    def err(v):
        return "-" if v is None else f"{v:.3g}"

    rows = [
        {"quantity": f"steps to loss {target:.4g}", "forecast": cmp.steps_to_target_forecast,
         "real run": cmp.steps_to_target_run, "error": err(cmp.steps_to_target_error)},
        {"quantity": f"steps to plateau ({cmp.plateau_rel_eps:g})",
         "forecast": cmp.steps_to_plateau_forecast, "real run": cmp.steps_to_plateau_run,
         "error": err(cmp.steps_to_plateau_error)},
        {"quantity": f"loss at step {cmp.final_step}", "forecast": cmp.final_loss_forecast,
         "real run": cmp.final_loss_run, "error": "-"},
        {"quantity": f"accuracy at step {cmp.final_step}",
         "forecast": cmp.final_accuracy_forecast, "real run": cmp.final_accuracy_run,
         "error": err(cmp.final_accuracy_diff)},
    ]  # fmt: skip
    click.echo(format_table(rows))
    res = "" if cmp.steps_resolution in (None, 1) else f", located to {cmp.steps_resolution} steps"
    click.echo(f"steps-to-target error |T̂−T|/T: {err(cmp.steps_to_target_error)}"
               f"  (target {cmp.target_note}{res})")  # fmt: skip
    click.echo(f"curve error mean|L̂−L|/L0: {cmp.curve_error:.3g} (max {cmp.curve_error_max:.3g}) "
               f"over {cmp.steps.size} logged steps")  # fmt: skip
    if cmp.band_coverage is not None:
        click.echo(f"real loss inside the forecast band at {cmp.band_coverage:.0%} of the steps")
    click.echo(
        f"cost: real run {run.train_seconds:.2f} s training + {run.eval_seconds:.2f} s "
        f"full-loss evaluation; kernel {k_cost:.2f} s + forecast {f_sec:.2f} s; "
        f"ratio real/forecast {cmp.cost_ratio:.3g}x ({cmp.cost_ratio_with_eval:.3g}x with "
        "evaluation)"
    )
    if run.interrupted:
        click.echo(f"note: the real run was interrupted after {run.steps_done} steps; "
                   "compared on the steps it logged")  # fmt: skip
    for note in cmp.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {paths['json']}, {paths['png']}, {paths['html']}")


def _check_same_source(kernel, model, data, params) -> None:
    """The reloaded model and data must be those of the kernel (weights hash, fingerprint)."""
    from tangentlab.data import as_arrays, fingerprint
    from tangentlab.errors import ModeSwitchWarning
    from tangentlab.tangent import Tangent

    meta = kernel.metadata
    if "weights_sha" in meta:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModeSwitchWarning)  # the kernel already said so
            sha = Tangent(model, params=params).weights_hash()
        if sha != meta["weights_sha"]:
            raise TangentlabError(
                f"tangentlab validate: the model loaded for the real run differs from the "
                f"kernel's (weights sha {sha} vs {meta['weights_sha']}); its factory is not "
                "deterministic (random initialization?). Save the weights and pass --weights."
            )
    if "data_fingerprint" in meta:
        fp = fingerprint(*as_arrays(data, where="tangentlab validate"))
        if fp != meta["data_fingerprint"]:
            raise TangentlabError(
                f"tangentlab validate: the data loaded for the real run differs from the "
                f"kernel's (fingerprint {fp} vs {meta['data_fingerprint']}); use the same "
                "--data/--samples/--seed as the kernel."
            )


@main.command("examples")
def list_examples() -> None:
    """List the built-in examples."""
    from tangentlab.examples import EXAMPLES

    for name, desc in EXAMPLES.items():
        click.echo(f"{name:14s} {desc}")


if __name__ == "__main__":  # pragma: no cover
    main()

