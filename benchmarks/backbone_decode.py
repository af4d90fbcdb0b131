"""One-token decode speed of Qwen2Backbone against transformers.Qwen2Model with the same weights.

CPU part: decode tokens per second by batch size and context length, for the
``tiny`` preset's backbone and a ~100M-parameter configuration. Each row runs
our backbone (eager; compiled with ``compile_decode()`` unless ``--no-compile``;
compiled ahead of time with ``compile_decode(ahead_of_time=True)`` unless
``--no-ahead-of-time``) and ``transformers.Qwen2Model`` with its default cache
(``DynamicCache``) in the same process, interleaved, on the same weights, and
reports the ratio. Both are called the way generation calls a backbone, under
``torch.inference_mode()`` (which ours enters by itself when gradients are off):
ours with explicit positions and a ones mask, transformers with
``inputs_embeds`` and its cache.

GPU part (when CUDA is available): per-token latency of the Qwen2.5-14B shape
in bf16 at batch 1 against the memory-bandwidth floor, the bytes of the decoder
weights divided by the measured device-to-device copy bandwidth.

Usage:
    python benchmarks/backbone_decode.py                      # CPU rows (+ GPU rows with a GPU)
    python benchmarks/backbone_decode.py --configs tiny --batch-sizes 2 --contexts 16,128
    python benchmarks/backbone_decode.py --gpu-only --gpu-compile

Writes benchmarks/results/backbone_decode.json (or --output).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_results  # noqa: E402

from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig  # noqa: E402
from nextstep.presets import tiny  # noqa: E402

CONFIGS = {
    "tiny": lambda: tiny().backbone.config,
    "100m": lambda: Qwen2BackboneConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
        num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
}


def hf_model(config: Qwen2BackboneConfig, seed: int):
    """A random ``transformers.Qwen2Model`` of the same shape (its default sdpa attention)."""
    from transformers import Qwen2Config, Qwen2Model

    fields = config.to_hf_config()
    fields.pop("architectures")
    fields.pop("model_type")
    torch.manual_seed(seed)
    return Qwen2Model(Qwen2Config(**fields, attn_implementation="sdpa")).eval()


def paired(config: Qwen2BackboneConfig, seed: int = 0):
    """transformers' model and ours holding equal weights."""
    reference = hf_model(config, seed)
    ours = Qwen2Backbone(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def hf_cache_argument(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Decoder:
    """Prefill once, then time one-token steps at a fixed context (cropping back after each block)."""

    def __init__(self, name, model, batch, context, capacity, hidden_size, generator):
        self.name, self.model, self.batch, self.context = name, model, batch, context
        self.embeds = torch.randn(batch, 1, hidden_size, generator=generator)
        prompt = torch.randn(batch, context, hidden_size, generator=generator)
        self.step_mask = torch.ones(batch, 1, dtype=torch.bool)
        with torch.no_grad():
            if name == "transformers":
                from transformers import DynamicCache

                self.argument = hf_cache_argument(model)
                try:
                    self.cache = DynamicCache(config=model.config)
                except TypeError:
                    self.cache = DynamicCache()
                model(inputs_embeds=prompt, use_cache=True, **{self.argument: self.cache})
            else:
                self.cache = model.new_cache(batch, capacity)
                positions = torch.arange(context).expand(batch, context)
                model(prompt, positions, torch.ones(batch, context, dtype=torch.bool), self.cache)

    def crop(self) -> None:
        if self.name == "transformers":
            excess = self.cache.get_seq_length() - self.context
            if excess:
                self.cache.crop(-excess)
        else:
            self.cache.crop(self.context)

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        self.crop()
        model, embeds, cache = self.model, self.embeds, self.cache
        with torch.inference_mode():  # both in their fastest mode (ours enters it anyway without gradients)
            if self.name == "transformers":
                kwargs = {self.argument: cache, "use_cache": True}
                start = time.perf_counter()
                for _ in range(steps):
                    model(inputs_embeds=embeds, **kwargs)
            else:
                position = torch.full((self.batch, 1), self.context)
                start = time.perf_counter()
                for step in range(steps):
                    model(embeds, position + step, self.step_mask, cache)
        return (time.perf_counter() - start) / steps


def cpu_rows(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs:
        config = CONFIGS[name]()
        reference, ours = paired(config, seed=0)
        compiled = None
        if args.compile:
            compiled = Qwen2Backbone(config).eval()
            compiled.load_state_dict(ours.state_dict())
            # One graph per cache shape (dynamic=False): the benchmark's shapes are fixed per row.
            compiled.compile_decode(dynamic=not args.static_compile)
        ahead = None
        if args.ahead_of_time:
            ahead = Qwen2Backbone(config).eval()
            ahead.load_state_dict(ours.state_dict())
            start = time.perf_counter()
            ahead.compile_decode(ahead_of_time=True)  # one library for every batch size and length
            ahead_seconds = time.perf_counter() - start
            if ahead._compiled_decode is None:
                raise SystemExit("ahead-of-time compilation failed (see the warning above)")
        parameters = sum(p.numel() for p in ours.parameters())
        steps = args.steps if args.steps else (50 if parameters < 20e6 else 8)
        for batch in args.batch_sizes:
            for context in args.contexts:
                generator = torch.Generator().manual_seed(context)
                capacity = context + steps + 1
                decoders = [Decoder("ours", ours, batch, context, capacity, config.hidden_size, generator),
                            Decoder("transformers", reference, batch, context, capacity, config.hidden_size,
                                    torch.Generator().manual_seed(context))]
                compile_seconds = None
                if compiled is not None:
                    if args.static_compile:
                        torch._dynamo.reset()  # one graph per row; stay clear of the recompile limit
                    decoders.append(Decoder("ours_compiled", compiled, batch, context, capacity,
                                            config.hidden_size, torch.Generator().manual_seed(context)))
                    start = time.perf_counter()
                    decoders[-1].run(2)  # compiles (or recompiles for a new cache shape)
                    compile_seconds = time.perf_counter() - start
                if ahead is not None:
                    decoders.append(Decoder("ours_ahead_of_time", ahead, batch, context, capacity,
                                            config.hidden_size, torch.Generator().manual_seed(context)))
                times = {d.name: [] for d in decoders}
                for decoder in decoders:  # warm-up
                    decoder.run(max(2, steps // 5))
                for repeat in range(args.repeats):
                    # Alternate the order so that drift on a shared machine hits all alike.
                    order = decoders if repeat % 2 == 0 else decoders[::-1]
                    for decoder in order:
                        times[decoder.name].append(decoder.run(steps))
                median = {key: statistics.median(value) for key, value in times.items()}
                row = {
                    "config": name, "parameters": parameters, "batch": batch, "context": context,
                    "steps_per_repeat": steps, "repeats": args.repeats,
                    "ours_ms": median["ours"] * 1e3,
                    "transformers_ms": median["transformers"] * 1e3,
                    "ours_tokens_per_s": batch / median["ours"],
                    "transformers_tokens_per_s": batch / median["transformers"],
                    "speedup": median["transformers"] / median["ours"],
                }
                line = (f"{name:>5} B={batch:<2} ctx={context:<5} ours {row['ours_ms']:8.3f} ms "
                        f"({row['ours_tokens_per_s']:9.1f} tok/s)  transformers {row['transformers_ms']:8.3f} ms "
                        f"({row['transformers_tokens_per_s']:9.1f} tok/s)  speedup {row['speedup']:5.2f}x")
                if compiled is not None:
                    row["ours_compiled_ms"] = median["ours_compiled"] * 1e3
                    row["ours_compiled_tokens_per_s"] = batch / median["ours_compiled"]
                    row["compiled_speedup"] = median["transformers"] / median["ours_compiled"]
                    row["compile_seconds"] = compile_seconds
                    line += f"  compiled {row['ours_compiled_ms']:8.3f} ms ({row['compiled_speedup']:5.2f}x)"
                if ahead is not None:
                    row["ours_ahead_of_time_ms"] = median["ours_ahead_of_time"] * 1e3
                    row["ours_ahead_of_time_tokens_per_s"] = batch / median["ours_ahead_of_time"]
                    row["ahead_of_time_speedup"] = median["transformers"] / median["ours_ahead_of_time"]
                    row["ahead_of_time_compile_seconds"] = ahead_seconds
                    line += (f"  ahead of time {row['ours_ahead_of_time_ms']:8.3f} ms "
                             f"({row['ahead_of_time_speedup']:5.2f}x)")
                print(line, flush=True)
                rows.append(row)
    return rows


def copy_bandwidth(device: torch.device, gigabytes: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    count = int(gigabytes * 2**30) // 2
    source = torch.empty(count, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    repeats = 10
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del source, target
    torch.cuda.empty_cache()
    return 2 * count * 2 / seconds


def gpu_decode_ms(decode, steps: int, repeats: int) -> float:
    """Median milliseconds per step (CUDA events)."""
    values = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decode(steps)
        end.record()
        torch.cuda.synchronize()
        values.append(start.elapsed_time(end) / steps)
    return statistics.median(values)


def gpu_rows(args, on_result) -> list[dict]:
    """Qwen2.5-14B shape in bf16: per-token latency against the bandwidth floor."""
    from transformers import DynamicCache

    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    config = Qwen2BackboneConfig()  # the Qwen2.5-14B shape
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            reference = hf_model(config, seed=0) if args.gpu_transformers else None
            if reference is not None:
                with torch.device("meta"):
                    ours = Qwen2Backbone(config)
                ours.load_state_dict(reference.state_dict(), assign=True)  # shares the tensors
                ours.rotary.to_empty(device=device)
                ours.rotary.reset_buffers()
            else:
                ours = Qwen2Backbone(config)
    finally:
        torch.set_default_dtype(previous)
    ours.eval()
    weight_bytes = sum(p.numel() * p.element_size() for name, p in ours.named_parameters()
                       if not name.startswith("embed_tokens"))
    floor_ms = weight_bytes / bandwidth * 1e3
    print(f"decoder weights {weight_bytes / 1e9:.2f} GB -> floor {floor_ms:.2f} ms/token", flush=True)
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for batch in args.gpu_batch_sizes:
        context = args.gpu_context
        capacity = context + args.gpu_steps + 1
        prompt = torch.randn(batch, context, config.hidden_size, device=device, dtype=torch.bfloat16,
                             generator=generator) * 0.02
        step_embeds = prompt[:, -1:].clone()
        ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
        positions = torch.arange(context, device=device).expand(batch, context)
        row = {"config": "qwen2.5-14b", "dtype": "bfloat16", "batch": batch, "context": context,
               "decoder_weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth,
               "floor_ms": floor_ms}
        with torch.no_grad():
            cache = ours.new_cache(batch, capacity)
            hidden = ours(prompt, positions, torch.ones(batch, context, dtype=torch.bool, device=device), cache)

            def ours_decode(steps, model=ours, cache=cache):
                cache.crop(context)
                position = torch.full((batch, 1), context, device=device)
                for step in range(steps):
                    model(step_embeds, position + step, ones, cache)

            ours_decode(3)
            row["ours_ms"] = gpu_decode_ms(ours_decode, args.gpu_steps, args.repeats)
            print(f"B={batch} ctx={context}: ours eager {row['ours_ms']:.2f} ms/token "
                  f"({row['ours_ms'] / floor_ms:.2f}x floor)", flush=True)
            if reference is not None:
                hf_cache = DynamicCache(config=reference.config)
                argument = hf_cache_argument(reference)
                expected = reference(inputs_embeds=prompt, use_cache=True, **{argument: hf_cache}).last_hidden_state
                difference = (hidden.float() - expected.float()).abs().max().item()
                scale = expected.float().abs().max().item()
                row["prefill_max_abs_difference"] = difference
                row["prefill_max_abs_reference"] = scale

                def hf_decode(steps):
                    excess = hf_cache.get_seq_length() - context
                    if excess:
                        hf_cache.crop(-excess)
                    for _ in range(steps):
                        reference(inputs_embeds=step_embeds, use_cache=True, **{argument: hf_cache})

                hf_decode(3)
                row["transformers_ms"] = gpu_decode_ms(hf_decode, args.gpu_steps, args.repeats)
                row["speedup"] = row["transformers_ms"] / row["ours_ms"]
                print(f"B={batch} ctx={context}: transformers {row['transformers_ms']:.2f} ms/token, "
                      f"prefill max |ours - transformers| {difference:.3g} (max |transformers| {scale:.3g})",
                      flush=True)
            on_result(rows + [row])
            if args.gpu_compile:
                ours.compile_decode(mode="reduce-overhead")
                start = time.perf_counter()
                ours_decode(3)
                torch.cuda.synchronize()
                row["compile_seconds"] = time.perf_counter() - start
                row["ours_compiled_ms"] = gpu_decode_ms(ours_decode, args.gpu_steps, args.repeats)
                ours.disable_compiled_decode()
                print(f"B={batch} ctx={context}: ours compiled {row['ours_compiled_ms']:.2f} ms/token "
                      f"({row['ours_compiled_ms'] / floor_ms:.2f}x floor, compiled in {row['compile_seconds']:.0f} s)",
                      flush=True)
        rows.append(row)
        on_result(rows)
        del cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,100m", type=lambda s: s.split(","))
    parser.add_argument("--batch-sizes", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--contexts", default="16,128,512", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=0, help="decode steps per timed block (0: by model size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compile_decode column on CPU")
    parser.add_argument("--no-ahead-of-time", dest="ahead_of_time", action="store_false",
                        help="skip the compile_decode(ahead_of_time=True) column on CPU")
    parser.add_argument("--dynamic-compile", dest="static_compile", action="store_false",
                        help="compile with dynamic shapes (one graph for all rows) instead of one graph per shape")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--gpu-batch-sizes", default="1", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--gpu-context", type=int, default=1024)
    parser.add_argument("--gpu-steps", type=int, default=32)
    parser.add_argument("--gpu-compile", action="store_true", help="also time compile_decode(mode='reduce-overhead')")
    parser.add_argument("--no-gpu-transformers", dest="gpu_transformers", action="store_false")
    parser.add_argument("--output", default="backbone_decode",
                        help="a name under benchmarks/results/ (.json added), or a file path")
    args = parser.parse_args()
    unknown = [name for name in args.configs if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only needs a CUDA device, found none (nothing written)")

    import transformers

    payload = {"command": " ".join(sys.argv), "transformers": transformers.__version__, "cpu_rows": [],
               "gpu_rows": []}

    def save(gpu_rows=None):
        if gpu_rows is not None:
            payload["gpu_rows"] = gpu_rows
        return write_results(args.output, payload)

    print(machine(), flush=True)
    if not args.gpu_only:
        payload["cpu_rows"] = cpu_rows(args)
        save()
    if torch.cuda.is_available() and not args.skip_gpu:
        gpu_rows(args, save)
    path = save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
