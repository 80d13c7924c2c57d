"""``tangentlab`` command line: parse -> call the Python API -> write JSON/PNG/HTML.

No mathematics here: every step is a public function (``load_example`` /
``specs.load_model_spec`` / ``specs.load_data_spec``, ``compute_kernel``, ``forecast``,
``sweep``, ``report.write_*``).

Examples::

    tangentlab forecast --example fashion-lite0 --out runs/demo
    tangentlab forecast --example digits-cnn --lr 0.5 --batch-size 32 --momentum 0.9
    tangentlab sweep --example digits-cnn --lr 0.1,0.3,1 --batch-size 16,full --momentum 0,0.9
    tangentlab forecast --example digits-cnn --lr 0.5 --schedule warmup-cosine \
        --warmup-fraction 0.1
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tangentlab.errors import MemoryBudgetError, TangentlabError
from tangentlab.forecast import STABILIZED_REACHED
from tangentlab.projection import DEFAULT_KIND
from tangentlab.schedules import SCHEDULE_KINDS

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


def _linearize_options() -> list:
    """``--linearize`` and the options of its models (part of :func:`_source_options`)."""
    return [
        click.option("--linearize", type=click.Choice(["auto", "all", "body", "top"]),
                     default="auto", show_default=True,
                     help="body: keep the final linear head exact and linearize only the "
                     "body (tl.compute_head_body_kernel; a calibrated steps interval). all: "
                     "the tangent model (the whole network linearized). top (forecast, "
                     "validate, sweep): the top of the network exact, the last block linear "
                     "(exact_top; the most accurate on held-out tasks, with a reliability "
                     "check, ~7x body's cost for one forecast; see README 'Exact top'). auto: "
                     "forecast, validate and sweep take top where the network splits "
                     "(EfficientNet-Lite, BERT "
                     "classifiers, or --split) and the options allow it; else body where it "
                     "applies, else all, saying why (tl.choose_linearization). information "
                     "and influence use the tangent model."),
        click.option("--split", "split_spec", default=None, metavar="SPEC",
                     help="--linearize top: 'pkg.module:function' or 'file.py:function' "
                     "(imports and runs that code) returning (body, top) of the model, "
                     "model(x) == top(body(x)) (default: EfficientNet-Lite and BERT "
                     "classifiers are split by tangentlab.examples.split_model)."),
        click.option("--head", default=None, metavar="NAME",
                     help="--linearize body/auto: module name of the final nn.Linear "
                     "(default: the model's last nn.Linear)."),
        click.option("--directions", default=None, metavar="P|all",
                     help="--linearize body/auto: principal directions of the features kept "
                     "exact beside the head's rows (default: C); 'all': every direction "
                     "the training features span — closer to real runs on convolutional "
                     "bodies, costlier (N + C read-outs per sample; see README). "
                     "--linearize top: the directions of z kept exact (default 32C, at most "
                     "128, for a vector z, 2C P² for a map of P positions, at most all of "
                     "z)."),
    ]


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
                     "Jacobians fit in memory, else k=4096; the exact top, --linearize "
                     "top or auto's choice: k=1024, as accurate as 4096 on its held-out "
                     "64-px rounds at about half the simulations' cost)."),
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
        *_linearize_options(),
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
            click.option("--weight-decay", type=kind or float, default=None,
                         help=f"Weight decay λ{many}: coupled L2 as torch SGD (default 0), "
                         "decoupled as torch AdamW (default 0.01)."),
            click.option("--optimizer", "optimizer_name", type=click.Choice(["sgd", "adamw"]),
                         default="sgd", show_default=True,
                         help="torch.optim.SGD, or torch.optim.AdamW (forecast, sweep and "
                         "validate: exact AdamW of the tangent model in weight space; see "
                         "README 'AdamW')."),
            click.option("--betas", default=None, metavar="B1,B2",
                         help="--optimizer adamw: (β1, β2) (default 0.9,0.999)."),
            click.option("--eps", type=float, default=None,
                         help="--optimizer adamw: ε (default 1e-8)."),
            click.option("--adam-solver", type=click.Choice(["exact", "per-tensor"]),
                         default="exact", show_default=True,
                         help="--optimizer adamw: exact (explicit Jacobian J [N·C, P], "
                         "weight space) or per-tensor (one second moment per weight tensor, "
                         "function space from per-tensor kernels; scales like a kernel, "
                         "--projection k projects each large tensor)."),
            click.option("--schedule", type=kind or click.Choice(SCHEDULE_KINDS),
                         default="constant", show_default=True,
                         help=f"Learning-rate schedule over the --steps{many}: one of "
                         f"{', '.join(SCHEDULE_KINDS)}; --lr is its peak (tl.make_schedule)."),
            click.option("--warmup-steps", type=int, default=None,
                         help="Warmup length in steps of the warmup schedules."),
            click.option("--warmup-fraction", type=float, default=None,
                         help="Warmup length as a fraction of --steps (default 0.1)."),
            click.option("--step-every", type=int, default=None,
                         help="--schedule step: steps between two decays."),
            click.option("--step-gamma", type=float, default=None,
                         help="--schedule step: decay factor (default 0.1)."),
            click.option("--loss", "loss_name", type=click.Choice(["mse", "ce"]), default="mse",
                         show_default=True, help="½‖f − s·onehot(y)‖² or cross-entropy."),
            click.option("--target-scale", type=float, default=1.0, show_default=True,
                         help="s, the MSE target scale."),
            click.option("--paths", type=int, default=10, show_default=True,
                         help="Sample paths of a minibatch forecast (the exact top, "
                         "--linearize top or auto's choice, simulates one: the batches of "
                         "the real run, tl.finetune(seed=--seed))."),
            click.option("--target-loss", type=float, default=None,
                         help="ε of steps-to-target (default: (1 − target-drop)·L0)."),
            click.option("--target-drop", type=float, default=0.8, show_default=True,
                         help="Relative drop of the loss that defines the default target."),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def _pilot_option(fn):
    """``--pilot``: one short real run conditions the intervals (forecast, sweep)."""
    return click.option(
        "--pilot", is_flag=True, default=False,
        help="Head-exact model: first fine-tune for real one short pilot (full batch, SGD "
        "momentum 0.9 at 0.1 of the stability limit, until the loss halves; on held-out "
        "development tasks about 3% of a 24-setting sweep's cost) and condition the steps "
        "intervals on how far it ran from its own forecast (NOTE [pilot feature]).",
    )(fn)  # fmt: skip


def _measure_pilot(o: dict[str, Any], kernel, info: dict, timer: dict):
    """``--pilot``: tl.measure_pilot on the freshly loaded model and data (None without it)."""
    import tangentlab as tl

    if not o.get("pilot"):
        return None
    if not isinstance(kernel, tl.HeadBodyKernel):
        raise TangentlabError(
            "tangentlab: --pilot conditions the head-exact model's intervals; use "
            "--linearize body (or auto, on a model whose output is a final nn.Linear), not "
            "the tangent model or a saved --kernel."
        )
    model, data, _, params, _, _ = _resolve(o, quiet=True)  # already described
    if params == "all":
        params = None
    _check_same_source(kernel, model, data, params)
    _echo("tangentlab: pilot: fine-tuning for real (full batch, SGD momentum 0.9 at 0.1 of "
          "the stability limit) until the training loss halves ...")  # fmt: skip
    t0 = time.perf_counter()
    pilot = tl.measure_pilot(model, data, kernel, loss=_loss(o), params=params, seed=o["seed"],
                             device=o["device"], progress=not o["no_progress"])  # fmt: skip
    timer["pilot (real run + its forecast)"] = time.perf_counter() - t0
    _echo(f"tangentlab: {pilot}; {pilot.cost:,} sample-gradients")
    info["pilot"] = dict(feature=round(pilot.feature, 4), steps=pilot.steps,
                         forecast_steps=pilot.forecast_steps, lr=pilot.lr, cost=pilot.cost,
                         note=pilot.note)  # fmt: skip
    return pilot


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


class _Fault(click.ClickException):
    """An environment fault or an unexpected error: one line, exit code 1."""

    exit_code = 1


def _errors_as_usage(fn):
    """Library errors become one clear line and exit code 2; environment faults (files,
    disk, devices) and unexpected errors one line and exit code 1. ``--debug`` (or
    TANGENTLAB_DEBUG=1) shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug") or (
            os.environ.get("TANGENTLAB_DEBUG") == "1")  # fmt: skip
        try:
            with warnings.catch_warnings():  # restores showwarning when the command ends
                if not debug:
                    warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except TangentlabError as exc:
            if debug:
                raise
            raise _InputError(str(exc)) from None
        except OSError as exc:
            if debug:
                raise
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            raise _Fault(f"tangentlab: cannot read or write{where}: {exc.strerror or exc} "
                         "(check the path, its permissions and the free disk space; "
                         "--debug shows the traceback).") from None  # fmt: skip
        except (RuntimeError, ValueError, TypeError) as exc:
            if debug:
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _Fault(f"tangentlab: {type(exc).__name__}: {msg} (does the model accept "
                         "this data? --debug shows the traceback).") from None  # fmt: skip
        except KeyboardInterrupt:
            click.echo("\ninterrupted; what was finished (kernel chunks, a sweep's settings) "
                       "is kept in the cache and the next run resumes from it.", err=True)
            sys.exit(130)

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one line for CLI users (no source file or line of code)."""
    from tangentlab.errors import TangentlabWarning

    if issubclass(category, TangentlabWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line), err=True,
                   nl=False)  # fmt: skip


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
        return _eval_mode(ex.model, quiet), ex.data, ex.num_classes, params, name, d
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
    model = _eval_mode(model, quiet)
    return model, data, o["num_classes"], o["params"], Path(o["data_spec"]).name, {}


def _eval_mode(model, quiet: bool):
    """The tangent model is taken in eval mode; say so once, in CLI words."""
    training = sum(1 for m in model.modules() if m.training)
    model.eval()
    if training and not quiet:
        _echo("tangentlab: using the model in eval mode (batch-norm statistics frozen, "
              "dropout off), as the tangent model requires; `validate --bn train` trains "
              "the real run with batch statistics instead.")  # fmt: skip
    return model


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
    """``--projection``: 'exact', 'auto' (tl.choose_projection) or an integer k."""
    import tangentlab as tl
    from tangentlab.projection import Projection

    spec = str(o["projection"]).strip().lower()
    if spec == "exact":
        return None
    if spec == "auto":
        return tl.choose_projection(
            model, data, params=params, num_classes=o["num_classes"], trace=_trace(o),
            memory_budget=o["memory_budget"], device=o["device"], kind=o["projection_kind"],
            seed=o["seed"],
        )  # fmt: skip
    try:
        k = int(spec)
    except ValueError:
        raise TangentlabError(
            f"tangentlab: --projection must be 'exact', 'auto' or an integer k, got {spec!r}."
        ) from None
    return Projection(k, kind=o["projection_kind"], seed=o["seed"])


def _kernel(o: dict[str, Any], timer: dict):
    """Load or compute the kernel described by the options; returns (kernel, defaults,
    info) and records the seconds spent loading the model/data and on the kernel. What
    --linearize auto chose, and why, goes in info["linearize"] (JSON and HTML reports)."""
    kernel, defaults, info = _kernel_of(o, timer)
    if o.get("linearize_reason"):
        info["linearize"] = o["linearize_reason"]
    return kernel, defaults, info


def _kernel_of(o: dict[str, Any], timer: dict):
    import tangentlab as tl

    if o.get("optimizer_name") == "adamw":
        return _adam_source(o, timer)
    trace = _trace(o)
    if o["kernel_file"]:
        t0 = time.perf_counter()
        kernel = tl.load_kernel(o["kernel_file"])
        timer["kernel (loaded)"] = time.perf_counter() - t0
        if trace is not False and not kernel.is_trace:
            raise TangentlabError(
                f"tangentlab: --trace/--probes asks for a trace kernel but {o['kernel_file']} "
                "holds a full kernel; drop --trace/--probes to use it, or compute a trace "
                "kernel (without --kernel)."
            )
        _echo(f"tangentlab: loaded kernel {o['kernel_file']} (N={kernel.num_samples}, "
              f"C={kernel.num_classes}{', trace kernel' if kernel.is_trace else ''})")
        return kernel, {}, {"kernel": o["kernel_file"]}
    t0 = time.perf_counter()
    model, data, c, params, name, defaults = _resolve(o)
    if params == "all":
        params = None
    dataset_size = None
    if o.get("subsample") is not None:
        data, dataset_size = tl.subsample(data, o["subsample"], seed=o["seed"], verbose=True)
    proj = _projection({**o, "num_classes": c}, model, data, params)
    timer["model and data"] = time.perf_counter() - t0
    if o.get("linearize") == "auto":  # options allow it (_check_linearize): ask the model
        choice = tl.choose_linearization(model, data, head=o.get("head"), params=params)
        o["linearize"], o["head"] = choice.model, choice.head
        o["linearize_reason"] = f"auto: {choice.reason}"
        _echo(f"tangentlab: --linearize auto: {choice.reason}"
              + ("; --linearize all for the tangent model." if choice.model == "body" else "."))
    if o.get("linearize") == "body":
        if o.get("eval_spec") is not None or o.get("eval_samples") is not None:
            proj = None  # held-out curves need the exact read-out kernels (_check_held_out)
        return _head_body_kernel(o, timer, model, data, params, proj, name)
    t0 = time.perf_counter()
    kernel = tl.compute_kernel(
        model, data, num_classes=c, projection=proj, params=params,
        memory_budget=o["memory_budget"], device=o["device"],
        batch_size=o["kernel_batch_size"], seed=o["seed"], trace=trace,
        cache=o["cache"] or Path(o["out"]) / "kernel", progress=not o["no_progress"],
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    timer["kernel"] = seconds
    info = {"source": name, "params": str(params), "projection": kernel.metadata["projection"],
            "num_samples": kernel.num_samples, "num_classes": kernel.num_classes,
            "kernel_seconds": round(seconds, 2)}  # fmt: skip
    if kernel.is_trace:
        info["trace"] = kernel.metadata.get("trace", "exact")
    if dataset_size is not None:
        info.update(dataset_size=dataset_size, subsample=kernel.num_samples)
    return kernel, defaults, info


def _head_body_kernel(o: dict[str, Any], timer: dict, model, data, params, proj, name: str):
    """``--linearize body``: the head-exact, body-linear model (tl.compute_head_body_kernel)."""
    import tangentlab as tl

    t0 = time.perf_counter()
    hb = tl.compute_head_body_kernel(
        model, data, head=o["head"], params=params, projection=proj, seed=o["seed"],
        directions=_directions(o.get("directions")),
        memory_budget=o["memory_budget"], device=o["device"],
        cache=Path(o["cache"] or Path(o["out"]) / "kernel") / "head-body",
        progress=not o["no_progress"],
    )  # fmt: skip
    seconds = timer["kernel (head exact, body linear)"] = time.perf_counter() - t0
    info = {"source": name, "params": str(params), "projection": str(proj),
            "num_samples": hb.num_samples, "num_classes": hb.num_classes,
            "kernel_seconds": round(seconds, 2),
            "model_of_training": f"head exact ({hb.metadata['head']}), body linear; "
            f"r = {hb.metadata['rank']}, {hb.metadata['probes']} probes"}  # fmt: skip
    return hb, {}, info


def _directions(value: str | None) -> int | str | None:
    """``--directions``: None, 'all' or an integer >= 0."""
    if value is None or str(value).strip().lower() == "all":
        return None if value is None else "all"
    try:
        return int(value)
    except ValueError:
        raise TangentlabError(
            f"tangentlab: --directions must be an integer >= 0 or 'all', got {value!r}."
        ) from None


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


def _lr(o: dict[str, Any], kernel, momentum: float, timer: dict) -> float:
    """``--lr``, or tl.stable_lr: half the stability limit (η̃ λ_max / N = 1)."""
    import tangentlab as tl

    if o["lr"] is not None and not isinstance(o["lr"], str):
        return float(o["lr"])
    _eigh(kernel, timer)
    lr = tl.stable_lr(kernel, momentum=momentum)
    lam_max = (kernel.top_eigenvalue("mse") if isinstance(kernel, tl.HeadBodyKernel) else
               float(kernel.eigh()[0].max()))  # fmt: skip
    _echo(f"tangentlab: --lr not given: using lr = {lr:.4g} (tl.stable_lr: half the "
          f"stability limit, λ_max/N = {lam_max / kernel.num_samples:.4g}, momentum "
          f"{momentum:g}).")  # fmt: skip
    return lr


def _eigh(kernel, timer: dict) -> None:
    """The kernel's eigendecomposition, timed (cached on the kernel once computed)."""
    if getattr(kernel, "_eig", True) is not None:  # computed, or not a Kernel (head-body)
        return
    t0 = time.perf_counter()
    _echo("tangentlab: eigendecomposition of the kernel (kept with it once computed) ...")
    kernel.eigh()
    timer["eigendecomposition"] = time.perf_counter() - t0


