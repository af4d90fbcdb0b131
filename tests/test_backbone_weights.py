"""The streaming safetensors loader (nextstep.weights): shards, renaming, dtypes, meta modules, reports, memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nextstep.weights as weights
from nextstep.layers import RotaryEmbedding
from nextstep.weights import (
    INDEX_NAME,
    checkpoint_shards,
    iter_checkpoint,
    load_safetensors,
    read_checkpoint_index,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("counts", torch.zeros(3, dtype=torch.long))
        self.rotary = RotaryEmbedding(4)


def write_sharded(directory, state, per_shard=2, prefix=""):
    """Write ``state`` as shards of ``per_shard`` tensors plus a model.safetensors.index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for number, start in enumerate(range(0, len(names), per_shard)):
        shard = f"model-{number + 1:05d}.safetensors"
        save_file({prefix + n: state[n].contiguous() for n in names[start:start + per_shard]}, str(directory / shard))
        weight_map.update({prefix + n: shard for n in names[start:start + per_shard]})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def source_state():
    torch.manual_seed(0)
    return {"embed.weight": torch.randn(10, 4), "proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3),
            "counts": torch.tensor([1, 2, 3])}


def test_sharded_checkpoint_loads_into_a_meta_module_with_renaming_and_cast(tmp_path):
    state = source_state()
    write_sharded(tmp_path, state, prefix="model.")
    with torch.device("meta"):
        module = Tiny()
    report = load_safetensors(module, tmp_path, rename=lambda k: k.removeprefix("model."), dtype=torch.float16)
    assert report.complete and report.missing == [] and report.skipped == []
    assert sorted(report.loaded) == sorted(state)
    assert module.head.weight is module.embed.weight, "tied parameters stay tied"
    assert module.embed.weight.dtype == torch.float16 and module.counts.dtype == torch.long
    assert torch.equal(module.proj.weight, state["proj.weight"].half())
    assert torch.equal(module.counts, state["counts"])
    assert module.rotary.signed_frequencies.dtype == torch.float32, "derived buffers are rebuilt"
    torch.testing.assert_close(module.rotary.inv_freq, RotaryEmbedding(4).inv_freq)
    assert isinstance(module.proj.weight, nn.Parameter) and module.proj.weight.requires_grad


def test_only_one_shard_is_open_at_a_time(tmp_path, monkeypatch):
    write_sharded(tmp_path, source_state(), per_shard=1)
    real_open, state = weights.safe_open, {"open": 0, "most": 0, "opened": []}

    class Tracking:
        def __init__(self, path, **kwargs):
            self.handle = real_open(path, **kwargs)
            state["opened"].append(path)

        def __enter__(self):
            state["open"] += 1
            state["most"] = max(state["most"], state["open"])
            return self.handle.__enter__()

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(weights, "safe_open", Tracking)
    load_safetensors(Tiny(), tmp_path)
    assert state["most"] == 1
    assert len(state["opened"]) == 2 * 4, "headers once, then each shard once"


def test_problems_are_reported_by_name(tmp_path):
    state = source_state()
    state["proj.weight"] = torch.randn(5, 4)
    state["extra"] = torch.zeros(1)
    del state["proj.bias"]
    write_sharded(tmp_path, state)
    with pytest.raises(ValueError) as error:
        load_safetensors(Tiny(), tmp_path)
    message = str(error.value)
    assert "missing keys ['proj.bias']" in message
    assert "unexpected keys ['extra']" in message
    assert "proj.weight: expected (3, 4), found (5, 4)" in message
    module = Tiny()
    before = module.proj.weight.clone()
    report = load_safetensors(module, tmp_path, strict=False)
    assert not report.complete and report.mismatched and torch.equal(module.proj.weight, before)
    assert torch.equal(module.embed.weight, state["embed.weight"])


