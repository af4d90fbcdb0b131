"""Read and write FLUX-shaped VAE weights in the layouts found in the wild.

Three layouts are understood, plus the library's own:

* ``bfl``: the single ``ae.safetensors`` of FLUX.1, LDM names
  (``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1.q`` as 1x1 convs,
  ``decoder.up.{i}`` indexed by resolution level). `FluxVAE` uses these names.
* ``diffusers``: an ``AutoencoderKL`` directory (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), names ``encoder.down_blocks.{i}.resnets.{j}``,
  attention as Linear ``to_q``/``to_k``/``to_v``/``to_out.0``, decoder ``up_blocks``
  in reverse level order.
* ``nextstep``: NextStep-1's ``vae/`` directory (``checkpoint.pt`` with LDM names +
  ``config.json`` with ``ch, ch_mult, num_res_blocks, z_channels, encoder_norm, psz`` ...).
  The pickle is read with ``torch.load(weights_only=True)`` only.
* ``native``: ``config.json`` (a `FluxVAEConfig`) + ``model.safetensors``.
"""

from __future__ import annotations

import difflib
import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextstep.io import atomic_directory, read_json_object, what_is_at
from nextstep.model_config import describes_a_model
from nextstep.serialization import read_safetensors
from nextstep.tokenizers.flux_vae import FluxVAE, FluxVAEConfig

logger = logging.getLogger("nextstep")

LAYOUTS = ("bfl", "diffusers", "nextstep", "native")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
NATIVE_WEIGHTS = "model.safetensors"

_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ----------------------------------------------------------------- key mapping
def _diffusers_key_to_bfl(key: str, num_levels: int) -> str:
    match = re.match(r"(encoder|decoder)\.(.*)", key)
    if match is None:
        raise ValueError(f"unexpected key {key!r} in a diffusers AutoencoderKL checkpoint")
    part, rest = match.groups()
    for old, new in (("conv_norm_out", "norm_out"),):
        if rest.startswith(old):
            return f"{part}.{new}{rest[len(old):]}"
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", rest):
        level, block, layer, tail = m.groups()
        return f"{part}.down.{level}.block.{block}.{_RESNET_RENAMES.get(layer, layer)}.{tail}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        return f"{part}.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", rest):
        index, block, layer, tail = m.groups()
        level = num_levels - 1 - int(index)
        return f"{part}.up.{level}.block.{block}.{_RESNET_RENAMES.get(layer, layer)}.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        level = num_levels - 1 - int(m.group(1))
        return f"{part}.up.{level}.upsample.conv.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(.*)", rest):
        index, layer, tail = m.groups()
        return f"{part}.mid.block_{int(index) + 1}.{_RESNET_RENAMES.get(layer, layer)}.{tail}"
    if m := re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest):
        return f"{part}.mid.attn_1.{_ATTENTION_RENAMES[m.group(1)]}.{m.group(2)}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    raise ValueError(f"unexpected key {key!r} in a diffusers AutoencoderKL checkpoint")


def _bfl_key_to_diffusers(key: str, num_levels: int) -> str:
    part, rest = key.split(".", 1)
    inverse_resnet = {v: k for k, v in _RESNET_RENAMES.items()}
    inverse_attention = {v: k for k, v in _ATTENTION_RENAMES.items()}
    if rest.startswith("norm_out."):
        return f"{part}.conv_norm_out.{rest[len('norm_out.'):]}"
    if m := re.match(r"down\.(\d+)\.block\.(\d+)\.(\w+)\.(.*)", rest):
        level, block, layer, tail = m.groups()
        return f"{part}.down_blocks.{level}.resnets.{block}.{inverse_resnet.get(layer, layer)}.{tail}"
    if m := re.match(r"down\.(\d+)\.downsample\.conv\.(.*)", rest):
        return f"{part}.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := re.match(r"up\.(\d+)\.block\.(\d+)\.(\w+)\.(.*)", rest):
        level, block, layer, tail = m.groups()
        index = num_levels - 1 - int(level)
        return f"{part}.up_blocks.{index}.resnets.{block}.{inverse_resnet.get(layer, layer)}.{tail}"
    if m := re.match(r"up\.(\d+)\.upsample\.conv\.(.*)", rest):
        index = num_levels - 1 - int(m.group(1))
        return f"{part}.up_blocks.{index}.upsamplers.0.conv.{m.group(2)}"
    if m := re.match(r"mid\.block_(\d)\.(\w+)\.(.*)", rest):
        index, layer, tail = m.groups()
        return f"{part}.mid_block.resnets.{int(index) - 1}.{inverse_resnet.get(layer, layer)}.{tail}"
    if m := re.match(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)", rest):
        return f"{part}.mid_block.attentions.0.{inverse_attention[m.group(1)]}.{m.group(2)}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    raise ValueError(f"unexpected key {key!r} in a FLUX (BFL) autoencoder state dict")


