import pytest
import torch

from nextstep import FlowMatchingHead, FlowMatchingHeadConfig, NextStep, build_model, model_preset
from nextstep.backbones import positions_from_mask
from nextstep.builders import build_component


def images(count, size=32, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forward_returns_weighted_losses(tiny_model):
    batch = tiny_model.prepare_batch(images(2), ["a cat", "a dog"], image_first=[False, True])
    out = tiny_model(batch, generator=torch.Generator().manual_seed(0))
    config = tiny_model.config
    expected = config.text_loss_weight * out.text + config.image_loss_weight * out.image
    torch.testing.assert_close(out.total, expected)
    assert out.num_image_tokens == 2 * 4  # every image token is a target, in either order
    assert torch.isfinite(out.total)


def test_denominators_turn_the_means_into_shares_of_a_larger_batch(tiny_model):
    batch = tiny_model.prepare_batch(images(2), ["a cat", "a dog on a mat"], image_first=[False, True])
    text_count, image_count = batch.target_counts()
    mean = tiny_model(batch, generator=torch.Generator().manual_seed(0))
    assert (mean.num_text_tokens, mean.num_image_tokens) == (text_count, image_count)
    # Divided by this batch's own counts: its means.
    own = tiny_model(batch, generator=torch.Generator().manual_seed(0), denominators=(text_count, image_count))
    torch.testing.assert_close(own.total, mean.total)
    # By three times as many targets: a third of each term.
    larger = tiny_model(batch, generator=torch.Generator().manual_seed(0),
                        denominators=torch.tensor([3.0 * text_count, 3.0 * image_count]))
    torch.testing.assert_close(larger.text * 3, mean.text)
    torch.testing.assert_close(larger.image * 3, mean.image)
    for bad in ((text_count - 1, image_count), (text_count,), (text_count, image_count, 1),
                (float("nan"), image_count), (text_count, float("inf"))):
        with pytest.raises(ValueError, match=rf"denominators must be \(text, image\) counts at least .*"
                                             rf"\({text_count}, {image_count}\)"):
            tiny_model(batch, generator=torch.Generator().manual_seed(0), denominators=bad)


def test_teacher_forcing_alignment(trained_like_model):
    model = trained_like_model
    captured = {}
    original = model.image_head.loss

    def recording_loss(target, condition, generator=None):
        captured["target"], captured["condition"] = target, condition
        return original(target, condition, generator)

    model.image_head.loss = recording_loss
    pixels = images(2, size=32)
    batch = model.prepare_batch(pixels, ["first caption", "x"], image_first=[False, False])
    model(batch)
    tokens, _, _ = model.encode_images(pixels)  # (2, 4, D)
    # Targets: every image token of every example, in raster order.
    torch.testing.assert_close(captured["target"], tokens.flatten(0, 1))
    # Conditions: the projected hidden state one position before each image token.
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.image_mask, batch.image_tokens)
        hidden = model.backbone(embeds, positions_from_mask(batch.attention_mask), batch.attention_mask)
        rows, cols = torch.nonzero(batch.image_mask, as_tuple=True)
        expected = model.image_out_projector(hidden[rows, cols - 1])
    torch.testing.assert_close(captured["condition"], expected)
    # The first image token is predicted from <|begin_of_image|>.
    first = batch.image_mask.float().argmax(1)
    assert (batch.input_ids[torch.arange(2), first - 1] == model.text_tokenizer.begin_of_image_id).all()


def test_the_lm_head_at_each_position_is_scored_against_the_next_text_token(trained_like_model):
    """The text loss, written out: position i's logits against the id at i + 1, where i + 1 is a text target."""
    model = trained_like_model.eval()
    batch = model.prepare_batch(images(2), ["first caption", "a dog on a mat"], image_first=[False, True])
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        hidden = model.hidden_states(batch)
        losses = [torch.nn.functional.cross_entropy(
            model.lm_head(hidden[row, position - 1]).float()[None],
            model.text_targets(batch.input_ids[row, position])[None])
            for row, position in batch.text_target_mask.nonzero().tolist() if position > 0]
    assert out.num_text_tokens == len(losses) > 4
    torch.testing.assert_close(out.text, torch.stack(losses).mean())


