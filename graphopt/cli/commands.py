"""The ``graphopt`` command: a thin layer over the Python API.

Every error a user can cause ends in one line on stderr (``error: ...``) and exit code 2;
``validate`` (and ``optimize --validate``) exit 1 when outputs are outside tolerance.
``--debug`` shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from graphopt.errors import ConfigError, GraphoptError

from .common import (  # noqa: F401 - _shapes etc. are used by the commands below
    _console,
    _emit_json,
    _json_default,
    _shapes,
    _write_text_atomic,
    input_shape_option,
)

logger = logging.getLogger("graphopt")

EXIT_MISMATCH = 1
EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphopt")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Make ONNX models smaller and faster by verified graph rewrites."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"debug": debug}


# --------------------------------------------------------------------------- inspect


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--groups", is_flag=True, help="List the coupled prunable groups.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(model: Path, input_shapes: tuple[str, ...], groups: bool, as_json: bool) -> None:
    """Show a model's inputs, outputs, opsets, op histogram, params, MACs and size."""
    from graphopt.analysis.inspect import inspect_model

    shapes = _shapes(input_shapes)
    info = inspect_model(model, shapes, groups=groups)
    if as_json:
        _emit_json(info)
        return
    from graphopt.cli.render import render_inspect

    render_inspect(_console(), info)


# --------------------------------------------------------------------------- optimize


@cli.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the optimized model (never the input).")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              help="A YAML or JSON recipe naming the passes.")
@click.option("--pass", "pass_specs", multiple=True, metavar="NAME[:key=value,...]",
              help="A pass to run, in order (repeatable), e.g. prune-channels:ratio=0.5.")
@input_shape_option
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration inputs: an .npz file or a folder of .npz files.")
@click.option("--validation", type=click.Path(path_type=Path),
              help="Inputs to measure a lossy run's fidelity on (.npz file or folder); "
                   "default: the last --holdout share of the calibration inputs.")
@click.option("--holdout", type=click.FloatRange(0, 0.9), default=0.25, show_default=True,
              help="Share of calibration inputs kept apart for fidelity (without --validation).")
@click.option("--final", type=click.Choice(["auto", "all", "rest"]), default="auto",
              show_default=True,
              help="With a held-out share: all = measure fidelity on a model optimized from "
                   "the rest, then optimize again from all the calibration and write that "
                   "(about twice the time); rest = write the model optimized from the rest "
                   "(its figure exact); auto = all unless the second run's refit forwards "
                   "alone are counted at over 30 CPU s.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Measure the latency ratio of a lossy run's result (A/B interleaved).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu",
              show_default=True, help="Where latency (and latency budgets) are measured.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report here: JSON, or an HTML page with plots for .html.")
@click.option("--validate", "do_validate", is_flag=True,
              help="Compare the result with the input; exit 1 when outside tolerance.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance for --validate.")
@click.option("--rtol", type=float, default=None, help="Relative tolerance for --validate.")
@click.option("--on-error", type=click.Choice(["stop", "continue"]), default=None,
              help="When a pass fails verification: stop (default) or continue without it.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights beside the model (default: only when over 2 GB).")
