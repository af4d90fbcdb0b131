import json, os, time
import torch
from nextstep.backbones import Qwen2Backbone, Qwen2BackboneConfig, positions_from_mask, xformers_available
dev = "cuda" if torch.cuda.is_available() else "cpu"
out = {"device": dev, "torch": torch.__version__, "xformers": xformers_available()}
cfg = Qwen2BackboneConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2)
torch.manual_seed(0)
m = Qwen2Backbone(cfg).to(dev, torch.bfloat16).eval()
def run(model, steps=8, dtype=torch.bfloat16):
    g = torch.Generator(device=dev).manual_seed(0)
    emb = torch.randn(2, 12 + steps, 512, device=dev, dtype=dtype, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool, device=dev); mask[1, :3] = False
    pos = positions_from_mask(mask)
    ones = torch.ones(2, 1, dtype=torch.bool, device=dev)
    with torch.no_grad():
        c = model.new_cache(2, 12 + steps + 5)
        outs = [model(emb[:, :12], pos, mask, c)[:, -1:]]
        for i in range(steps):
            outs.append(model(emb[:, 12 + i:13 + i], pos[:, -1:] + 1 + i, ones, c))
        full_mask = torch.cat([mask, torch.ones(2, steps, dtype=torch.bool, device=dev)], 1)
        full = model(emb[:, :12 + steps], positions_from_mask(full_mask), full_mask)[:, 11:]
    return torch.cat(outs, 1).float(), full.float()
base, full = run(m)
out["bf16_cached_vs_full_max_abs"] = (base - full).abs().max().item()
out["bf16_scale"] = base.abs().max().item()
m.set_attention_backend("eager"); eager, _ = run(m); m.set_attention_backend("sdpa")
out["bf16_sdpa_vs_eager_max_abs"] = (base - eager).abs().max().item()
m32 = Qwen2Backbone(cfg).to(dev).eval(); m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
a, b = run(m32, dtype=torch.float32)
out["fp32_cached_vs_full_max_abs"] = (a - b).abs().max().item()
m32.set_attention_backend("eager"); a2, _ = run(m32, dtype=torch.float32)
out["fp32_sdpa_vs_eager_max_abs"] = (a - a2).abs().max().item()
m.compile_decode()
t = time.time(); comp, _ = run(m); torch.cuda.synchronize() if dev == "cuda" else None
out["compile_seconds"] = time.time() - t
comp2, _ = run(m)
out["compiled_vs_eager_max_abs"] = (comp - base).abs().max().item()
out["compiled_second_cache_vs_eager_max_abs"] = (comp2 - base).abs().max().item()
print(json.dumps(out), flush=True)
if os.environ.get("OUT"):
    open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w").write(json.dumps(out, indent=1))