def test_the_loss_weights_are_the_published_ones_by_default():
    for config in (model_preset("tiny")(), model_preset("nextstep_1_large")()):
        assert (config.text_loss_weight, config.image_loss_weight) == (0.01, 1.0)


def test_batch_mul_repeats_each_target():
    config = FlowMatchingHeadConfig(token_dim=4, condition_dim=8, width=16, depth=1, batch_mul=3)
    head = FlowMatchingHead(config)
    seen = {}
    original = head.velocity

    def recording(x_t, t, condition):
        seen["t"], seen["condition"] = t, condition
        return original(x_t, t, condition)

    head.velocity = recording
    condition = torch.randn(5, 8)
    head.loss(torch.randn(5, 4), condition)
    assert seen["t"].shape == (15,)
    torch.testing.assert_close(seen["condition"], condition.repeat(3, 1))
    assert seen["t"].unique().numel() == 15  # fresh time per repeat


def test_a_few_optimisation_steps_lower_the_loss():
    model = build_model("tiny", seed=0)
    batch = model.prepare_batch(images(4, size=32), ["red", "green", "blue", "cyan"],
                                image_first=[False] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def evaluate():
        with torch.no_grad():
            return model(batch, generator=torch.Generator().manual_seed(123)).total.item()

    before = evaluate()
    for step in range(30):
        loss = model(batch, generator=torch.Generator().manual_seed(step)).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert evaluate() < 0.7 * before


def test_tokenizer_is_frozen_and_other_parameters_train(tiny_model):
    assert not any(p.requires_grad for p in tiny_model.image_tokenizer.parameters())
    batch = tiny_model.prepare_batch(images(2), ["a", "b"], image_first=[False, False])
    tiny_model(batch).total.backward()
    for name, parameter in tiny_model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, name


def test_head_token_dim_must_match_tokenizer():
    config = model_preset("tiny")()
    parts = {kind: build_component(getattr(config, kind)) for kind in
             ("image_tokenizer", "text_tokenizer", "backbone", "sampler")}
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=32, condition_dim=64, width=16, depth=1))
    with pytest.raises(ValueError, match="token_dim 32.*token_dim 64"):
        NextStep(image_head=head, config=config, **parts)
    head = FlowMatchingHead(FlowMatchingHeadConfig(token_dim=64, condition_dim=48, width=16, depth=1))
    with pytest.raises(ValueError, match="condition_dim 48"):
        NextStep(image_head=head, config=config, **parts)


def test_tied_lm_head_shares_the_embedding():
    config = model_preset("tiny")().replace(tie_word_embeddings=True)
    model = build_model(config, seed=0)
    assert model.lm_head.output_weight() is model.backbone.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()


def test_prepare_batch_rejects_bad_sizes(tiny_model):
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_model.prepare_batch(torch.zeros(1, 3, 40, 32), ["x"])
    with pytest.raises(ValueError, match="captions"):
        tiny_model.prepare_batch(torch.zeros(2, 3, 32, 32), ["x"])
    with pytest.raises(ValueError, match=r"one ordering per caption \(3\), found 1"):
        tiny_model.prepare_batch(torch.zeros(3, 3, 32, 32), ["x", "y", "z"], image_first=[True])
    with pytest.raises(ValueError, match="captions must be a list of strings, one per image, found 'ab'"):
        tiny_model.prepare_batch(torch.zeros(2, 3, 32, 32), "ab")
    with pytest.raises(ValueError, match=r"images must be floating point with values in \[-1, 1\], found torch.uint8"):
        tiny_model.prepare_batch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["x"])