@click.option("--allow-unverified", is_flag=True,
              help="Write the result even when a lossless pass could not be checked (no input "
                   "size tried runs the model); it is still reported as unverified.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def optimize(source: Path, output: Path, recipe: Path | None, pass_specs: tuple[str, ...],
             input_shapes: tuple[str, ...], calibration: Path | None, validation: Path | None,
             holdout: float, final: str, latency: bool, provider: str, report_path: Path | None,
             do_validate: bool, atol: float | None, rtol: float | None, on_error: str | None,
             external_data: bool | None, allow_unverified: bool, as_json: bool) -> None:
    """Run passes on SOURCE and write the result to -o OUTPUT.

    A lossless pass whose result could not be checked (no input size tried runs the model)
    is reported as unverified, and nothing is written (exit 1) unless --allow-unverified.
    """
    from graphopt.api import optimize as run_optimize
    from graphopt.ir.model import save
    from graphopt.core.recipe import Recipe, load_recipe, passes_from_specs

    if bool(recipe) == bool(pass_specs):
        raise ConfigError("give either --recipe FILE or one or more --pass NAME")
    if source.exists() and output.exists() and source.resolve() == output.resolve():
        raise GraphoptError(f"refusing to overwrite the input model {source}; choose another -o")
    plan = load_recipe(recipe) if recipe else Recipe(passes_from_specs(list(pass_specs)))
    validate_opts: dict[str, Any] | bool = False
    if do_validate:
        validate_opts = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None} or True
    console = _console(stderr=True)
    with console.status("optimizing", spinner="dots") as status:
        model, report = run_optimize(
            source, plan, input_shapes=_shapes(input_shapes), calibration=calibration,
            validate=validate_opts, on_error=on_error, allow_unverified=allow_unverified,
            validation=validation, holdout=holdout, final=final, latency=latency, provider=provider,
            progress=lambda name: status.update(f"running pass [bold]{name}[/]"),
        )
        held = bool(report.unverified) and not allow_unverified
        if not held:
            status.update(f"writing {output}")
            save(model, output, external_data=external_data, protect=(source,))
    report.metadata.update({"input": str(source), "output": None if held else str(output)})
    if report_path and report_path.suffix.lower() in (".html", ".htm"):
        from ..htmlreport import page_for_run, render_html
        from ..ir.model import load

        page = page_for_run(report, load(source, load_external=False), model, model=str(source))
        _write_text_atomic(report_path, render_html(page))
    elif report_path:
        _write_text_atomic(report_path, json.dumps(report.to_dict(), indent=2,
                                                   default=_json_default))
    if as_json:
        _emit_json(report.to_dict())
    else:
        from graphopt.cli.render import render_report

        render_report(_console(), report)
    if held:
        names = ", ".join(f"'{p.name}'" for p in report.unverified)
        click.echo(f"error: {output} not written: pass {names} changed the model but could not "
                   f"be verified ({report.unverified[0].unverified}); rerun with "
                   "--allow-unverified to write it anyway", err=True)
        sys.exit(EXIT_MISMATCH)
    if report.validation is not None and not report.validation.ok:
        sys.exit(EXIT_MISMATCH)
    if not report.ok:
        sys.exit(EXIT_MISMATCH)


# --------------------------------------------------------------------------- validate


def _tolerances(values: tuple[str, ...]) -> dict[str, tuple[float, float | None]]:
    out = {}
    for text in values:
        name, sep, rest = text.partition("=")
        parts = rest.split(",")
        try:
            if not sep or not name or not 1 <= len(parts) <= 2:
                raise ValueError
            out[name] = (float(parts[0]), float(parts[1]) if len(parts) == 2 else None)
        except ValueError:
            raise ConfigError(
                f"bad --tol '{text}': expected OUTPUT=ATOL or OUTPUT=ATOL,RTOL"
            ) from None
    return out


@cli.command()
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
              help="Inputs: an .npz file or a folder of them (default: generated).")
@input_shape_option
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--tol", "tols", multiple=True, metavar="OUTPUT=ATOL[,RTOL]",
              help="Tolerance for one output (repeatable).")
@click.option("--count", type=click.IntRange(1, 1000), default=2, show_default=True,
              help="How many generated input batches (without --inputs).")
@click.option("--mask", "mask", default="auto", show_default=True, metavar="NAME|auto|none",
              help="Attention-mask input: compare per-token outputs on real tokens only "
                   "(auto: the mask the token analysis finds, if any).")
