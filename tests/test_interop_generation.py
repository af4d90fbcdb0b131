"""Generation from a release directory equals the release's algorithm on the same weights and noise.

`ReleaseTextToImage` below is the published pipeline's text-to-image procedure
written from its description (prompt layout with left padding, CFG branches
batched, per-token flow-head sampling with the first release's Euler-Maruyama
formulas, out-/in-projectors, ``use_norm``), on top of ``transformers.Qwen2Model``
for the decoder and a functional flow head read straight from the release keys.
It recomputes the whole sequence for every token (no KV cache) with absolute
positions counted over the padding, as the release does. The noise our pipeline
draws is captured and handed to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interop_synthetic import ReleaseShapes, write_release_checkpoint
from safetensors.torch import load_file

from nextstep import generation
from nextstep.model import NextStep

LAST_STEP_SIZE = 0.04


def linear(x: torch.Tensor, weights: dict, name: str) -> torch.Tensor:
    return F.linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"])


class ReleaseTextToImage:
    """The release's text-to-image sampling, independent of the library's modules."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

        self.config = json.loads((directory / "config.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False,
                                                       padding_side="left")
        self.weights = {}
        for shard in sorted(directory.glob("model-*.safetensors")):
            self.weights.update(load_file(str(shard)))
        c = self.config
        decoder_config = Qwen2Config(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"], rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
            attn_implementation="eager",
        )
        self.decoder = Qwen2Model(decoder_config).eval()
        decoder_state = {k: v for k, v in self.weights.items() if k.startswith(("embed_tokens.", "layers.", "norm."))}
        self.decoder.load_state_dict(decoder_state, strict=True)
        self.down_factor = 8 * c["latent_patch_size"]

    # -------------------------------------------------------------- flow head
    def head(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        w = {k.removeprefix("image_head.net."): v for k, v in self.weights.items() if k.startswith("image_head.net.")}
        half = 128
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t[:, None].float() * frequencies[None]
        code = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        time = linear(F.silu(linear(code, w, "time_embed.mlp.0")), w, "time_embed.mlp.2")
        y = time + linear(condition, w, "cond_embed")
        h = linear(x, w, "input_proj")
        for i in range(self.config["fm_head_layers"]):
            p = f"res_blocks.{i}."
            shift, scale, gate = linear(F.silu(y), w, p + "adaLN_modulation.1").chunk(3, dim=-1)
            normed = F.layer_norm(h, h.shape[-1:], w[p + "in_ln.weight"], w[p + "in_ln.bias"], eps=1e-6)
            inner = linear(F.silu(linear(normed * (1 + scale) + shift, w, p + "mlp.0")), w, p + "mlp.2")
            h = h + gate * inner
        shift, scale = linear(F.silu(y), w, "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale) + shift
        return linear(h, w, "final_layer.linear")

    def guided_velocity(self, x, t, condition, cfg, branches):
        velocity = self.head(torch.cat([x] * branches), t.expand(condition.shape[0]), condition)
        if branches == 2:
            conditional, unconditional = velocity.chunk(2)
            velocity = unconditional + cfg * (conditional - unconditional)
        return velocity

    def sample_token(self, condition, noise, step_noise, cfg, branches, shift, steps):
        """First-release Euler-Maruyama: SDE on shifted linspace(0, 1 - 0.04, steps), then one Euler step of 0.04."""
        times = torch.linspace(0, 1 - LAST_STEP_SIZE, steps)
        times = times / (shift - (shift - 1) * times)
        x = noise
        for k, (ti, tj) in enumerate(zip(times[:-1], times[1:])):
            dt = tj - ti
            velocity = self.guided_velocity(x, ti, condition, cfg, branches)
            variance = (1 - ti) ** 2 + ti * (1 - ti)
            score = (ti * velocity - x) / variance
            drift = velocity + (1 - ti) * score
            x = x + drift * dt + torch.sqrt(2 * (1 - ti)) * (step_noise[k] * torch.sqrt(dt))
        velocity = self.guided_velocity(x, times[-1], condition, cfg, branches)
        return x + velocity * LAST_STEP_SIZE

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, captions, *, hw, cfg, shift, steps, use_norm, noise, step_noise, images_per_caption=1,
                 negative_prompt="", positive_prompt=None):
        captions = [c for c in captions for _ in range(images_per_caption)]
        if positive_prompt:
            captions = [f"{c} {positive_prompt}" for c in captions]
        rows = len(captions)
        branches = 2 if cfg > 1.0 else 1
        if branches == 2:
            captions = captions + [negative_prompt] * rows
        text = self.tokenizer(captions, padding="longest", add_special_tokens=True, return_tensors="pt")
        grid_h, grid_w = hw[0] // self.down_factor, hw[1] // self.down_factor
        prefix = self.tokenizer(f"<|image_area|>{grid_h}*{grid_w}", add_special_tokens=True).input_ids
        if self.tokenizer.bos_token is not None:
            prefix = prefix[1:]
        prefix = torch.tensor(prefix + [self.config["boi"]])
        input_ids = torch.cat([text.input_ids, prefix.expand(len(captions), -1)], dim=1)
        mask = torch.cat([text.attention_mask, torch.ones(len(captions), len(prefix), dtype=torch.long)], dim=1)
        embeds = self.decoder.embed_tokens(input_ids)
        tokens = []
        for index in range(grid_h * grid_w):
            length = embeds.shape[1]
            hidden = self.decoder(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=torch.arange(length)[None]).last_hidden_state[:, -1]
            condition = linear(hidden, self.weights, "image_out_projector")
            token = self.sample_token(condition, noise[:, index], step_noise[index], cfg, branches, shift, steps)
            if use_norm:
                token = F.layer_norm(token, token.shape[-1:], eps=1e-6)
            tokens.append(token)
            fed_back = torch.cat([linear(token, self.weights, "image_in_projector")] * branches)
            embeds = torch.cat([embeds, fed_back[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(len(captions), 1, dtype=torch.long)], dim=1)
        return torch.stack(tokens, dim=1)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("release") / "NextStep-1-Large"
    write_release_checkpoint(directory, ReleaseShapes(), num_shards=3)
    return directory


@pytest.fixture(scope="module")
def models(release_dir):
    return NextStep.from_pretrained(release_dir), ReleaseTextToImage(release_dir)


def run_both(models, monkeypatch, prompts, *, hw, cfg, shift, steps, use_norm, per_prompt=1,
             negative_prompt="", positive_prompt=""):
    model, release = models
    captured = {}
    draw = generation._draw_noise

    def capture(*args, **kwargs):
        noise, step_noise = draw(*args, **kwargs)
        captured.update(noise=noise.clone(), step_noise=step_noise.clone())
        return noise, step_noise

    monkeypatch.setattr(generation, "_draw_noise", capture)
    ours, _, _ = generation.generate_tokens(
        model, prompts, height=hw[0], width=hw[1], cfg=cfg, shift=shift, num_steps=steps, use_norm=use_norm,
        seed=3, num_images_per_prompt=per_prompt, negative_prompt=negative_prompt, positive_prompt=positive_prompt)
    theirs = release.generate(
        prompts, hw=hw, cfg=cfg, shift=shift, steps=steps, use_norm=use_norm, noise=captured["noise"],
        step_noise=captured["step_noise"], images_per_caption=per_prompt, negative_prompt=negative_prompt,
        positive_prompt=positive_prompt)
    return ours, theirs


def test_text_to_image_tokens_match_the_release_algorithm(models, monkeypatch):
    ours, theirs = run_both(models, monkeypatch, ["a red cat"], hw=(32, 32), cfg=3.0, shift=1.0, steps=6,
                            use_norm=True)
    assert ours.shape == (1, 4, 16)
    assert theirs.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_batched_prompts_of_different_lengths_match_with_shift_and_prompt_additions(models, monkeypatch):
    ours, theirs = run_both(
        models, monkeypatch, ["a red cat", "two small dogs playing on a sunny beach at noon"], hw=(32, 48),
        cfg=2.5, shift=3.2, steps=4, use_norm=False, per_prompt=2, negative_prompt="blurry, low quality",
        positive_prompt="masterpiece.")
    assert ours.shape == (4, 6, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_without_guidance_one_branch_matches(models, monkeypatch):
    ours, theirs = run_both(models, monkeypatch, ["a lighthouse"], hw=(48, 32), cfg=1.0, shift=1.0, steps=3,
                            use_norm=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_release_sampler_is_the_default_of_a_loaded_release(models):
    model, _ = models
    assert model.config.sampler.type == "euler_maruyama"
    assert model.config.use_norm is True
