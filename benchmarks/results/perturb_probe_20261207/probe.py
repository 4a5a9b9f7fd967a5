"""Does a clean-only measure of adversarial neuron sensitivity (ANP's own premise) rank pruned sets by ASR?
For each cell/method on disk: the unpruned model, the suspects alone, the stored rule (walk), and the oracle
count in mask order. For each: clean acc, ASR (reference only), and under PGD neuron perturbation of the BN
affine params (eps, 5 sign steps maximising clean CE on the deciding set): perturbed acc and the share of
perturbed predictions that go to the most predicted wrong class."""
import ast, glob, json, os, sys, re, time
import torch, torch.nn as nn, torch.nn.functional as F
from torch.func import functional_call
torch.set_num_threads(int(os.environ.get("T", "1")))
from anp_fast_bench import quality
from anp_fast import load_masks, selection
from anp_fast.pruning import prune, pruned_count
from anp_fast.selection import _clean_tensors

only = re.compile(sys.argv[1] if len(sys.argv) > 1 else "")
EPS = [float(e) for e in os.environ.get("EPS", "0.2,0.4").split(",")]

def sensitivity(model, x, y, eps, steps=5, seed=0):
    model = model.eval()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    base = {n: (m.weight.detach(), m.bias.detach()) for n, m in bns.items()}
    g = torch.Generator().manual_seed(seed)
    d = {n: ((torch.rand(w.shape, generator=g) * 2 - 1) * eps).requires_grad_() for n, (w, _) in base.items()}
    e = {n: ((torch.rand(w.shape, generator=g) * 2 - 1) * eps).requires_grad_() for n, (w, _) in base.items()}
    def run():
        params = {}
        for n, (w, b) in base.items():
            params[n + ".weight"] = w * (1 + d[n]); params[n + ".bias"] = b * (1 + e[n])
        return functional_call(model, params, (x,))
    for _ in range(steps):
        loss = F.cross_entropy(run(), y)
        gd = torch.autograd.grad(loss, list(d.values()) + list(e.values()))
        with torch.no_grad():
            for t, gt in zip(list(d.values()) + list(e.values()), gd):
                t.add_(eps / 2 * gt.sign()).clamp_(-eps, eps)
    with torch.no_grad():
        out = run()
    pred = out.argmax(1)
    wrong = pred[pred != y]
    share = (torch.bincount(wrong, minlength=out.shape[1]).max().item() / max(1, len(wrong)))
    top = torch.bincount(wrong, minlength=out.shape[1]).argmax().item() if len(wrong) else -1
    return {"eps": eps, "acc": float((pred == y).float().mean()), "loss": float(F.cross_entropy(out, y)),
            "wrong_share": share, "wrong_top": top}

s = quality.Settings(work="/work/matrix")
for ev_path in sorted(glob.glob("/work/matrix/*/*/s*/*/eval.json")):
    if not only.search(ev_path):
        continue
    parts = ev_path.split("/")
    data, ar, sd, method = parts[3], parts[4], parts[5], parts[6]
    if not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(ev_path)), "backdoored.safetensors")):
        continue
    if not os.path.exists(os.path.join(os.path.dirname(ev_path), "masks.txt")):
        continue
    out_path = f"OUT/{data}_{ar}_{sd}_{method}.json"
    if os.path.exists(out_path):
        continue
    t = time.time()
    attack, rate = ar.split("@")
    cell = quality.Cell(data, attack, float(rate), int(sd[1:]))
    model, _, ev = quality._setup(cell, s)
    masks = load_masks(os.path.join(s.work, cell.key, method, "masks.txt"))
    base = json.load(open(ev_path))
    (x, y), held = _clean_tensors(ev, split=True)
    x, y = x[:256], y[:256]
    rule = base["chosen"]["rule"]
    sus_rule, _ = selection.walk(model, masks, ev, budget_points=s.budget, max_fraction=0)
    variants = {"none": None, "suspects": sus_rule, "walk": rule, "oracle": {"number": base["oracle"]["number"]}}
    rows = {}
    for vname, r in variants.items():
        m = model if r is None else prune(model, masks, **r)
        a = ev(m) if vname != "walk" else base["after"]
        if vname == "none":
            a = base["before"]
        rows[vname] = {"acc": a["acc"], "asr": a["asr"], "pruned": 0 if r is None else pruned_count(masks, **r),
                       "sens": [sensitivity(m, x, y, eps) for eps in EPS]}
    json.dump({"cell": cell.key, "method": method, "rows": rows}, open(out_path, "w"))
    print(cell.key, method, f"[{time.time()-t:.0f}s]")
    for vname, r in rows.items():
        print(f"  {vname:9s} n={r['pruned']:4d} acc {100*r['acc']:5.1f} asr {100*r['asr']:5.1f} | " +
              " ".join(f"eps{q['eps']}: pacc {100*q['acc']:5.1f} loss {q['loss']:.2f} wshare {q['wrong_share']:.2f} top {q['wrong_top']}"
                       for q in r["sens"]), flush=True)