def _timings(timer: dict, start: float) -> str:
    """``kernel 7.1 s, eigendecomposition 2.0 s, forecast 0.4 s, other 1.2 s; total 10.7 s``."""
    total = time.perf_counter() - start
    parts = [f"{k} {v:.1f} s" for k, v in timer.items()]
    parts.append(f"other {max(total - sum(timer.values()), 0.0):.1f} s")
    return ", ".join(parts) + f"; total {total:.1f} s"


def _target(o: dict[str, Any], initial_loss: float) -> float:
    import tangentlab as tl

    if o["target_loss"] is not None:
        return float(o["target_loss"])
    return tl.default_target(initial_loss, drop=o["target_drop"])


def _check_hyper(o: dict[str, Any], *, lists: bool) -> list:
    """Validate every setting before the (possibly long) kernel computation; returns the
    optimizers (lr = 1 as a stand-in while --lr is not given)."""
    import tangentlab as tl
    from tangentlab.forecast import check_options

    sizes = [_batch(b) for b in (str(o["batch_size"]).split(",") if lists else
                                 [o["batch_size"]])]  # fmt: skip
    lrs = [1.0] if o["lr"] is None else (_floats(o["lr"], "lr") if lists else [o["lr"]])
    moms = _floats(o["momentum"], "momentum") if lists else [o["momentum"]]
    wds = _weight_decays(o, lists=lists)
    if o.get("optimizer_name") == "adamw":
        opts = _adamw_grid(o, lrs, moms, wds)
    else:
        _check_sgd_only(o)
        opts = tl.SGD.grid(lr=lrs, momentum=moms, weight_decay=wds)
    _schedules(o, o["steps"] if o["steps"] is not None else 300, lists=lists)  # validated now
    steps = o["steps"] if o["steps"] is not None else 1
    for b in sizes:
        check_options("tangentlab", opts[0], steps, loss=_loss(o), batch_size=b,
                      paths=o["paths"], seed=o["seed"])  # fmt: skip
    if not 0 < o["target_drop"] < 1:
        raise TangentlabError(
            f"tangentlab: --target-drop must be in (0, 1), got {o['target_drop']!r}; 0.8 "
            "targets an 80% drop of the initial loss."
        )
    if o["target_loss"] is not None and not math.isfinite(o["target_loss"]):
        raise TangentlabError(f"tangentlab: --target-loss must be finite, got {o['target_loss']}.")
    _check_subsample(o, sizes)
    _check_linearize(o)
    _check_device(o["device"])
    return opts


def _weight_decays(o: dict[str, Any], *, lists: bool) -> list[float]:
    """``--weight-decay`` (a list for sweep); default 0 for SGD, 0.01 (torch's) for AdamW."""
    if o["weight_decay"] is None:
        return [0.01 if o.get("optimizer_name") == "adamw" else 0.0]
    return _floats(o["weight_decay"], "weight-decay") if lists else [o["weight_decay"]]


_ADAMW_COMMANDS = ("forecast", "sweep", "validate")


def _adamw_grid(o: dict[str, Any], lrs: list, moms: list, wds: list) -> list:
    """``--optimizer adamw``: the AdamW optimizers, after the checks that only it needs."""
    import tangentlab as tl

    command = click.get_current_context().info_name
    if command not in _ADAMW_COMMANDS:
        raise TangentlabError(
            f"tangentlab {command}: --optimizer adamw is available for "
            f"{', '.join(_ADAMW_COMMANDS)}; {command} computes SGD's closed forms (use "
            "--optimizer sgd)."
        )
    if any(m != 0 for m in moms):
        raise TangentlabError(
            "tangentlab: --momentum is SGD's heavy-ball coefficient; AdamW's first-moment "
            "decay is β1 of --betas (e.g. --betas 0.9,0.999)."
        )
    if o["lr"] is None:
        raise TangentlabError(
            "tangentlab: --optimizer adamw needs --lr (the default, tl.stable_lr, is SGD's "
            "stability criterion); e.g. --lr 1e-4."
        )
    betas = (0.9, 0.999) if o.get("betas") is None else tuple(_floats(o["betas"], "betas"))
    if len(betas) != 2:
        raise TangentlabError(
            f"tangentlab: --betas must be two numbers B1,B2, got {o['betas']!r}; e.g. "
            "--betas 0.9,0.999."
        )
    clash = [f for f, v in (("--kernel", o.get("kernel_file")), ("--subsample", o.get("subsample")),
                            ("--trace", o.get("trace_kernel")), ("--probes", o.get("probes")),
                            ("--linearize body", o.get("linearize") == "body"))
             if v]  # fmt: skip
    if clash:
        raise TangentlabError(
            f"tangentlab: --optimizer adamw forecasts from the tangent model's Jacobians "
            f"(exact AdamW in weight space, or per-tensor kernels); it cannot be combined "
            f"with {', '.join(clash)} (fixed-kernel forecasts of SGD)."
        )
    eps = 1e-8 if o.get("eps") is None else o["eps"]
    return tl.AdamW.grid(lr=lrs, betas=[betas], eps=[eps], weight_decay=wds)


def _check_sgd_only(o: dict[str, Any]) -> None:
    given = [f for f, v in (("--betas", o.get("betas")), ("--eps", o.get("eps")),
                            ("--adam-solver", o.get("adam_solver") not in (None, "exact")))
             if v is not None and v is not False]  # fmt: skip
    if given:
        raise TangentlabError(
            f"tangentlab: {'/'.join(given)} go with --optimizer adamw (the SGD forecast has "
            "no such setting)."
        )


def _adam_source(o: dict[str, Any], timer: dict):
    """``--optimizer adamw``: the tangent model's Jacobians for AdamW (exact weight space, or
    per-tensor kernels); returns (source, defaults, info) as :func:`_kernel`."""
    import tangentlab as tl

    t0 = time.perf_counter()
    model, data, c, params, name, defaults = _resolve(o)
    if params == "all":
        params = None
    timer["model and data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    common = dict(params=params, memory_budget=o["memory_budget"], device=o["device"],
                  progress=not o["no_progress"])  # fmt: skip
    if o.get("adam_solver") == "per-tensor":
        spec = str(o["projection"]).strip().lower()
        k = None if spec in ("exact", "auto") else int(spec) if spec.isdigit() else spec
        if isinstance(k, str):
            raise TangentlabError(
                f"tangentlab: --projection must be 'exact', 'auto' or an integer k, got {spec!r}."
            )
        source = tl.compute_block_kernel(model, data, projection=k, seed=o["seed"], **common)
        what = f"per-tensor kernels ({len(source.sizes)} tensors, projection {k})"
        timer["per-tensor kernels"] = seconds = time.perf_counter() - t0
    else:
        source = tl.compute_weight_space_tangent(model, data, **common)
        what = f"explicit Jacobian [N·C, P] = [{source.jacobian.shape[0] * source.num_classes}, " \
            f"{source.num_params}]"
        timer["Jacobian"] = seconds = time.perf_counter() - t0
    info = {"source": name, "params": str(params), "num_samples": source.num_samples,
            "num_classes": source.num_classes, "kernel_seconds": round(seconds, 2),
            "model_of_training": f"AdamW on the tangent model from its {what}"}  # fmt: skip
    return source, defaults, info


_WARMUP_OPTIONS = ("warmup_steps", "warmup_fraction")
_STEP_OPTIONS = ("step_every", "step_gamma")


