import glob, time, json, sys
import torch
import fastsoup
from benchmarks.greedy.data import Config
from benchmarks.greedy.model import make_model
cfg = Config(n=16, classes=10, heldout=4096, train=8192, raw=64, resize=36, crop=32, batch_size=128, dim=64, depth=3, heads=4, mlp=256)
paths = sorted(glob.glob("/tmp/fastsoup-compare-greedy/checkpoints/*.safetensors"))
m = make_model(cfg)
x = torch.randn(128, 3, 32, 32)
try:
    from fastsoup.mixing import load_checkpoint
except ImportError:
    from fastsoup.soup import _load_checkpoint as load_checkpoint
cks = [fastsoup.open_checkpoint(p) for p in paths]
st = {}
for ck in cks: load_checkpoint(ck, m, staging=st)
tl = te = 0.0
for r in range(3):
    for ck in cks:
        t = time.perf_counter(); load_checkpoint(ck, m, staging=st); tl += time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(8): m(x)
        te += time.perf_counter() - t
print(json.dumps({"tree": fastsoup.__file__.split('/')[2], "load": round(tl, 3), "eval": round(te, 3), "n": len(paths)}))