def _is_attention_projection(key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key))


def diffusers_to_bfl(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to BFL names; Linear attention -> 1x1 conv.

    Args:
        state: diffusers keys -> tensors.
        num_levels: ``len(block_out_channels)`` (the decoder's block order is reversed).
    """
    refused = sorted(k for k in state if "quant_conv" in k)
    if refused:
        raise ValueError(
            f"checkpoint has {refused}: VAEs with quant_conv/post_quant_conv are not FLUX-shaped "
            "and are not supported"
        )
    out = {}
    for key, tensor in state.items():
        new = _diffusers_key_to_bfl(key, num_levels)
        if _is_attention_projection(new) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[new] = tensor
    return out


def bfl_to_diffusers(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Inverse of `diffusers_to_bfl`: BFL names -> diffusers names, 1x1 conv -> Linear."""
    out = {}
    for key, tensor in state.items():
        if _is_attention_projection(key) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[_bfl_key_to_diffusers(key, num_levels)] = tensor
    return out


# ------------------------------------------------------------------- configs
def config_from_diffusers(data: dict) -> FluxVAEConfig:
    """`FluxVAEConfig` from a diffusers ``AutoencoderKL`` ``config.json``."""
    if not isinstance(data.get("block_out_channels"), list) or not data["block_out_channels"]:
        raise ValueError(f"a diffusers VAE config.json must have block_out_channels, a list of widths, found "
                         f"{data.get('block_out_channels')!r}")
    channels = list(data["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first width")
    if data.get("use_quant_conv", True) or data.get("use_post_quant_conv", True):
        raise ValueError(
            "diffusers config enables quant_conv/post_quant_conv; only FLUX-shaped VAEs "
            "(use_quant_conv=false, use_post_quant_conv=false) are supported"
        )
    scale = data.get("scaling_factor")
    shift = data.get("shift_factor")
    return FluxVAEConfig(
        in_channels=data.get("in_channels", 3), out_channels=data.get("out_channels", 3), ch=base,
        ch_mult=tuple(c // base for c in channels), num_res_blocks=data.get("layers_per_block", 2),
        z_channels=data.get("latent_channels", 16), norm_groups=data.get("norm_num_groups", 32),
        normalization="scale_shift" if scale is not None else "none",
        scaling_factor=float(scale if scale is not None else 1.0),
        shift_factor=float(shift if shift is not None else 0.0),
    )


def config_to_diffusers(config: FluxVAEConfig) -> dict:
    """A diffusers ``AutoencoderKL`` ``config.json`` for a `FluxVAEConfig`."""
    levels = len(config.ch_mult)
    data = {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks, "act_fn": "silu",
        "latent_channels": config.z_channels, "norm_num_groups": config.norm_groups,
        "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    }
    if config.normalization == "scale_shift":
        data["scaling_factor"] = config.scaling_factor
        data["shift_factor"] = config.shift_factor
    return data


#: FLUX.1's latent scale and shift: how a FLUX.1 file (which stores none) is read.
FLUX_LATENT_SETTINGS = {"normalization": "scale_shift", "scaling_factor": 0.3611, "shift_factor": 0.1159}

#: The fields of NextStep-1's ``vae/config.json``.
NEXTSTEP_CONFIG_FIELDS = ("resolution", "in_channels", "ch", "out_ch", "ch_mult", "num_res_blocks",
                          "z_channels", "scaling_factor", "shift_factor", "deterministic",
                          "encoder_norm", "psz")
#: What NextStep-1's code gives a field its ``vae/config.json`` leaves out (FLUX.1's VAE, sampled, no
#: standardisation).
NEXTSTEP_CONFIG_DEFAULTS = {"resolution": 256, "in_channels": 3, "ch": 128, "out_ch": 3, "ch_mult": (1, 2, 4, 4),
                            "num_res_blocks": 2, "z_channels": 16,
                            "scaling_factor": FLUX_LATENT_SETTINGS["scaling_factor"],
                            "shift_factor": FLUX_LATENT_SETTINGS["shift_factor"], "deterministic": False,
                            "encoder_norm": False, "psz": None}


def config_from_nextstep(data: dict) -> FluxVAEConfig:
    """`FluxVAEConfig` from NextStep-1's ``vae/config.json``.

    ``encoder_norm`` true selects the per-``psz`` channel standardisation, and the
    ``scaling_factor`` / ``shift_factor`` that the release's pipeline applies after it
    are kept (1 and 0 in the release); false selects FLUX.1's scale and shift alone.
    A field the file leaves out takes the value the release's own code gives it
    (`NEXTSTEP_CONFIG_DEFAULTS`).
    """
    unknown = sorted(key for key in set(data) - set(NEXTSTEP_CONFIG_FIELDS) if not key.startswith("_"))
    misspelt = {key: close[0] for key in unknown
                if (close := difflib.get_close_matches(key, NEXTSTEP_CONFIG_FIELDS, n=1, cutoff=0.8))}
    if misspelt:  # a default would silently take the place of the value meant
        raise ValueError("unknown field(s) of a NextStep VAE config that look like misspellings: "
                         + ", ".join(f"{key!r} (did you mean {known!r}?)" for key, known in misspelt.items()))
    if unknown:  # the release's loader ignores them too; metadata such as "_class_name" goes unmentioned
        logger.warning("ignoring unknown field(s) %s of a NextStep VAE config; known: %s", unknown,
                       list(NEXTSTEP_CONFIG_FIELDS))
    data = {**NEXTSTEP_CONFIG_DEFAULTS, **{k: v for k, v in data.items() if k in NEXTSTEP_CONFIG_FIELDS}}
    scale, shift = float(data["scaling_factor"]), float(data["shift_factor"])
    if data["encoder_norm"]:
        normalization = "layer_norm"
    else:
        normalization = "scale_shift" if (scale, shift) != (1.0, 0.0) else "none"
    return FluxVAEConfig(
        in_channels=data["in_channels"], out_channels=data["out_ch"], ch=data["ch"], ch_mult=tuple(data["ch_mult"]),
        num_res_blocks=data["num_res_blocks"], z_channels=data["z_channels"], normalization=normalization,
        normalization_patch_size=int(data["psz"] or 1), scaling_factor=scale, shift_factor=shift,
        deterministic=bool(data["deterministic"]),
    )


def config_to_nextstep(config: FluxVAEConfig, resolution: int = 256) -> dict:
    """NextStep-1's ``vae/config.json`` fields for a `FluxVAEConfig`."""
    encoder_norm = config.normalization == "layer_norm"
    scaled = config.normalization in ("layer_norm", "scale_shift")
    scale, shift = (config.scaling_factor, config.shift_factor) if scaled else (1.0, 0.0)
    return {
        "resolution": resolution, "in_channels": config.in_channels, "ch": config.ch,
        "out_ch": config.out_channels, "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks, "z_channels": config.z_channels,
        "scaling_factor": scale, "shift_factor": shift, "deterministic": config.deterministic,
        "encoder_norm": encoder_norm, "psz": config.normalization_patch_size,
    }


def config_from_bfl_state(state: dict[str, torch.Tensor], norm_groups: int = 32) -> FluxVAEConfig:
    """Infer the architecture from BFL-named weights (GroupNorm groups cannot be inferred)."""
    levels = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=0)
    blocks = 1 + max((int(m.group(1)) for k in state
                      if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))), default=0)
    # At least one level's first block: with it present, ``blocks`` is at least 1.
    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight",
              *(f"encoder.down.{i}.block.0.conv1.weight" for i in range(levels))]
    missing = [name for name in needed if name not in state]
    if missing:
        raise ValueError(f"weights do not look like a FLUX autoencoder in BFL names (encoder.*, decoder.*): missing "
                         f"{missing}, found names such as {sorted(state)[:3]}")
    ch = state["encoder.conv_in.weight"].shape[0]
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    z_channels = state["encoder.conv_out.weight"].shape[0] // 2
    return FluxVAEConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0], ch=ch,
        ch_mult=tuple(w // ch for w in widths), num_res_blocks=blocks, z_channels=z_channels,
        norm_groups=norm_groups, normalization="none",
    )