def _schedules(o: dict[str, Any], steps: int, *, lists: bool) -> list:
    """``--schedule`` (comma-separated for sweep) and its options -> the schedules of a run of
    ``steps`` steps, by tl.make_schedule (warmup options go to the warmup kinds, step options
    to ``step``)."""
    import tangentlab as tl

    raw = str(o["schedule"])
    kinds = [k.strip() for k in raw.split(",") if k.strip()] if lists else [raw]
    if not kinds or any(k not in SCHEDULE_KINDS for k in kinds):
        raise TangentlabError(
            f"tangentlab: --schedule must be one of {', '.join(SCHEDULE_KINDS)}"
            f"{' (comma-separated)' if lists else ''}, got {raw!r}."
        )
    for names, fits, kinds_text in (
        (_WARMUP_OPTIONS, lambda k: k.startswith("warmup"), "warmup, warmup-linear or "
         "warmup-cosine"), (_STEP_OPTIONS, lambda k: k == "step", "step"),
    ):  # fmt: skip
        given = [n for n in names if o.get(n) is not None]
        if given and not any(fits(k) for k in kinds):
            flags = "/".join("--" + n.replace("_", "-") for n in given)
            raise TangentlabError(
                f"tangentlab: {flags} goes with --schedule {kinds_text}; got --schedule {raw}."
            )
    out = []
    for k in kinds:
        names = _WARMUP_OPTIONS if k.startswith("warmup") else _STEP_OPTIONS if k == "step" else ()
        try:
            out.append(tl.make_schedule(k, steps, **{n: o.get(n) for n in names}))
        except TangentlabError as exc:  # in CLI words: the flags, not the Python names
            msg = str(exc).replace("make_schedule:", f"tangentlab: --schedule {k}:", 1)
            for n in (*_WARMUP_OPTIONS, *_STEP_OPTIONS):
                msg = msg.replace(n, "--" + n.replace("_", "-"))
            raise TangentlabError(msg) from None
    return out


def _check_linearize(o: dict[str, Any]) -> None:
    """Refuse --linearize body with options of the tangent model only; resolve
    --linearize auto to all when one is given (else _kernel asks the model)."""
    if o.get("linearize") == "top":
        _check_top(o)
        return
    if o.get("split_spec") is not None:
        if o.get("linearize") != "auto":
            raise TangentlabError("tangentlab: --split goes with --linearize top (or auto).")
        o["linearize"], o["linearize_reason"] = "top", "auto: the exact top, for --split"
        _check_top(o)
        return
    if o.get("linearize") == "all":
        for flag in ("head", "directions"):
            if o.get(flag) is not None:
                raise TangentlabError(
                    f"tangentlab: --{flag} goes with --linearize body (or auto).")
        return
    _directions(o.get("directions"))  # a bad value is refused before any work
    clash = [f for f, v in (("--kernel", o.get("kernel_file")),
                            ("--subsample", o.get("subsample")),
                            ("--trace", o.get("trace_kernel")), ("--probes", o.get("probes")),
                            ("--optimizer adamw", o.get("optimizer_name") == "adamw"))
             if v]  # fmt: skip
    if o.get("linearize") == "auto":
        if o.get("eval_spec") is not None or o.get("eval_samples") is not None:
            clash.append("held-out curves (RESULTS.md 'sweeps')")
        if clash:
            o["linearize"] = "all"
            o["linearize_reason"] = f"auto: the tangent model, for {', '.join(clash)}"
            if clash == ["--kernel"]:
                return  # a saved kernel is the tangent model's: nothing to say
            _echo(f"tangentlab: --linearize auto: the tangent model, for what the head-exact "
                  f"model lacks or does no better: {', '.join(clash)}.")
        return
    if clash:
        raise TangentlabError(
            f"tangentlab: --linearize body computes its own kernels; it cannot be combined "
            f"with {', '.join(clash)} (those are for the tangent model, --linearize all)."
        )


def _top_clash(o: dict[str, Any]) -> list[str]:
    """The options given that ``--linearize top`` cannot take (the other models' options)."""
    return [f for f, v in (("--kernel", o.get("kernel_file")),
                           ("--subsample", o.get("subsample")),
                           ("--trace", o.get("trace_kernel")), ("--probes", o.get("probes")),
                           ("--head", o.get("head")),
                           ("--optimizer adamw", o.get("optimizer_name") == "adamw"),
                           ("--pilot", o.get("pilot")),
                           ("--weight-decay", _decays(o.get("weight_decay"))),
                           ("held-out curves (--eval-data/--eval-samples)",
                            o.get("eval_spec") is not None or o.get("eval_samples") is not None))
            if v]  # fmt: skip


def _decays(value: Any) -> bool:
    """Whether ``--weight-decay`` (a number, or sweep's comma-separated list) asks for any."""
    try:
        return value is not None and any(float(v) != 0 for v in str(value).split(","))
    except ValueError:
        return True  # not numbers: refused where the option is parsed


# --projection auto of the exact top: k = 1024, as accurate as 4096 on two held-out 64-px
# rounds at about half the simulations' seconds (PLAN-fresh10.md; README "Exact top").
TOP_PROJECTION = 1024
# Built-in examples whose network tangentlab.examples.split_model splits (digits-cnn: none).
_TOP_EXAMPLES = ("fashion-lite0", "rt-minilm")


class _NoTop(Exception):
    """--linearize auto tried the exact top on a model it does not apply to: fall back."""


def _auto_top(o: dict[str, Any]) -> bool:
    """``--linearize auto`` of forecast/validate/sweep: try the exact top (``o["linearize"]`` set
    to ``"top"``, ``o["auto_top"]``) where the options allow it: none of the other models'
    options (:func:`_top_clash`), no ``--directions`` (the head-exact model's meaning), BN
    frozen, and a model that may split (a built-in example that does, or a ``--model``:
    asked once loaded, :func:`_top_kernel`; else :class:`_NoTop` and the usual choice)."""
    if o.get("linearize") != "auto" or _top_clash(o) or o.get("directions") is not None:
        return False
    if o.get("bn", "frozen") != "frozen" or o.get("split_spec") is not None:
        return False
    if o["model_spec"] is None and o["data_spec"] is None:
        if (o["example"] or "fashion-lite0") not in _TOP_EXAMPLES:
            return False
    o["linearize"], o["auto_top"] = "top", True
    return True


def _check_top(o: dict[str, Any]) -> None:
    """``--linearize top``: forecast only, SGD, and none of the other models' options."""
    command = click.get_current_context().info_name
    if command not in ("forecast", "validate", "sweep"):
        raise TangentlabError(
            f"tangentlab {command}: --linearize top (the exact-top model) is available for "
            "forecast, validate and sweep; use --linearize body or all here, or the Python "
            "API (tangentlab.experimental.exact_top)."
        )
    clash = _top_clash(o)
    if clash:
        raise TangentlabError(
            f"tangentlab: --linearize top computes its own kernel and simulates SGD without "
            f"weight decay; it cannot be combined with {', '.join(clash)} (use --linearize "
            "body or all for those)."
        )
    _directions(o.get("directions"))
    if str(o.get("projection", "auto")).strip().lower() not in ("auto", "exact"):
        try:
            int(o["projection"])
        except ValueError:
            raise TangentlabError(
                f"tangentlab: --projection must be 'exact', 'auto' or an integer k, got "
                f"{o['projection']!r}."
            ) from None


