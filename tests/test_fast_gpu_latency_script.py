"""benchmarks/gpu_latency.py runs end to end with tiny shapes on the CPU (--dry-run), before it meets a GPU."""

import json
import re
from pathlib import Path

import torch
from benchmark_helpers import load_benchmark

from nextstep.kernels.triton_support import dependent_launch_available


def test_dry_run_writes_json_and_markdown(tmp_path):
    script = load_benchmark("gpu_latency")
    assert script.main(["--dry-run", "--out", str(tmp_path), "--tokens", "4", "--batch-sizes", "1,2",
                        "--steps", "2", "--repeats", "1", "--prompt-tokens", "3"]) == 0
    result = json.loads((tmp_path / "gpu_latency.json").read_text())
    assert result["dry_run"] and not result["errors"]
    assert {(row["batch"], row["tokens"], row["steps"]) for row in result["rows"]} == {(1, 4, 2), (2, 4, 2)}
    for row in result["rows"]:
        assert row["backbone_ms"] > 0 and row["head_ms"] > 0 and row["image_seconds"] > 0
        # The targets' image is timed after an untimed generation of the same sizes.
        assert ("image_cold_seconds" in row) == (script.image_key(row) == (1, 4, 2))
        assert row["backbone_floor_ms"] > 0 and row["head_floor_ms"] > 0
    assert result["eager"] and result["card"]["copy_bandwidth_bytes_per_s"] > 0
    stacks = ["backbone", "fused"]
    if result["triton"]:
        stacks.append("fused, few-rows products")
        if dependent_launch_available():
            stacks.append("fused, few-rows products, dependent launches")
        stacks.append("fused, int8 weights")
    assert [single["stack"] for single in result["backbone_one_row"]] == stacks
    assert result["decode_stack_chosen"] in set(stacks) - {"fused, int8 weights"}
    if result["triton"]:  # Triton's interpreter (make test): the few-rows kernel against the library's
        assert {entry["product"] for entry in result["layer_products"]} == {"qkv", "o", "gate_up", "down"}
        assert {entry["kind"] for entry in result["layer_products"]} == {"library", "skinny", "skinny int8"}
        assert all(entry["weight_copies"] >= 1 for entry in result["layer_products"])
        assert result["skinny_tiles_chosen"] and result["head_block_tiles_chosen"]
    for single in result["backbone_one_row"]:
        assert single["ms"] > 0 and single["floor_ms"] > 0 and single["context"] == 3 + 4 // 2
    table = (tmp_path / "gpu_latency.md").read_text()
    assert "| tokens | batch | head steps |" in table and table.count("\n| 4 |") == 2
    assert "Backbone alone, one row (batch 1, no CFG), context 5, fused stack:" in table
    assert f"The configurations decode with the {result['decode_stack_chosen']} stack" in table
    # Right after the targets' configuration (batch 1, the most tokens, the fewest steps): the same image
    # through int8 copies of the decode weights, where that stack runs.
    if result["triton"]:
        (image,) = result["int8_images"]
        assert script.image_key(image) == (1, 4, 2) and image["image_seconds"] > 0
        assert image["estimated_image_seconds"] > 0 and image["image_cold_seconds"] > 0
        assert "Image through int8 copies of the decode weights (fused, int8 weights stack), batch 1, 4 tokens" in table
        decode = result["int8_image_decode"]
        assert (decode["rows"], decode["tokens"], decode["context"]) == (2, 4, 5) and decode["ms"] > 0
    else:
        assert result["int8_images"] == []


