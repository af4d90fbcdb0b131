"""Where the benchmarks write their results: a bare name under benchmarks/results/, a path as given."""

import json

from benchmark_helpers import BENCHMARKS, load_benchmark


def test_a_bare_name_goes_under_results_and_a_path_is_kept():
    common = load_benchmark("common")
    assert common.results_path("backbone_decode") == BENCHMARKS / "results" / "backbone_decode.json"
    assert str(common.results_path("/tmp/run/decode.json")) == "/tmp/run/decode.json"
    assert str(common.results_path("runs/decode")) == "runs/decode"


def test_interleaved_timing_calls_every_function_in_turn_and_keeps_each_one_s_times(monkeypatch):
    import pytest

    common = load_benchmark("common")
    calls, clock = [], [0.0]
    durations = {"a": iter([9, 3.0, 2.0, 4.0]), "b": iter([9, 1.0, 5.0, 0.5])}  # the first call is the warm-up

    def timed(name):
        def function():
            calls.append(name)
            clock[0] += next(durations[name])
        return function

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    times = common.interleaved_times({"a": timed("a"), "b": timed("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert times == {"a": [3.0, 2.0, 4.0], "b": [1.0, 5.0, 0.5]}
    with pytest.raises(ValueError, match=r"^rounds must be at least 1, found 0$"):
        common.interleaved_times({"a": timed("a")}, rounds=0)


def test_write_results_adds_the_machine_and_makes_the_folder(tmp_path):
    common = load_benchmark("common")
    path = common.write_results(str(tmp_path / "new" / "numbers.json"), {"ratio": 5.9})
    assert path == tmp_path / "new" / "numbers.json"
    written = json.loads(path.read_text())
    assert written["ratio"] == 5.9 and written["machine"]["cores"] >= 1


# ---------------------------------------------------------------------- benchmarks/gpu_latency.py and gpu_check.sh
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

GPU_CHECK = BENCHMARKS / "gpu_check.sh"
#: Options of a short dry run of gpu_latency.py: the targets' configuration alone, no images.
SHORT_DRY_RUN = ["--dry-run", "--tokens", "4", "--batch-sizes", "1", "--steps", "2", "--repeats", "1",
                 "--prompt-tokens", "3", "--budget-seconds", "0"]


def test_gpu_latency_exits_1_without_cuda_outside_a_dry_run(tmp_path, monkeypatch, capsys):
    script = load_benchmark("gpu_latency")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main(["--out", str(tmp_path)]) == 1
    assert "expected a CUDA device outside --dry-run, found none" in capsys.readouterr().out
    assert not (tmp_path / "gpu_latency.json").exists()


@pytest.mark.parametrize("persistent", [False, True])
def test_gpu_latency_exits_1_on_errors_and_on_kernel_fallbacks(tmp_path, monkeypatch, capsys, persistent):
    script = load_benchmark("gpu_latency")
    found = {"errors": [], "seconds": 1.0}
    monkeypatch.setattr(script, "run", lambda args: found)
    options = ["--dry-run", "--out", str(tmp_path)] + (["--persistent-head"] if persistent else [])
    assert script.main(options) == 0
    found["errors"] = ["decode step check: over its tolerance"]
    assert script.main(options) == 1
    assert "FAILED, expected no errors and no kernel fallbacks, found 1" in capsys.readouterr().out
    found["errors"] = []
    monkeypatch.setattr(script, "FAILED_KERNELS", {"skinny_linear": "RuntimeError: launch failed"})
    assert script.main(options) == 1
    assert "ran as their PyTorch references from then on: skinny_linear" in capsys.readouterr().out
    monkeypatch.setattr(script, "FAILED_KERNELS", {})
    found["grid_barrier"] = {"errors": ["grid barrier (barrier_us): RuntimeError: hang"]}
    assert script.main(options) == 1


def test_backbone_floors_are_weights_only_with_the_kv_cache_apart():
    script = load_benchmark("gpu_latency")
    card = {"copy_bandwidth_bytes_per_s": 1e12, "matmul_flops_per_s": 1e15}
    floors = script.backbone_floors(6e9, 1e9, 2e10, card)
    assert floors == {"floor_ms": 6.0, "floor_with_kv_ms": 7.0}
    # The arithmetic counts the matrices a token is multiplied by: not the embedding table, not the vectors.
    model = script.build_random_model(True, torch.device("cpu"), 0)
    matrices = [p for name, p in model.backbone.named_parameters() if p.ndim == 2 and "embed_tokens" not in name]
    assert script.backbone_matmul_parameters(model) == sum(p.numel() for p in matrices)
    assert script.backbone_matmul_parameters(model) < sum(p.numel() for p in model.backbone.parameters())
    # An estimate at more rows grows the bytes read by the keys and values of the extra rows.
    single = {"stack": "fused", "tokens": 4, "int8": False, "ms": 10.0, "floor_ms": 5.0, "weight_bytes": 5e9,
              "kv_bytes": 1e9}
    assert script.image_backbone_ms({"backbone_one_row": [single], "rows": []}, 4, 2, False) == 10.0 * 7e9 / 6e9


def test_checks_compare_against_the_reference_and_fail_out_of_tolerance():
    script = load_benchmark("gpu_latency")
    expected = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    check = script.compared(expected + torch.tensor([[0.0, 0.2], [0.0, 0.0]]), expected)
    assert math.isclose(check["max_abs_error"], 0.2, rel_tol=1e-6)
    assert math.isclose(check["max_rel_error"], 0.05, rel_tol=1e-6)
    assert script.check_verdict(check, 0.1)["passed"] and not script.check_verdict(check, 0.01)["passed"]
    nan = script.compared(torch.full((2, 2), float("nan")), expected)
    assert not script.check_verdict(nan, 0.1)["passed"]
    assert not script.check_verdict(script.compared(torch.zeros(2), torch.zeros(2)), 0.1)["passed"]
    with pytest.raises(ValueError, match=r"expected an output of shape \(2, 2\), found \(2,\)"):
        script.compared(torch.zeros(2), expected)


def test_the_checks_pass_at_the_dry_runs_shapes():
    script = load_benchmark("gpu_latency")
    from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity

    generator = torch.Generator().manual_seed(0)
    model = script.check_model(True, torch.device("cpu"), 1)
    checks = script.check_decode_stacks(model, {"fused": {}}, 2, 5, generator)
    assert checks["fused"]["passed"] and checks["fused"]["layers"] == script.CHECK_LAYERS
    assert 0 < checks["fused"]["max_abs_error"] or checks["fused"]["max_rel_error"] == 0
    velocity = FusedFlowMatchingVelocity(model.image_head)
    check = script.check_token_step(model, velocity, 2, 2, 2, 7.5, torch.device("cpu"), generator, "norm kernels")
    assert check["passed"] and check["tolerance"] == script.CHECK_TOLERANCES[torch.float32]


def test_a_stack_out_of_tolerance_is_not_timed_and_the_run_fails(tmp_path, monkeypatch):
    script = load_benchmark("gpu_latency")
    checks = script.check_decode_stacks

    def fused_fails(model, options, rows, context, generator):
        found = checks(model, options, rows, context, generator)
        found["fused"] = script.check_verdict({**found["fused"], "max_rel_error": 0.5}, found["fused"]["tolerance"])
        return found

    monkeypatch.setattr(script, "check_decode_stacks", fused_fails)
    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")  # the PyTorch references: short, also under the interpreter
    assert script.main(SHORT_DRY_RUN + ["--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_latency.json").read_text())
    assert "fused" not in {single["stack"] for single in result["backbone_one_row"]}
    assert result["decode_stack_chosen"] == "backbone"
    (error,) = result["errors"]
    assert "decode step (fused stack, 2 rows, context 5)" in error and "the stack is not timed" in error
    assert "| decode step | fused | 2 | 5 |" in (tmp_path / "gpu_latency.md").read_text()


def test_a_token_step_out_of_tolerance_is_not_timed(tmp_path, monkeypatch):
    script = load_benchmark("gpu_latency")
    from nextstep.fast.flow_head_velocity import FusedFlowMatchingVelocity

    check = script.check_token_step
    failing = {"block kernels"}

    def out_of_tolerance(model, velocity, rows, branches, steps, cfg, device, generator, name):
        found = check(model, velocity, rows, branches, steps, cfg, device, generator, name)
        return script.check_verdict({**found, "max_rel_error": 0.5}, found["tolerance"]) if name in failing else found

    monkeypatch.setattr(script, "check_token_step", out_of_tolerance)
    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")  # the PyTorch references: short, also under the interpreter
    args = script.parse_args(SHORT_DRY_RUN + ["--out", str(tmp_path), "--batch-sizes", "1,2"])
    model = script.build_random_model(True, torch.device("cpu"), 0)
    result = {"checks": [], "errors": []}
    velocities = {name: FusedFlowMatchingVelocity(model.image_head) for name in ("norm kernels", "block kernels")}
    assert script.check_token_steps(args, result, model, velocities, torch.device("cpu"), 2,
                                    torch.Generator()) == {"block kernels"}
    # Both batch sizes of the variant that passed, the first of the one that failed.
    assert [(c["variant"], c["batch"], c["passed"]) for c in result["checks"]] == [
        ("norm kernels", 1, True), ("norm kernels", 2, True), ("block kernels", 1, False)]
    assert result["errors"][0].endswith("over the tolerance 0.001; the variant is not timed")
    # Without the norm kernels' token step, no configuration is timed, and the run fails.
    failing = {"norm kernels"}
    assert script.main(SHORT_DRY_RUN + ["--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_latency.json").read_text())
    assert result["rows"] == []
    assert "the token step with the norm kernels failed its check" in result["configurations_skipped"][0]["reason"]


def _fake_python(tmp_path, codes: dict[str, int]):
    """A stand-in for Python that logs its arguments and exits with ``codes``' status for each part."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >>{calls}
case "$1 $2 $#" in
  "-c "*) echo versions; exit {codes.get('environment', 0)} ;;
  "-m pytest 6") exit {codes.get('persistent head tests', 0)} ;;
  "-m pytest "*) exit {codes.get('tests', 0)} ;;
esac
if [ "$1" = benchmarks/gpu_latency.py ]; then
  case " $* " in
    *" --persistent-head "*) exit {codes.get('persistent head latency', 0)} ;;
    *) exit {codes.get('gpu_latency', 0)} ;;
  esac
fi
exit 99
""")
    fake.chmod(0o755)
    return fake, calls


def _gpu_check(tmp_path, codes: dict[str, int]):
    fake, calls = _fake_python(tmp_path, codes)
    env = {key: value for key, value in os.environ.items() if key not in ("DRY_RUN", "LATENCY_ARGS")}
    env.update(PYTHON=str(fake), OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=60)
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()[1:]
    return done, calls.read_text().splitlines(), summary


def test_gpu_check_passes_when_every_part_passes(tmp_path):
    done, calls, summary = _gpu_check(tmp_path, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary == ["PASS environment (exit 0)", "PASS tests (exit 0)", "PASS gpu_latency (exit 0)",
                       "PASS persistent head tests (exit 0)", "PASS persistent head latency (exit 0)"]
    assert not any("--no-fused-decode" in call for call in calls)
    assert done.stdout.rstrip().endswith("gpu_check exit 0")


def test_gpu_check_fails_when_a_part_fails_and_keeps_its_status(tmp_path):
    done, _, summary = _gpu_check(tmp_path, {"gpu_latency": 1, "persistent head latency": 124})
    assert done.returncode == 1
    assert "FAIL gpu_latency (exit 1)" in summary
    assert "FAIL persistent head latency (exit 124: over its time limit)" in summary
    assert (tmp_path / "out" / "gpu_latency.log").read_text().rstrip().endswith("gpu_latency exit 1")


def test_after_failed_tests_the_benchmark_runs_without_the_fused_stack(tmp_path):
    done, calls, summary = _gpu_check(tmp_path, {"tests": 1})
    assert done.returncode == 1 and "FAIL tests (exit 1)" in summary
    latency = [call for call in calls if "gpu_latency.py" in call]
    assert len(latency) == 2 and all(call.endswith("--no-fused-decode") for call in latency)
    assert "PASS gpu_latency (exit 0; run with --no-fused-decode since the tests failed)" in summary
    assert "gpu_latency.py runs with --no-fused-decode" in (tmp_path / "out" / "gpu_latency.log").read_text()


def test_after_failed_one_launch_tests_its_timings_are_not_run(tmp_path):
    done, calls, summary = _gpu_check(tmp_path, {"persistent head tests": 1})
    assert done.returncode == 1
    assert not any("--persistent-head" in call for call in calls)
    assert summary[-2:] == ["FAIL persistent head tests (exit 1)",
                            "FAIL persistent head latency (not run: the one-launch head's tests failed)"]


def test_gpu_check_limits_finish_well_inside_8_minutes():
    script = GPU_CHECK.read_text()
    assert "set -u -o pipefail" in script
    limits = [int(value) for value in re.findall(r'timeout -k 5 "\$\{[A-Z_]+:-(\d+)\}"', script)]
    assert len(limits) == 5 and sum(limits) == 430 and sum(limits) + 5 * len(limits) <= 460
    assert "430 s" in script and "455 s" in script
