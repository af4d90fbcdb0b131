import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nextstep.cli import main


def test_generate_writes_png_files(tmp_path, capsys):
    code = main(["generate", "a red circle", "blue square", "--steps", "2", "--height", "32",
                 "--width", "48", "--output", str(tmp_path), "--grid", "--quiet", "--num-images", "2"])
    assert code == 0
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["000-a-red-circle-0.png", "000-a-red-circle-1.png",
                       "001-blue-square-0.png", "001-blue-square-1.png", "grid.png"]
    assert Image.open(tmp_path / "000-a-red-circle-0.png").size == (48, 32)
    assert Image.open(tmp_path / "grid.png").size == (96, 64)
    assert str(tmp_path / "grid.png") in capsys.readouterr().out


def test_generate_never_replaces_images_of_another_request_unasked(tmp_path, capsys):
    arguments = ["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path), "--quiet"]
    assert main(arguments) == 0
    first = (tmp_path / "000-a-red-circle-0.png").read_bytes()
    assert main(arguments) == 0  # the same request: the same images
    assert main(arguments + ["--seed", "5"]) == 2
    assert ("already holds 000-a-red-circle-0.png from another generation (with other settings: seed 0 there, 5 "
            "here); pass --overwrite") in capsys.readouterr().err
    assert (tmp_path / "000-a-red-circle-0.png").read_bytes() == first
    assert main(arguments + ["--seed", "5", "--overwrite"]) == 0
    assert (tmp_path / "000-a-red-circle-0.png").read_bytes() != first
    assert main(["generate", "a blue square", *arguments[2:]]) == 0  # other files: nothing to replace
    assert main(arguments + ["--seed", "5"]) == 0  # each image keeps the request it answers
    records = json.loads((tmp_path / "generation.json").read_text())
    assert records["000-a-red-circle-0.png"]["seed"] == 5 and records["000-a-blue-square-0.png"]["seed"] == 0


def test_generate_records_the_settings_used_and_sees_a_changed_model_or_input_image(tmp_path, tiny_model, capsys):
    model, out = tmp_path / "model", tmp_path / "out"
    tiny_model.save_pretrained(model)
    arguments = ["generate", "a red circle", "--model", str(model), "--steps", "1", "--height", "32", "--width",
                 "32", "--output", str(out), "--quiet"]
    assert main(arguments) == 0
    record = json.loads((out / "generation.json").read_text())["000-a-red-circle-0.png"]
    assert record["resolved"] == {"cfg": 7.5, "cfg_schedule": "constant", "num_steps": 1, "shift": 1.0,
                                  "sampler": "euler", "temperature": 1.0, "cfg_img": None, "candidates": 1,
                                  "candidate_score": "flow", "negative_prompt": "", "height": 32, "width": 32}
    assert main(arguments) == 0  # the same model again
    tiny_model.save_pretrained(model)  # the model saved again (as after more training)
    assert main(arguments) == 2
    assert "with other settings: model_fingerprint" in capsys.readouterr().err
    source = tmp_path / "source.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(source)
    editing = arguments[:-3] + ["--image", str(source), "--output", str(tmp_path / "edits"), "--quiet"]
    assert main(editing) == 0
    edited = json.loads((tmp_path / "edits" / "generation.json").read_text())["000-a-red-circle-0.png"]["resolved"]
    assert (edited["shift"], edited["cfg_img"], edited["negative_prompt"]) == (3.2, 2.0, "Copy original image.")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(source)  # another input image at the same path
    assert main(editing) == 2
    assert "image_sha256" in capsys.readouterr().err
    # A record written before identities were recorded compares on the options alone.
    records = json.loads((out / "generation.json").read_text())
    for record in records.values():
        record.pop("model_fingerprint")
    (out / "generation.json").write_text(json.dumps(records))
    assert main(arguments) == 0


def test_a_file_in_the_way_of_the_output_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    arguments = ["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--quiet", "--output"]
    with pytest.raises(SystemExit):
        main(arguments + [str(tmp_path / "afile" / "sub")])
    assert f"expected a folder to write into at {tmp_path / 'afile'} (on the way to" in capsys.readouterr().err
    (tmp_path / "out" / "000-a-red-circle-0.png").mkdir(parents=True)
    monkeypatch.setattr("nextstep.builders.load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    assert main(arguments + [str(tmp_path / "out"), "--overwrite"]) == 2
    assert "expected a PNG file or nothing at" in capsys.readouterr().err


def test_generate_reruns_after_an_interruption_and_for_fewer_prompts(tmp_path, monkeypatch):
    import nextstep.generation as generation

    arguments = ["generate", "a red circle", "two squares", "--model", "tiny", "--steps", "1", "--height", "32",
                 "--width", "32", "--output", str(tmp_path), "--quiet", "--grid"]
    real, calls = generation.decode_tokens, []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "decode_tokens", stop_at_the_second)
    assert main(arguments) == 130
    monkeypatch.undo()
    assert main(arguments) == 0  # its own first image is replaced by the same one
    assert main(arguments[:2] + arguments[3:-1]) == 0  # one of the prompts, no grid: the same first image


def test_generate_reports_bad_sizes(tmp_path, capsys):
    code = main(["generate", "x", "--height", "40", "--output", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err
    assert "multiple of 16" in error
    assert "tok" not in error  # no progress bar for a generation that never started
    assert not list(tmp_path.glob("*.png"))


def test_info_counts_the_published_shapes():
    result = subprocess.run([sys.executable, "-m", "nextstep", "info", "nextstep_1_large"],
                            capture_output=True, text=True, timeout=120, check=True)
    counts = {m.group(1).strip(): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^\s+(\S.*?)\s{2,}.*?([\d,]{5,}) \(", result.stdout, re.M)}
    assert abs(counts["backbone + lm_head"] / 14.77e9 - 1) < 0.005
    assert abs(counts["image_head"] / 157.2e6 - 1) < 0.005


def test_info_of_a_saved_model(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--config"]) == 0
    out = capsys.readouterr().out
    assert "flow_matching" in out and '"tie_word_embeddings": false' in out
    assert "generation: cfg 7.5 (constant), 50 steps, 256x256" in out
    assert "text_tokenizer       byte           266 ids" in out
    ranking = copy.deepcopy(tiny_model)
    ranking.config = ranking.config.replace(
        generation=ranking.config.generation.replace(candidates=3, candidate_score="caption"))
    ranking.save_pretrained(tmp_path / "ranking")
    assert main(["info", str(tmp_path / "ranking")]) == 0
    assert "256x256, best of 3 by the caption score\n" in capsys.readouterr().out


def test_the_command_line_page_lists_every_subcommand_with_its_help():
    import argparse
    import re

    from nextstep.cli import build_parser

    page = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    for name, text in helps.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(text)}$", page, re.MULTILINE), name
        assert f"## nextstep {name}\n" in page, name


def test_generate_with_the_fast_sampler_and_int8_decode_weights(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setenv("NEXTSTEP_DISABLE_TRITON", "1")  # the references: the wiring is tested here, not the kernels
    common = ["generate", "a red circle", "--steps", "4", "--quiet"]  # the shipped model
    assert main(common + ["--output", str(tmp_path / "loop")]) == 0
    assert main(common + ["--output", str(tmp_path / "fast"), "--token-sampler", "fast"]) == 0
    assert main(common + ["--output", str(tmp_path / "int8"), "--token-sampler", "int8"]) == 0
    (loop,), (fast,), (int8,) = (sorted((tmp_path / name).glob("*.png")) for name in ("loop", "fast", "int8"))
    pixels = [np.asarray(Image.open(path), dtype=np.float32) for path in (loop, fast, int8)]
    assert np.abs(pixels[1] - pixels[0]).max() <= 1  # the same tokens up to rounding
    assert 0 < np.abs(pixels[2] - pixels[0]).mean() < 8  # int8 weights: close, not equal


def test_unreadable_inputs_and_unusable_outputs_are_named(tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    Image.new("RGB", (40, 32)).save(tmp_path / "odd.png")
    cases = [
        (["caption", str(tmp_path / "odd.png"), "--model", "tiny"],
         r"odd\.png: image width must be a positive multiple of 16 .*found 40"),
        (["info", str(tmp_path / "nope")], "expected a model directory at .*nope', found nothing"),
        (["info", "no-such-preset"], "unknown model 'no-such-preset': expected a model directory"),
        (["eval-tokenizer", str(tmp_path / "missing.safetensors")],
         "expected a VAE checkpoint at .*missing.safetensors', found nothing"),
        (["generate", "x", "--steps", "abc"], "argument --steps: expected an integer >= 1, found 'abc'"),
        (["caption", str(not_an_image)], "expected an image file at .*notes.png, found data PIL cannot read"),
        (["caption", str(tmp_path)], "expected an image file at .*, found a folder"),
        (["generate", "x", "--image", str(not_an_image), "--output", str(tmp_path / "out")],
         "expected an image file at .*notes.png, found data PIL cannot read"),
        (["generate", "x", "--output", str(not_an_image)],
         "expected a folder to write into at .*notes.png, found a file"),
        (["generate", "x", "--device", "bogus"], "expected a device such as cpu or cuda:0, found 'bogus'"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse refuses an argument with exit status 2
            code = exit.code
        assert code == 2, argv
        assert re.search(message, capsys.readouterr().err), argv
    assert not (tmp_path / "out").exists()


def test_images_the_command_line_reads_stand_as_shown_and_lose_transparency_to_white(tmp_path):
    from nextstep.images import read_image_file

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown turned a quarter
    Image.new("RGB", (64, 32), "red").save(tmp_path / "phone.jpg", exif=exif.tobytes())
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert read_image_file(tmp_path / "phone.jpg").size == (32, 64)
    clear = read_image_file(tmp_path / "clear.png")
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)


def test_a_caption_is_printed_on_one_line(tmp_path, capsys, monkeypatch):
    import nextstep.text_generation as text_generation
    from nextstep.text_generation import GeneratedText

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    written = GeneratedText(texts=[" a red\ncircle\tand more "], ids=[[]], log_probs=None, stopped=[True])
    monkeypatch.setattr(text_generation, "caption_images", lambda model, images, **kwargs: written)
    assert main(["caption", str(tmp_path / "a.png"), "--model", "tiny"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'a.png'}\ta red circle and more\n"


def test_interruptions_divergence_and_missing_packages_end_without_a_traceback(tmp_path, capsys, monkeypatch):
    import nextstep.cli as cli

    for error, code, message in ((KeyboardInterrupt(), 130, "nextstep info: interrupted"),
                                 (FloatingPointError("the loss became nan at step 2"), 1, "the loss became nan"),
                                 (ImportError("tensorboard is not installed: pip install tensorboard"), 2,
                                  "pip install tensorboard")):
        def handler(args, error=error):
            raise error

        monkeypatch.setattr(cli, "command_info", handler)
        assert main(["info", "tiny"]) == code
        assert message in capsys.readouterr().err


def test_recipe_model_arguments_the_preset_does_not_take_are_named(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"model": "tiny", "model_arguments": {"foo": 1}}')
    assert main(["train", str(recipe), "-o", str(tmp_path / "out"), "--max-steps", "1", "--quiet"]) == 2
    assert "model_arguments ['foo'] do not fit the preset 'tiny'" in capsys.readouterr().err


def test_generate_keeps_what_another_run_recorded_in_the_folder_meanwhile(tmp_path, monkeypatch):
    import nextstep.builders as builders

    real = builders.load_model

    def another_run_finishes_while_this_one_loads(*args, **kwargs):
        (tmp_path / "000-a-blue-square-0.png").write_bytes(b"")
        (tmp_path / "generation.json").write_text(json.dumps({"000-a-blue-square-0.png": {"seed": 9}}))
        return real(*args, **kwargs)

    monkeypatch.setattr(builders, "load_model", another_run_finishes_while_this_one_loads)
    assert main(["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path), "--quiet"]) == 0
    records = json.loads((tmp_path / "generation.json").read_text())
    assert set(records) == {"000-a-blue-square-0.png", "000-a-red-circle-0.png"}


def test_each_prompt_s_seeds_follow_the_previous_prompt_s_images(tmp_path, monkeypatch):
    import nextstep.generation as generation
    from nextstep.cli import main
    seeds, real = [], generation.generate_tokens
    def recording(*args, **kwargs):
        seeds.append(kwargs["seed"])
        return real(*args, **kwargs)
    monkeypatch.setattr(generation, "generate_tokens", recording)
    assert main(["generate", "a", "b", "--steps", "1", "--height", "32", "--width", "32", "--num-images", "2",
                 "--seed", "3", "--output", str(tmp_path), "--quiet"]) == 0
    assert seeds == [3, 5]


def test_each_image_s_record_names_its_prompt_index(tmp_path):
    from nextstep.cli import main
    assert main(["generate", "a", "b", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path), "--quiet"]) == 0
    records = json.loads((tmp_path / "generation.json").read_text())
    assert records["000-a-0.png"]["index"] == 0 and records["001-b-0.png"]["index"] == 1


def test_the_overwrite_refusal_counts_the_other_files(tmp_path):
    from nextstep.cli import _check_overwrite
    with pytest.raises(FileExistsError, match="holds a.png and 2 more from"):
        _check_overwrite([tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"], None, {}, "generation")


def test_image_names_drop_the_prompt_s_outer_punctuation_and_name_a_prompt_without_letters_image(tmp_path):
    assert main(["generate", "  A Red Circle! ", "!!!", "--model", "tiny", "--steps", "1", "--height", "32",
                 "--width", "32", "--output", str(tmp_path), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000-a-red-circle-0.png", "001-image-0.png"]


def test_a_count_of_zero_is_refused_by_the_argument_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--steps", "0"])
    assert "argument --steps: expected an integer >= 1, found 0" in capsys.readouterr().err


def test_a_cuda_device_the_machine_lacks_is_refused_by_the_argument_parser(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["generate", "x", "--device", "cuda"])
    assert "expected a device this machine has, found 'cuda' (no cuda device here)" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        main(["generate", "x", "--device", "cuda:1"])
    assert "found 'cuda:1' (1 cuda device(s))" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("gpu", "expected a device such as cpu or cuda:0, found 'gpu'"),
    ("mps", "expected a device this machine has, found 'mps' (no mps device here)"),
    (1.5, "device must be a device name such as cpu or cuda:0, found float 1.5"),
    (True, "device must be a device name such as cpu or cuda:0, found bool True"),
])
def test_loading_refuses_a_device_the_machine_lacks_before_reading_anything(device, message, monkeypatch):
    import torch

    from nextstep import load_model
    from nextstep.devices import available_device
    from nextstep.model import NextStep

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for load in (lambda: load_model("tiny", device=device), lambda: NextStep.from_pretrained("missing", device=device),
                 lambda: available_device(device)):
        with pytest.raises(ValueError, match=re.escape(message)):
            load()
    assert available_device("cpu") == torch.device("cpu") and available_device("meta").type == "meta"


def test_a_rerun_with_or_without_quiet_is_the_same_request(tmp_path):
    arguments = ["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path)]
    assert main(arguments + ["--quiet"]) == 0
    assert main(arguments) == 0


def test_sampler_options_change_the_sampler_s_config_and_are_part_of_the_request(tmp_path, capsys, monkeypatch):
    import nextstep.generation as generation

    used = []
    sample = generation.generate_tokens

    def recording(*args, **kwargs):
        used.append(kwargs["sampler"])
        return sample(*args, **kwargs)

    monkeypatch.setattr(generation, "generate_tokens", recording)
    base = ["generate", "a red circle", "--model", "tiny", "--steps", "2", "--height", "32", "--width", "32", "--quiet"]
    assert main(base + ["--sampler", "euler_maruyama", "--sampler-option", "last_step_size=0",
                        "--sampler-option", "to_one=false", "-o", str(tmp_path / "a")]) == 0
    assert used[-1].config.last_step_size == 0 and used[-1].config.to_one is False
    record = json.loads((tmp_path / "a" / "generation.json").read_text())["000-a-red-circle-0.png"]
    assert record["sampler_option"] == ["last_step_size=0", "to_one=false"] and record["resolved"]["sampler"] == \
        "euler_maruyama"
    assert main(base + ["--sampler", "euler_maruyama", "-o", str(tmp_path / "a")]) == 2  # another request
    assert "with other settings: sampler_option ['last_step_size=0', 'to_one=false'] there, None here" in \
        capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "b")]) == 0
    assert used[-1] is None  # no option: the name (here the model's own sampler)
    for option, message in (("last_step_size", "--sampler-option expects KEY=VALUE, found 'last_step_size'"),
                            ("nope=1", "sampler options for euler_maruyama: EulerMaruyamaSamplerConfig got unknown "
                                       "key(s) ['nope']")):
        assert main(base + ["--sampler", "euler_maruyama", "--sampler-option", option, "-o", str(tmp_path / "c")]) == 2
        assert message in capsys.readouterr().err


def test_a_record_written_before_an_option_existed_is_the_same_request_as_that_option_unset(tmp_path):
    arguments = ["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path), "--quiet"]
    assert main(arguments) == 0
    records = json.loads((tmp_path / "generation.json").read_text())
    for record in records.values():
        del record["sampler_option"]
    (tmp_path / "generation.json").write_text(json.dumps(records))
    assert main(arguments) == 0


def test_the_grid_of_several_prompts_has_one_row_per_prompt_and_is_recorded_with_its_request(tmp_path):
    arguments = ["generate", "a", "b", "c", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--num-images", "2", "--grid", "--output", str(tmp_path), "--quiet"]
    assert main(arguments) == 0
    assert Image.open(tmp_path / "grid.png").size == (64, 96)
    assert json.loads((tmp_path / "generation.json").read_text())["grid.png"]["prompts"] == ["a", "b", "c"]
    assert main(arguments) == 0  # the same request: its grid is replaced by the same one


def test_tokens_that_are_not_finite_are_refused_rather_than_saved(tmp_path, capsys, monkeypatch):
    import torch

    import nextstep.generation as generation

    monkeypatch.setattr(generation, "generate_tokens",
                        lambda *args, **kwargs: (torch.full((1, 4, 16), float("nan")), 2, 2))
    assert main(["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path), "--quiet"]) == 1
    assert "the tokens of 'a red circle' are not finite: sampling diverged" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_an_image_write_cut_short_leaves_no_partial_file(tmp_path, monkeypatch):
    def cut_short(image, file, *args, **kwargs):
        Path(file).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", cut_short)
    assert main(["generate", "a red circle", "--model", "tiny", "--steps", "1", "--height", "32", "--width", "32",
                 "--output", str(tmp_path), "--quiet"]) == 130
    assert not list(tmp_path.glob("*.png"))


def test_caption_refuses_bad_sampling_options_before_the_model_loads(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    monkeypatch.setattr("nextstep.builders.load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    assert main(["caption", str(tmp_path / "a.png"), "--top-k", "3"]) == 2
    assert "top_k and top_p narrow random draws, which need temperature > 0" in capsys.readouterr().err


def test_caption_passes_its_sampling_options_on(tmp_path, monkeypatch):
    import nextstep.text_generation as text_generation
    from nextstep.text_generation import GeneratedText

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    asked = {}

    def caption_images(model, images, **kwargs):
        asked.update(kwargs)
        return GeneratedText(texts=["a circle"], ids=[[]], log_probs=None, stopped=[True])

    monkeypatch.setattr(text_generation, "caption_images", caption_images)
    assert main(["caption", str(tmp_path / "a.png"), "--model", "tiny"]) == 0
    assert asked == {"max_new_tokens": 32, "temperature": 0.0, "top_k": None, "top_p": None, "seed": 0}
    assert main(["caption", str(tmp_path / "a.png"), "--model", "tiny", "--temperature", "0.7", "--top-k", "5",
                 "--top-p", "0.9", "--seed", "4", "--max-new-tokens", "8"]) == 0
    assert asked == {"max_new_tokens": 8, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 4}


def test_info_names_an_untied_lm_head_and_no_ranking_of_a_single_candidate(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  lm_head +untied +[\d,]+ \(", out, re.MULTILINE)
    assert "best of" not in out


def test_info_shows_the_word_vectors_of_a_model_that_has_them(tmp_path, capsys):
    from nextstep import build_model
    from nextstep.layers.word_vectors import WordVectorConfig
    from nextstep.presets import tiny

    config = tiny()
    count = config.backbone.config.vocab_size
    build_model(config.replace(word_vectors=WordVectorConfig(count=count, dim=8))).save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    assert re.search(rf"^  word_vectors +{count:,} x 8 +[\d,]+ \(", capsys.readouterr().out, re.MULTILINE)


def test_parameter_and_id_counts_read_as_people_write_them():
    from types import SimpleNamespace

    from nextstep.cli import _human, _id_counts

    assert [_human(n) for n in (999, 1_000, 1_234_567, 14_770_000_000)] == ["999", "1.00K", "1.23M", "14.77B"]
    assert _id_counts(SimpleNamespace(vocab_size=266, input_vocab_size=266)) == "266 ids"
    assert _id_counts(SimpleNamespace(vocab_size=1266, input_vocab_size=21266)) == \
        "1,266 ids + 20,000 read through word vectors"


def test_eval_tokenizer_passes_its_options_on(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import nextstep.evaluation.tokenizer_report as tokenizer_report

    asked = []
    monkeypatch.setattr(tokenizer_report, "run_tokenizer_evaluation", lambda tokenizer, output, **kwargs: asked.append(
        (output, kwargs)) or SimpleNamespace(to_markdown=lambda: "| psnr |"))
    assert main(["eval-tokenizer", "tiny", "--output", str(tmp_path / "a")]) == 0
    assert main(["eval-tokenizer", "tiny", "--output", str(tmp_path / "b"), "--count", "3", "--size", "32",
                 "--seed", "5"]) == 0
    assert asked == [(tmp_path / "a", {"count": 256, "size": 64, "seed": 1234}),
                     (tmp_path / "b", {"count": 3, "size": 32, "seed": 5})]
    assert "| psnr |" in capsys.readouterr().out


def test_the_emoji_limit_is_checked_for_the_emoji_suite_only(tmp_path, capsys, monkeypatch):
    def load_model(*args, **kwargs):
        raise ValueError("the model loads")

    monkeypatch.setattr("nextstep.builders.load_model", load_model)
    for suite, limit, message in (("emoji", "9", "--limit must be >= 10, found 9"), ("emoji", "10", "the model loads"),
                                  ("shapes", "3", "the model loads")):
        assert main(["eval", "tiny", "--suite", suite, "--limit", limit, "--output", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def _evaluation_of_a_saved_tiny_model(tmp_path, tiny_model, monkeypatch) -> tuple[dict, Path, list[str]]:
    """Suites faked (what each is asked, by suite), the tiny model saved, and the start of an `eval` command line
    into ``tmp_path / "eval"`` up to ``--suite``."""
    from cli_helpers import fake_suites

    asked = {}
    fake_suites(monkeypatch, asked=asked)
    tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    return asked, out, ["eval", str(tmp_path / "model"), "--size", "32", "--output", str(out), "--quiet", "--suite"]


def test_eval_keeps_the_summary_of_earlier_suites_and_refuses_those_of_a_changed_model(tmp_path, tiny_model, capsys,
                                                                                       monkeypatch):
    asked, out, common = _evaluation_of_a_saved_tiny_model(tmp_path, tiny_model, monkeypatch)
    assert main(common + ["shapes"]) == 0
    assert asked["shapes"]["images_per_tag"] == 100 and asked["shapes"]["settings"].batch_size == 32
    assert main(common + ["tokenizer", "--crops", "4", "--batch-size", "8"]) == 0  # the batch size changes no result
    assert asked["tokenizer"] == {"count": 4, "size": 32}
    summary = json.loads((out / "summary.json").read_text())
    assert {"shapes", "tokenizer"} <= set(summary)
    assert "shapes table" in (out / "summary.md").read_text() and "tokenizer table" in (out / "summary.md").read_text()
    tiny_model.save_pretrained(tmp_path / "model")  # the model saved again (as after more training)
    assert main(common + ["tokenizer", "--crops", "4"]) == 2
    assert "with other settings: model_fingerprint" in capsys.readouterr().err


def test_eval_without_a_size_refuses_a_model_that_draws_oblong_images(tmp_path, tiny_model, capsys):
    tiny_model.config = tiny_model.config.replace(generation=tiny_model.config.generation.replace(height=32, width=64))
    tiny_model.save_pretrained(tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--suite", "tokenizer", "--output", str(tmp_path / "out")]) == 2
    assert "the model generates 32x64 by default: give --size" in capsys.readouterr().err


def test_preference_pairs_passes_its_judging_and_sampling_options_on(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import nextstep.evaluation.self_judged_pairs as self_judged_pairs

    asked = {}

    def write(model, output, **kwargs):
        asked.update(kwargs)
        return SimpleNamespace(pairs=3, prompts_with_pairs=2, prompts=4, images=16, correct=0.5)

    monkeypatch.setattr(self_judged_pairs, "write_self_judged_pairs", write)
    assert main(["preference-pairs", "tiny", str(tmp_path / "pairs"), "--combinations", "held_out",
                 "--samples-per-prompt", "4", "--size", "32", "--batch-size", "8", "--seed", "5",
                 "--token-sampler", "fused", "--quiet"]) == 0
    settings = asked["settings"]
    assert (asked["combinations"], asked["samples_per_prompt"]) == ("held_out", 4)
    assert (settings.height, settings.width, settings.batch_size, settings.seed, settings.token_sampler) == \
        (32, 32, 8, 5, "fused")
    assert f"wrote {tmp_path / 'pairs'}: 3 pairs from 2 of 4 prompts (16 images, 0.500 judged correct)" in \
        capsys.readouterr().out


def test_replace_decoder_stores_the_decoder_as_asked_and_takes_it_from_a_vae_folder(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    from nextstep.tokenizers.vae_checkpoints import save_flux_vae

    tiny_model.save_pretrained(tmp_path / "model")
    save_flux_vae(tiny_model.image_tokenizer, tmp_path / "vae")
    for dtype in ("float32", "bfloat16"):
        assert main(["replace-decoder", str(tmp_path / "model"), str(tmp_path / "vae"), str(tmp_path / dtype),
                     "--decoder-dtype", dtype]) == 0
        written = load_file(tmp_path / dtype / "model.safetensors")
        decoder = {written[key].dtype for key in written if ".decoder." in key}
        assert decoder == {getattr(torch, dtype)}


def test_add_word_aliases_names_a_model_that_is_not_there(tmp_path, capsys):
    assert main(["add-word-aliases", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "expected a model directory or a shipped model at" in capsys.readouterr().err


def test_add_word_vectors_passes_its_options_on(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    import nextstep.tokenizers.word_vector_table as word_vector_table

    asked, saved = {}, []
    written = SimpleNamespace(save_pretrained=saved.append, text_tokenizer=SimpleNamespace(
        config=SimpleNamespace(vector_words=("violin", "cello"))))
    monkeypatch.setattr(word_vector_table, "sentence_encoder_word_vectors",
                        lambda model, **kwargs: asked.update(kwargs) or written)
    assert main(["add-word-vectors", "tiny", str(tmp_path / "out"), "--dim", "5",
                 "--substitution-probability", "0.4"]) == 0
    assert asked == {"dim": 5, "substitution_probability": 0.4} and saved == [str(tmp_path / "out")]
    assert "(2 further words, 5 components per vector)" in capsys.readouterr().out


def test_modules_named_after_the_command_are_imported_from_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "cli_probe_module.py").write_text("IMPORTED = True\n")
    assert main(["info", "tiny", "--import", "cli_probe_module"]) == 0
    assert sys.modules.pop("cli_probe_module").IMPORTED
    assert main(["--import", "no_such_package_here.sub", "info", "tiny"]) == 2
    assert "--import no_such_package_here.sub: expected an importable module, found none" in capsys.readouterr().err
    for written in ("cli_probe_module.py", "plugins/cli_probe_module.py"):
        assert main(["--import", written, "info", "tiny"]) == 2
        assert ("a module is named without its .py and with dots for folders: --import "
                f"{written[:-3].replace('/', '.')}") in capsys.readouterr().err


def test_eval_passes_sampler_options_on_records_them_and_reads_older_records_as_none(tmp_path, tiny_model, capsys,
                                                                                      monkeypatch):
    asked, out, common = _evaluation_of_a_saved_tiny_model(tmp_path, tiny_model, monkeypatch)
    common = [*common, "shapes"]
    options = ["--sampler", "euler_maruyama", "--sampler-option", "last_step_size=0"]
    assert main(common + options) == 0
    assert asked["shapes"]["settings"].sampler_options == {"last_step_size": 0}
    record = json.loads((out / "evaluation.json").read_text())
    assert record["settings"]["sampler_options"] == {"last_step_size": 0}
    assert main(common + ["--sampler", "euler_maruyama"]) == 2  # other settings: not replaced
    assert "sampler_options" in capsys.readouterr().err
    assert main(common + ["--overwrite"]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    del record["settings"]["sampler_options"]  # as written before the setting existed
    (out / "evaluation.json").write_text(json.dumps(record))
    assert main(common + ["--skip-finished"]) == 0
    assert "shapes: finished earlier in" in capsys.readouterr().out
    for option, message in (("nope=1", "sampler options for euler_maruyama: EulerMaruyamaSamplerConfig got unknown "
                                       "key(s) ['nope']"),
                            ("last_step_size", "--sampler-option expects KEY=VALUE, found 'last_step_size'")):
        assert main(common + ["--sampler", "euler_maruyama", "--sampler-option", option, "--overwrite"]) == 2
        assert message in capsys.readouterr().err



def test_a_generation_cut_short_between_an_image_and_its_record_refuses_neither_request(tmp_path, capsys,
                                                                                         monkeypatch):
    import nextstep.io

    base = ["generate", "a red circle", "--model", "tiny", "--height", "32", "--width", "32", "--quiet",
            "--output", str(tmp_path)]
    assert main(base + ["--steps", "1"]) == 0
    writes = []
    write = nextstep.io.atomic_write_text

    def failing_second(path, text):  # the image's own record, after the image landed
        writes.append(path)
        if len(writes) == 2:
            raise OSError("no space left on device")
        write(path, text)

    monkeypatch.setattr(nextstep.io, "atomic_write_text", failing_second)
    assert main(base + ["--steps", "2", "--overwrite"]) == 2
    monkeypatch.undo()
    record = json.loads((tmp_path / "generation.json").read_text())["000-a-red-circle-0.png"]
    assert record["steps"] == 2 and record["replacing"]["steps"] == 1
    import shutil

    for steps in ("2", "1"):  # the file is one of the two; either request goes on without --overwrite
        folder = tmp_path.parent / f"{tmp_path.name}-{steps}"
        shutil.copytree(tmp_path, folder)
        assert main(base[:-1] + [str(folder), "--steps", steps]) == 0, capsys.readouterr().err
        record = json.loads((folder / "generation.json").read_text())["000-a-red-circle-0.png"]
        assert record["steps"] == int(steps) and "replacing" not in record
    assert main(base + ["--steps", "3"]) == 2  # a third request is refused as before
    assert "with other settings: steps 2 there, 3 here" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["replace-decoder", "tiny", "tiny"], ["add-word-vectors", "tiny"]])
def test_commands_that_write_a_model_refuse_a_folder_of_other_files_before_loading(tmp_path, capsys, monkeypatch,
                                                                                    command):
    monkeypatch.setattr("nextstep.builders.load_model", lambda *a, **k: pytest.fail("loaded first"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main([*command, str(tmp_path / "out")]) == 2
    assert "found a folder of 1 other entries (notes.txt)" in capsys.readouterr().err


def test_a_new_image_is_recorded_before_it_is_written_so_a_rerun_after_a_crash_goes_on(tmp_path, capsys,
                                                                                       monkeypatch):
    from contextlib import contextmanager

    import nextstep.io

    base = ["generate", "a red circle", "--model", "tiny", "--height", "32", "--width", "32", "--quiet",
            "--steps", "1", "--output", str(tmp_path)]
    write = nextstep.io.atomic_path

    @contextmanager
    def crashing_once_landed(path):  # the run stops as soon as the new image is in place
        with write(path) as tmp:
            yield tmp
        if str(path).endswith(".png"):
            raise OSError("no space left on device")

    monkeypatch.setattr(nextstep.io, "atomic_path", crashing_once_landed)
    assert main(base) == 2
    monkeypatch.undo()
    assert (tmp_path / "000-a-red-circle-0.png").is_file()
    assert main(base) == 0, capsys.readouterr().err  # not refused as an image of unrecorded settings


def test_eval_of_several_models_checks_sampler_options_against_each_before_any_loads(tmp_path, tiny_model, capsys,
                                                                                      monkeypatch):
    from nextstep.builders import model_sampler_spec
    from nextstep.config import ComponentSpec
    from nextstep.samplers.euler_maruyama import EulerMaruyamaSampler, EulerMaruyamaSamplerConfig

    tiny_model.sampler = EulerMaruyamaSampler(EulerMaruyamaSamplerConfig())
    tiny_model.config = tiny_model.config.replace(sampler=ComponentSpec.named("sampler", "euler_maruyama"))
    tiny_model.save_pretrained(tmp_path / "stochastic")
    monkeypatch.setattr("nextstep.builders.load_model", lambda *a, **k: pytest.fail("a model loaded first"))
    assert (model_sampler_spec(str(tmp_path / "stochastic")).type, model_sampler_spec("tiny").type) == \
        ("euler_maruyama", "euler")
    # last_step_size is a field of the saved model's sampler (euler_maruyama), not of the preset's (euler)
    assert main(["eval", str(tmp_path / "stochastic"), "tiny", "--sampler-option", "last_step_size=0", "--suite",
                 "tokenizer", "-o", str(tmp_path / "eval"), "--quiet"]) == 2
    assert "tiny: sampler options for euler: EulerSamplerConfig got unknown key(s) ['last_step_size']" in \
        capsys.readouterr().err