def test_floats_for_an_integer_buffer_and_a_malformed_index_are_named(tmp_path):
    state = source_state()
    state["counts"] = torch.tensor([1.7, 2.9, 3.2])  # an integer buffer would round them silently
    write_sharded(tmp_path / "floats", state)
    with pytest.raises(ValueError, match=r"counts: expected torch.int64 values, found F32"):
        load_safetensors(Tiny(), tmp_path / "floats")
    write_sharded(tmp_path / "index", source_state())
    index = json.loads((tmp_path / "index" / INDEX_NAME).read_text())
    index["weight_map"]["proj.bias"] = ["model-00001.safetensors"]
    (tmp_path / "index" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"every 'weight_map' entry must name a shard file, found 'proj.bias': "
                                         r"\['model-00001.safetensors'\]"):
        load_safetensors(Tiny(), tmp_path / "index")


def test_rename_to_none_skips_and_collisions_are_refused(tmp_path):
    state = source_state()
    state["lm_head.weight"] = torch.zeros(10, 4)
    write_sharded(tmp_path, state)
    report = load_safetensors(Tiny(), tmp_path, rename=lambda k: None if k.startswith("lm_head") else k)
    assert report.skipped == ["lm_head.weight"]
    with pytest.raises(ValueError, match="both map to"):
        load_safetensors(Tiny(), tmp_path, rename=lambda k: "embed.weight" if "weight" in k else k)


