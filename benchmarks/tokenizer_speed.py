"""Encode / decode throughput of the FLUX-shaped VAE at 256x256 on this machine.

Usage: python benchmarks/tokenizer_speed.py [--batch 2] [--size 256] [--output NAME]
Writes benchmarks/results/tokenizer_speed.json (or --output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, write_results  # noqa: E402

from nextstep.presets import flux_vae_config  # noqa: E402
from nextstep.tokenizers import FluxVAE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="tokenizer_speed", help="results name or path (common.results_path)")
    args = parser.parse_args()
    rows = []
    for name in ("tiny", "flux"):
        torch.manual_seed(0)
        vae = FluxVAE(flux_vae_config(name)).eval()
        images = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
        with torch.inference_mode():
            latents = vae.encode(images)
            encode = best_time(lambda: vae.encode(images), args.repeats)
            decode = best_time(lambda: vae.decode(latents), args.repeats)
        row = {"shape": name, "parameters": sum(p.numel() for p in vae.parameters()),
               "batch": args.batch, "size": args.size,
               "encode_images_per_s": args.batch / encode, "decode_images_per_s": args.batch / decode}
        rows.append(row)
        print(f"{name:>5}: {row['parameters'] / 1e6:6.2f}M params  encode {row['encode_images_per_s']:8.2f} img/s"
              f"  decode {row['decode_images_per_s']:8.2f} img/s  ({args.size}x{args.size}, batch {args.batch})")
    path = write_results(args.output, {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