def test_a_short_budget_times_the_targets_configuration_and_skips_the_others(tmp_path):
    script = load_benchmark("gpu_latency")
    assert script.main(["--dry-run", "--out", str(tmp_path), "--tokens", "1,4", "--batch-sizes", "2,1",
                        "--steps", "3,2", "--repeats", "1", "--prompt-tokens", "3", "--budget-seconds", "0"]) == 0
    result = json.loads((tmp_path / "gpu_latency.json").read_text())
    assert not result["errors"]
    # The targets' configuration (batch 1, the most tokens, the fewest steps) is timed whatever the budget.
    (row,) = result["rows"]
    assert script.image_key(row) == (1, 4, 2) and row["backbone_ms"] > 0 and "image_seconds" not in row
    skipped = {(entry["batch"], entry["tokens"], entry["steps"]) for entry in result["configurations_skipped"]}
    assert skipped == {(b, t, s) for b in (1, 2) for t in (1, 4) for s in (2, 3)} - {(1, 4, 2)}
    assert all("kept for the targets' images" in entry["reason"] for entry in result["configurations_skipped"])
    assert result["eager"] == [] and "kept for the targets' images" in result["eager_skipped"]
    table = (tmp_path / "gpu_latency.md").read_text()
    assert "Configurations not timed, so that the budget afforded the targets' images: batch " in table
    assert "Eager path not timed:" in table


def test_the_reserve_for_the_targets_images_follows_their_estimates():
    script = load_benchmark("gpu_latency")
    args = script.parse_args(["--dry-run", "--tokens", "4", "--batch-sizes", "1", "--steps", "2"])
    result = {"rows": [], "backbone_one_row": []}
    assert script.target_reserve_seconds(result, args, 2) == script.DEFAULT_TARGET_RESERVE_SECONDS
    row = {"batch": 1, "tokens": 4, "steps": 2, "estimated_image_seconds": 10.0, "head_ms": 5.0,
           "head_blocks_ms": None}
    result["rows"].append(row)
    own = script.expected_image_seconds(10.0, True, 3.0)
    assert script.target_reserve_seconds(result, args, 2) == own
    # With the int8 stack timed at the image's rows, its image is kept too.
    result["int8_image_decode"] = {"tokens": 4, "rows": 2, "ms": 1000.0}
    result["backbone_one_row"].append({"int8": True, "tokens": 4, "ms": 500.0})
    assert script.target_reserve_seconds(result, args, 2) == own + script.expected_image_seconds(
        4 * (1000.0 + 5.0) / 1e3, True, 3.0)


def test_without_cuda_it_says_so_and_fails_without_writing_results(tmp_path, monkeypatch, capsys):
    script = load_benchmark("gpu_latency")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main(["--out", str(tmp_path)]) == 1  # nothing measured: a check that ran it must not pass
    assert "CUDA is not available" in capsys.readouterr().out
    assert not (tmp_path / "gpu_latency.json").exists()


def test_floors_count_every_weight_once_per_read():
    script = load_benchmark("gpu_latency")
    model = script.build_random_model(True, torch.device("cpu"), 0)
    once, modulation, per_evaluation = script.head_weights(model)
    net = model.image_head.net
    # Time embeddings are tabulated per time grid, the LayerNorm affines folded into the modulations.
    tabulated = [*net.time_embed.parameters(), *(p for block in net.res_blocks for p in block.in_ln.parameters())]
    head_parameters = {id(p) for p in model.image_head.parameters()} - {id(p) for p in tabulated}
    counted = [id(p) for p in once + modulation + per_evaluation if id(p) in head_parameters]
    assert sorted(counted) == sorted(head_parameters)
    assert script.head_bytes(model, 3) - script.head_bytes(model, 2) == script.nbytes(*per_evaluation)
    embedding = model.backbone.embed_tokens.weight
    assert script.backbone_weight_bytes(model) == sum(
        p.numel() * 4 for p in model.backbone.parameters()) - embedding.numel() * 4


