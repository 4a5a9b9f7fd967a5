"""Apply anp_fast.selection.choose (as the demo does) to a finished demo run; print the outcome."""
import json, sys, time, torch
from torch.utils.data import TensorDataset
from anp_fast.data import load_digits
from anp_fast.attacks import parse_trigger, triggered_test_set
from anp_fast.models import resnet18
from anp_fast.maskfile import load_masks
from anp_fast.pipeline import Evaluator
from anp_fast.pruning import prune, pruned_count
from anp_fast.selection import choose
run, mode = sys.argv[1], sys.argv[2]; budget = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
seed = int(run.split("_")[0][1:])
splits = load_digits(seed=seed, holdout_fraction=0.1)
trig = parse_trigger("badnets", (1, 16, 16))
x_asr, y_asr = triggered_test_set(splits.test.x, splits.test.y, trig, 0)
model = resnet18(num_classes=10, in_channels=1, width=16)
model.load_state_dict(torch.load(f"{run}/backdoored.pt", weights_only=True)); model.eval()
masks = load_masks(f"{run}/masks.txt")
ev = Evaluator(torch.device("cpu"), TensorDataset(splits.test.x, splits.test.y),
               TensorDataset(splits.holdout.x, splits.holdout.y), TensorDataset(x_asr, y_asr), 0,
               clean=TensorDataset(splits.clean.x, splits.clean.y))
before = ev(model); t0 = time.perf_counter()
rule = choose(model, masks, ev, budget, mode=mode)["rule"]; dt = time.perf_counter() - t0
after = ev(prune(model, masks, **rule))
drop = 100 * (before["acc"] - after["acc"])
res = {"run": run, "mode": mode, "threads": torch.get_num_threads(), "pruned": pruned_count(masks, **rule),
       "acc_before": before["acc"], "acc": after["acc"], "drop": drop, "asr": after["asr"], "choose_s": dt,
       "pass": drop <= 2 + 1e-9 and after["asr"] <= 0.05}
print(json.dumps(res), flush=True)
with open("/work/runs/demos/apply.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
