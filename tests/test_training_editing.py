"""Editing samples: source image, instruction, target image; the image loss covers the target only."""

import torch
from training_helpers import tiny_config

from nextstep import build_model
from nextstep.training import AspectRatioBuckets, TextToImageTask, Trainer, TrainingData
from nextstep.training.data.editing import ShapesEditingConfig, ShapesEditingDataset
from nextstep.training.data.loader import collate_samples


def test_only_the_last_image_is_a_flow_matching_target():
    model = build_model("tiny", seed=0)
    builder = model.sequences
    source, target = torch.randn(4, 64), torch.randn(6, 64)
    example = builder.editing_example("make it blue", source, (2, 2), target, (2, 3))
    batch = builder.collate([example, example])
    assert int(batch.image_mask[0].sum()) == 10
    assert int(batch.image_target_mask[0].sum()) == 6
    targets = batch.image_tokens[0][batch.image_target_mask[0]]
    torch.testing.assert_close(targets, target)
    assert not (batch.text_target_mask & batch.image_mask).any()
    text = model.text_tokenizer.decode(batch.input_ids[0][~batch.image_mask[0]].tolist())
    assert "make it blue" in text and text.index("2*2") < text.index("make it blue") < text.index("2*3")


def test_shapes_edits_come_with_exact_before_and_after_scenes():
    dataset = ShapesEditingDataset(ShapesEditingConfig(num_samples=40, size=32))
    kinds = set()
    for index in range(40):
        source, instruction, target = dataset.edit(index)
        kinds.add(instruction.split()[0])
        if instruction.startswith("remove"):
            assert len(target.objects) == len(source.objects) - 1
        if instruction.startswith("add"):
            assert len(target.objects) == len(source.objects) + 1
        if instruction.startswith("make"):
            assert [o.colour for o in source.objects] != [o.colour for o in target.objects]
    assert kinds == {"make", "remove", "add", "move"}
    sample = dataset.load(0)
    batch = collate_samples([sample, dataset.load(1)], 32, 32)
    assert batch.is_editing and batch.source_images.shape == batch.images.shape == (2, 3, 32, 32)


def test_editing_batches_train(tmp_path):
    data = TrainingData(ShapesEditingDataset(ShapesEditingConfig(num_samples=16, size=32)),
                        AspectRatioBuckets(32, multi_aspect=False))
    trainer = Trainer(TextToImageTask(build_model("tiny", seed=0)), data, tiny_config(max_steps=2), tmp_path,
                      show_progress=False)
    records = trainer.fit(resume=False)
    assert len(records) == 2 and all(r.metrics["image_loss"] > 0 for r in records)


def test_an_editing_manifest_reads_its_pairs_and_skips_targets_whose_header_cannot_be_read(tmp_path):
    import json

    import pytest
    from PIL import Image

    from nextstep.training.data import CorruptSampleError
    from nextstep.training.data.editing import EditingManifestConfig, EditingManifestDataset

    Image.new("RGB", (40, 24), (200, 0, 0)).save(tmp_path / "before.png")
    Image.new("RGB", (48, 32), (0, 0, 200)).save(tmp_path / "after.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    lines = [{"source": "before.png", "instruction": "make it blue", "target": "after.png"},
             {"source": "before.png", "instruction": "never read", "target": "garbage.png"},
             {"source": "missing.png", "instruction": "from nothing", "target": "after.png"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = EditingManifestDataset(EditingManifestConfig(path=str(tmp_path / "edits.jsonl")))
    assert dataset.sample_kind == "editing" and len(dataset) == 2 and dataset.scanned == 3
    assert len(dataset.known_bad) == 1 and "garbage.png (unreadable header" in dataset.known_bad[0]
    assert dataset.image_size(0) == (48, 32)
    sample = dataset.load(0)
    assert sample.caption == "make it blue" and sample.image.size == (48, 32) and sample.source_image.size == (40, 24)
    assert [dataset.caption(index) for index in range(2)] == ["make it blue", "from nothing"]
    with pytest.raises(CorruptSampleError, match="missing.png: unreadable image"):
        dataset.load(1)

    (tmp_path / "bad.jsonl").write_text(json.dumps({"source": "before.png", "target": "after.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 1: missing or non-string \['instruction'\]"):
        EditingManifestDataset(EditingManifestConfig(path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(FileNotFoundError, match="expected an editing manifest at"):
        EditingManifestDataset(EditingManifestConfig(path=str(tmp_path / "none.jsonl")))


def test_each_shapes_edit_changes_exactly_what_its_instruction_says():
    from nextstep.training.data.shapes.world import object_phrase

    dataset = ShapesEditingDataset(ShapesEditingConfig(num_samples=80, size=32))
    seen = set()
    for index in range(80):
        source, instruction, target = dataset.edit(index)
        words = instruction.split()
        before, after = list(source.objects), list(target.objects)
        seen.add(words[0])
        if words[0] == "make":  # make the <colour> <shape> <new colour>
            (changed,) = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
            old, new = before[changed], after[changed]
            assert (old.colour, old.shape, new.colour) == (words[2], words[3], words[4])
            assert (new.shape, new.center, new.size) == (old.shape, old.center, old.size)
        elif words[0] == "remove":  # remove the <colour> <shape>
            (gone,) = [o for o in before if o not in after]
            assert (gone.colour, gone.shape) == (words[2], words[3])
            assert [o for o in before if o is not gone] == after
        elif words[0] == "add":  # add a <colour> <shape>
            assert after[:-1] == before and instruction == f"add {object_phrase(after[-1])}"
        else:  # move the <colour> <shape> to the <left|right>
            (moved,) = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
            old, new = before[moved], after[moved]
            assert (old.colour, old.shape) == (words[2], words[3])
            assert new.center[1] == old.center[1]
            assert new.center[0] < old.center[0] if words[-1] == "left" else new.center[0] > old.center[0]
    assert seen == {"make", "remove", "add", "move"}


def test_an_edit_sample_shows_the_source_scene_as_its_source_and_the_edited_scene_as_its_image():
    from nextstep.training.data.shapes.render import render_scene

    dataset = ShapesEditingDataset(ShapesEditingConfig(num_samples=4, size=32))
    for index in range(4):
        source, instruction, target = dataset.edit(index)
        sample = dataset.load(index)
        assert sample.caption == instruction
        assert sample.source_image.tobytes() == render_scene(source, 32, 32).tobytes()
        assert sample.image.tobytes() == render_scene(target, 32, 32).tobytes()
        assert sample.metadata["target"]["objects"] == [o.to_dict() for o in target.objects]