def test_a_batch_of_another_token_width_and_bad_draw_rows_are_named(tiny_model):
    from nextstep.sequence import SequenceBuilder

    width = tiny_model.image_head.token_dim
    narrow = SequenceBuilder(tiny_model.text_tokenizer, width // 2)
    batch = narrow.collate([narrow.example("a cat", torch.randn(4, width // 2), 2, 2)])
    with pytest.raises(ValueError, match=rf"image tokens must be {width} wide \(the image head's token_dim\), "
                                         rf"found shape \(1, \d+, {width // 2}\)"):
        tiny_model(batch)
    batch = tiny_model.prepare_batch(images(2), ["a cat", "a cat"], image_first=[False, False])
    for rows in (torch.tensor([0]), torch.tensor([0, 0, 1])):
        with pytest.raises(ValueError, match=rf"draw_rows must have shape \(2,\), one index per row, found "
                                             rf"\({rows.shape[0]},\)"):
            tiny_model(batch, draw_rows=rows)


def test_meta_build_of_the_published_shape_allocates_nothing():
    with torch.device("meta"):
        model = build_model("nextstep_1_large", with_text_tokenizer=False)
    counts = model.parameter_counts()
    assert abs(counts["backbone"] + counts["lm_head"] - 14.77e9) / 14.77e9 < 0.005
    assert abs(counts["image_head"] - 157.2e6) / 157.2e6 < 0.005
    assert all(p.is_meta for p in model.parameters())
    backbone = model.backbone.config  # Qwen2.5-14B's config.json
    assert (backbone.vocab_size, backbone.hidden_size, backbone.intermediate_size, backbone.num_layers,
            backbone.num_heads, backbone.num_kv_heads) == (152064, 5120, 13824, 48, 40, 8)
    assert (backbone.rope_theta, backbone.rms_norm_eps, backbone.attention_bias, backbone.output_attention_bias) == \
        (1000000.0, 1e-5, True, False)


def test_training_entry_points_name_what_they_take(tiny_model):
    from PIL import Image

    with pytest.raises(ValueError, match=r"images must be a \(B, 3, H, W\) tensor in \[-1, 1\], found list "
                                         r"\(nextstep\.images\.from_pil converts PIL images of one size\)"):
        tiny_model.prepare_batch([Image.new("RGB", (32, 32))], ["a"])
    with pytest.raises(ValueError, match=r"found \(3, 32, 32\)"):
        tiny_model.prepare_batch(torch.zeros(3, 32, 32), ["a"])
    with pytest.raises(TypeError, match=r"forward takes a SequenceBatch \(from prepare_batch, or "
                                        r"SequenceBuilder\.collate\), found Tensor"):
        tiny_model(torch.zeros(1, 3, 32, 32))
    batch = tiny_model.prepare_batch(torch.zeros(1, 3, 32, 32), ["a"])
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, found int 7"):
        tiny_model(batch, generator=7, context_noise=0.1)


def test_a_default_output_size_the_image_tokenizer_cannot_make_is_refused_when_the_model_is_built():
    from nextstep.generation_defaults import GenerationDefaults

    config = model_preset("tiny")().replace(generation=GenerationDefaults(height=30, width=32))
    with pytest.raises(ValueError, match=r"config\.generation \(the default output size, 30x32\): image height must "
                                         r"be a positive multiple of 16 .*found 30"):
        build_model(config, seed=0)


def test_context_noise_blurs_only_the_context_at_a_scale_drawn_per_sequence(trained_like_model):
    """Context noise of scale s: each sequence reads its image tokens plus Gaussian noise of one scale
    drawn from U(0, s); the flow-matching targets stay the clean tokens."""
    model = trained_like_model
    seen = {}
    original_loss, original_hidden = model.image_head.loss, model.hidden_states

    def recording_loss(target, condition, generator=None):
        seen["target"] = target
        return original_loss(target, condition, generator)

    def recording_hidden(batch, context=None, **kwargs):
        seen["context"] = context
        return original_hidden(batch, context, **kwargs)

    model.image_head.loss, model.hidden_states = recording_loss, recording_hidden
    pixels = images(6, size=32)
    batch = model.prepare_batch(pixels, ["a", "b", "c", "d", "e", "f"], image_first=[False] * 6)
    model(batch, generator=torch.Generator().manual_seed(0), context_noise=2.0)
    tokens, _, _ = model.encode_images(pixels)
    torch.testing.assert_close(seen["target"], tokens.flatten(0, 1))
    offsets = (seen["context"] - batch.image_tokens)[batch.image_mask].view(6, -1)  # (rows, tokens x D)
    spreads = offsets.std(dim=1)
    assert (spreads > 0).all() and (spreads < 2.0 * 1.25).all()
    assert spreads.max() > 1.5 * spreads.min()  # one scale per sequence, not one for all


def test_prepare_batch_draws_the_image_first_order_at_the_configured_probability(tiny_model):
    """Text dropout: each pair is ordered image-first with probability image_first_probability, so 0 orders
    none that way and 1 all of them."""
    captions = ["a cat", "a dog", "a red circle"]
    for probability in (0.0, 1.0):
        tiny_model.config = tiny_model.config.replace(image_first_probability=probability)
        drawn = tiny_model.prepare_batch(images(3), captions, generator=torch.Generator().manual_seed(0))
        given = tiny_model.prepare_batch(images(3), captions, image_first=[probability == 1.0] * 3)
        assert torch.equal(drawn.input_ids, given.input_ids)
        assert torch.equal(drawn.image_mask, given.image_mask)


def test_word_substitutions_change_the_loss_in_training_only():
    """The word-vector substitutions are a training device: an evaluated model reads every word as it is."""
    from test_word_aliases import letter_counts
    from test_word_vectors import word_model

    from nextstep.tokenizers.word_vector_table import attach_word_vectors

    model = attach_word_vectors(word_model(), ["crimson", "violin"], letter_counts, dim=4,
                                substitution_probability=1.0)
    batch = model.prepare_batch(images(2, size=16), ["a red circle", "a yellow face"], image_first=[False, False])

    def text_loss(training, probability):
        model.word_vectors.config = model.word_vectors.config.replace(substitution_probability=probability)
        model.train(training)
        with torch.no_grad():
            return model(batch, generator=torch.Generator().manual_seed(0)).text

    torch.testing.assert_close(text_loss(False, 1.0), text_loss(False, 0.0))
    assert not torch.allclose(text_loss(True, 1.0), text_loss(True, 0.0))


def test_image_positions_read_the_projected_token_instead_of_the_placeholder_embedding(tiny_model):
    """An image position's input is image_in_projector(token) alone; text positions keep their embeddings."""
    batch = tiny_model.prepare_batch(images(2), ["a cat", "a dog on a mat"], image_first=[False, True])
    with torch.no_grad():
        embeds = tiny_model.embed(batch.input_ids, batch.image_mask, batch.image_tokens)
        projected = tiny_model.image_in_projector(batch.image_tokens[batch.image_mask])
        text = tiny_model.embed_text(batch.input_ids)
    torch.testing.assert_close(embeds[batch.image_mask], projected)
    torch.testing.assert_close(embeds[~batch.image_mask], text[~batch.image_mask])


def test_packed_sequences_each_draw_their_own_context_noise_scale(trained_like_model):
    """Packing several sequences into one row keeps context noise a per-sequence draw, as unpacked."""
    model = trained_like_model
    seen = {}
    original_hidden = model.hidden_states

    def recording_hidden(batch, context=None, **kwargs):
        seen["context"] = context
        return original_hidden(batch, context, **kwargs)

    model.hidden_states = recording_hidden
    tokens, grid_h, grid_w = model.encode_images(images(6, size=32))
    builder = model.sequences
    examples = [builder.example(caption, tokens[i], grid_h, grid_w, image_first=False)
                for i, caption in enumerate(["a", "b", "c", "d", "e", "f"])]
    batch = builder.pack(examples, 4096)
    assert batch.input_ids.shape[0] == 1 and int(batch.document_ids.max()) == 6
    model(batch, generator=torch.Generator().manual_seed(0), context_noise=2.0)
    offsets = seen["context"] - batch.image_tokens
    spreads = torch.stack([offsets[batch.image_mask & (batch.document_ids == document)].std()
                           for document in range(1, 7)])
    assert (spreads > 0).all() and (spreads < 2.0 * 1.25).all()
    assert spreads.max() > 1.5 * spreads.min()


def test_a_further_word_is_scored_as_its_stand_in_until_its_vector_is_trained():
    """A vector word's class for the LM head is its table row: with the projection still zero, a caption
    with "crimson" has exactly the losses of the caption with the known word standing in for it."""
    from test_word_aliases import letter_counts
    from test_word_vectors import word_model

    from nextstep.tokenizers.word_vector_table import attach_word_vectors

    model = word_model()
    attached = attach_word_vectors(model, ["crimson", "violin"], letter_counts, dim=4).eval()
    tokenizer = attached.text_tokenizer
    crimson = tokenizer.encode(" crimson")[0]
    assert crimson >= attached.backbone.vocab_size  # an id beyond the embedding table
    stand_in = tokenizer.decode([int(attached.word_vectors.learned_ids[crimson])])
    pixels = images(1, size=16)
    with torch.no_grad():
        further = attached(attached.prepare_batch(pixels, ["a crimson heart"], image_first=[True]),
                           generator=torch.Generator().manual_seed(0))
        known = model(model.prepare_batch(pixels, ["a" + stand_in + " heart"], image_first=[True]),
                      generator=torch.Generator().manual_seed(0))
    assert further.num_text_tokens == known.num_text_tokens
    torch.testing.assert_close(further.text, known.text)


def test_a_preset_loads_in_the_dtype_asked_for():
    from nextstep.builders import load_model

    for dtype, expected in ((None, torch.float32), (torch.bfloat16, torch.bfloat16), ("float16", torch.float16)):
        model = load_model("tiny", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {expected}, dtype


def test_the_total_loss_uses_the_configured_weights(tiny_model):
    """total = text_loss_weight * text + image_loss_weight * image, for weights other than the published ones."""
    tiny_model.config = tiny_model.config.replace(text_loss_weight=0.5, image_loss_weight=2.0)
    batch = tiny_model.prepare_batch(images(2), ["a cat", "a dog"], image_first=[False, True])
    out = tiny_model(batch, generator=torch.Generator().manual_seed(0))
    assert out.image > 0 and out.text > 0
    torch.testing.assert_close(out.total, 0.5 * out.text + 2.0 * out.image)


def test_a_batch_without_targets_still_backpropagates_zero_gradients(tiny_model):
    """A batch of one-token sequences (B 2, L 1) has no text or image target: its losses are 0 and its total
    still reaches the backbone and the input projector (with zero gradients), so a training step can take it."""
    from nextstep.sequence import Example

    token = tiny_model.text_tokenizer.encode("a")[0]
    batch = tiny_model.sequences.collate([Example([token]), Example([token])])
    out = tiny_model(batch, generator=torch.Generator().manual_seed(0))
    assert (out.num_text_tokens, out.num_image_tokens) == (0, 0)
    assert out.total.item() == out.text.item() == out.image.item() == 0.0
    out.total.backward()
    for name, parameter in tiny_model.named_parameters():
        if parameter.requires_grad and not name.startswith(("lm_head", "image_head", "image_out_projector")):
            assert parameter.grad is not None and not parameter.grad.any(), name


def test_wide_images_are_encoded_with_their_own_grid(tiny_model):
    """encode_images of (B 1, 3, 32, 64) images: 2 x 4 tokens in raster order, and the training sequence
    says '2*4' (h then w)."""
    pixels = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens, grid_h, grid_w = tiny_model.encode_images(pixels)
    assert (grid_h, grid_w) == (2, 4) and tokens.shape == (1, 8, tiny_model.token_dim)
    batch = tiny_model.prepare_batch(pixels, ["a wide view"], image_first=[False])
    assert tiny_model.sequences.parse(batch.input_ids[0].tolist()) == ("a wide view", 2, 4)
    torch.testing.assert_close(batch.image_tokens[batch.image_mask], tokens[0])


def test_draws_given_or_shared_in_a_way_the_batch_cannot_take_are_refused(tiny_model):
    """flow_draws must be times (N,) and noise (N, D) for the N image targets; rows sharing draws (draw_rows)
    must hold the same text ids, and packed sequences cannot share draws by row."""
    batch = tiny_model.prepare_batch(images(2), ["a cat", "a dog"], image_first=[False, False])
    count, width = batch.target_counts()[1], tiny_model.token_dim
    times, noise = torch.rand(count), torch.randn(count, width)
    for bad in ((times[:3], noise[:3]), (times, noise[:, : width // 2]), (times[:, None], noise)):
        with pytest.raises(ValueError, match=rf"flow_draws must be times \({count},\) and noise \({count}, {width}\)"):
            tiny_model(batch, flow_draws=bad)
    with pytest.raises(ValueError, match="rows that share their random draws .* must hold the same text ids"):
        tiny_model(batch, draw_rows=torch.tensor([0, 0]))
    builder = tiny_model.sequences
    tokens, grid_h, grid_w = tiny_model.encode_images(images(2))
    packed = builder.pack([builder.example(caption, tokens[i], grid_h, grid_w)
                           for i, caption in enumerate(["a cat", "a cat"])], 100)
    with pytest.raises(ValueError, match="draw_rows shares draws between whole rows; packed sequences draw per "
                                         "sequence"):
        tiny_model(packed, draw_rows=torch.tensor([0]))