@click.option("--json", "as_json", is_flag=True)
def validate(reference: Path, candidate: Path, inputs_path: Path | None,
             input_shapes: tuple[str, ...], atol: float, rtol: float, tols: tuple[str, ...],
             count: int, mask: str, as_json: bool) -> None:
    """Compare CANDIDATE's outputs with REFERENCE's; exit 1 when outside tolerance."""
    from graphopt.ir.inputs import load_inputs
    from graphopt.ir.model import open_for_run
    from graphopt.runtime.validate import validate as run_validation

    # Models over 2 GB stay on disk: an outline here, onnxruntime reads the files.
    ref, cand = open_for_run(reference), open_for_run(candidate)
    feeds = load_inputs(inputs_path, ref.model) if inputs_path else None
    result = run_validation(ref, cand, feeds, input_shapes=_shapes(input_shapes), atol=atol,
                            rtol=rtol, tolerances=_tolerances(tols) or None, count=count,
                            **_mask_input(ref.model, mask))
    if as_json:
        _emit_json(result.to_dict())
    else:
        from graphopt.cli.render import render_validation

        render_validation(_console(), result)
    if not result.ok:
        sys.exit(EXIT_MISMATCH)


def _mask_input(model, mask: str) -> dict:
    """validate's ``mask`` and ``selected`` options from ``--mask``."""
    if mask.lower() == "none":
        return {}
    from ..analysis.tokens import analyze_tokens, selected_outputs

    found = analyze_tokens(model, None if mask.lower() == "auto" else mask)
    if isinstance(found, str):
        return {} if mask.lower() == "auto" else {"mask": mask}
    return {"mask": found.mask, "selected": selected_outputs(model, found)}


# --------------------------------------------------------------------------- bench


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--vs", "other", type=click.Path(dir_okay=False, path_type=Path),
              help="A second model to compare against, timed interleaved with MODEL.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt", "auto"]),
              default="cpu", show_default=True)
@input_shape_option
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
              help="Inputs: an .npz file (default: generated).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Intra-op threads (default: onnxruntime's choice).")
@click.option("--warmup", type=click.IntRange(0, 10000), default=5, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 100000), default=20, show_default=True,
              help="Minimum timed runs per model.")
@click.option("--min-time", type=click.FloatRange(0, 3600), default=1.0, show_default=True,
              help="Minimum seconds of timed runs per model.")
@click.option("--trt-fp16", is_flag=True, help="TensorRT: allow FP16 kernels.")
@click.option("--trt-cache", type=click.Path(file_okay=False, path_type=Path),
              help="TensorRT: engine cache folder.")
@click.option("--trt-sparse", is_flag=True,
              help="TensorRT: let the build use 2:4 sparse tactics for weights in that pattern "
                   "(the EP's trt_sparsity_enable; the sparse-weights flag with --trt-native).")
@click.option("--trt-native", is_flag=True,
              help="Also time a native TensorRT engine (needs the tensorrt package).")
@click.option("--json", "as_json", is_flag=True)
def bench(model: Path, other: Path | None, provider: str, input_shapes: tuple[str, ...],
          inputs_path: Path | None, threads: int | None, warmup: int, rounds: int,
          min_time: float, trt_fp16: bool, trt_cache: Path | None, trt_sparse: bool,
          trt_native: bool, as_json: bool) -> None:
    """Time MODEL (and --vs OTHER, interleaved) on an execution provider."""
    from graphopt.runtime.benchmark import benchmark as run_benchmark
    from graphopt.ir.inputs import load_inputs
    from graphopt.ir.model import open_for_run

    # Models over 2 GB stay on disk: an outline here, onnxruntime reads the files.
    a = open_for_run(model)
    b = open_for_run(other) if other else None
    feeds = load_inputs(inputs_path, a.model)[0] if inputs_path else None
    options: dict[str, Any] = dict(provider=provider, input_shapes=_shapes(input_shapes),
                                   feeds=feeds, warmup=warmup, threads=threads,
                                   rounds=rounds, min_time=min_time,
                                   trt_fp16=trt_fp16, trt_cache=trt_cache,
                                   trt_sparse=trt_sparse)
    with _console(stderr=True).status("benchmarking", spinner="dots"):
        result = run_benchmark(a, vs=b, **options)
    native = None
    if trt_native:
        from graphopt.runtime.trt import benchmark_tensorrt

        native = benchmark_tensorrt(model, vs=other, input_shapes=_shapes(input_shapes),
                                    feeds=feeds, fp16=trt_fp16, sparse_weights=trt_sparse,
                                    warmup=warmup, rounds=rounds,
                                    min_time=min_time)
    if as_json:
        data = result.to_dict()
        if native is not None:
            data["tensorrt_native"] = native.to_dict() if hasattr(native, "to_dict") else native
        _emit_json(data)
        return
    from graphopt.cli.render import render_benchmark

    render_benchmark(_console(), result, native, str(model), str(other) if other else None)


