"""Paired samples read from manifests: editing (source, instruction, target) and preference (chosen, rejected)."""

import json
import tarfile

import pytest
import torch
from PIL import Image

from nextstep.training.data import ImageTextBatch, PreferenceManifestDataset
from nextstep.training.data.editing import EditingManifestConfig, EditingManifestDataset
from nextstep.training.data.preferences import (
    PreferenceManifestConfig,
    ShapesPreferencesConfig,
    ShapesPreferencesDataset,
)


def _write_manifest(path, entries):
    path.write_text("\n".join(json.dumps(entry) for entry in entries) + "\n")
    return str(path)


def test_a_preference_pair_is_bucketed_by_its_chosen_image_and_keeps_both_sides_apart(tmp_path):
    """The pair's size is the chosen image's (width, height); ``image`` is the chosen picture, ``rejected_image``
    the rejected one, and the key names the chosen file."""
    Image.new("RGB", (48, 32), (255, 0, 0)).save(tmp_path / "chosen.png")
    Image.new("RGB", (24, 40), (0, 0, 255)).save(tmp_path / "rejected.png")
    manifest = _write_manifest(tmp_path / "pairs.jsonl",
                               [{"caption": "a red picture", "chosen": "chosen.png", "rejected": "rejected.png"}])
    pairs = PreferenceManifestDataset(PreferenceManifestConfig(manifest))
    assert pairs.sample_kind == "preference" and pairs.image_size(0) == (48, 32)
    sample = pairs.load(0)
    assert sample.key == str(tmp_path / "chosen.png") and sample.caption == "a red picture"
    assert sample.image.size == (48, 32) and sample.image.getpixel((0, 0)) == (255, 0, 0)
    assert sample.rejected_image.size == (24, 40) and sample.rejected_image.getpixel((0, 0)) == (0, 0, 255)


def test_a_preference_manifest_refuses_a_chosen_image_whose_header_cannot_be_read(tmp_path):
    """An unreadable chosen image stops the build naming the line and the file (a rejected one is read on load)."""
    Image.new("RGB", (32, 32)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    manifest = _write_manifest(tmp_path / "pairs.jsonl", [
        {"caption": "a", "chosen": "good.png", "rejected": "broken.png"},
        {"caption": "b", "chosen": "broken.png", "rejected": "good.png"},
    ])
    with pytest.raises(ValueError, match=r"pairs\.jsonl line 2: cannot read .*broken\.png"):
        PreferenceManifestDataset(PreferenceManifestConfig(manifest))


def test_an_editing_pair_keys_its_sample_by_the_target_file_and_holds_the_source_apart(tmp_path):
    """``image`` is the edited target, ``source_image`` the picture before the edit, and the key the target's path."""
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "before.png")
    Image.new("RGB", (32, 32), (200, 0, 200)).save(tmp_path / "after.png")
    manifest = _write_manifest(tmp_path / "edits.jsonl",
                               [{"source": "before.png", "instruction": " make it purple ", "target": "after.png"}])
    dataset = EditingManifestDataset(EditingManifestConfig(path=manifest))
    sample = dataset.load(0)
    assert sample.key == str(tmp_path / "after.png")
    assert sample.image.getpixel((0, 0)) == (200, 0, 200) and sample.source_image.getpixel((0, 0)) == (0, 200, 0)
    assert dataset.scanned == 1 and len(dataset) == 1


@pytest.mark.parametrize("index", [-1, 3, 4])
def test_shapes_preference_pairs_refuse_an_index_outside_the_dataset(index):
    """A dataset of 3 pairs has indices 0, 1 and 2: others raise IndexError naming the range."""
    dataset = ShapesPreferencesDataset(ShapesPreferencesConfig(num_samples=3, size=32))
    with pytest.raises(IndexError, match=rf"index must be in \[0, 3\), found {index}"):
        dataset.pair(index)
    chosen, rejected = dataset.pair(2)
    assert chosen.caption != rejected.caption


def test_a_batch_with_cached_source_tokens_is_an_editing_batch():
    """A batch is an editing batch when it holds source images or only their cached tokens (B=2, N=4, D=3)."""
    tokens = torch.zeros(2, 4, 3)
    cached = ImageTextBatch(keys=["a", "b"], captions=["x", "y"], tokens=tokens, grid=(2, 2),
                            source_tokens=tokens, source_grid=(2, 2))
    assert cached.is_editing and not cached.is_preference
    plain = ImageTextBatch(keys=["a", "b"], captions=["x", "y"], tokens=tokens, grid=(2, 2))
    assert not plain.is_editing and len(plain) == 2


@pytest.mark.parametrize("others", [1, 2])
def test_a_stream_is_refused_beside_any_number_of_other_datasets(tmp_path, others):
    """A webdataset must be a recipe's only dataset, whether one or two map-style datasets come with it."""
    from nextstep.training.data import DataConfig
    from nextstep.training.data.source import build_datasets

    with tarfile.open(tmp_path / "shard.tar", "w"):
        pass
    specs = ({"type": "webdataset", "shards": [str(tmp_path / "shard.tar")]},) + ({"type": "shapes"},) * others
    with pytest.raises(ValueError, match=r"a streaming dataset \(webdataset\) must be the only dataset of a recipe"):
        build_datasets(DataConfig(datasets=specs))


def test_an_editing_instruction_loses_the_blanks_around_it_as_captions_do(tmp_path):
    """Blanks around a manifest's instruction go, as around every other source's captions."""
    Image.new("RGB", (32, 32)).save(tmp_path / "before.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "after.png")
    (tmp_path / "edits.jsonl").write_text(json.dumps(
        {"source": "before.png", "instruction": " make it purple\n", "target": "after.png"}) + "\n")
    dataset = EditingManifestDataset(EditingManifestConfig(path=str(tmp_path / "edits.jsonl")))
    assert dataset.caption(0) == "make it purple"
    assert dataset.load(0).caption == "make it purple"