# ---------------------------------------------------------------------- files
def read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict read with ``weights_only=True``; refuses pickles that need code."""
    if not path.is_file():
        raise FileNotFoundError(f"expected a checkpoint at {path}, found nothing")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} needs arbitrary code execution to unpickle, which is refused "
            f"(torch.load weights_only=True): {error}. Convert it to safetensors in a trusted "
            "environment first."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable torch checkpoint ({error})") from error
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(data, dict) and wrapper in data and isinstance(data[wrapper], dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a state dict of tensors: found a {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path} does not hold a state dict of tensors: {key!r} is a {type(value).__name__}")
    return dict(data)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("vae.", "first_stage_model.", "ae.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_layout(path: str | Path) -> str:
    """Which of `LAYOUTS` the file or directory at ``path`` holds.

    Raises:
        FileNotFoundError: nothing at ``path``, or nothing there in any of the layouts (naming them);
            a NextStep model's directory (whose tokenizer it holds) is named as one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expected a VAE checkpoint at {path}, found {what_is_at(path)}")
    if path.is_dir() and (path / "config.json").is_file():
        try:
            fields = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            fields = {}
        if describes_a_model(fields):
            raise FileNotFoundError(f"{path} is a NextStep model, not a VAE checkpoint: load the model and take "
                                    "its image_tokenizer (or evaluate it with `nextstep eval MODEL --suite "
                                    "tokenizer`)")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "bfl"
        if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
            return "nextstep"
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHTS).exists() or (path / "vae" / DIFFUSERS_WEIGHTS).exists():
            return "diffusers"
        if (path / "checkpoint.pt").exists() or (path / "vae" / "checkpoint.pt").exists():
            return "nextstep"
        if (path / NATIVE_WEIGHTS).exists() and (path / "config.json").exists():
            return "native"
        if (path / "ae.safetensors").exists():
            return "bfl"
    raise FileNotFoundError(
        f"{path} is not a VAE checkpoint: expected a FLUX 'ae.safetensors' file, a diffusers "
        f"directory with config.json + {DIFFUSERS_WEIGHTS}, a NextStep directory with "
        f"config.json + checkpoint.pt, or a directory with config.json + {NATIVE_WEIGHTS}"
    )