def test_image_estimates_use_the_backbone_at_the_images_rows():
    script = load_benchmark("gpu_latency")
    one_row = [{"stack": "fused", "tokens": 4, "int8": False, "ms": 10.0, "floor_ms": 6.0, "weight_bytes": 5e9},
               {"stack": "fused, int8 weights", "tokens": 4, "int8": True, "ms": 4.0, "floor_ms": 3.0,
                "weight_bytes": 2e9}]
    found = {"cfg": 7.5, "backbone_one_row": one_row, "decode_stack_chosen": "fused",
             "rows": [{"batch": 1, "tokens": 4, "steps": 2, "backbone_ms": 11.0}],
             "card": {"copy_bandwidth_bytes_per_s": 1e12}}
    # Measured at the image's two rows; else one row times the chosen stack's growth to two rows.
    assert script.image_backbone_ms({**found, "int8_image_decode": {"tokens": 4, "rows": 2, "ms": 4.5}}, 4, 2,
                                    True) == 4.5
    assert script.image_backbone_ms(found, 4, 2, True) == 4.0 * 11.0 / 10.0
    # Without the configuration, the floor's growth: the keys and values of two rows (1 GB each) instead of one.
    assert abs(script.image_backbone_ms({**found, "rows": []}, 4, 2, True) - 4.0 * 4e9 / 3e9) < 1e-9
    # An older main run, whose one-row entries do not say int8: they are the model's own weights.
    old = {"backbone_one_row": [{"context": 5, "ms": 10.0}]}
    assert script.image_backbone_ms(old, 4, 2, False) == 10.0
    assert script.image_backbone_ms(old, 4, 2, True) is None
    # A budget must afford the warm-up generation too.
    assert script.expected_image_seconds(10.0, True, 3.0) == 2 * script.expected_image_seconds(10.0, False, 0.0) + 3.0


def test_product_timings_rotate_through_copies_over_twice_the_l2():
    script = load_benchmark("gpu_latency")
    l2 = 50 * 10**6
    assert script.weight_copies(52 * 10**6, l2, 20) == 2  # the o product in bf16
    assert script.weight_copies(26 * 10**6, l2, 20) == 4  # in int8
    assert script.weight_copies(283 * 10**6, l2, 20) == 1  # gate_up
    assert script.weight_copies(1000, l2, 20) == script.MAX_WEIGHT_COPIES
    assert script.weight_copies(1000, l2, 1) == 1


def test_persistent_head_mode_writes_its_own_json(tmp_path):
    script = load_benchmark("gpu_latency")
    assert script.main(["--dry-run", "--persistent-head", "--out", str(tmp_path), "--batch-sizes", "1",
                        "--steps", "2", "--repeats", "1", "--tokens", "4"]) == 0
    result = json.loads((tmp_path / "gpu_latency_persistent.json").read_text())
    (entry,) = result["persistent_head"]
    assert entry["one_launch_ms"] > 0 and entry["norm_kernels_ms"] > 0 and entry["floor_ms"] > 0
    assert not (tmp_path / "gpu_latency.json").exists() and not result["errors"]
    # Where the one launch ran: a full image at batch 1 with it, through int8 decode weights where the fused
    # stack runs.
    if entry["one_launch_ran"]:
        (image,) = result["one_launch_images"]
        assert script.image_key(image) == (1, 4, 2) and image["image_seconds"] > 0
        assert image["decode_weights"] == ("int8" if result["triton"] else "native")
        assert image["image_cold_seconds"] > 0
    else:
        assert result["one_launch_images"] == []


def test_gpu_check_limits_fit_one_device_call():
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh").read_text()
    # Every step under a limit with a kill after it; the limits leave the device call's 600 s a margin.
    limits = [int(value) for value in re.findall(r'timeout -k 5 "\$\{[A-Z_]+:-(\d+)\}"', script)]
    assert len(limits) == script.count("timeout ") == 5 and sum(limits) + 5 * len(limits) <= 600
    # The dry run runs the Triton parts through the interpreter.
    dry_run = script[script.index('if [ "${DRY_RUN:-0}" = 1 ]'):script.index("else")]
    assert "export TRITON_INTERPRET=1" in dry_run