# --------------------------------------------------------------------------- export


@cli.command()
@click.argument("target")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--hf", is_flag=True,
              help="TARGET is a Hugging Face model folder or config.json (random weights).")
@click.option("--opset", type=click.IntRange(7, 30), default=None)
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True)
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Keep the first axis of every input dynamic.")
def export(target: str, output: Path, input_shapes: tuple[str, ...], hf: bool, opset: int | None,
           exporter: str, dynamic_batch: bool) -> None:
    """Export a torch module to ONNX, checked against torch through onnxruntime.

    TARGET is FILE.py:FACTORY or package.module:FACTORY, a callable returning an
    ``nn.Module`` (``--input-shape`` gives the example input shapes, float inputs), or with
    --hf a Hugging Face model folder or config.json.
    """
    from graphopt.exporters import export as export_module
    from graphopt.exporters import export_hf

    shapes = _shapes(input_shapes)
    if hf:
        kwargs: dict[str, Any] = {"opset": opset, "exporter": exporter}
        for name, shape in shapes.items():
            if len(shape) == 2:
                kwargs["batch"], kwargs["seq_len"] = shape
        path = export_hf(target, output, **{k: v for k, v in kwargs.items() if v is not None})
    else:
        if not shapes:
            raise ConfigError("give the example input shapes with --input-shape NAME:DIMS")
        module = _load_factory(target)()
        import torch

        names = list(shapes)
        examples = tuple(torch.randn(*shape) for shape in shapes.values())
        dynamic = {n: {0: "batch"} for n in names} if dynamic_batch else None
        path = export_module(module, examples, output, input_names=names, dynamic_axes=dynamic,
                             opset=opset, exporter=exporter)
    click.echo(f"exported {path}")


def _load_factory(target: str):
    import importlib
    import importlib.util

    spec, sep, attr = target.rpartition(":")
    if not sep or not spec or not attr:
        raise ConfigError(f"bad export target '{target}': expected FILE.py:FACTORY or "
                          "module:FACTORY")
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"export target file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(spec)
        except ImportError as exc:
            raise ConfigError(f"cannot import '{spec}': {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"'{attr}' in {spec} is not a callable returning a torch module")
    return factory


# --------------------------------------------------------------------------- passes


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True)
def list_passes(as_json: bool) -> None:
    """List the available passes and their options."""
    import dataclasses

    from graphopt.core.registry import registered_passes

    rows = []
    for name, cls in registered_passes().items():
        options = {f.name: f.default for f in dataclasses.fields(cls.Config)}
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        rows.append({"name": name, "lossless": cls.lossless, "options": options,
                     "summary": summary})
    if as_json:
        _emit_json(rows)
        return
    from rich.table import Table

    table = Table("pass", "kind", "options (defaults)", "what it does")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        table.add_row(r["name"], "lossless" if r["lossless"] else "lossy", opts, r["summary"])
    _console().print(table)


from .sweep import sweep as _sweep  # noqa: E402 - defined in its own module

cli.add_command(_sweep)


# --------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and a non-zero exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="graphopt", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()} (see graphopt --help)", err=True)
        return EXIT_USER_ERROR
    except GraphoptError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback for the user without --debug
        if debug:
            raise
        click.echo(f"error: internal error: {exc.__class__.__name__}: {exc} "
                   "(rerun with --debug for a traceback and report it)", err=True)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
