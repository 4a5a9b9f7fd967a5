import sys, json, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), "..", "demo_seeds_20261202"))
from demo_run import load_run
from anp_fast import load_masks
from anp_fast.selection import walk
from anp_fast.pruning import prune
seed, BF16, FP32 = sys.argv[1], sys.argv[2], sys.argv[3]
a = load_masks(f"{BF16}/s{seed}_t1/masks.txt"); b = load_masks(f"{FP32}/s{seed}_t1/masks.txt")
fa = torch.cat([a[k] for k in a]); fb = torch.cat([b[k] for k in a])
model, masks, ev = load_run(f"{BF16}/s{seed}_t1")
ra, _ = walk(model, a, ev)
sa = {(k, i) for k, v in ra["neurons"].items() for i in v}
s = json.load(open(f"{FP32}/s{seed}_t1/summary.json"))
sb = {(k, i) for k, v in s["chosen"]["neurons"].items() for i in v}
bk = torch.load(f"{BF16}/s{seed}_t1/backdoored.pt", weights_only=True); fk = torch.load(f"{FP32}/s{seed}_t1/backdoored.pt", weights_only=True)
same_model = all(torch.equal(bk[k], fk[k]) for k in bk)
print(json.dumps({"seed": seed, "same_backdoored_model": same_model, "mask_max_abs_diff": float((fa - fb).abs().max()),
  "mask_mean_abs_diff": float((fa - fb).abs().mean()), "pruned_bf16": len(sa), "pruned_fp32": len(sb), "common": len(sa & sb),
  "fp32_after": {k: s["after"][k] for k in ("acc", "asr")}, "fp32_before": {k: s["before"][k] for k in ("acc", "asr")}}))
