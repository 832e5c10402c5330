"""benchmarks/gpu_check.py (`make gpu-check`) where there is no GPU: the preflight's one line,
the plan --dry-run prints (every step, within the budget, with flags the CLIs declare), the
runner's budget, timeouts and skipped steps, and the report's table."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from ldm_edge.export.cli import main as export_main
from ldm_edge.runtime.cli.run import main as run_main
from ldm_edge.runtime.cli.run import timing_table
from ldm_edge.runtime.pipeline import Timings
from ldm_edge.runtime.schedulers import scheduler_names

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CLIS = {"ldm-export": (export_main, "ldm_edge.export.cli"),
        "ldm-run": (run_main, "ldm_edge.runtime.cli.run")}
# the script run as on a machine without TensorRT, whatever this one has
NO_TRT = ("import runpy, sys; sys.modules['tensorrt'] = None; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")
STEP_LINE = re.compile(r"^\s*\d+\. (.+?)\s{2,}(\d+) s  (.+?)(?:   \[after: (.+)\])?$")


@pytest.fixture(scope="module")
def gc():
    """The script as a module (it lives outside the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while defining
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def script(*args, code=None):
    argv = [sys.executable, "-c", code, str(SCRIPT)] if code else [sys.executable, str(SCRIPT)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def flag_problems(tool: str, args: list[str]) -> list[str]:
    """What in ``tool args`` the click command does not declare: a subcommand, a flag, a
    choice value (parsed by click's own parser, values unconverted: no path must exist)."""
    command = CLIS[tool][0]
    ctx = click.Context(command, info_name=tool)
    if isinstance(command, click.Group):
        name, args = args[0], args[1:]
        command = command.get_command(ctx, name)
        if command is None:
            return [f"{tool} has no subcommand {name!r}"]
        ctx = click.Context(command, info_name=name, parent=ctx)
    try:
        values, extra, _ = command.make_parser(ctx).parse_args(list(args))
    except click.UsageError as e:
        return [e.format_message()]
    found = [f"unexpected arguments {extra}"] if extra else []
    for param in command.params:
        given = values.get(param.name)
        if given is None or not isinstance(param.type, click.Choice):
            continue
        for value in given if isinstance(given, (list, tuple)) else [given]:
            if value not in param.type.choices:
                found.append(f"{param.opts[0]} has no choice {value!r}")
    return found


# -- the preflight ------------------------------------------------------------------------------
def test_without_tensorrt_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "gpu-check"
    r = script("--out", str(out), code=NO_TRT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("gpu-check: error: TensorRT is not installed"), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()  # nothing started, nothing written


# -- the plan -----------------------------------------------------------------------------------
def test_dry_run_lists_every_step_within_the_budget(tmp_path):
    out = tmp_path / "gpu-check"
    r = script("--dry-run", "--out", str(out))
    assert r.returncode == 0, r.stderr
    head = re.search(r"timeouts sum to (\d+) s of the (\d+) s budget", r.stdout)
    assert head, r.stdout
    total, budget = int(head[1]), int(head[2])
    steps = {m[1]: (int(m[2]), shlex.split(m[3])) for m in map(STEP_LINE.match,
                                                                r.stdout.splitlines()) if m}
    assert budget == 540 and sum(t for t, _ in steps.values()) == total <= budget

    def value(words, flag):
        return words[words.index(flag) + 1] if flag in words else None

    for bundle in ("tiny-sd1", "demo"):
        for prec in ("fp16", "int8"):
            assert steps[f"{bundle} {prec}"][1][3] == prec  # ldm-export fp16|int8 BUNDLE
            engines = steps[f"{bundle} engines {prec}"][1]
            assert engines[3] == "engines" and value(engines, "--precision") == prec
            for backend in ("tensorrt", "onnxruntime"):
                run = steps[f"{bundle} ldm-run {backend} {prec}"][1]
                assert run[2] == "ldm_edge.runtime.cli.run" and value(run, "--backend") == backend
                assert value(run, "--precision") == prec and value(run, "--seed") == "0"
    assert "--refittable" in steps["demo engines fp16"][1]
    for backend in ("tensorrt", "onnxruntime"):
        run = steps[f"demo lora ldm-run {backend} fp16"][1]
        assert value(run, "--backend") == backend
        assert value(run, "--lora").endswith("demo/weights/lora/top_center.safetensors:1")
    assert steps["demo lora refit probe"][1][2:4] == ["--child", "refit"]
    assert not out.exists()  # a dry run writes nothing


def test_planned_commands_use_flags_the_clis_declare(gc, tmp_path):
    steps, _ = gc.plan(tmp_path, bench=True, pytest=True)
    tools = {}
    for step in steps:
        if step.tool is not None:
            module = CLIS[step.tool][1]
            assert step.argv[1:3] == ("-m", module), step.name
            assert flag_problems(step.tool, list(step.argv[3:])) == [], step.name
            tools[step.tool] = tools.get(step.tool, 0) + 1
        elif "--child" in step.argv:  # the script's own measurements
            a = gc.arguments(list(step.argv[2:]))
            assert a.child[0] in gc.CHILDREN, step.name
    assert tools == {"ldm-export": 10, "ldm-run": 10}
    assert gc.SCHEDULER in scheduler_names()


def test_the_flag_check_catches_a_renamed_flag_or_choice():
    (renamed,) = flag_problems("ldm-export", ["engines", "B", "--refitable"])
    assert "--refitable" in renamed  # click's own words: "No such option '--refitable'..."
    assert flag_problems("ldm-export", ["engines", "B", "--precision", "int4"]) == \
        ["--precision has no choice 'int4'"]
    assert flag_problems("ldm-export", ["engine", "B"]) == ["ldm-export has no subcommand 'engine'"]
    assert flag_problems("ldm-run", ["B", "--backend", "tensorrt", "--lora", "x:1"]) == []


def test_each_step_waits_only_for_earlier_steps(gc, tmp_path):
    steps, rows = gc.plan(tmp_path)
    seen = set()
    for step in steps:
        assert set(step.needs) <= seen, step.name
        seen.add(step.name)
    assert len(seen) == len(steps)  # names are unique: the report keys on them
    for row in rows:
        assert {row.build, row.trt, row.ort} | ({row.probe} if row.probe else set()) <= seen
    assert [(r.bundle, r.precision, r.lora) for r in rows] == [
        ("tiny-sd1", "fp16", False), ("tiny-sd1", "int8", False),
        ("demo", "fp16", False), ("demo", "int8", False), ("demo", "fp16", True)]
    assert sum(s.timeout_s for s in steps) <= gc.BUDGET_S


# -- the runner ---------------------------------------------------------------------------------
def test_runner_records_failures_skips_dependents_and_stops_at_the_budget(gc, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(gc, "MIN_STEP_S", 0.5)
    py = sys.executable
    steps = [gc.Step("fails", (py, "-c", "import sys; print('working'); sys.exit('bad: why')"), 10),
             gc.Step("after fails", (py, "-c", "pass"), 10, ("fails",)),
             gc.Step("slow", (py, "-c", "import time; time.sleep(60)"), 1),
             gc.Step("sleeps", (py, "-c", "import time; time.sleep(60)"), 60),
             gc.Step("too late", (py, "-c", "pass"), 10)]
    runner = gc.Runner(tmp_path, budget_s=4)
    t0 = time.monotonic()
    recs = [runner.run(s) for s in steps]
    assert time.monotonic() - t0 < 10
    assert [r["status"] for r in recs] == ["failed", "skipped", "failed", "failed", "skipped"]
    assert recs[0]["last_line"] == "bad: why" and recs[0]["rc"] == 1
    assert (tmp_path / recs[0]["log"]).read_text().endswith("working\n\nbad: why\n")
    assert recs[1]["reason"] == "needs fails (failed)"
    assert recs[2]["last_line"] == "stopped at its 1 s timeout"
    assert recs[3]["last_line"] == "stopped at the 4 s budget"
    assert recs[4]["reason"] == "the 4 s budget was spent"


def test_ldm_runs_timing_table_is_read_back(gc):
    t = Timings(text_encoder=0.012, unet=0.05, vae_decoder=0.034, total=0.5, lora=0.25,
                unet_per_step=[0.02, 0.01, 0.03])
    assert gc.parse_timings("denoising ...\n" + timing_table(t) + "\nout.png\ndone in 1 s") == {
        "text_encoder_ms": 12.0, "unet_step_ms": 20.0, "vae_decoder_ms": 34.0,
        "lora_merge_ms": 250.0, "total_ms": 500.0}


# -- the report ---------------------------------------------------------------------------------
def _made_up_report(gc, tmp_path, monkeypatch) -> dict:
    steps, rows = gc.plan(tmp_path)
    by_name = {s.name: s for s in steps}
    ok = {"status": "ok", "seconds": 1.0}
    records = {s.name: {"step": s.name, **ok} for s in steps}
    records["tiny-sd1 ldm-run tensorrt fp16"]["timings"] = {
        "text_encoder_ms": 1.5, "unet_step_ms": 2.25, "vae_decoder_ms": 3.0, "total_ms": 400.0}
    records["tiny-sd1 ldm-run onnxruntime fp16"]["timings"] = {"unet_step_ms": 20.0}
    records["demo engines int8"] = {"step": "demo engines int8", "status": "failed",
                                    "seconds": 3.2, "last_line": "ldm-export: error: no | way"}
    records["demo ldm-run tensorrt int8"] = {"step": "demo ldm-run tensorrt int8",
                                             "status": "skipped",
                                             "reason": "needs demo engines int8 (failed)"}
    records["demo lora ldm-run tensorrt fp16"] = {"step": "demo lora ldm-run tensorrt fp16",
                                                  "status": "skipped",
                                                  "reason": "the 540 s budget was spent"}
    records["demo lora refit probe"]["result"] = {"refit_s": 0.042, "lora_vs_base_psnr_db": 21.5}
    tiny_fp16 = ("pictures/tiny-sd1-fp16-tensorrt.png", "pictures/tiny-sd1-fp16-onnxruntime.png")
    monkeypatch.setattr(gc, "picture_psnr",
                        lambda out, a, b: 51.23 if (a, b) == tiny_fp16 else 44.0)
    results = [gc.row_result(r, records, by_name, tmp_path) for r in rows]
    return {"machine": {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                        "tensorrt": "10.13.0", "onnxruntime": "1.23.0", "polygraphy": "0.49.26"},
            "budget_s": 540, "seconds": 312, "rows": results,
            "steps": [records[s.name] for s in steps]}


def test_rows_name_the_step_that_kept_them_empty(gc, tmp_path, monkeypatch):
    rows = _made_up_report(gc, tmp_path, monkeypatch)["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "skipped"]
    assert rows[0]["psnr_db"] == 51.23 and rows[0]["build_s"] == 1.0
    assert rows[3]["why"] == "demo engines int8: ldm-export: error: no | way"
    assert "psnr_db" not in rows[3] and rows[3]["onnxruntime"] is None
    assert rows[4]["why"] == "demo lora ldm-run tensorrt fp16: the 540 s budget was spent"
    assert rows[4]["refit"] == {"refit_s": 0.042, "lora_vs_base_psnr_db": 21.5}
    assert "build_s" not in rows[4]  # the LoRA row runs on the demo's FP16 engines


def test_report_table_renders_every_row_and_step(gc, tmp_path, monkeypatch):
    report = _made_up_report(gc, tmp_path, monkeypatch)
    text = gc.markdown(report)
    assert text.startswith("gpu-check on NVIDIA H100 80GB HBM3 (sm90), TensorRT 10.13.0")
    tables = [[ln for ln in block.splitlines() if ln.startswith("|")]
              for block in text.split("\n\n") if block.startswith("|")]
    results, steps = tables
    assert len(results) == 2 + 5 and len(steps) == 2 + len(report["steps"])
    assert len({ln.count("|") for ln in results}) == 1  # no cell broke the columns
    assert len({ln.count("|") for ln in steps}) == 1
    assert results[2] == ("| tiny-sd1 | fp16 | 1 | 51.23 | 1.5 | 2.25 | 3 | 400 | 20 | – | ok |")
    assert results[5].startswith("| demo | int8 | – | – |")
    assert results[5].endswith("| **failed** at demo engines int8 |")
    assert results[3].startswith("| tiny-sd1 | int8 | 1 | 44 | – |")
    assert results[6].startswith("| demo + demo LoRA | fp16 (refittable) | – | – |")
    assert results[6].endswith("| 0.042 | **skipped** at demo lora ldm-run tensorrt fp16 |")
    assert "ldm-export: error: no / way" in text  # the failed step's last line, in its row
    assert "the 540 s budget was spent" in text and "21.5 dB" in text


def test_report_renders_without_machine_facts(gc):
    text = gc.markdown({"rows": [], "steps": []})
    assert text.startswith("gpu-check on ? (sm?)")


# -- the refit probe, on onnxruntime (the same Pipeline calls as on TensorRT) --------------------
def test_refit_probe_times_the_lora_open_and_sees_the_lora(gc, tiny_bundles, tmp_path):
    import numpy as np

    from ldm_edge.runtime.lora.safetensors_read import write_safetensors

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    rng = np.random.default_rng(0)
    lora = tmp_path / "q.safetensors"
    write_safetensors(lora, {f"{stem}.lora_down.weight": rng.standard_normal((4, 32), np.float32),
                             f"{stem}.lora_up.weight": rng.standard_normal((32, 4), np.float32)})
    got = gc.refit_probe(str(tiny_bundles["sd1"]), str(lora), backend="onnxruntime",
                         precision="fp32", repeats=2)
    assert set(got) == {"open_with_lora_s", "open_without_s", "merge_s", "refit_s",
                        "lora_vs_base_psnr_db"}
    assert got["open_with_lora_s"] > 0 and got["open_without_s"] > 0 and got["merge_s"] > 0
    assert got["lora_vs_base_psnr_db"] < 60  # the LoRA reached the second picture (45 dB here)