def _load_into(vae: FluxVAE, state: dict[str, torch.Tensor], source: str) -> FluxVAE:
    from nextstep.serialization import check_state_dict

    check_state_dict(vae.state_dict(), state, source)
    vae.load_state_dict(state, strict=True)
    return vae


def load_flux_vae(path: str | Path, *, layout: str | None = None, keep_dtype: bool = False,
                  **config_changes: object) -> FluxVAE:
    """Load a `FluxVAE` from any of `LAYOUTS` (detected unless ``layout`` is given), in float32.

    Args:
        path: a file (``ae.safetensors``, ``checkpoint.pt``) or a directory.
        layout: force one of `LAYOUTS`.
        keep_dtype: keep the floating dtype the checkpoint's tensors share instead (float32 when
            they mix dtypes).
        **config_changes: fields of `FluxVAEConfig` to override after reading the
            checkpoint's own config, e.g. ``normalization="layer_norm"`` for FLUX.1
            weights used the NextStep way (the standardisation alone: scale 1 and
            shift 0 unless given too), or ``norm_groups`` for BFL files.
    """
    path = Path(path)
    if (layout in (None, "diffusers", "native") and path.is_file() and path.name in (DIFFUSERS_WEIGHTS, NATIVE_WEIGHTS)
            and (path.parent / "config.json").is_file()):
        path = path.parent  # the weights file of a directory layout: its directory holds the config too
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; known: {list(LAYOUTS)}")
    if layout == "bfl":
        file = path / "ae.safetensors" if path.is_dir() else path
        state = _strip_prefix(read_safetensors(file))
        norm_groups = config_changes.pop("norm_groups", 32)
        config = config_from_bfl_state(state, norm_groups)
        if "normalization" not in config_changes:
            config_changes.update(FLUX_LATENT_SETTINGS)
    elif layout == "diffusers":
        directory = path / "vae" if (path / "vae" / DIFFUSERS_WEIGHTS).exists() else path
        config = config_from_diffusers(read_json_object(directory / "config.json", "VAE config.json"))
        raw = read_safetensors(directory / DIFFUSERS_WEIGHTS)
        state = diffusers_to_bfl(raw, len(config.ch_mult))
        file = directory / DIFFUSERS_WEIGHTS
    elif layout == "nextstep":
        directory = path if path.is_dir() else path.parent
        if (directory / "vae" / "checkpoint.pt").exists():
            directory = directory / "vae"
        file = path if path.is_file() else directory / "checkpoint.pt"
        config = config_from_nextstep(read_json_object(directory / "config.json", "VAE config.json"))
        state = _strip_prefix(read_torch_checkpoint(file))
    else:
        config = FluxVAEConfig.load(path / "config.json")
        file = path / NATIVE_WEIGHTS
        state = read_safetensors(file)
    if config_changes.get("normalization") == "layer_norm":  # NextStep's way: the standardisation alone
        config_changes = {"scaling_factor": 1.0, "shift_factor": 0.0, **config_changes}
    config = config.replace(**config_changes) if config_changes else config
    vae = FluxVAE(config)
    if keep_dtype:
        saved = {tensor.dtype for tensor in state.values() if tensor.is_floating_point()}
        if len(saved) == 1:
            vae = vae.to(saved.pop())
    return _load_into(vae, state, str(file))


