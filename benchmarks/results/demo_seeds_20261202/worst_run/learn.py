"""Learn ANP masks on a finished demo run's backdoored model (the demo's clean split), keep snapshots.
usage: learn.py RUN SEED ITERS TAG [eps]"""
import sys, time, torch
sys.path.insert(0, "..")
from demo_run import load_run
from anp_fast import ANPConfig, save_masks
from anp_fast.engine import optimize_masks
from anp_fast.datasets import load_digits
run, seed, iters, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
eps = float(sys.argv[5]) if len(sys.argv) > 5 else 0.4
model, _, ev = load_run(run)
dseed = int(run.rstrip("/").split("/")[-1].split("_")[0][1:])
splits = load_digits(seed=dseed, holdout_fraction=0.1)
cfg = ANPConfig(iters=iters, seed=seed, precision="bf16", eps=eps)
snaps = []
def keep(it, engine):
    snaps.append(engine.state.mask.detach().cpu().clone()); return False
t0 = time.perf_counter()
res = optimize_masks(model, (splits.clean.x, splits.clean.y), cfg, progress=False, monitor=keep, monitor_every=100)
save_masks(res.masks, f"./{tag}.masks.txt")
torch.save({"masks": torch.stack(snaps), "layers": list(res.masks.keys())}, f"./{tag}.snaps.pt")
print(tag, "done", time.perf_counter() - t0, flush=True)