def _check_subsample(o: dict[str, Any], sizes: list) -> None:
    sub = o.get("subsample")
    if sub is None:
        return
    if sub < 1:
        raise TangentlabError(f"tangentlab: --subsample must be a positive integer, got {sub}.")
    if o["kernel_file"]:
        raise TangentlabError(
            "tangentlab: --subsample computes the kernel on n of the N samples; it cannot "
            "be combined with --kernel."
        )
    if any(b is not None for b in sizes) or o["loss_name"] != "mse":
        raise TangentlabError(
            "tangentlab: --subsample forecasts full-batch MSE only (--batch-size full, "
            "--loss mse); minibatch noise and cross-entropy need the kernel on all N."
        )


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TangentlabError(
            f"tangentlab: --device {device!r} is not a device name; use cpu or cuda[:i]."
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TangentlabError(
            f"tangentlab: --device {device} asked for CUDA, but this torch build or machine "
            "has no usable GPU (torch.cuda.is_available() is False); use --device cpu."
        )


def _loss(o: dict[str, Any]):
    import tangentlab as tl

    if o["loss_name"] == "ce":
        if o["target_scale"] != 1.0:
            raise TangentlabError(
                "tangentlab: --target-scale applies to --loss mse only; drop it for ce."
            )
        return tl.CrossEntropy()
    return tl.MSE(o["target_scale"])


def _eval_options(fn):
    """``--eval-data`` / ``--eval-samples`` of ``forecast`` and ``validate``: held-out curves."""
    opts = [
        click.option("--eval-data", "eval_spec", default=None, metavar="SPEC",
                     help="Held-out set (formats as --data): forecast its loss/accuracy "
                     "curves through the cross kernel Θ(X_eval, X) and the best step "
                     "(minimum held-out loss) as an early-stopping recommendation."),
        click.option("--eval-samples", type=int, default=None, metavar="M",
                     help="Built-in examples: M held-out samples from the example's test "
                     "split (disjoint from the training samples)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tangentlab")
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Forecast fine-tuning of pre-trained PyTorch networks from their tangent model,
    without training."""
    warnings.filterwarnings("default", category=UserWarning, module="tangentlab")


@main.command()
@_source_options
@_hyper_options(lists=False)
@_subsample_option
@_eval_options
@_pilot_option
@_errors_as_usage
def forecast(**o: Any) -> None:
    """Forecast the loss/accuracy curves of SGD (or AdamW) fine-tuning and the steps to a
    target loss.

    \b
    Example:
      $ tangentlab forecast --example digits-cnn --lr 0.5 --steps 200 --out runs/d
      setting           steps_to_target  ...  final_accuracy  diverges
      lr=0.5, full ...  41               ...  0.985           False
    """
    import tangentlab as tl
    from tangentlab.report import format_table, summary_row, write_forecast_report

    start, timer = time.perf_counter(), {}
    optimizer = _check_hyper(o, lists=False)[0]
    if _top_or_fallback(o, _forecast_top, optimizer, start, timer):
        return
    _check_held_out(o)
    kernel, defaults, info = _kernel(o, timer)
    lr = _lr(o, kernel, o["momentum"], timer)
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    optimizer = optimizer.replace(lr=lr, schedule=_schedules(o, steps, lists=False)[0])
    cross, _ = _held_out(o, kernel, timer)
    if o["batch_size"] in (None, "full") and o["loss_name"] == "mse":
        _eigh(kernel, timer)  # the closed form needs it: timed on its own line
    t0 = time.perf_counter()
    fc = tl.forecast(
        kernel, optimizer, steps, loss=_loss(o), batch_size=_batch(o["batch_size"]),
        paths=o["paths"], seed=o["seed"], dataset_size=info.get("dataset_size"),
        eval_data=cross,
    )  # fmt: skip
    timer["forecast"] = time.perf_counter() - t0
    pilot = _measure_pilot(o, kernel, info, timer)
    if cross is not None:
        info.update(eval_samples=cross.num_eval,
                    cross_kernel_seconds=round(timer["cross kernel"], 3))  # fmt: skip
    target = _target(o, float(fc.loss[0]))
    info["target_definition"] = ("given (--target-loss)" if o["target_loss"] is not None else
                                  f"a drop of {o['target_drop']:.0%} from the initial loss "
                                  "(tl.default_target)")  # fmt: skip
    info.update(forecast_seconds=round(timer["forecast"], 3), target_loss=target,
                schedule=optimizer.schedule.describe(),
                lr_choice=info.get("lr_choice", "given (--lr)" if o["lr"] is not None else
                                   "tl.stable_lr: half the stability limit"))  # fmt: skip
    paths = write_forecast_report(o["out"], [fc], kernel, target_loss=target,
                                  title=f"tangentlab forecast: {info.get('source', '')}",
                                  info=info, pilot=pilot)  # fmt: skip
    click.echo(format_table([summary_row(fc, target, pilot=pilot)]))
    if fc.diverges:
        _print_divergence(fc)
    t = fc.steps_to(target)
    click.echo(f"steps to loss {target:.4g}: {t if t is not None else f'not reached in {steps}'}")
    if fc.method.get("model") == "head-body":  # calibrated: NOTE [steps interval]
        click.echo(f"  real run, 80% interval: {fc.steps_interval(target, pilot=pilot)}")
        last = fc.loss.shape[0] - 1  # NOTE [loss interval]: the band at the horizon
        click.echo(f"  real loss at step {last}: "
                   f"{fc.loss_interval(pilot=pilot).at(last)} (band of the steps intervals)")
    elif o.get("linearize") == "all" and t is not None:
        click.echo("  note: on seven held-out fine-tuning tasks real runs reached their 50-90% "
                   "drops a median 3.9-5.8x sooner than the tangent model forecast (RESULTS.md "
                   "'holdout-fresh', 'holdout-depth'); --linearize body (a final nn.Linear "
                   "head) gives a calibrated interval, median error 26% there.")
    if fc.best_step is not None:
        b = fc.best_step
        click.echo(f"held-out ({cross.num_eval} samples): best step {b} (min held-out loss "
                   f"{fc.eval_loss[b]:.4g}, accuracy {fc.eval_accuracy[b]:.1%}); final held-out "
                   f"accuracy {fc.eval_accuracy[-1]:.1%}")  # fmt: skip
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {paths['json']}, {paths['png']}, {paths['html']}")


def _split(o: dict[str, Any], model) -> tuple[Any, Any, str]:
    """(body, top, how) of ``--linearize top``: ``--split`` (user code), else
    tangentlab.examples.split_model; refused unless top(body(x)) is the model's output."""
    from tangentlab.examples import split_model
    from tangentlab.specs import load_split_spec

    if o.get("split_spec") is not None:
        _echo(f"tangentlab: --split {o['split_spec']}: importing and running that code.")
        body, top = load_split_spec(o["split_spec"], model)
        return body.eval(), top.eval(), f"--split {o['split_spec']}"  # as the model (_resolve)
    try:
        return split_model(model)
    except TangentlabError as exc:
        raise TangentlabError(
            "tangentlab: --linearize top needs the model split into a linearized body and an "
            "exact top; " + str(exc).replace("split_model: ", "", 1)
        ) from None


def _top_kernel(o: dict[str, Any], timer: dict) -> dict[str, Any]:
    """``--linearize top``: the model split (checked to compose to it) and the exact-top
    kernel (tangentlab.experimental.exact_top.compute_exact_top_kernel)."""
    from tangentlab.data import as_arrays, take
    from tangentlab.examples import split_trunk
    from tangentlab.experimental import exact_top as et

    t0 = time.perf_counter()
    model, data, _, params, name, defaults = _resolve(o)
    if params == "all":
        params = None
    if o.get("auto_top"):
        import tangentlab as tl
        from tangentlab.examples import split_model

        choice = tl.choose_linearization(model, params=params, exact_top=True)
        if choice.model != "top":
            try:
                split_model(model)
            except TangentlabError:
                raise _NoTop(f"no known split of a {type(model).__name__} into a linearized "
                             "body and an exact top") from None
            raise _NoTop(choice.reason)
        o["linearize_reason"] = f"auto: {choice.reason}"
        _echo(f"tangentlab: --linearize auto: {choice.reason}.")
    body, top, how = _split(o, model)
    trunk, body = split_trunk(body, params)  # NOTE [frozen trunk]: (None, body) if unknown
    x, _ = as_arrays(data, where="tangentlab")
    gap = et.split_mismatch(model, body, top, take(x, slice(0, 4)), trunk=trunk)
    if not gap <= 1e-4:
        raise TangentlabError(
            f"tangentlab: --linearize top: top(body(x)) differs from the model's output by "
            f"{gap:.3g} (relative) on the first samples ({how}); the split must compose to the "
            "model, the top ending at its logits."
        )
    timer["model and data"] = time.perf_counter() - t0
    _echo(f"tangentlab: --linearize top: {how}; the body's trained weights linearized "
          "(README 'Exact top, last block linear')"
          + ("; the frozen layers below them run once (split_trunk)." if trunk else "."))
    spec = str(o["projection"]).strip().lower()
    k = None if spec == "exact" else TOP_PROJECTION if spec == "auto" else int(spec)
    t0 = time.perf_counter()
    try:
        etk = et.compute_exact_top_kernel(
            body, top, data, params=params, top_params=params, projection=k, seed=o["seed"],
            directions=_directions(o.get("directions")), memory_budget=o["memory_budget"],
            cache=Path(o["cache"] or Path(o["out"]) / "kernel") / "exact-top",
            progress=not o["no_progress"], trunk=trunk)  # fmt: skip
    except MemoryBudgetError as exc:
        raise MemoryBudgetError(
            f"{exc} The exact top keeps Φ [N q, k] in memory (q directions of z per sample; "
            f"{'--linearize auto chose it' if o.get('auto_top') else '--linearize top'}): "
            "--projection 256, fewer --directions (by default 32C, at most 128, for a vector z, "
            "2C P² for a map) or --linearize body (the head-exact model) need far less."
        ) from None
    timer["kernel (exact top, block linear)"] = time.perf_counter() - t0
    return dict(kernel=etk, name=name, params=params, how=how, defaults=defaults, k=k)


def _top_forecast(o: dict[str, Any], optimizer, timer: dict, *, advise: bool) -> dict[str, Any]:
    """``--linearize top``: split, kernel, learning rate and the exact-top forecast
    (tangentlab.experimental.exact_top), with reliable_lr's advice where the check flags
    (``advise``); returns what forecast and validate report."""
    import warnings

    from tangentlab.errors import ValidityWarning
    from tangentlab.experimental import exact_top as et

    src = _top_kernel(o, timer)
    etk, name, params, how, defaults, k = (src[a] for a in ("kernel", "name", "params", "how",
                                                            "defaults", "k"))  # fmt: skip
    loss, batch = _loss(o), _batch(o["batch_size"])
    lr = o["lr"]
    if lr is None:
        t0 = time.perf_counter()
        _echo("tangentlab: --lr not given: the exact-top model's stability limit at w0 (Lanczos on "
              "its Gauss-Newton matrix) ...")
        lr = et.stable_lr(etk, loss=loss, momentum=o["momentum"])
        timer["learning rate"] = time.perf_counter() - t0
        _echo(f"tangentlab: --lr not given: using lr = {lr:.4g} (exact_top.stable_lr: half "
              f"the exact-top model's stability limit at w0 for {loss.name}, momentum "
              f"{o['momentum']:g}).")  # fmt: skip
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    optimizer = optimizer.replace(lr=float(lr), schedule=_schedules(o, steps, lists=False)[0])
    kw = dict(loss=loss, batch_size=batch, seed=o["seed"])
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ValidityWarning)
        fc = et.forecast_exact_top(etk, optimizer, steps, progress=not o["no_progress"], **kw)
    timer["forecast"] = time.perf_counter() - t0
    l0 = float(fc.loss[0])
    if o["target_loss"] is not None:
        drop = 1.0 - float(o["target_loss"]) / l0
        if not 0.0 < drop < 1.0:
            raise TangentlabError(
                f"tangentlab: --target-loss {o['target_loss']:g} must lie between 0 and the "
                f"initial loss {l0:.4g} (--linearize top reads its targets as drops of L0)."
            )
    else:
        drop = float(o["target_drop"])
    forecasts = [(f"lr {fc.settings['lr']:.4g}", fc)]
    flagged = fc.blowup is not None or fc.flagged(drop) or bool(fc.reliability.get("flagged"))
    for w in caught:
        _echo(f"tangentlab: warning: {w.message}")
    skipped = flagged and advise and et.schedule_decays(optimizer.schedule)
    if skipped:
        _echo(f"tangentlab: the check flags this forecast; reliable_lr's advice needs a schedule "
              f"that ends at the full rate (got {optimizer.schedule.describe()}): lower --lr "
              "and forecast again.")
    elif flagged and advise:
        t0 = time.perf_counter()
        _echo("tangentlab: the check flags this forecast; exact_top.reliable_lr looks for "
              "the largest rate (x0.8 each try) whose forecast passes ...")
        deep = max(*et.RELIABILITY_DROPS, drop)
        safe = et.reliable_lr(etk, optimizer, steps, drops=tuple(sorted({0.5, 0.8, drop})),
                              stop_below=(1.0 - deep) * l0, progress=not o["no_progress"],
                              **kw)  # fmt: skip
        timer["reliable_lr"] = time.perf_counter() - t0
        if safe is not None and safe is not fc:
            forecasts.append((f"advised: lr {safe.settings['lr']:.4g}", safe))
    info = {"source": name, "params": str(params), "model_of_training":
            f"exact top, block linear: {how}", "projection": str(k),
            "directions": etk.rank, "kernel_seconds": round(etk.metadata["seconds"], 2),
            "num_samples": etk.num_samples, "num_classes": etk.metadata["num_classes"],
            "lr_choice": "given (--lr)" if o["lr"] is not None else
            "exact_top.stable_lr: half the model's stability limit",
            "target_definition": f"a drop of {drop:.0%} from the initial loss",
            "minibatch": "one path, the batches of tl.finetune(seed=--seed)"
            if batch is not None else "full batch"}  # fmt: skip
    if o.get("linearize_reason"):
        info["linearize"] = o["linearize_reason"]
    return dict(kernel=etk, fc=fc, forecasts=forecasts, drop=drop, flagged=flagged, info=info,
                optimizer=optimizer, steps=steps, params=params, name=name, train=kw,
                skipped=skipped)  # fmt: skip


def _top_or_fallback(o: dict[str, Any], run: Callable, optimizer, start: float,
                     timer: dict) -> bool:
    """``run`` (:func:`_forecast_top` or :func:`_validate_top`) where ``--linearize top``,
    or auto's choice, asks for the exact top: True once done; False where it is not asked
    for or does not apply to the model (auto's usual choice then follows, :func:`_no_top`)."""
    if o.get("linearize") != "top" and not _auto_top(o):
        return False
    try:
        run(o, optimizer, start, timer)
        return True
    except _NoTop as why:
        _no_top(o, why)
        return False


def _no_top(o: dict[str, Any], why: _NoTop) -> None:
    """--linearize auto: the exact top does not apply to this model; back to the usual choice
    (head exact, else the tangent model), saying why."""
    o["linearize"], o["auto_top"] = "auto", False
    _echo(f"tangentlab: --linearize auto: not the exact top ({why}; a model of your own "
          "takes --linearize top --split).")


def _forecast_top(o: dict[str, Any], optimizer, start: float, timer: dict) -> None:
    """``forecast --linearize top``: the exact-top forecast, its estimate, interval and
    reliability check, and reliable_lr's advice where the check flags."""
    from tangentlab.report import exact_top_row, format_table, write_exact_top_report

    r = _top_forecast(o, optimizer, timer, advise=True)
    forecasts, drop = r["forecasts"], r["drop"]
    paths = write_exact_top_report(o["out"], forecasts, r["kernel"], drop=drop, info=r["info"],
                                   title=f"tangentlab forecast (exact top): {r['name']}")
    click.echo(format_table([exact_top_row(lb, f, drop) for lb, f in forecasts]))
    _print_top(r["fc"], drop, forecasts[1][1] if len(forecasts) > 1 else None, r["flagged"],
               skipped=r["skipped"])  # fmt: skip
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {paths['json']}, {paths['png']}, {paths['html']}")


# --lr not given for sweep --linearize top: these fractions of the exact-top model's
# stability limit at w0 at each momentum (as the head-exact sweep's 0.1, 0.3, 1 and 1.5 x
# half its limit)
TOP_SWEEP_FRACTIONS = (0.05, 0.15, 0.5, 0.75)


def _sweep_top(o: dict[str, Any], optimizers: list, start: float, timer: dict) -> None:
    """``sweep --linearize top``: one exact-top kernel, every setting's forecast
    (tangentlab.experimental.exact_top.sweep_exact_top, cached per setting in
    ``OUT/kernel/exact-top-sweep``), ranked by the estimated real steps to the target."""
    from tangentlab.experimental import exact_top as et
    from tangentlab.report import write_exact_top_sweep_report

    rank_by = o["rank_by"] or "steps"
    if rank_by not in ("steps", "samples"):
        raise TangentlabError(
            f"tangentlab: --rank-by {rank_by} ranks by held-out curves, which the exact top "
            "does not forecast; use --rank-by steps or samples, or --linearize body or all "
            "with --eval-samples/--eval-data."
        )
    r = _top_kernel(o, timer)
    etk, loss = r["kernel"], _loss(o)
    steps = o["steps"] if o["steps"] is not None else r["defaults"].get("steps", 300)
    if o["lr"] is None:
        optimizers = _top_sweep_rates(o, etk, loss, timer)
    optimizers = [opt.replace(schedule=sched) for opt in optimizers
                  for sched in _schedules(o, steps, lists=True)]  # fmt: skip
    sizes = [_batch(b) for b in str(o["batch_size"]).split(",")]
    drop = float(o["target_drop"])
    if o["target_loss"] is not None:
        l0 = etk.initial_loss(loss)
        drop = 1.0 - float(o["target_loss"]) / l0
        if not 0.0 < drop < 1.0:
            raise TangentlabError(
                f"tangentlab: --target-loss {o['target_loss']:g} must lie between 0 and the "
                f"initial loss {l0:.4g} (--linearize top reads its targets as drops of L0)."
            )
    n_settings = len(optimizers) * len(sizes)
    _echo(f"tangentlab: forecasting {n_settings} settings on the exact-top kernel (each "
          "stops at its target; finished settings are kept in the cache, so an interrupted "
          "sweep resumes) ...")
    t0 = time.perf_counter()
    result = et.sweep_exact_top(
        etk, optimizers, steps, loss=loss, batch_sizes=sizes, drop=drop, rank_by=rank_by,
        seed=o["seed"],
        cache=Path(o["cache"] or Path(o["out"]) / "kernel") / "exact-top-sweep",
        progress=not o["no_progress"])  # fmt: skip
    timer["sweep"] = time.perf_counter() - t0
    table = result.table
    info = {"source": r["name"], "params": str(r["params"]),
            "model_of_training": f"exact top, block linear: {r['how']}",
            "projection": str(r["k"]), "directions": etk.rank,
            "kernel_seconds": round(etk.metadata["seconds"], 2),
            "num_samples": etk.num_samples, "settings": len(table),
            "sweep_seconds": round(timer["sweep"], 3),
            "restored_settings": int(table["cached"].sum()),
            "target_definition": f"a drop of {drop:.0%} from the initial loss",
            "ranking": ("the estimate of the real steps" if rank_by == "steps" else
                        "the estimate x the batch size (sample-gradients)")
            + " (NOTE [exact-top sweep ranking]: benchmarks/RESULTS.md 'twolayer-sweep')",
            "lr_choice": "given (--lr)" if o["lr"] is not None else
            f"{TOP_SWEEP_FRACTIONS} of the exact-top model's stability limit per momentum",
            "minibatch": "one path each, the batches of tl.finetune(seed=--seed)"}  # fmt: skip
    if o.get("linearize_reason"):
        info["linearize"] = o["linearize_reason"]
    paths = write_exact_top_sweep_report(
        o["out"], result, etk, info=info,
        title=f"tangentlab sweep (exact top): {r['name']}")  # fmt: skip
    _print_top_sweep(result, rank_by, len(sizes), trunk=bool(etk.metadata.get("trunk")))
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {paths['csv']}, {paths['json']}, {paths['ranking']}, {paths['png']}, "
               f"{paths['html']}")


