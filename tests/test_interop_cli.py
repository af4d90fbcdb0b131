"""``nextstep convert`` and the documentation of the release mapping."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from interop_synthetic import ReleaseShapes, write_qwen_checkpoint, write_release_checkpoint
from safetensors.torch import load_file

from nextstep.cli import main
from nextstep.interop import RELEASE_FIELDS, detect_model_layout
from nextstep.interop.convert import parse_size
from nextstep.model import NextStep

SMALL = ReleaseShapes(vocab_size=320)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "interop.md"


def shards(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def test_convert_release_to_native_and_back(tmp_path, capsys):
    original = write_release_checkpoint(tmp_path / "release", SMALL, vocabulary="small", num_shards=2)
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "native")]) == 0
    assert "release -> native" in capsys.readouterr().out
    assert detect_model_layout(tmp_path / "native") == "native"
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--max-shard-size", "100KB"]) == 0
    assert "native -> release" in capsys.readouterr().out
    written = shards(tmp_path / "back")
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 2
    assert set(written) == set(original) - {"gen_pos_embed"}
    assert all(torch.equal(written[name], original[name]) for name in written)


def test_convert_casts_to_the_requested_dtype(tmp_path):
    write_release_checkpoint(tmp_path / "release", SMALL, vocabulary="small", num_shards=2)
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "bf16"), "--to", "release",
                 "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in shards(tmp_path / "bf16").values()} == {torch.bfloat16}


def test_convert_keeps_the_vae_in_its_checkpoint_dtype(tmp_path):
    write_release_checkpoint(tmp_path / "release", SMALL, vocabulary="small", num_shards=2, dtype=torch.bfloat16)
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "again"), "--to", "release"]) == 0
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "native")]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    for written in ("again", "back"):
        assert {t.dtype for t in shards(tmp_path / written).values()} == {torch.bfloat16}
        vae = torch.load(tmp_path / written / "vae" / "checkpoint.pt", weights_only=True)
        assert {t.dtype for t in vae.values()} == {torch.float32}


def test_convert_takes_the_vae_of_a_release_without_a_vae_folder(tmp_path, capsys):
    write_release_checkpoint(tmp_path / "release", SMALL, vocabulary="small", num_shards=2)
    shutil.move(str(tmp_path / "release" / "vae"), str(tmp_path / "tokenizer-f8ch16"))
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "native")]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "native"),
                 "--vae", str(tmp_path / "tokenizer-f8ch16")]) == 0
    original = torch.load(tmp_path / "tokenizer-f8ch16" / "checkpoint.pt", weights_only=True)
    state = NextStep.from_pretrained(tmp_path / "native").image_tokenizer.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"),
                 "--vae", str(tmp_path / "tokenizer-f8ch16")]) == 2
    assert "--vae" in capsys.readouterr().err and not (tmp_path / "back").exists()


def test_convert_builds_a_model_from_a_qwen_checkpoint(tmp_path, capsys):
    write_release_checkpoint(tmp_path / "release", SMALL, vocabulary="small", num_shards=1)
    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small", num_layers=1)
    assert main(["convert", str(tmp_path / "qwen"), str(tmp_path / "out")]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "qwen"), str(tmp_path / "out"), "--vae", str(tmp_path / "release" / "vae"),
                 "--head", "tiny"]) == 0
    model = NextStep.from_pretrained(tmp_path / "out")
    assert model.backbone.config.num_layers == 1 and model.image_head.config.depth == 2
    assert model.text_tokenizer.special_token_id("<|begin_of_image|>") == 278 + 2


def test_convert_reports_a_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_an_output_that_cannot_be_replaced_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import nextstep.interop.release_checkpoint as release_checkpoint

    write_release_checkpoint(tmp_path / "release", SMALL, vocabulary="small", num_shards=1)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    monkeypatch.setattr(release_checkpoint, "load_release_checkpoint",
                        lambda *a, **k: pytest.fail("the model loaded before the output was checked"))
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "taken")]) == 2
    assert "found a folder of 1 other entries (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_the_command_line_shards_as_python_does():
    from nextstep.cli import build_parser
    from nextstep.interop.release_checkpoint import DEFAULT_MAX_SHARD_SIZE

    arguments = build_parser().parse_args(["convert", "a", "b"])
    assert parse_size(arguments.max_shard_size) == DEFAULT_MAX_SHARD_SIZE


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512KiB") == 512 * 1024 and parse_size(1000) == 1000
    assert parse_size("1.5 MB") == 1_500_000
    for bad in ("5 parsecs", "-3MB", "0"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_documentation_maps_every_release_field():
    text = DOCS.read_text()
    rows = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    assert set(RELEASE_FIELDS) <= rows, sorted(set(RELEASE_FIELDS) - rows)


def test_a_native_source_is_converted_to_the_requested_dtype(tmp_path):
    from safetensors.torch import load_file

    from nextstep.cli import main
    write_release_checkpoint(tmp_path / "release", ReleaseShapes(vocab_size=320), vocabulary="small", num_shards=2)
    assert main(["convert", str(tmp_path / "release"), str(tmp_path / "native")]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    dtypes = {t.dtype for p in (tmp_path / "bf16").glob("model*.safetensors") for t in load_file(str(p)).values()}
    assert dtypes == {torch.bfloat16}


def test_convert_passes_its_options_on_and_reports_the_parameters_in_short(tmp_path, capsys, monkeypatch):
    import nextstep.interop.convert as convert
    from nextstep.interop.convert import ConversionResult

    asked = {}
    monkeypatch.setattr(convert, "convert_checkpoint", lambda source, output, **kwargs: asked.update(
        kwargs, source=source) or ConversionResult("qwen2", "native", 1_234_567))
    assert main(["convert", "qwen", str(tmp_path / "out"), "--to", "native", "--dtype", "float16",
                 "--max-shard-size", "2GB", "--vae", "vae", "--head", "tiny", "--seed", "3"]) == 0
    assert asked == {"source": "qwen", "to": "native", "dtype": torch.float16, "max_shard_size": 2 * 10**9,
                     "vae": "vae", "head": "tiny", "seed": 3}
    assert f"wrote {tmp_path / 'out'} (qwen2 -> native, 1.23M parameters)" in capsys.readouterr().out


def test_a_qwen_source_is_built_with_the_seed_and_dtype_asked_for(tmp_path, tiny_model, monkeypatch):
    import nextstep.interop.qwen_init as qwen_init
    from nextstep.interop.convert import convert_checkpoint

    write_qwen_checkpoint(tmp_path / "qwen", vocab_size=300, vocabulary="small", num_layers=1)
    asked = {}
    monkeypatch.setattr(qwen_init, "nextstep_from_qwen", lambda source, **kwargs: asked.update(kwargs) or tiny_model)
    result = convert_checkpoint(tmp_path / "qwen", tmp_path / "out", dtype=torch.bfloat16, vae=tmp_path / "vae",
                                head="tiny", seed=4)
    assert asked == {"image_tokenizer": tmp_path / "vae", "head": "tiny", "dtype": torch.bfloat16, "seed": 4}
    assert (result.source_layout, result.target_layout) == ("qwen2", "native")
    assert result.parameters == tiny_model.parameter_counts()["total"]
    assert detect_model_layout(tmp_path / "out") == "native"


def test_an_unknown_target_layout_is_refused_before_anything_is_written(tmp_path, tiny_model):
    from nextstep.interop.convert import convert_checkpoint

    tiny_model.save_pretrained(tmp_path / "native")
    with pytest.raises(ValueError, match=r"target layout must be one of \['native', 'release'\], found 'hf'"):
        convert_checkpoint(tmp_path / "native", tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()


def test_parse_size_refuses_a_boolean():
    for flag in (True, False):
        with pytest.raises(ValueError, match="size must be a number"):
            parse_size(flag)
