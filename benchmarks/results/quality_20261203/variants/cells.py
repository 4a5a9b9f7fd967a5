"""Apply walk variants to finished matrix cells: python cells.py WORK '[{OPTIONS}...]' OUT.jsonl [cell-glob]"""
import glob, json, os, sys, time
import torch
sys.path.insert(0, '/work/main/benchmarks')
import quality as q
from anp_fast import load_masks
from anp_fast.pruning import prune
from anp_fast.selection import walk

work, variants, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pattern = sys.argv[4] if len(sys.argv) > 4 else '*/*/s*/*/eval.json'
s = q.Settings(work=work)
for ev_path in sorted(glob.glob(os.path.join(work, pattern))):
    folder = os.path.dirname(ev_path)
    rel = os.path.relpath(folder, work)
    data, ar, seed, method = rel.split('/')
    attack, rate = ar.split('@')
    cell = q.Cell(data, attack, float(rate), int(seed[1:]))
    model, _, evaluator = q._setup(cell, s)
    masks = load_masks(os.path.join(folder, 'masks.txt'))
    before = json.load(open(ev_path))['before']
    for v in variants:
        t0 = time.perf_counter()
        rule, report = walk(model, masks, evaluator, **v)
        after = evaluator(prune(model, masks, **rule))
        row = dict(cell=rel, variant=v, threads=torch.get_num_threads(),
                   pruned=sum(len(i) for i in rule["neurons"].values()), **report,
                   drop=round(100 * (before["acc"] - after["acc"]), 2), asr_before=round(100 * before["asr"], 1),
                   asr=round(100 * after["asr"], 1), s=round(time.perf_counter() - t0, 1))
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