def _top_sweep_rates(o: dict[str, Any], etk, loss, timer: dict) -> list:
    """``sweep --linearize top`` without ``--lr``: ``TOP_SWEEP_FRACTIONS`` of the exact-top
    model's stability limit 2(1 − m)/S at each ``--momentum`` m."""
    import tangentlab as tl
    from tangentlab.experimental import exact_top as et

    t0 = time.perf_counter()
    _echo("tangentlab: --lr not given: the exact-top model's stability limit at w0 "
          "(Lanczos on its Gauss-Newton matrix) ...")
    limit = et.stable_lr(etk, loss=loss, fraction=1.0)  # 2 / S at momentum 0
    timer["learning rate"] = time.perf_counter() - t0
    _echo(f"tangentlab: --lr not given: at each momentum m, "
          f"{', '.join(f'{f:g}' for f in TOP_SWEEP_FRACTIONS)} of the exact-top model's "
          f"stability limit 2(1 - m)/S at w0 (2/S = {limit:.4g} for {loss.name}).")
    return [tl.SGD(float(f"{f * limit * (1.0 - m):.3g}"), momentum=m)
            for m in _floats(o["momentum"], "momentum") for f in TOP_SWEEP_FRACTIONS]


def _batch_label(value: Any) -> str | int:
    """A sweep table's batch size as shown: "full" (None, or NaN in a numeric column)."""
    return "full" if value is None or value != value else int(value)


def _print_top_sweep(result, rank_by: str, n_sizes: int, *, trunk: bool = False) -> None:
    """The exact-top sweep's table and its reading in words (the safer pick where the first
    is flagged)."""
    table = result.table
    shown = table[["rank", "lr", "momentum", "batch_size", "schedule", "estimate",
                   "interval_low", "interval_high", "check", "steps_to_target",
                   "samples_to_target"]].copy()
    shown["samples_to_target"] = ["-" if v is None or v != v else f"{v:.3g}"
                                  for v in table["samples_to_target"]]  # fmt: skip
    shown["batch_size"] = [_batch_label(v) for v in table["batch_size"]]
    shown["interval"] = [("-" if lo is None or lo != lo else f"{lo:.0f}-{hi:.0f}")
                         for lo, hi in zip(table["interval_low"], table["interval_high"])]
    shown["estimate"] = ["not reached" if v is None or v != v else f"{v:.0f}"
                         for v in table["estimate"]]  # fmt: skip
    shown["steps_to_target"] = ["-" if v is None or v != v else int(v)
                                for v in table["steps_to_target"]]  # fmt: skip
    shown = shown.drop(columns=["interval_low", "interval_high"]
                       + (["schedule"] if len(set(table["schedule"])) == 1 else [])
                       + (["samples_to_target"] if rank_by == "steps" and n_sizes == 1
                          else []))  # fmt: skip
    with _pd_display():
        click.echo(shown.to_string(index=False))
    flagged = int((table["check"] != "passed").sum())
    by = ("the estimated real steps (column 'estimate'" if rank_by == "steps" else
          "the estimated sample-gradients, steps x batch size (column 'samples_to_target'")
    click.echo(f"target: a {result.drop:.0%} drop of L0; {len(table)} settings from one exact-top "
               f"kernel, ranked by {by}; 'interval': where the real run's steps should fall)"
               + (f"; {flagged} flagged by the reliability check: near their edge of "
                  "stability, their steps are uncertain (wide intervals)" if flagged else ""))
    first, safe = table.iloc[0], result.best_passed
    if first["check"] != "passed" and safe is not None:
        row = table.iloc[safe - 1]
        b = _batch_label(row["batch_size"])
        click.echo(f"the first is flagged; the fastest whose check passes is rank {safe}: "
                   f"{row['optimizer']}, batch {b}, estimate {row['estimate']:.0f} steps "
                   f"(interval {row['interval_low']:.0f}-{row['interval_high']:.0f}), the "
                   "safer pick (RESULTS.md 'twolayer-sweep').")
    if first["estimate"] == first["estimate"] and first["estimate"] is not None:
        b = _batch_label(first["batch_size"])
        steps = math.ceil(first["interval_high"]) + 1
        click.echo(f"to check the pick with a real run: tangentlab validate (the same model and "
                   f"data options) --lr {first['lr']:g} --momentum {first['momentum']:g} "
                   f"--batch-size {b} --steps {steps}"
                   + (" --cached-trunk (the same run on the frozen trunk's outputs, cheaper)"
                      if trunk else "")
                   + ("" if first["schedule"] == "Constant()" else
                      f", with its schedule {first['schedule']}"))


def _validate_top(o: dict[str, Any], optimizer, start: float, timer: dict) -> None:
    """``validate --linearize top``: the exact-top forecast, then the real run of the same
    settings (tl.finetune on a fresh copy, the same batches), and how they compare."""
    import numpy as np

    import tangentlab as tl
    from tangentlab.report import write_exact_top_report

    if o["bn"] != "frozen":
        raise TangentlabError("tangentlab: --linearize top models a network whose batch-norm "
                              "statistics are frozen; drop --bn train (or use --linearize "
                              "all).")  # fmt: skip
    r = _top_forecast(o, optimizer, timer, advise=False)
    fc, drop, steps, opt = r["fc"], r["drop"], r["steps"], r["optimizer"]
    model, data, _, params, _, _ = _resolve(o, quiet=True)  # a fresh copy: w0 again
    if params == "all":
        params = None
    net, cached = _above_trunk(o, model, params) if o["cached_trunk"] else (model, {})
    _echo(f"tangentlab: fine-tuning for real: {steps} steps of {opt.describe()} (BN frozen"
          + ("; the layers above the frozen trunk, on its outputs computed once" if cached
             else "") + ") ...")  # fmt: skip
    t0 = time.perf_counter()
    run = tl.finetune(net, data, opt, steps, params=params, log_every=o["log_every"],
                      bn="frozen", device=o["device"], progress=not o["no_progress"],
                      **cached, **r["train"])  # fmt: skip
    timer["real fine-tuning"] = time.perf_counter() - t0
    if run.steps.size == 0:  # interrupted before the initial loss: nothing to compare
        raise KeyboardInterrupt
    target = (1.0 - drop) * float(run.loss[0])
    real_t, est, iv = run.steps_to(target), fc.steps_estimate(drop), fc.steps_interval(drop)
    common = np.intersect1d(run.steps, fc.steps)
    lr_ = np.interp(common, run.steps, run.loss)
    lf = np.interp(common, fc.steps, fc.loss)
    ok = np.isfinite(lr_) & np.isfinite(lf)
    curve = float(np.mean(np.abs(lf[ok] - lr_[ok])) / run.loss[0]) if ok.any() else float("nan")
    err = (None if real_t is None or est is None or real_t == 0
           else abs(est - real_t) / real_t)  # fmt: skip
    inside = None if real_t is None else (iv is not None and iv[0] <= real_t <= iv[1])
    cost = float(r["kernel"].metadata["seconds"]) + float(fc.seconds)
    comparison = dict(target_loss=target, drop=drop, real_steps=real_t,
                      forecast_steps=fc.steps_to_drop(drop), estimate=est,
                      interval=None if iv is None else list(iv), inside=inside,
                      steps_error=err, curve_error=curve, check="flagged" if r["flagged"]
                      else "passed", real_train_seconds=run.train_seconds,
                      real_run_on="cached trunk outputs" if cached else "the network",
                      real_trunk_seconds=run.hyperparameters.get("trunk_seconds"),
                      forecast_seconds=cost,
                      cost_ratio=run.train_seconds / cost if cost > 0 else None)  # fmt: skip
    info = dict(r["info"], comparison=comparison, bn="frozen",
                log_every=run.hyperparameters["log_every"])  # fmt: skip
    paths = write_exact_top_report(
        o["out"], r["forecasts"], r["kernel"], drop=drop, info=info, stem="validation",
        measured=[("real run", run.steps, run.loss, run.accuracy)],
        title=f"tangentlab validate (exact top): {r['name']}")  # fmt: skip
    shown = "not reached" if real_t is None else real_t
    click.echo(f"steps to loss {target:.4g} (a {drop:.0%} drop of the run's initial loss): "
               f"real run {shown}, forecast {fc.steps_to_drop(drop)}, estimate "
               f"{'-' if est is None else f'{est:.0f}'}")
    if err is not None:
        click.echo(f"steps-to-target error |T̃−T|/T: {err:.3g}")
    if inside is not None:
        band = "-" if iv is None else f"{iv[0]:.0f}-{iv[1]:.0f}"
        click.echo(f"real steps vs the interval ({band}, check {comparison['check']}): "
                   f"{'inside' if inside else 'OUTSIDE'}")
    click.echo(f"curve error mean|L̂−L|/L0: {curve:.3g} over {int(ok.sum())} logged steps")
    trunk_s = run.hyperparameters.get("trunk_seconds")
    where = "" if trunk_s is None else f" on cached trunk outputs (+ {trunk_s:.2f} s trunk)"
    click.echo(f"cost: real run {run.train_seconds:.2f} s training{where}; kernel + forecast "
               f"{cost:.2f} s; ratio real/forecast {run.train_seconds / cost:.2f}x")
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {paths['json']}, {paths['png']}, {paths['html']}")


def _above_trunk(o: dict[str, Any], model, params) -> tuple[Any, dict]:
    """``validate --cached-trunk``: (the layers above the frozen trunk, ``{"trunk": trunk}``)
    for tl.finetune, which runs the trunk once (NOTE [frozen trunk]: the same run)."""
    from tangentlab.examples import compose, split_trunk

    body, top, how = _split(o, model)
    trunk, rest = split_trunk(body, params)
    if trunk is None:
        raise TangentlabError(
            f"tangentlab: --cached-trunk: no frozen layers below the trained weights to cache "
            f"({how}; the first layer is trained, or the body is not one split_trunk knows): "
            "drop --cached-trunk.")  # fmt: skip
    return compose(rest, top), dict(trunk=trunk)


