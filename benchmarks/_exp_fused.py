import sys, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
from xquant_fx.kernels import moe as km
from xquant_fx.moe import experts_reference
from bench_moe import graph_time
torch.manual_seed(0)
e, hid, inter, dev, bf16 = 128, 2048, 768, "cuda", torch.bfloat16
gate_up = torch.randn(e, 2 * inter, hid, device=dev, dtype=bf16) * 0.02
down = torch.randn(e, hid, inter, device=dev, dtype=bf16) * 0.02
rw = torch.randn(e, hid, device=dev, dtype=bf16) * 0.02
x = torch.randn(1, hid, device=dev, dtype=bf16)
VARIANTS = [dict(), dict(ROUTE=1), dict(ROUTE=2), dict(POLL=1), dict(TICKET=0), dict(ROUTE=1, POLL=1), dict(ROUTE=1, POLL=1, TICKET=0)]
for k in (8, 4):
    v, i, _ = km.router(x, rw, k, normalize=True, values_dtype=bf16)
    ref = experts_reference(x, i, v, gate_up, down).float()
    routes = (i.reshape(-1).clone(), v.reshape(-1).clone())
    for prog in (192, 384):
        km.DECODE = km.Decode(up_programs=prog)
        def two():
            vv, ii, _ = km.router(x, rw, k, normalize=True, values_dtype=bf16)
            return km.moe_experts(x, ii, vv, gate_up, down)
        row = [f"k={k} prog={prog} two={graph_time(two, 500)*1e6:.1f} experts={graph_time(lambda: km.moe_experts(x, i, v, gate_up, down), 500)*1e6:.1f} router={graph_time(lambda: km.router(x, rw, k, normalize=True, values_dtype=bf16), 500)*1e6:.1f} gemv={graph_time(lambda: km.router_logits(x, rw, bf16), 500)*1e6:.1f}"]
        for var in VARIANTS:
            fn = lambda: km.moe_decode(x, rw, gate_up, down, k, normalize=True, values_dtype=bf16, variant=var, routes=routes if var.get("ROUTE") == 1 else None)[0]
            err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
            row.append(f"{var}: {graph_time(fn, 500)*1e6:.1f} ({err:.0e})")
        print(" | ".join(row), flush=True)
