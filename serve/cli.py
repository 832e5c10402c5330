"""``ldm-export triton`` (the model repository) and ``ldm-serve`` (it, on a real tritonserver)."""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from pathlib import Path

import click

from ldm_edge.runtime.cli.errors import invoke_reporting

from .limits import (DEFAULT_MAX_IMAGES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_PROMPT_CHARS,
                     DEFAULT_MAX_STEPS, ServeLimits)
from .pbtxt import UNET_QUEUE_DELAY_US
from .repository import COMPONENT_KINDS, write_repository


def repository_options(f):
    """What both commands take to write the repository."""
    options = [
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
                     show_default=True, help="Variant served (components without it: the next "
                                             "wider one, as ldm-run)."),
        click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Copies of the pipeline model: requests served at once. Each "
                          "component has one; the U-Net batches their calls together."),
        click.option("--batch-delay-us", type=click.IntRange(0), default=UNET_QUEUE_DELAY_US,
                     show_default=True, help="How long the U-Net's dynamic batcher waits for "
                                             "other requests' calls (microseconds)."),
        click.option("--max-steps", type=click.IntRange(1), default=DEFAULT_MAX_STEPS,
                     show_default=True, help="Per-request limit on --steps."),
        click.option("--max-pixels", type=click.IntRange(64), default=DEFAULT_MAX_PIXELS,
                     show_default=True, help="Per-request limit on height x width."),
        click.option("--max-images", type=click.IntRange(1), default=DEFAULT_MAX_IMAGES,
                     show_default=True, help="Per-request limit on images (prompts x "
                                             "--num-images)."),
        click.option("--max-prompt-chars", type=click.IntRange(1),
                     default=DEFAULT_MAX_PROMPT_CHARS, show_default=True,
                     help="Per-request limit on each prompt's length."),
        click.option("--trt-version", default=None, metavar="X.Y.Z",
                     help="With --components tensorrt: the serving container's TensorRT "
                          "release; engines another release built are refused (default: "
                          "not checked; a note says what the engines need)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _note(message: str) -> None:
    click.echo(f"note: {message}", err=True)


def _limits(kw: dict) -> ServeLimits:
    return ServeLimits(max_steps=kw["max_steps"], max_pixels=kw["max_pixels"],
                       max_images=kw["max_images"], max_prompt_chars=kw["max_prompt_chars"])


@click.command("triton")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Model repository folder to write.")
@click.option("--components", type=click.Choice(COMPONENT_KINDS), default="onnxruntime",
              show_default=True,
              help="How the components run: Triton's onnxruntime backend on the bundle's "
                   "graphs, tensorrt_plan on its engines, or Python models running onnxruntime "
                   "(servers with only the Python backend, e.g. the nvidia-pytriton wheel's).")
@repository_options
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def triton_cmd(bundle, out, components, force, **kw):
    """Write a Triton model repository for BUNDLE: one model per component and
    `ldm_pipeline`, our sampling loop as a Python-backend model calling them (BLS)."""
    path = write_repository(bundle, out, components=components, precision=kw["precision"],
                            instances=kw["instances"], limits=_limits(kw),
                            batch_delay_us=kw["batch_delay_us"], force=force,
                            trt_version=kw["trt_version"], note=_note)
    click.echo(str(path))


class _Command(click.Command):
    def invoke(self, ctx):
        return invoke_reporting("ldm-serve", super().invoke, ctx,
                                debug=lambda: bool(ctx.params.get("debug")))


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback unless told otherwise).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--components", type=click.Choice(COMPONENT_KINDS), default=None,
              help="Default: onnxruntime where the server has that backend, else python.")
@repository_options
@click.option("--repository", type=click.Path(), default=None,
              help="Write the model repository here and keep it (default: a temporary one).")
@click.option("--serve-venv", type=click.Path(), default=None,
              help="Run the tritonserver of this venv (nvidia-pytriton, numpy<2: `make "
                   "serve-venv`). Default: the tritonserver on PATH, else the one in "
                   "$LDM_EDGE_SERVE_VENV or .venv-serve.")
@click.option("--log", "log_path", type=click.Path(), default=None,
              help="tritonserver's log file (default: in the temporary folder).")
@click.option("--debug", is_flag=True, help="Tracebacks, and tritonserver's verbose log.")
def serve_main(bundle, host, http_port, grpc_port, metrics_port, components, repository,
               serve_venv, log_path, debug, **kw):
    """Serve BUNDLE on NVIDIA Triton Inference Server (KServe v2 HTTP and gRPC, Prometheus
    metrics) until Ctrl-C or SIGTERM; in-flight requests finish first."""
    from .server import TritonServer, find_triton

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="ldm-serve: %(levelname)s: %(message)s")
    install = find_triton(serve_venv)
    kind = components or ("onnxruntime" if install.has("onnxruntime") else "python")
    if kind != "python" and not install.has(kind):
        from ldm_edge.runtime.errors import UsageError

        raise UsageError(f"this tritonserver has no {kind} backend (it has: "
                         f"{', '.join(install.backends) or 'none'}); use --components python")
    with tempfile.TemporaryDirectory(prefix="ldm-serve-") as tmp:
        repo = Path(repository) if repository else Path(tmp) / "repository"
        write_repository(bundle, repo, components=kind, precision=kw["precision"],
                         instances=kw["instances"], limits=_limits(kw),
                         batch_delay_us=kw["batch_delay_us"], force=bool(repository),
                         trt_version=kw["trt_version"], note=_note)
        server = TritonServer(install, repo, host=host, http_port=http_port,
                              grpc_port=grpc_port, metrics_port=metrics_port,
                              log_path=Path(log_path or Path(tmp) / "tritonserver.log"),
                              verbose=debug)
        stop = _StopSignal()
        t0 = time.perf_counter()
        server.start()
        click.echo(f"tritonserver pid {server.proc.pid}, log {server.log_path}", err=True)
        try:
            ends = server.endpoints()
            click.echo(f"serving {bundle} ({kind} components, {kw['instances']} pipeline "
                       f"instance(s)) in {time.perf_counter() - t0:.1f} s", err=True)
            for name in ("http", "grpc", "metrics"):
                click.echo(f"{name:<8} {ends[name]}")
            click.echo(f"try: ldm-run --server {ends['http']} -p \"a red circle\"", err=True)
            stop.wait(server)
        finally:
            code = server.stop()
        click.echo(f"stopped (tritonserver exit code {code})", err=True)


class _StopSignal:
    """SIGINT/SIGTERM end the wait; so does the server dying on its own."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signum

    def wait(self, server) -> None:
        from ldm_edge.runtime.errors import UsageError

        while self.received is None:
            if server.proc.poll() is not None:
                raise UsageError(f"tritonserver exited on its own (code "
                                 f"{server.proc.returncode}); see its log")
            time.sleep(0.2)


if __name__ == "__main__":
    serve_main()