def _print_top(fc, drop: float, safe, flagged: bool, *, skipped: bool = False) -> None:
    """The exact-top forecast's answer in words: steps, estimate, interval, check, advice."""
    target = (1.0 - drop) * float(fc.loss[0])
    t, est, iv = fc.steps_to_drop(drop), fc.steps_estimate(drop), fc.steps_interval(drop)
    if fc.blowup is not None:
        click.echo(f"DIVERGES: the exact-top forecast blows up at step {fc.blowup}; lower the "
                   "learning rate.")  # fmt: skip
    click.echo(f"steps to loss {target:.4g} (a {drop:.0%} drop): "
               f"{t if t is not None else 'not reached in ' + str(fc.settings['steps'])}")
    if iv is not None:
        click.echo(f"  real run: estimate {est:.0f} steps, interval {iv[0]:.0f}-{iv[1]:.0f} "
                   f"({'wide: the check flags it' if fc.flagged(drop) else 'check passed'}, "
                   f"R = {fc.rebound(drop):.3g}; NOTE [exact-top steps interval])")
    if not flagged:
        return
    if skipped:
        click.echo("  advice: lower --lr and forecast again (the schedule decays, so "
                   "reliable_lr cannot stretch it over a lower rate's longer horizon).")
        return
    if safe is None:
        click.echo("  advice: no rate down to 0.8^9 x lr passes the check; read the steps as "
                   "uncertain, or validate with a real run (tangentlab validate "
                   "--cached-trunk: the same run at a tenth to a quarter of its cost where "
                   "the layers below the trained weights are frozen).")
        return
    st = safe.steps_estimate(drop)
    siv = safe.steps_interval(drop)
    got = ("not reached" if siv is None else
           f"estimate {st:.0f} steps, interval {siv[0]:.0f}-{siv[1]:.0f}")  # fmt: skip
    ratio = safe.settings["lr"] / fc.settings["lr"]
    click.echo(f"  advice: at lr {safe.settings['lr']:.4g} ({ratio:.2g}x) the check passes: "
               f"{got} (exact_top.reliable_lr); for this rate itself, train: tangentlab "
               "validate --cached-trunk (the same run at a tenth to a quarter of its cost).")


def _print_divergence(fc) -> None:
    if fc.stability >= fc.stability_limit:
        click.echo(f"DIVERGES: η̃·λ_max/N = {fc.stability:.3g} ≥ {fc.stability_limit:g}; "
                   "lower the learning rate.")  # fmt: skip
    elif fc.method.get("model") == "head-body":  # stable at w0: the head x body growth
        got, total = STABILIZED_REACHED
        st = (fc.method.get("stabilized") or {}) if getattr(fc, "stabilized", None) else {}
        rerun = (f"The interval below is read from the forecast at {st['factor']:g} x the rate "
                 "(NOTE [stabilized estimate]), for a run that gets there. " if st else "")
        click.echo(
            f"DIVERGES: the head-exact model's loss blows up after step {fc.divergence_step}, "
            f"though the step is stable at w0 (η̃·λ_max/N = {fc.stability:.3g}): the head x "
            "body product sharpens as it trains. Real networks in this regime may spike and "
            "recover (edge of stability) or stall and diverge too: on twenty-eight held-out "
            f"tasks they reached {got} of the {total} targets such forecasts missed. {rerun}"
            "Lower the learning rate for a forecast to read, or check with `tangentlab "
            "validate`."
        )
    else:
        click.echo(f"DIVERGES: the loss blows up after step {fc.divergence_step}; lower the "
                   "learning rate.")  # fmt: skip


@main.command()
@_source_options
@_hyper_options(lists=True)
@_subsample_option
@_eval_options
@click.option("--rank-by", type=click.Choice(["steps", "samples", "eval_accuracy",
                                              "best_eval_accuracy", "eval_loss"]),
              default=None,
              help="Ranking: steps to the target loss (default); samples: steps x batch size "
              "(the exact top's sweep: the sample-gradients, i.e. compute, to the target); or "
              "with --eval-data/--eval-samples the held-out accuracy at the last step "
              "(default then), the best held-out accuracy along the run, or the final "
              "held-out loss.")  # fmt: skip
@_pilot_option
@_errors_as_usage
def sweep(**o: Any) -> None:
    """Forecast every combination of comma-separated hyper-parameters from ONE kernel,
    ranked by predicted steps to the target loss, or by held-out accuracy.

    \b
    Example:
      $ tangentlab sweep --example digits-cnn --lr 0.1,0.5 --batch-size 16,full
      lr   batch_size  rank  steps_to_target  final_loss ...
      $ tangentlab sweep --example digits-cnn --momentum 0,0.9 --eval-samples 200
      lr   batch_size  rank  ...  eval_accuracy  best_eval_accuracy  best_step
    """
    import tangentlab as tl
    from tangentlab.report import write_sweep_report

    start, timer = time.perf_counter(), {}
    optimizers = _check_hyper(o, lists=True)
    if _top_or_fallback(o, _sweep_top, optimizers, start, timer):
        return
    if o["rank_by"] == "samples":
        raise TangentlabError(
            "tangentlab: --rank-by samples ranks the exact top's sweep (steps x batch size), "
            "and this sweep does not use it: --linearize auto takes it on a network that "
            "splits, --linearize top --split on any other."
        )
    _check_held_out(o)
    if o["rank_by"] not in (None, "steps") and o["eval_spec"] is None and (
        o["eval_samples"] is None
    ):  # fmt: skip
        raise TangentlabError(
            f"tangentlab: --rank-by {o['rank_by']} ranks by held-out curves; add "
            "--eval-samples M (built-in examples) or --eval-data SPEC."
        )
    kernel, defaults, info = _kernel(o, timer)
    cross, _ = _held_out(o, kernel, timer)
    pilot = _measure_pilot(o, kernel, info, timer)
    if o["lr"] is None:
        base = _lr(o, kernel, max(opt.momentum for opt in optimizers), timer)
        optimizers = tl.SGD.grid(lr=[base * f for f in (0.1, 0.3, 1.0, 1.5)],
                                 momentum=_floats(o["momentum"], "momentum"),
                                 weight_decay=_weight_decays(o, lists=True))
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    optimizers = [opt.replace(schedule=sched) for opt in optimizers
                  for sched in _schedules(o, steps, lists=True)]  # fmt: skip
    sizes = [_batch(b) for b in str(o["batch_size"]).split(",")]
    if None in sizes and o["loss_name"] == "mse":
        _eigh(kernel, timer)
    t0 = time.perf_counter()
    common = dict(loss=_loss(o), batch_sizes=sizes, paths=o["paths"], seed=o["seed"],
                  dataset_size=info.get("dataset_size"), eval_data=cross,
                  rank_by=o["rank_by"], pilot=pilot)  # fmt: skip
    result = tl.sweep(kernel, optimizers, steps, target_loss=o["target_loss"], **common)
    if o["target_loss"] is None and o["target_drop"] != 0.8:  # re-rank on the asked target
        target = _target(o, float(result.forecasts[0].loss[0]))
        result = tl.sweep(kernel, optimizers, steps, target_loss=target, **common)
    timer["sweep"] = time.perf_counter() - t0
    table = result.table
    info.update(sweep_seconds=round(timer["sweep"], 3), settings=len(table),
                target_loss=result.target_loss, rank_by=result.rank_by)  # fmt: skip
    if cross is not None:
        info.update(eval_samples=cross.num_eval,
                    cross_kernel_seconds=round(timer["cross kernel"], 3))  # fmt: skip
    paths = write_sweep_report(o["out"], result, kernel, info=info,
                               title=f"tangentlab sweep: {info.get('source', '')}")  # fmt: skip
    shown = table.drop(columns=["optimizer", "loss_limit"])
    with _pd_display():
        click.echo(shown.to_string(index=False))
    ranked = ("held-out " + result.rank_by.replace("_", " ").replace("eval ", "")
              if result.rank_by != "steps" else "steps to the target")  # fmt: skip
    click.echo(f"target loss {result.target_loss:.4g}; {len(table)} settings from one kernel, "
               f"ranked by {ranked}; rows outside the validity region or diverging rank last "
               "(column 'valid')")  # fmt: skip
    click.echo(f"time: {_timings(timer, start)}")
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
    """Compute (or load from the cache) the kernel and print its summary as JSON (with
    --linearize auto/body: the head-exact model's read-out kernels)."""
    import json

    import tangentlab as tl
    from tangentlab.report import write_json

    start, timer = time.perf_counter(), {}
    _check_device(o["device"])
    _check_linearize(o)
    kernel, _, info = _kernel(o, timer)
    _eigh(kernel, timer)
    summary = {**kernel.describe(), "info": info}
    path = write_json(summary, Path(o["out"]) / "kernel.json")
    click.echo(json.dumps(summary, indent=1, default=str))
    cache = Path(o["cache"] or Path(o["out"]) / "kernel")
    where = (f"kernel file: {cache / 'kernel.safetensors'}" if isinstance(kernel, tl.Kernel)
             else f"read-out kernels cached under {cache / 'head-body'}")  # fmt: skip
    click.echo(f"time: {_timings(timer, start)}; wrote {path} ({where})", err=True)


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
@click.option("--cached-trunk", is_flag=True,
              help="With the exact top (--linearize top, or auto where it applies): train "
              "the layers above the frozen trunk (the layers below the first trained weight) "
              "on its outputs, computed once: the same real run up to float rounding, at "
              "a tenth to a quarter of its cost (tl.finetune(trunk=); README 'Exact top, "
              "last block linear'). The cost ratio then compares the forecast with that run.")