def test_checkpoint_discovery_and_errors(tmp_path):
    write_sharded(tmp_path / "sharded", source_state())
    shards = checkpoint_shards(tmp_path / "sharded")
    assert [s.name for s in shards] == ["model-00001.safetensors", "model-00002.safetensors"]
    assert checkpoint_shards(tmp_path / "sharded" / INDEX_NAME) == shards
    assert checkpoint_shards(shards[0]) == [shards[0]]
    infos = read_checkpoint_index(tmp_path / "sharded")
    assert infos["proj.weight"].shape == (3, 4) and infos["proj.weight"].dtype == "F32"
    assert dict(iter_checkpoint(tmp_path / "sharded", rename=lambda k: k.upper())).keys() == {
        "EMBED.WEIGHT", "PROJ.WEIGHT", "PROJ.BIAS", "COUNTS"}
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match="model-00002.safetensors"):
        checkpoint_shards(tmp_path / "sharded")
    with pytest.raises(FileNotFoundError, match="found none"):
        checkpoint_shards(tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_checkpoint_index(tmp_path / "broken.safetensors")


def test_meta_buffers_without_a_rebuild_rule_are_refused(tmp_path):
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2))
            self.register_buffer("table", torch.zeros(2), persistent=False)

    save_file({"weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = Opaque()
    with pytest.raises(ValueError, match=r"buffers \['table'\]"):
        load_safetensors(module, tmp_path)


@pytest.mark.slow
def test_peak_memory_stays_near_the_model_size(tmp_path):
    """A 134 MB checkpoint in 4 shards loads into a meta-built model with well under 2x its size in RAM."""
    layers, width = 8, 2048  # 8 x 2048 x 2048 fp32
    torch.manual_seed(0)
    write_sharded(tmp_path, {f"{i}.weight": torch.randn(width, width) for i in range(layers)})
    script = textwrap.dedent(f"""
        import json, torch
        from torch import nn
        from nextstep.weights import load_safetensors

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear({width}, {width}, bias=False) for _ in range({layers})])
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
        before = status("VmRSS")
        load_safetensors(model, {str(tmp_path)!r})
        print(json.dumps({{"size": sum(p.numel() * 4 for p in model.parameters()),
                          "growth": status("VmHWM") - before}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    # The model itself, plus at most one shard mapped and one tensor in flight.
    assert numbers["size"] <= numbers["growth"] < 1.6 * numbers["size"], numbers


def test_a_dtype_alone_casts_a_real_module_on_its_own_device(tmp_path):
    """``dtype`` without ``device``: a module that already has memory (not meta) is cast too, every floating
    parameter and buffer of it, integers kept."""
    state = source_state()
    write_sharded(tmp_path, state)
    module = Tiny()
    assert module.embed.weight.dtype == torch.float32
    report = load_safetensors(module, tmp_path, dtype=torch.bfloat16)
    assert report.complete
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert module.counts.dtype == torch.long and torch.equal(module.counts, state["counts"])
    assert module.embed.weight.device.type == "cpu"
    assert torch.equal(module.proj.weight, state["proj.weight"].to(torch.bfloat16))
    assert module.head.weight is module.embed.weight


def test_a_tensor_held_by_two_shards_is_named_with_both(tmp_path):
    """Which copy would load is unclear (and the two may differ): a name in two shards is refused."""
    state = source_state()
    save_file({"proj.weight": state["proj.weight"], "embed.weight": state["embed.weight"]},
              str(tmp_path / "part-a.safetensors"))
    save_file({"proj.weight": state["proj.weight"] + 1, "proj.bias": state["proj.bias"],
               "counts": state["counts"]}, str(tmp_path / "part-b.safetensors"))
    for read in (read_checkpoint_index, lambda path: load_safetensors(Tiny(), path)):
        with pytest.raises(ValueError, match=r"'proj.weight' appears in both part-a.safetensors and part-b"):
            read(tmp_path)


def test_shards_are_listed_in_the_order_of_the_index(tmp_path):
    state = source_state()
    save_file({"proj.weight": state["proj.weight"]}, str(tmp_path / "z-first.safetensors"))
    save_file({"embed.weight": state["embed.weight"], "proj.bias": state["proj.bias"], "counts": state["counts"]},
              str(tmp_path / "a-second.safetensors"))
    weight_map = {"proj.weight": "z-first.safetensors", "embed.weight": "a-second.safetensors",
                  "proj.bias": "a-second.safetensors", "counts": "a-second.safetensors"}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    assert [shard.name for shard in checkpoint_shards(tmp_path)] == ["z-first.safetensors", "a-second.safetensors"]
    assert [name for name, _ in iter_checkpoint(tmp_path)][0] == "proj.weight"


def test_an_unexpected_tensor_alone_fails_a_strict_load(tmp_path):
    state = source_state()
    state["extra"] = torch.zeros(1)
    write_sharded(tmp_path, state)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        load_safetensors(Tiny(), tmp_path)
    report = load_safetensors(Tiny(), tmp_path, strict=False)
    assert not report.complete and report.unexpected == ["extra"] and report.missing == []
    assert report.describe() == "unexpected keys ['extra']"


def test_frozen_parameters_of_a_meta_module_stay_frozen(tmp_path):
    write_sharded(tmp_path, source_state())
    with torch.device("meta"):
        module = Tiny()
    module.proj.requires_grad_(False)
    load_safetensors(module, tmp_path, dtype=torch.bfloat16)
    assert not module.proj.weight.requires_grad and not module.proj.bias.requires_grad
    assert module.embed.weight.requires_grad and module.head.weight is module.embed.weight


def test_a_buffer_its_own_module_rebuilds_in_place_loads_into_a_meta_module(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3))
            self.register_buffer("scale", torch.empty(3), persistent=False)
            self.reset_buffers()

        def reset_buffers(self):
            with torch.no_grad():
                self.scale.copy_(torch.arange(3.0))

    save_file({"weight": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = Scaled()
    load_safetensors(module, tmp_path)
    assert not module.scale.is_meta and torch.equal(module.scale, torch.arange(3.0))
    assert torch.equal(module.weight, torch.ones(3))


def test_iterating_a_checkpoint_skips_the_names_rename_drops(tmp_path):
    write_sharded(tmp_path, source_state())
    kept = dict(iter_checkpoint(tmp_path, rename=lambda k: None if k.startswith("proj.") else "model." + k))
    assert sorted(kept) == ["model.counts", "model.embed.weight"]