def _latent_handling(config: FluxVAEConfig) -> tuple:
    """What a config does to latents, with equivalent spellings made equal (``scale_shift`` by 1 and 0
    is ``none``; scale, shift and block size mean nothing to the settings that ignore them)."""
    normalization, scale, shift = config.normalization, config.scaling_factor, config.shift_factor
    if normalization == "scale_shift" and (scale, shift) == (1.0, 0.0):
        normalization = "none"
    if normalization == "none":
        scale, shift = 1.0, 0.0
    block = config.normalization_patch_size if normalization == "layer_norm" else 1
    return normalization, block, scale, shift


def _settings_lost(config: FluxVAEConfig, layout: str, state: dict[str, torch.Tensor]) -> list[tuple]:
    """(field, value, value after loading) for each setting of ``config`` a ``layout`` file would not keep."""
    if layout == "diffusers":
        reloaded = config_from_diffusers(config_to_diffusers(config))
    elif layout == "nextstep":
        reloaded = config_from_nextstep(config_to_nextstep(config))
    else:  # a bare FLUX.1 file: the architecture, read back as FLUX.1's VAE (groups given when loading)
        reloaded = config_from_bfl_state(state, config.norm_groups).replace(**FLUX_LATENT_SETTINGS)
    lost = [(name, getattr(config, name), getattr(reloaded, name))
            for name in ("norm_groups", "deterministic", "patch_size")
            if getattr(config, name) != getattr(reloaded, name)]
    names = ("normalization", "normalization_patch_size", "scaling_factor", "shift_factor")
    mine, theirs = _latent_handling(config), _latent_handling(reloaded)
    lost += [(name, a, b) for name, a, b in zip(names, mine, theirs) if a != b]
    return lost


