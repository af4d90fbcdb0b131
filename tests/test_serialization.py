import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextstep import ComponentSpec, NextStep, build_model, generate_tokens, model_preset
from nextstep.tokenizers.hf_text import HFTextTokenizer, HFTextTokenizerConfig

ARGS = dict(height=32, width=32, num_steps=2, cfg=2.0, seed=4)


def test_save_load_gives_identical_outputs(trained_like_model, tmp_path):
    model = trained_like_model
    model.save_pretrained(tmp_path / "model")
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    loaded = NextStep.from_pretrained(tmp_path / "model")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    before, _, _ = generate_tokens(model, ["a cat"], **ARGS)
    after, _, _ = generate_tokens(loaded, ["a cat"], **ARGS)
    assert torch.equal(before, after)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    batch = model.prepare_batch(pixels, ["x"], image_first=[False])
    torch.testing.assert_close(model(batch, generator=torch.Generator().manual_seed(0)).total,
                               loaded(batch, generator=torch.Generator().manual_seed(0)).total,
                               rtol=0, atol=0)


def test_load_in_bfloat16(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = NextStep.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    images = loaded.generate(["x"], height=32, width=32, num_steps=1)
    assert images[0].size == (32, 32)


def test_hf_tokenizer_files_travel_with_the_model(hf_tokenizer_dir, tmp_path):
    config = model_preset("tiny")()
    config.backbone.config = config.backbone.config.replace(vocab_size=320)
    config.text_tokenizer = ComponentSpec("text_tokenizer", "huggingface",
                                          HFTextTokenizerConfig(path=str(hf_tokenizer_dir)))
    model = build_model(config, seed=0)
    assert isinstance(model.text_tokenizer, HFTextTokenizer)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["text_tokenizer"] == {"kind": "text_tokenizer", "type": "huggingface", "path": "tokenizer"}
    os.chdir(tmp_path)  # the relative path resolves against the model directory, not the cwd
    loaded = NextStep.from_pretrained(tmp_path / "m")
    assert loaded.text_tokenizer.encode("a red circle") == model.text_tokenizer.encode("a red circle")
    assert loaded.text_tokenizer.begin_of_image_id == model.text_tokenizer.begin_of_image_id
    # The saved model's file names its copy; the live model keeps finding its own files.
    assert model.text_tokenizer.config.path == str(hf_tokenizer_dir)
    assert model.config.text_tokenizer.config.path == str(hf_tokenizer_dir)
    assert build_model(model.current_config()).text_tokenizer.encode("a red circle") == \
        model.text_tokenizer.encode("a red circle")
    size = model.text_tokenizer.vocab_size
    for ids in ([65, size], [-1]):
        with pytest.raises(ValueError, match=rf"ids \[{ids[-1]}\] lie outside the tokenizer's vocabulary of {size}"):
            model.text_tokenizer.decode(ids)


def _rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_missing_unexpected_and_misshaped_keys_are_named(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")

    def damage(state):
        del state["image_in_projector.bias"]
        state["extra.weight"] = torch.zeros(2)
        state["image_out_projector.weight"] = torch.zeros(3, 3)

    _rewrite_weights(tmp_path / "m", damage)
    with pytest.raises(ValueError) as error:
        NextStep.from_pretrained(tmp_path / "m")
    message = str(error.value)
    assert "image_in_projector.bias" in message
    assert "extra.weight" in message
    assert "image_out_projector.weight: expected (64, 64), found (3, 3)" in message


def test_corrupt_weights_name_the_file(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors"):
        NextStep.from_pretrained(tmp_path / "m")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NextStep.from_pretrained(tmp_path / "nowhere")


def test_failed_save_keeps_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    tiny_model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()

    import nextstep.serialization as serialization

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(serialization, "save_file", crash)
    with torch.no_grad():
        tiny_model.image_in_projector.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging leftovers
    NextStep.from_pretrained(target)


def test_a_folder_of_other_files_is_never_replaced(tiny_model, tmp_path):
    (tmp_path / "runs" / "important").mkdir(parents=True)
    (tmp_path / "runs" / "important" / "ckpt.txt").write_text("precious")
    (tmp_path / "notes.md").write_text("notes")
    with pytest.raises(FileExistsError, match=r"expected an empty folder or one written here before .*notes\.md, runs"):
        tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "runs" / "important" / "ckpt.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md", "runs"]  # nothing staged either
    (tmp_path / "empty").mkdir()
    tiny_model.save_pretrained(tmp_path / "empty")  # an empty folder, or a model's, is replaced
    tiny_model.save_pretrained(tmp_path / "empty")


def test_a_training_checkpoint_is_never_replaced_by_a_model(tiny_model, tmp_path):
    checkpoint = tmp_path / "step-00000002"
    tiny_model.save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="found a training checkpoint \\(it holds trainer_state.json\\)"):
        tiny_model.save_pretrained(checkpoint)
    assert (checkpoint / "trainer_state.json").is_file()


def test_an_interrupted_replacement_is_named_and_undone_by_the_next_write(tiny_model, tmp_path):
    from nextstep.builders import load_model

    target = tmp_path / "m"
    tiny_model.save_pretrained(target)
    target.rename(tmp_path / f".m.moved-aside-{time.time_ns():020d}-ab12cd")  # a crash between the two renames
    with pytest.raises(FileNotFoundError, match=r"found nothing, but .*\.m\.moved-aside-\d+-ab12cd, the earlier "
                                                r"directory an interrupted write moved aside \(rename it to m to use "
                                                r"it\)"):
        load_model(str(target))
    tiny_model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_only_what_a_write_moved_aside_is_restored_and_the_latest_of_it(tmp_path):
    from nextstep.io import atomic_directory, what_is_at

    (tmp_path / "model.old-2024").mkdir()  # a user's own folder, named like a backup
    (tmp_path / "model.old-2024" / "config.json").write_text('{"v": "mine"}')
    assert what_is_at(tmp_path / "model") == "nothing"
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text('{"v": "new"}')
    assert (tmp_path / "model.old-2024" / "config.json").read_text() == '{"v": "mine"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.old-2024"]
    # Two backups of crashed writes: the later one (by the time in its name, not the file's) comes back.
    (tmp_path / "model").rename(tmp_path / f".model.moved-aside-{2:020d}-b")
    (tmp_path / f".model.moved-aside-{1:020d}-a").mkdir()  # older, but touched last
    with atomic_directory(tmp_path / "model") as staging:
        assert (tmp_path / "model" / "config.json").read_text() == '{"v": "new"}'
        (staging / "config.json").write_text('{"v": "newer"}')
    # A half-deleted old directory is never a candidate, and the next write clears it; so is an older copy
    # left aside once a write succeeds.
    (tmp_path / ".model.trash-x").mkdir()
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text('{"v": "newest"}')
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["model", "model.old-2024"], names


def test_a_failed_last_rename_puts_the_old_directory_back(tiny_model, tmp_path, monkeypatch):
    import nextstep.io as io

    target = tmp_path / "m"
    tiny_model.save_pretrained(target)
    real = os.replace

    def staging_fails(source, destination):  # the old directory is aside; the new one cannot take its place
        if Path(destination) == target and Path(source).name.endswith(".tmp"):  # the staging directory
            raise OSError(5, "input/output error")
        return real(source, destination)

    monkeypatch.setattr(io.os, "replace", staging_fails)
    with pytest.raises(OSError, match="input/output error"):
        tiny_model.save_pretrained(target)
    monkeypatch.setattr(io.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    NextStep.from_pretrained(target)


def test_saving_through_a_link_replaces_its_target_and_keeps_the_link(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    tiny_model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    NextStep.from_pretrained(tmp_path / "link")


def test_unregistered_component_cannot_be_saved_silently(tiny_model, tmp_path):
    from nextstep.samplers import EulerSampler

    class MySampler(EulerSampler):
        registry_name = None

    tiny_model.sampler = MySampler()
    with pytest.raises(ValueError, match="register_component"):
        tiny_model.save_pretrained(tmp_path / "m")


def test_generation_defaults_travel_with_the_model(tiny_model, tmp_path):
    from nextstep.generation_defaults import GenerationDefaults

    tiny_model.config = tiny_model.config.replace(generation=GenerationDefaults(cfg=3.0, num_steps=20,
                                                                                height=64, width=64))
    tiny_model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["generation"] == {"cfg": 3.0, "cfg_schedule": "constant", "num_steps": 20, "height": 64,
                                   "width": 64}
    assert NextStep.from_pretrained(tmp_path / "m").config.generation == tiny_model.config.generation
    # a config written before the field existed, or one naming only some settings
    del saved["generation"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    assert NextStep.from_pretrained(tmp_path / "m").config.generation == GenerationDefaults()
    saved["generation"] = {"num_steps": 10}
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    assert NextStep.from_pretrained(tmp_path / "m").config.generation == GenerationDefaults(num_steps=10)
    saved["generation"] = {"steps": 10}
    (tmp_path / "m" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="unknown key"):
        NextStep.from_pretrained(tmp_path / "m")


def test_parts_stored_in_16_bits_load_back_into_a_float32_model(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "full")
    tiny_model.save_pretrained(tmp_path / "half", storage_dtypes={"image_tokenizer.decoder": torch.float16})
    stored = load_file(tmp_path / "half" / "model.safetensors")
    assert {t.dtype for k, t in stored.items() if k.startswith("image_tokenizer.decoder.")} == {torch.float16}
    assert {t.dtype for k, t in stored.items() if not k.startswith("image_tokenizer.decoder.")} == {torch.float32}
    full, half = (os.path.getsize(tmp_path / name / "model.safetensors") for name in ("full", "half"))
    assert half < full
    loaded = NextStep.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for name, tensor in loaded.state_dict().items():
        expected = tiny_model.state_dict()[name]
        if name.startswith("image_tokenizer.decoder."):
            torch.testing.assert_close(tensor, expected.half().float(), rtol=0, atol=0)
        else:
            assert torch.equal(tensor, expected), name


@pytest.mark.parametrize("storage, message", [
    ({"image_tokenizer.decod": torch.float16}, "'image_tokenizer.decod', which is no parameter or module"),
    ({"backbone": torch.int8}, "must be a floating torch.dtype, found torch.int8"),
])
def test_storage_dtypes_name_what_is_wrong(tiny_model, tmp_path, storage, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.save_pretrained(tmp_path / "out", storage_dtypes=storage)
    assert not (tmp_path / "out").exists()


def test_weights_shared_under_two_names_are_saved_once_and_fill_both(tmp_path):
    """A component that ties two of its weights saves (safetensors refuses one memory under two names)."""
    import copy

    from nextstep.weights import load_safetensors

    model = build_model("tiny", seed=0)
    blocks = model.image_head.net.res_blocks
    blocks[1].mlp[0].weight = blocks[0].mlp[0].weight  # tied, as a component could tie them
    model.save_pretrained(tmp_path / "tied")
    names = load_file(str(tmp_path / "tied" / "model.safetensors")).keys()
    assert "image_head.net.res_blocks.0.mlp.0.weight" in names
    assert "image_head.net.res_blocks.1.mlp.0.weight" not in names
    loaded = copy.deepcopy(model)  # the same ties
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.zero_()
    load_safetensors(loaded, tmp_path / "tied" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_dtype_is_a_floating_torch_dtype_or_its_name(tiny_model, tmp_path):
    from nextstep.builders import load_model

    tiny_model.save_pretrained(tmp_path / "m")
    assert NextStep.from_pretrained(tmp_path / "m", dtype="bfloat16").lm_head.output_weight().dtype == torch.bfloat16
    for bad in (torch.int32, "half-ish"):
        with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
            NextStep.from_pretrained(tmp_path / "m", dtype=bad)
        with pytest.raises(ValueError, match="dtype must be one of"):
            load_model("tiny", dtype=bad)


def test_files_written_atomically_have_an_ordinary_files_mode_whoever_writes_them(tmp_path):
    import os

    from safetensors.torch import save_file

    from nextstep.io import atomic_path, atomic_write_text

    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(tmp_path / "tensors.safetensors") as tmp:  # safetensors replaces the file it writes
        save_file({"a": torch.zeros(2)}, str(tmp))
    atomic_write_text(tmp_path / "text.json", "{}")
    for name in ("tensors.safetensors", "text.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_any_one_marker_makes_a_folder_replaceable(tmp_path):
    from nextstep.io import check_replaceable
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    check_replaceable(tmp_path / "d", ("config.json", "ae.safetensors"))


def test_a_model_with_packed_projections_saves_and_loads(trained_like_model, tmp_path):
    """Packing makes q/k/v and gate/up views into one tensor each; safetensors refuses tensors sharing memory,
    so each is written as a tensor of its own, and the model round-trips."""
    from nextstep.fast.packed_projections import pack_projections
    from nextstep.weights import tensor_to_save

    model = trained_like_model
    pack_projections(model.backbone)
    attention = model.backbone.layers[0].self_attn
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.weight.untyped_storage().data_ptr()
    model.save_pretrained(tmp_path / "model")
    loaded = NextStep.from_pretrained(tmp_path / "model")
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.state_dict().items())
    big = torch.arange(12.0).reshape(6, 2)
    saved = tensor_to_save(big[2:4])
    assert torch.equal(saved, big[2:4]) and saved.untyped_storage().nbytes() == saved.nbytes == 16
    save_file({"a": tensor_to_save(big[:2]), "b": tensor_to_save(big[2:4])}, str(tmp_path / "views.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "views.safetensors"))["b"], big[2:4])


def test_the_most_specific_storage_dtype_wins(tiny_model, tmp_path):
    """Nested prefixes: a tensor takes the dtype of the longest prefix it lies under, whatever the order given."""
    for storage in ({"image_tokenizer": torch.float16, "image_tokenizer.decoder": torch.bfloat16},
                    {"image_tokenizer.decoder": torch.bfloat16, "image_tokenizer": torch.float16}):
        tiny_model.save_pretrained(tmp_path / "m", storage_dtypes=storage)
        stored = load_file(tmp_path / "m" / "model.safetensors")
        dtypes = {}
        for name, tensor in stored.items():
            part = ("decoder" if name.startswith("image_tokenizer.decoder.") else
                    "tokenizer" if name.startswith("image_tokenizer.") else "rest")
            dtypes.setdefault(part, set()).add(tensor.dtype)
        assert dtypes == {"decoder": {torch.bfloat16}, "tokenizer": {torch.float16}, "rest": {torch.float32}}


def test_after_saving_the_model_config_describes_the_live_components(tiny_model, tmp_path):
    """A component swapped in after building (here the sampler) is what ``save_pretrained`` writes, and the
    model's own ``config`` names it from then on (as the saved file does)."""
    from nextstep.builders import build_component

    tiny_model.sampler = build_component(ComponentSpec.named("sampler", "flow_sde"))
    assert tiny_model.config.sampler.type == "euler"  # built with the preset's
    tiny_model.save_pretrained(tmp_path / "m")
    assert tiny_model.config.sampler.type == "flow_sde"
    assert tiny_model.config == tiny_model.current_config()
    assert NextStep.from_pretrained(tmp_path / "m").config.sampler == tiny_model.config.sampler


def test_empty_tensors_are_each_saved_under_their_own_name(tiny_model, tmp_path):
    """Tensors without elements share no memory (however alike their pointers): none is dropped as a tie."""
    tiny_model.image_head.register_buffer("first_empty", torch.zeros(0))
    tiny_model.image_head.register_buffer("second_empty", torch.zeros(0))
    tiny_model.save_pretrained(tmp_path / "m")
    names = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert {"image_head.first_empty", "image_head.second_empty"} <= names


def test_integer_tensors_keep_their_dtype_under_a_storage_dtype(tiny_model, tmp_path):
    counts = torch.arange(5) * 1000
    tiny_model.image_tokenizer.decoder.register_buffer("counts", counts)
    tiny_model.save_pretrained(tmp_path / "m", storage_dtypes={"image_tokenizer.decoder": torch.float16})
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert stored["image_tokenizer.decoder.counts"].dtype == torch.int64
    assert torch.equal(stored["image_tokenizer.decoder.counts"], counts)
    assert stored["image_tokenizer.decoder.conv_in.weight"].dtype == torch.float16


def test_the_weights_file_says_it_holds_pytorch_tensors(tiny_model, tmp_path):
    """Loaders such as transformers read the file's ``format`` metadata."""
    from safetensors import safe_open

    tiny_model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_part_loads_in_its_saved_dtype_only_when_it_was_saved_in_one():
    from hypothesis import given
    from hypothesis import strategies as st

    from nextstep.serialization import saved_part_dtypes
    from nextstep.weights import TensorInfo

    floating = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    saved = st.lists(st.sampled_from([*floating, "I64"]), max_size=4)

    def expected(dtypes):
        found = {floating[dtype] for dtype in dtypes if dtype in floating}
        return found.pop() if len(found) == 1 else None

    @given(tokenizer=saved, rest=saved)
    def check(tokenizer, rest):
        infos = {f"image_tokenizer.t{i}": TensorInfo(Path("m.safetensors"), (1,), dtype)
                 for i, dtype in enumerate(tokenizer)}
        infos.update({f"image_tokenizer_norm.t{i}": TensorInfo(Path("m.safetensors"), (1,), dtype)
                      for i, dtype in enumerate(rest)})  # not inside the image tokenizer
        assert saved_part_dtypes(infos) == {"image_tokenizer": expected(tokenizer), "model": expected(rest)}

    check()


def test_a_loaded_model_keeps_its_image_tokenizer_frozen(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    for dtype in (None, torch.bfloat16):
        loaded = NextStep.from_pretrained(tmp_path / "m", dtype=dtype)
        assert not any(p.requires_grad for p in loaded.image_tokenizer.parameters())
        assert all(p.requires_grad for p in loaded.image_head.parameters())


def test_extra_files_are_written_with_the_model_and_must_be_plain_names(tmp_path):
    from nextstep import build_model

    model = build_model("tiny", seed=0)
    model.save_pretrained(tmp_path / "m", extra_files={"report.json": "{}\n"})
    assert (tmp_path / "m" / "report.json").read_text() == "{}\n" and (tmp_path / "m" / "config.json").is_file()
    for name in ("sub/report.json", "config.json", "model.safetensors"):
        with pytest.raises(ValueError, match="extra_files must name plain files beside the model's own"):
            model.save_pretrained(tmp_path / "n", extra_files={name: "x"})
    assert not (tmp_path / "n").exists()


def test_loading_and_saving_keeps_the_parts_stored_in_another_dtype_unless_told(tmp_path):
    from nextstep import build_model
    from nextstep.weights import read_checkpoint_index

    def decoder_dtypes(folder):
        return {info.dtype for name, info in read_checkpoint_index(folder / "model.safetensors").items()
                if name.startswith("image_tokenizer.decoder.")}

    build_model("tiny", seed=0).save_pretrained(tmp_path / "half", storage_dtypes={
        "image_tokenizer.decoder": torch.float16})
    loaded = NextStep.from_pretrained(tmp_path / "half")
    assert loaded.stored_dtypes == {"image_tokenizer.decoder": torch.float16}
    loaded.save_pretrained(tmp_path / "again")
    assert decoder_dtypes(tmp_path / "again") == {"F16"}
    loaded.save_pretrained(tmp_path / "full", storage_dtypes={})
    assert decoder_dtypes(tmp_path / "full") == {"F32"}
    assert NextStep.from_pretrained(tmp_path / "half", dtype=torch.float32).stored_dtypes == {}
