"""Synthetic checkpoints in the layouts of the published NextStep-1 release and of Hugging Face Qwen2.5.

Everything here is written from the release's file layout as documented (key
names, config field names, shard index, tokenizer with the added tokens at the
release ids), not through the library's own writers, so the tests that read
these directories check the library against the layout rather than against
itself. Shapes are tiny; the real Qwen2.5 vocabulary comes from the
``quicktok-v1`` package (byte-level BPE ranks, turned into a ``tokenizer.json``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Qwen2.5's added tokens (151643-151664) and whether each is "special".
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
#: What the release adds: the pad token first, then the additional special tokens.
RELEASE_ADDED_TOKENS = ("[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>",
                        "<|image_placeholder|>", "<|begin_of_prompt_refinement|>",
                        "<|end_of_prompt_refinement|>", "<|begin_of_thinking|>", "<|end_of_thinking|>")
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                    r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_BASE_VOCAB = 151643


def _byte_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _merges_from_ranks(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list equivalent to rank-ordered byte tokens (tiktoken-style vocabularies)."""
    ranks = {token: rank for rank, token in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        splits = [i for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        if len(splits) != 1:  # replay BPE with the lower ranks: it ends in exactly two parts
            parts = [token[i:i + 1] for i in range(len(token))]
            while len(parts) > 2:
                pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                _, best = min(pair for pair in pairs if pair[0] < rank)
                parts[best:best + 2] = [parts[best] + parts[best + 1]]
            splits = [len(parts[0])]
        merges.append((token[:splits[0]], token[splits[0]:]))
    return merges


@functools.lru_cache(maxsize=None)
def _base_tokenizer_json(vocabulary: str) -> str:
    """``tokenizer.json`` text of a Qwen2-style byte-level BPE without added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocabulary == "qwen":
        import quicktok

        encoding = quicktok.get_encoding("qwen3")  # Qwen2.5 and Qwen3 share the 151,643 BPE tokens
        tokens = [encoding.decode_single_token_bytes(i) for i in range(QWEN_BASE_VOCAB)]
    elif vocabulary == "small":
        tokens = [bytes([b]) for b in range(256)]
    else:
        raise ValueError(f"vocabulary must be 'qwen' or 'small', found {vocabulary!r}")
    to_unicode = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for rank, token in enumerate(tokens)}
    merges = [(text(a), text(b)) for a, b in _merges_from_ranks(tokens)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer.to_str()


def write_tokenizer(directory: Path, *, vocabulary: str = "qwen", nextstep_tokens: bool = True) -> dict[str, int]:
    """Write Qwen2.5-style tokenizer files; return the ids of the added tokens.

    Args:
        directory: where ``tokenizer.json``, ``tokenizer_config.json``,
            ``special_tokens_map.json`` and ``added_tokens.json`` go.
        vocabulary: ``qwen`` (the real 151,643-token BPE) or ``small`` (256 bytes, no merges).
        nextstep_tokens: add the release's tokens after Qwen's (a NextStep
            release tokenizer) or not (a plain Qwen2.5 tokenizer).
    """
    from tokenizers import AddedToken, Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_str(_base_tokenizer_json(vocabulary))
    for content, special in QWEN25_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    added = list(QWEN25_ADDED_TOKENS)
    if nextstep_tokens:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in RELEASE_ADDED_TOKENS])
        added += [(t, True) for t in RELEASE_ADDED_TOKENS]
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {content: tokenizer.token_to_id(content) for content, _ in added}
    decoder = {str(ids[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": special} for content, special in added}
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    special_map = {"eos_token": "<|endoftext|>"}
    if nextstep_tokens:
        config.update(pad_token="[PAD]", additional_special_tokens=list(RELEASE_ADDED_TOKENS[1:]))
        special_map.update(pad_token="[PAD]", additional_special_tokens=list(RELEASE_ADDED_TOKENS[1:]))
    else:
        config.update(pad_token="<|endoftext|>")
        special_map.update(pad_token="<|endoftext|>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (directory / "added_tokens.json").write_text(json.dumps(dict(sorted(ids.items(), key=lambda kv: kv[1])),
                                                           indent=2))
    return ids


@dataclass
class ReleaseShapes:
    """Sizes of a synthetic release model (the published one: 5120 hidden, 48 layers, 152064 vocab ...)."""

    vocab_size: int = 151680
    hidden_size: int = 32
    intermediate_size: int = 48
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    fm_head_dim: int = 24
    fm_head_layers: int = 2
    latent_channels: int = 4
    latent_patch_size: int = 2
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-5
    vae: dict = field(default_factory=lambda: {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1})

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.latent_patch_size**2


def release_tensor_shapes(shapes: ReleaseShapes, *, output_bias: bool = False,
                          gen_pos_embed: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the release's safetensors shards, in the release's order."""
    h, head_dim = shapes.hidden_size, shapes.hidden_size // shapes.num_heads
    kv = shapes.num_kv_heads * head_dim
    out = {"embed_tokens.weight": (shapes.vocab_size, h)}
    for i in range(shapes.num_layers):
        p = f"layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (shapes.intermediate_size, h),
            p + "mlp.up_proj.weight": (shapes.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, shapes.intermediate_size),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
        if output_bias:
            out[p + "self_attn.o_proj.bias"] = (h,)
    out.update({"norm.weight": (h,), "lm_head.weight": (shapes.vocab_size, h)})
    if gen_pos_embed:
        out["gen_pos_embed"] = (1, 32 * 32, h)
    d, w = shapes.token_dim, shapes.fm_head_dim
    out.update({"image_in_projector.weight": (h, d), "image_in_projector.bias": (h,),
                "image_out_projector.weight": (h, h), "image_out_projector.bias": (h,)})
    net = "image_head.net."
    out.update({net + "time_embed.mlp.0.weight": (w, 256), net + "time_embed.mlp.0.bias": (w,),
                net + "time_embed.mlp.2.weight": (w, w), net + "time_embed.mlp.2.bias": (w,),
                net + "cond_embed.weight": (w, h), net + "cond_embed.bias": (w,),
                net + "input_proj.weight": (w, d), net + "input_proj.bias": (w,)})
    for i in range(shapes.fm_head_layers):
        p = f"{net}res_blocks.{i}."
        out.update({p + "in_ln.weight": (w,), p + "in_ln.bias": (w,),
                    p + "mlp.0.weight": (w, w), p + "mlp.0.bias": (w,),
                    p + "mlp.2.weight": (w, w), p + "mlp.2.bias": (w,),
                    p + "adaLN_modulation.1.weight": (3 * w, w), p + "adaLN_modulation.1.bias": (3 * w,)})
    out.update({net + "final_layer.linear.weight": (d, w), net + "final_layer.linear.bias": (d,),
                net + "final_layer.adaLN_modulation.1.weight": (2 * w, w),
                net + "final_layer.adaLN_modulation.1.bias": (2 * w,)})
    return out


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values of a plausible scale: norms near 1, other weights and biases small."""
    values = torch.randn(shape, generator=generator)
    if name.endswith(("layernorm.weight", "norm.weight", "in_ln.weight")):
        return 1.0 + 0.1 * values
    if name == "gen_pos_embed":
        return values
    if name.startswith("image_head."):
        return 0.2 * values
    return 0.08 * values


def release_config(shapes: ReleaseShapes, ids: dict[str, int], **changes) -> dict:
    """A release ``config.json``: Llama-style fields plus the NextStep ones, as the release writes them."""
    config = {
        "_name_or_path": "stepfun-ai/NextStep-1-Large",
        "architectures": ["NextStep"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_nextstep.NextStepConfig", "AutoModel": "modeling_nextstep.NextStep"},
        "boi": ids["<|begin_of_image|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eoi": ids["<|end_of_image|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "fm_head_batch_mul": 4,
        "fm_head_dim": shapes.fm_head_dim,
        "fm_head_layers": shapes.fm_head_layers,
        "head_dim": shapes.hidden_size // shapes.num_heads,
        "hidden_act": "silu",
        "hidden_size": shapes.hidden_size,
        "im_loss_weight": 1.0,
        "image_placeholder_id": ids["<|image_placeholder|>"],
        "initializer_range": 0.02,
        "intermediate_size": shapes.intermediate_size,
        "latent_channels": shapes.latent_channels,
        "latent_patch_size": shapes.latent_patch_size,
        "latent_size": 32,
        "lm_loss_weight": 0.01,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "nextstep",
        "num_attention_heads": shapes.num_heads,
        "num_hidden_layers": shapes.num_layers,
        "num_key_value_heads": shapes.num_kv_heads,
        "o_attention_bias": False,
        "pad_token_id_added": ids["[PAD]"],
        "pretraining_tp": 1,
        "rms_norm_eps": shapes.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shapes.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.0",
        "use_cache": True,
        "use_gen_pos_embed": False,
        "vae_name_or_path": "/path/to/NextStep-1-f8ch16-Tokenizer",
        "vocab_size": shapes.vocab_size,
    }
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def write_vae(directory: Path, shapes: ReleaseShapes, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``vae/config.json`` (release field names) and ``vae/checkpoint.pt`` (a plain state dict, LDM names)."""
    from nextstep.tokenizers.flux_vae import FluxVAE, FluxVAEConfig

    vae = shapes.vae
    config = {"resolution": 256, "in_channels": 3, "ch": vae["ch"], "out_ch": 3, "ch_mult": list(vae["ch_mult"]),
              "num_res_blocks": vae["num_res_blocks"], "z_channels": shapes.latent_channels,
              "scaling_factor": 1.0, "shift_factor": 0.0, "deterministic": True, "encoder_norm": True, "psz": 1}
    names = FluxVAE(FluxVAEConfig(ch=vae["ch"], ch_mult=tuple(vae["ch_mult"]), num_res_blocks=vae["num_res_blocks"],
                                  z_channels=shapes.latent_channels)).state_dict()
    state = {name: 0.05 * torch.randn(tensor.shape, generator=generator) for name, tensor in names.items()}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, str(directory / "checkpoint.pt"))
    return state


def write_release_checkpoint(
    directory: Path,
    shapes: ReleaseShapes | None = None,
    *,
    num_shards: int = 3,
    dtype: torch.dtype = torch.float32,
    vocabulary: str = "qwen",
    seed: int = 0,
    output_bias: bool = False,
    gen_pos_embed: bool = True,
    **config_changes,
) -> dict[str, torch.Tensor]:
    """Write a complete synthetic release directory; return its shard tensors by release key.

    Args:
        directory: the model directory to create.
        shapes: model sizes (tiny by default).
        num_shards: safetensors shards (``model-0000k-of-0000n.safetensors`` + index).
        dtype: dtype of the shard tensors (the published ones are bfloat16).
        vocabulary: ``qwen`` or ``small`` tokenizer base vocabulary.
        seed: seeds the random weights.
        output_bias: the checkpoint has ``o_proj.bias`` (``o_attention_bias`` true).
        gen_pos_embed: include the release's (unused) ``gen_pos_embed`` buffer.
        **config_changes: release config fields to change (None removes one).
    """
    shapes = shapes or ReleaseShapes()
    directory.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(directory, vocabulary=vocabulary)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, generator).to(dtype)
               for name, shape in release_tensor_shapes(shapes, output_bias=output_bias,
                                                        gen_pos_embed=gen_pos_embed).items()}
    names = list(tensors)
    bounds = [round(i * len(names) / num_shards) for i in range(num_shards + 1)]
    weight_map = {}
    for index in range(num_shards):
        file = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = names[bounds[index]:bounds[index + 1]]
        save_file({name: tensors[name] for name in chunk}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = release_config(shapes, ids, **config_changes)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    write_vae(directory / "vae", shapes, generator)
    return tensors


def write_qwen_checkpoint(directory: Path, *, vocab_size: int, hidden_size: int = 32, num_layers: int = 2,
                          tied: bool = False, vocabulary: str = "qwen", seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> None:
    """A plain Hugging Face Qwen2 checkpoint (``Qwen2ForCausalLM``, random tiny weights) with Qwen2.5 tokenizer
    files."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=48,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    Qwen2ForCausalLM(config).to(dtype).save_pretrained(str(directory))
    write_tokenizer(directory, vocabulary=vocabulary, nextstep_tokens=False)