def save_flux_vae(vae: FluxVAE, directory: str | Path, *, layout: str = "native", lossy: bool = False) -> None:
    """Write ``vae`` in one of `LAYOUTS`, atomically (the directory appears complete or not at all).

    Raises:
        ValueError: an unknown layout, or one whose files cannot describe ``vae`` so that it loads as the
            same tokenizer (a decoder wider than the encoder, GroupNorm groups other than 32 in the
            ``nextstep`` layout, latent handling a diffusers or FLUX.1 file has no field for), naming
            each setting it would lose, unless ``lossy``. (A FLUX.1 file never holds its groups:
            `load_flux_vae` takes them.)

    Args:
        vae: the tokenizer to write.
        directory: the folder to write (replaced atomically).
        layout: one of `LAYOUTS`.
        lossy: write the weights even where the layout cannot hold every latent setting; they are
            then given to `load_flux_vae` again (``normalization="layer_norm"``, ...).
    """
    save_flux_vae_state(vae.state_dict(), vae.config, directory, layout=layout, lossy=lossy)


def save_flux_vae_state(state: dict[str, torch.Tensor], config: FluxVAEConfig, directory: str | Path, *,
                        layout: str = "native", lossy: bool = False) -> None:
    """`save_flux_vae` for a `FluxVAE` state dict described by ``config``.

    A model directory that keeps some of the tokenizer's settings elsewhere
    writes its VAE with a config that leaves them at their defaults: the
    NextStep-1 release keeps the patch size in the model's ``config.json``
    (``latent_patch_size``), not in ``vae/config.json``.

    Args:
        state: the weights, under `FluxVAE`'s (LDM) names.
        config: the config to write, and to check ``layout`` against.
        directory: the folder to write (replaced atomically).
        layout: one of `LAYOUTS`.
        lossy: as for `save_flux_vae`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; known: {list(LAYOUTS)}")
    if layout != "native" and not config.symmetric:
        raise ValueError(f"the {layout} layout describes one width for encoder and decoder, found a decoder "
                         f"{config.decoder_width} wide with {config.decoder_groups} groups beside an encoder "
                         f"{config.ch} wide with {config.norm_groups}; save it in the native layout")
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if layout != "native" and not lossy:
        lost = [f"{name}={mine!r} (it would load as {theirs!r})"
                for name, mine, theirs in _settings_lost(config, layout, state)]
        if lost:
            raise ValueError(f"the {layout} layout cannot hold {', '.join(lost)}; save it in the native layout, "
                             "or pass lossy=True and give these settings to load_flux_vae")
    with atomic_directory(directory, markers=("config.json", "ae.safetensors")) as staging:
        if layout == "native":
            config.save(staging / "config.json")
            save_file(state, str(staging / NATIVE_WEIGHTS), metadata={"format": "pt"})
        elif layout == "diffusers":
            (staging / "config.json").write_text(json.dumps(config_to_diffusers(config), indent=2))
            save_file(bfl_to_diffusers(state, len(config.ch_mult)), str(staging / DIFFUSERS_WEIGHTS),
                      metadata={"format": "pt"})
        elif layout == "nextstep":
            (staging / "config.json").write_text(json.dumps(config_to_nextstep(config), indent=2))
            torch.save(state, str(staging / "checkpoint.pt"))
        else:
            save_file(state, str(staging / "ae.safetensors"), metadata={"format": "pt"})