@_eval_options
@_pilot_option
@_errors_as_usage
def validate(**o: Any) -> None:
    """Forecast, then really fine-tune the same model on the same data with the same
    settings (a fresh copy, torch.optim.SGD or AdamW), and compare the two.

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
    from tangentlab.report import write_validation_report

    start, timer = time.perf_counter(), {}
    optimizer = _check_hyper(o, lists=False)[0]
    if o["log_every"] is not None and o["log_every"] < 1:
        raise TangentlabError(
            f"tangentlab: --log-every must be a positive integer, got {o['log_every']!r}."
        )
    if _top_or_fallback(o, _validate_top, optimizer, start, timer):
        return
    if o["cached_trunk"]:
        raise TangentlabError(
            "tangentlab: --cached-trunk runs the layers above the exact top's split, and this "
            f"validation does not use the exact top (--linearize {o['linearize']}): pass "
            "--linearize top (with --split for a model of your own) or drop --cached-trunk.")
    _check_held_out(o)
    kernel, defaults, info = _kernel(o, timer)
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    optimizer = optimizer.replace(lr=_lr(o, kernel, o["momentum"], timer),
                                  schedule=_schedules(o, steps, lists=False)[0])  # fmt: skip
    train = dict(loss=_loss(o), batch_size=_batch(o["batch_size"]), seed=o["seed"])
    cross, ev = _held_out(o, kernel, timer)
    if train["batch_size"] is None and o["loss_name"] == "mse":
        _eigh(kernel, timer)
    t0 = time.perf_counter()
    fc = tl.forecast(kernel, optimizer, steps, paths=o["paths"], eval_data=cross, **train)
    f_sec = timer["forecast"] = time.perf_counter() - t0
    pilot = _measure_pilot(o, kernel, info, timer)
    # The real run starts from a freshly loaded model: the kernel's is left as it was.
    model, data, _, params, _, _ = _resolve(o, quiet=True)  # already described
    if params == "all":
        params = None
    _check_same_source(kernel, model, data, params)
    _echo(f"tangentlab: fine-tuning for real: {steps} steps of {optimizer.describe()} "
          f"(BN {o['bn']}) ...")  # fmt: skip
    t0 = time.perf_counter()
    run = tl.finetune(model, data, optimizer, steps, params=params, log_every=o["log_every"],
                      bn=o["bn"], device=o["device"], progress=not o["no_progress"],
                      eval_data=ev, **train)  # fmt: skip
    timer["real fine-tuning"] = time.perf_counter() - t0
    if run.steps.size == 0:  # interrupted before the initial loss: nothing to compare
        raise KeyboardInterrupt
    # a kernel reused from the cache costs ~0 s now: count what it cost when computed
    k_cost = max(timer.get("kernel", 0.0), float(kernel.metadata.get("seconds", 0.0) or 0.0))
    cmp = tl.compare(fc, run, target_loss=o["target_loss"], target_drop=o["target_drop"],
                     forecast_seconds=k_cost + f_sec, pilot=pilot)  # fmt: skip
    info.update(
        forecast_seconds=round(f_sec, 3), kernel_seconds_counted=round(k_cost, 3),
        run_train_seconds=round(run.train_seconds, 3),
        run_eval_seconds=round(run.eval_seconds, 3),
        run_wall_seconds=round(run.wall_seconds, 3), cost_ratio=cmp.cost_ratio,
        target_loss=cmp.target_loss, lr=optimizer.lr, schedule=optimizer.schedule.describe(),
        bn=o["bn"],
        log_every=run.hyperparameters["log_every"],
    )  # fmt: skip
    paths = write_validation_report(o["out"], fc, run, cmp, kernel, info=info, pilot=pilot,
                                    title=f"tangentlab validate: {info.get('source', '')}")
    _print_validation(cmp, run, k_cost, f_sec, pilot is not None)
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {paths['json']}, {paths['png']}, {paths['html']}")


def _print_validation(cmp, run, k_cost: float, f_sec: float, pilot: bool = False) -> None:
    from tangentlab.report import format_table

    target = cmp.target_loss

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
    if cmp.steps_interval is not None:  # head-exact: the calibrated median (NOTE [steps interval])
        rows.insert(1, {"quantity": "  median estimate (calibrated)",
                        "forecast": cmp.steps_median,
                        "real run": cmp.steps_to_target_run,
                        "error": err(cmp.steps_median_error)})  # fmt: skip
    ev = cmp.eval
    if ev is not None:
        rows += [
            {"quantity": f"held-out accuracy at step {ev['final_step']}",
             "forecast": ev["final_accuracy_forecast"], "real run": ev["final_accuracy_run"],
             "error": err(ev["final_accuracy_error_points"]) + " pts"},
            {"quantity": "best step (min held-out loss)", "forecast": ev["best_step_forecast"],
             "real run": ev["best_step_run"], "error": err(ev["best_step_error"])},
            {"quantity": "held-out accuracy at the best step",
             "forecast": ev["accuracy_at_best_forecast"], "real run": ev["accuracy_at_best_run"],
             "error": err(ev["accuracy_at_best_error_points"]) + " pts"},
        ]  # fmt: skip
    click.echo(format_table(rows))
    res = "" if cmp.steps_resolution in (None, 1) else f", located to {cmp.steps_resolution} steps"
    miss = " (MISS: the real run reaches the target, the forecast does not)" if (
        cmp.target_missed) else ""  # fmt: skip
    click.echo(f"steps-to-target error |T̂−T|/T: {err(cmp.steps_to_target_error)}{miss}"
               f"  (target {cmp.target_note}{res})")  # fmt: skip
    click.echo(f"curve error mean|L̂−L|/L0: {cmp.curve_error:.3g} (max {cmp.curve_error_max:.3g}) "
               f"over {cmp.steps.size} logged steps")  # fmt: skip
    if cmp.band_coverage is not None:
        click.echo(f"real loss inside the forecast band at {cmp.band_coverage:.0%} of the steps")
    if cmp.steps_interval is not None:  # head-exact forecasts: NOTE [steps interval]
        lo, hi = cmp.steps_interval
        shown = "unknown" if lo is None else f"{lo}-{'' if hi is None else hi} steps"
        where = {True: "inside", False: "OUTSIDE", None: "-"}[cmp.steps_in_interval]
        trust = "narrow band: trusted" if cmp.steps_trusted else "wide band"
        with_pilot = " with the pilot" if pilot else ""
        click.echo(f"real steps to the target vs the forecast's 80% interval{with_pilot} "
                   f"({shown}, {trust}): {where}")  # fmt: skip
    if cmp.loss_interval_coverage is not None:  # NOTE [loss interval]
        click.echo(f"real loss inside the forecast's band for it (calibrated) at "
                   f"{cmp.loss_interval_coverage:.0%} of the steps where the band has both "
                   "edges")  # fmt: skip
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


# ---- per-sample information and influence (tangentlab.information, tangentlab.influence) ---
def _sample_options(fn):
    """Options of ``information`` and ``influence``: evaluation set, flipped labels, report."""
    opts = [
        click.option("--eval-data", "eval_spec", default=None, metavar="SPEC",
                     help="Evaluation set (formats as --data) for train-to-eval influence and "
                     "the functional information (default: none / the training inputs)."),
        click.option("--eval-samples", type=int, default=None, metavar="M",
                     help="Built-in examples: M evaluation samples from the example's test "
                     "split (disjoint from the training samples)."),
        click.option("--flip-labels", type=float, default=0.0, show_default=True, metavar="F",
                     help="Flip a seeded fraction F of the training labels to another class "
                     "and report how many the ranking finds (detection curve)."),
        click.option("--show", type=int, default=8, show_default=True,
                     help="Samples shown at each end of the ranking in the HTML report."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _samples_setup(o: dict[str, Any], timer: dict):
    """Model, data (labels flipped when asked), kernel and the evaluation cross kernel.

    Returns ``(model, (x, y), kernel, cross or None, eval data or None, texts, flipped,
    params, projection, info)``."""
    import numpy as np
    import torch

    import tangentlab as tl
    from tangentlab.data import as_arrays, take
    from tangentlab.errors import ModeSwitchWarning

    clash = [f for f, v in (("--kernel", o["kernel_file"]), ("--trace", o["trace_kernel"]),
                            ("--probes", o["probes"]),
                            ("--linearize body", o["linearize"] == "body"),
                            ("--linearize top", o["linearize"] == "top"),
                            ("--split", o.get("split_spec"))) if v]  # fmt: skip
    if clash:
        raise TangentlabError(
            f"tangentlab: {', '.join(clash)} cannot be used here: per-sample scores need the "
            "full kernel of the tangent model computed from --model/--data or --example."
        )  # fmt: skip
    if not 0.0 <= o["flip_labels"] < 1.0:
        raise TangentlabError(
            f"tangentlab: --flip-labels must be a fraction in [0, 1), got {o['flip_labels']}."
        )
    if o["show"] < 1:
        raise TangentlabError(f"tangentlab: --show must be >= 1, got {o['show']}.")
    t0 = time.perf_counter()
    model, data, c, params, name, defaults = _resolve(o)
    if params == "all":
        params = None
    x, y = as_arrays(data, where="tangentlab")
    texts = None
    example = o["model_spec"] is None and o["data_spec"] is None
    if example and name == "rt-minilm":
        from tangentlab.examples import load_example

        ex = load_example(name, num_samples=o["samples"] or defaults["samples"],
                          seed=o["seed"], seq_len=o["seq_len"])  # fmt: skip
        texts = ex.info.get("texts")
    if c is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ModeSwitchWarning)
            c = int(tl.Tangent(model, params=params).f0(take(x, slice(0, 1))).shape[1])
    flipped = None
    if o["flip_labels"] > 0:
        rng = np.random.default_rng(o["seed"])
        n = int(y.shape[0])
        flipped = np.sort(rng.choice(n, max(1, round(o["flip_labels"] * n)), replace=False))
        y = y.clone()
        shift = torch.as_tensor(rng.integers(1, c, flipped.size))
        y[flipped] = (y[flipped] + shift) % c
        _echo(f"tangentlab: flipped the labels of {flipped.size} of {n} training samples "
              f"(seed {o['seed']}).")  # fmt: skip
    proj = _projection({**o, "num_classes": c}, model, (x, y), params)
    ev = _load_eval(o, name, example)
    timer["model and data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kernel = tl.compute_kernel(
        model, (x, y), num_classes=c, projection=proj, params=params,
        memory_budget=o["memory_budget"], device=o["device"],
        batch_size=o["kernel_batch_size"], seed=o["seed"],
        cache=o["cache"] or Path(o["out"]) / "kernel", progress=not o["no_progress"],
    )  # fmt: skip
    timer["kernel"] = time.perf_counter() - t0
    cross = None
    if ev is not None:
        t0 = time.perf_counter()
        cross = tl.compute_cross_kernel(
            model, ev, kernel, train_data=(x, y), params=params,
            memory_budget=o["memory_budget"], device=o["device"],
            batch_size=o["kernel_batch_size"], progress=not o["no_progress"],
        )  # fmt: skip
        timer["cross kernel"] = time.perf_counter() - t0
    info = {"source": name, "params": str(params), "projection": kernel.metadata["projection"],
            "num_samples": kernel.num_samples, "num_classes": kernel.num_classes,
            "eval_samples": None if cross is None else cross.num_eval,
            "flipped_labels": None if flipped is None else int(flipped.size)}  # fmt: skip
    return model, (x, y), kernel, cross, ev, texts, flipped, params, proj, info, defaults


def _load_eval(o: dict[str, Any], name: str, example: bool):
    """The evaluation set of ``--eval-data SPEC`` / ``--eval-samples M`` (examples' test
    split), or ``None``."""
    if o["eval_samples"] is not None and o["eval_spec"] is not None:
        raise TangentlabError("tangentlab: give --eval-data or --eval-samples, not both.")
    if o["eval_spec"] is not None:
        from tangentlab.specs import load_data_spec

        tok = o["tokenizer"] or (o["model_spec"] if os.path.isdir(o["model_spec"] or "")
                                 else None)  # fmt: skip
        return load_data_spec(o["eval_spec"], tokenizer_dir=tok, seq_len=o["seq_len"],
                              image_size=o["image_size"], seed=o["seed"])  # fmt: skip
    if o["eval_samples"] is None:
        return None
    if o["eval_samples"] < 1:
        raise TangentlabError(
            f"tangentlab: --eval-samples must be a positive integer, got {o['eval_samples']}."
        )
    if not example:
        raise TangentlabError(
            "tangentlab: --eval-samples is for built-in examples; give --eval-data SPEC."
        )
    from tangentlab.examples import load_example

    opts = {"seq_len": o["seq_len"]} if name == "rt-minilm" else {}
    if name == "fashion-lite0" and o["image_size"]:
        opts["image_size"] = o["image_size"]
    return load_example(name, num_samples=o["eval_samples"], seed=o["seed"], split="test",
                        **opts).data  # fmt: skip


def _check_held_out(o: dict[str, Any]) -> None:
    """Refuse --eval-data/--eval-samples with options whose forecast has no held-out curves
    (before anything is computed)."""
    if o["eval_spec"] is None and o["eval_samples"] is None:
        return
    clash = [f for f, v in (("--optimizer adamw", o.get("optimizer_name") == "adamw"),
                            ("--subsample", o.get("subsample")), ("--trace", _trace(o)),
                            ("--probes", o.get("probes"))) if v]
    if clash:
        raise TangentlabError(
            f"tangentlab: held-out curves (--eval-data/--eval-samples) need the full kernel "
            f"and SGD; they cannot be combined with {', '.join(clash)} "
            "(NOTE [held-out curves] in tangentlab.forecast)."
        )  # fmt: skip
    if o.get("linearize") == "body" and str(o.get("projection", "auto")) not in (
        "exact", "auto"
    ):  # fmt: skip
        raise TangentlabError(
            "tangentlab: held-out curves of --linearize body need its exact read-out kernels; "
            "use --projection exact (or auto) with --eval-data/--eval-samples."
        )


def _held_out(o: dict[str, Any], kernel, timer: dict):
    """``(cross kernel, eval data)`` for --eval-data/--eval-samples, or ``(None, None)``."""
    if o["eval_spec"] is None and o["eval_samples"] is None:
        return None, None
    import tangentlab as tl

    t0 = time.perf_counter()
    model, data, _, params, name, _ = _resolve(o, quiet=True)
    if params == "all":
        params = None
    example = o["model_spec"] is None and o["data_spec"] is None
    ev = _load_eval(o, name, example)
    timer["eval data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if isinstance(kernel, tl.HeadBodyKernel):  # --linearize body
        cross = tl.compute_head_body_cross_kernel(
            model, ev, kernel, train_data=data, params=params,
            memory_budget=o["memory_budget"], progress=not o["no_progress"],
        )  # fmt: skip
    else:
        cross = tl.compute_cross_kernel(
            model, ev, kernel, train_data=data, params=params,
            memory_budget=o["memory_budget"], device=o["device"],
            batch_size=o["kernel_batch_size"], progress=not o["no_progress"],
        )  # fmt: skip
    timer["cross kernel"] = time.perf_counter() - t0
    return cross, ev


def _time_option(value: str) -> int | float:
    v = str(value).strip().lower()
    if v in ("inf", "infinity"):
        return math.inf
    try:
        t = int(v)
    except ValueError:
        t = -1
    if t < 0:
        raise TangentlabError(
            f"tangentlab: --time must be a number of steps >= 0 or 'inf', got {value!r}."
        )
    return t


def _print_ranking(result, scores: list[tuple[str, Any]], k: int = 5) -> None:
    from tangentlab.report import format_table

    order = result.ranking()
    rows = []
    for where, idx in (("top", order[:k]), ("bottom", order[::-1][:k][::-1])):
        for i in idx:
            rows.append({"end": where, "sample": int(i), "label": int(result.targets[i]),
                         **{name: float(v[i]) for name, v in scores}})  # fmt: skip
    click.echo(format_table(rows))


@main.command()
@_source_options
@_hyper_options(lists=False)
@_sample_options
@click.option("--time", "time_spec", default=None, metavar="T",
              help="Training time of the smoothed run: steps, or 'inf' for the converged "
              "run (default: --steps).")
@click.option("--noise", type=click.Choice(["isotropic", "sgd"]), default="isotropic",
              show_default=True,
              help="Noise that smooths the weights: isotropic σ²I, or the stationary "
              "covariance of SGD with --batch-size B.")
@click.option("--sigma", type=float, default=1.0, show_default=True,
              help="σ of the smoothing noise (weights for --noise isotropic; outputs for the "
              "functional information).")
@_errors_as_usage
def information(**o: Any) -> None:
    """Smooth unique information of every training sample (Harutyunyan et al. 2021).

    SI = ½ (w − w₋ᵢ)ᵀ Σ⁻¹ (w − w₋ᵢ) in the weights and F-SI = mean‖f_w(x) − f_w₋ᵢ(x)‖²/(2σ²)
    in the outputs, for the tangent model trained by full-batch SGD (MSE) with and without
    sample i, in closed form through the kernel: no training. Writes information.json,
    information.csv and information.html (most and least informative samples; with
    --flip-labels the detection curve of the flipped ones).

    \b
    Example:
      $ tangentlab information --example digits-cnn --samples 100 --flip-labels 0.1 \
          --time 200 --out runs/info
    """
    import tangentlab as tl
    from tangentlab.report_data import write_data_report

    start, timer = time.perf_counter(), {}
    optimizer = _check_hyper(o, lists=False)[0]
    if o["loss_name"] != "mse":
        raise TangentlabError(
            "tangentlab information: the closed form is for --loss mse (Harutyunyan et al.); "
            "use `tangentlab influence` for cross-entropy."
        )
    batch = _batch(o["batch_size"])
    if o["noise"] == "sgd" and batch is None:
        raise TangentlabError(
            "tangentlab information: --noise sgd models minibatch noise; give --batch-size B."
        )
    time_t = None if o["time_spec"] is None else _time_option(o["time_spec"])
    _, (x, _y), kernel, cross, _, texts, flipped, _, _, info, defaults = _samples_setup(o, timer)
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    time_t = steps if time_t is None else time_t
    lr = _lr(o, kernel, o["momentum"], timer)
    optimizer = optimizer.replace(lr=lr, schedule=_schedules(o, max(int(steps), 1),
                                                               lists=False)[0])  # fmt: skip
    if batch is not None and o["noise"] != "sgd":
        _echo("tangentlab: note: the weights are those of the full-batch run; --batch-size "
              "enters only the SGD noise model (--noise sgd).")  # fmt: skip
    _eigh(kernel, timer)
    t0 = time.perf_counter()
    result = tl.sample_information(
        kernel, optimizer, time=time_t, eval_data=cross, loss=_loss(o), noise=o["noise"],
        sigma=o["sigma"], batch_size=batch if o["noise"] == "sgd" else None,
        progress=not o["no_progress"],
    )  # fmt: skip
    timer["information"] = time.perf_counter() - t0
    info.update(optimizer=optimizer.describe(), time=str(time_t), noise=o["noise"],
                sigma=o["sigma"], method=result.settings["method"])  # fmt: skip
    what = [
        ("quantity", "smooth unique information (Harutyunyan et al., ICLR 2021), nats"),
        ("in the weights", "½ (w − w₋ᵢ)ᵀ Σ⁻¹ (w − w₋ᵢ), Σ = "
         + ("σ² I" if o["noise"] == "isotropic" else f"stationary SGD covariance, B={batch}")),
        ("in the function", "mean over x of ‖f_w(x) − f_w₋ᵢ(x)‖² / (2σ²), x in the "
         + ("evaluation set" if cross is not None else "training inputs")),
        ("training run", f"tangent model, full-batch {optimizer.describe()}, MSE, "
         f"{'converged (t = ∞)' if time_t == math.inf else f'{time_t} steps'}"),
        ("samples", f"N = {kernel.num_samples} training"
         + (f", M = {cross.num_eval} evaluation" if cross is not None else "")),
    ]  # fmt: skip
    paths = write_data_report(
        o["out"], result, name="information", what=what, inputs=x, texts=texts,
        flipped=flipped, info=info, show=o["show"],
        title=f"tangentlab information: {info.get('source', '')}",
    )  # fmt: skip
    _print_ranking(result, [("weights", result.weights), ("functional", result.functional)])
    if flipped is not None:
        for key in ("weights", "functional"):
            c = tl.detection_curve(result.scores(key), flipped)
            found = c["found"][round(0.2 * kernel.num_samples)]
            click.echo(f"flipped labels found in the top 20% by {key} information: {found:.0%} "
                       f"(AUC {c['auc']:.3f})")  # fmt: skip
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@main.command()
@_source_options
@_hyper_options(lists=False)
@_sample_options
@click.option("--checkpoints", "checkpoint_spec", default="every", show_default=True,
              help="Steps summed over: 'every' step 0..T−1, or a comma-separated list of "
              "steps in [0, T] (TracInCP).")
@click.option("--real", is_flag=True,
              help="Also fine-tune for real (tl.finetune, keeping the --checkpoints) and "
              "compute the classic TracInCP on those checkpoints for comparison (one copy "
              "of the trained weights per checkpoint).")
@_errors_as_usage
def influence(**o: Any) -> None:
    """TracIn influence of every training sample (Pruthi et al. 2020), without training.

    TracIn(zᵢ, z) = Σₜ ηₜ δ_z(t)ᵀ Θ(x, xᵢ) δᵢ(t) on the tangent model, with the output
    gradients δ(t) of its forecast trajectory: self-influence (mislabeled samples rank
    high) and, with an evaluation set, train-to-eval influence. Writes influence.json,
    influence.csv and influence.html.

    \b
    Example:
      $ tangentlab influence --example digits-cnn --samples 100 --flip-labels 0.1 \
          --steps 100 --eval-samples 20 --out runs/infl
    """
    import tangentlab as tl
    from tangentlab.report_data import write_data_report

    start, timer = time.perf_counter(), {}
    optimizer = _check_hyper(o, lists=False)[0]
    spec, ckpts = _checkpoints(o)
    model, data, kernel, cross, ev, texts, flipped, params, proj, info, defaults = (
        _samples_setup(o, timer))  # fmt: skip
    steps = o["steps"] if o["steps"] is not None else defaults.get("steps", 300)
    lr = _lr(o, kernel, o["momentum"], timer)
    optimizer = optimizer.replace(lr=lr, schedule=_schedules(o, max(int(steps), 1),
                                                               lists=False)[0])  # fmt: skip
    train = dict(loss=_loss(o), batch_size=_batch(o["batch_size"]), seed=o["seed"])
    t0 = time.perf_counter()
    result = tl.influence(kernel, optimizer, steps, eval_data=cross, checkpoints=ckpts, **train)
    timer["influence"] = time.perf_counter() - t0
    info.update(optimizer=optimizer.describe(), steps=steps, loss=o["loss_name"],
                batch_size=train["batch_size"], checkpoints=spec)  # fmt: skip
    what = [
        ("quantity", "TracIn (Pruthi et al., NeurIPS 2020): Σₜ ηₜ ∇ℓ(z; wₜ)·∇ℓ(zᵢ; wₜ)"),
        ("on the tangent model", "∇ℓ(z)·∇ℓ(zᵢ) = δ_z(t)ᵀ Θ(x, xᵢ) δᵢ(t), δ from the forecast "
         "trajectory (no training)"),
        ("training run", f"{optimizer.describe()}, {o['loss_name'].upper()}, {steps} steps, "
         + ("full batch" if train["batch_size"] is None else f"B={train['batch_size']}")),
        ("checkpoints", "every step" if ckpts is None else ", ".join(map(str, ckpts))),
    ]  # fmt: skip
    if o["real"]:
        t0 = time.perf_counter()
        pearson, spearman = _tracincp_agreement(o, result, model, data, ev, optimizer, steps,
                                                ckpts, params, proj, train)  # fmt: skip
        timer["real run + TracInCP"] = time.perf_counter() - t0
        info.update(tracincp_pearson=round(pearson, 4), tracincp_spearman=round(spearman, 4))
        what.append(("TracInCP on real checkpoints", f"self-influence correlation: Pearson "
                     f"{pearson:.3f}, Spearman {spearman:.3f}"))  # fmt: skip
    paths = write_data_report(
        o["out"], result, name="influence", what=what, inputs=data[0], texts=texts,
        flipped=flipped, info=info, show=o["show"],
        title=f"tangentlab influence: {info.get('source', '')}",
    )  # fmt: skip
    scores = [("self", result.self_influence)]
    if result.train_to_eval is not None:
        scores.append(("eval", result.train_to_eval.sum(axis=0)))
    _print_ranking(result, scores)
    if flipped is not None:
        c = tl.detection_curve(result.self_influence, flipped)
        found = c["found"][round(0.2 * kernel.num_samples)]
        click.echo(f"flipped labels found in the top 20% by self-influence: {found:.0%} "
                   f"(AUC {c['auc']:.3f})")  # fmt: skip
    click.echo(f"time: {_timings(timer, start)}")
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


def _checkpoints(o: dict[str, Any]) -> tuple[str, list[int] | None]:
    """``--checkpoints``: ``("every", None)`` or the given steps."""
    spec = str(o["checkpoint_spec"]).strip().lower()
    if spec == "every":
        return spec, None
    try:
        return spec, [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise TangentlabError(
            f"tangentlab: --checkpoints must be 'every' or comma-separated steps, got "
            f"{o['checkpoint_spec']!r}."
        ) from None


def _tracincp_agreement(o, result, model, data, ev, optimizer, steps, ckpts, params, proj,
                        train) -> tuple[float, float]:  # fmt: skip
    """``--real``: fine-tune for real, TracInCP on its checkpoints, and the Pearson and
    Spearman correlations of the two self-influences (printed too)."""
    import numpy as np

    import tangentlab as tl

    _echo(f"tangentlab: fine-tuning for real ({steps} steps) to compare with TracInCP on "
          "its checkpoints ...")  # fmt: skip
    run = tl.finetune(model, data, optimizer, steps, params=params, device=o["device"],
                      checkpoints=ckpts if ckpts is not None else list(range(steps)),
                      progress=not o["no_progress"], **train)  # fmt: skip
    real = tl.tracin_checkpoints(run, data, eval_data=ev, projection=proj)
    pearson = float(np.corrcoef(result.self_influence, real.self_influence)[0, 1])
    ranks = [np.argsort(np.argsort(v)) for v in (result.self_influence, real.self_influence)]
    spearman = float(np.corrcoef(*ranks)[0, 1])
    click.echo(f"tangent TracIn vs real TracInCP (self-influence): Pearson {pearson:.3f}, "
               f"Spearman {spearman:.3f}")  # fmt: skip
    return pearson, spearman


@main.command("examples")
def list_examples() -> None:
    """List the built-in examples."""
    from tangentlab.examples import EXAMPLES

    for name, desc in EXAMPLES.items():
        click.echo(f"{name:14s} {desc}")


if __name__ == "__main__":  # pragma: no cover
    main()

