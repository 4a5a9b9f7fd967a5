"""Dense pruning curve of a finished demo run (clean-data metrics and test ACC/ASR per number pruned)."""
import json, sys, torch
from torch.utils.data import TensorDataset
from anp_fast.data import load_digits
from anp_fast.attacks import parse_trigger, triggered_test_set
from anp_fast.models import resnet18
from anp_fast.maskfile import load_masks
from anp_fast.pipeline import Evaluator
from anp_fast.pruning import sweep

run = sys.argv[1]
summ = json.load(open(f"{run}/summary.json"))
seed = summ["config"]["seed"]
splits = load_digits(seed=seed, holdout_fraction=0.1)
trig = parse_trigger("badnets", (1, 16, 16))
x_asr, y_asr = triggered_test_set(splits.test.x, splits.test.y, trig, 0)
model = resnet18(num_classes=10, in_channels=1, width=16)
model.load_state_dict(torch.load(f"{run}/backdoored.pt", weights_only=True)); model.eval()
masks = load_masks(f"{run}/masks.txt")
ev = Evaluator(torch.device("cpu"), TensorDataset(splits.test.x, splits.test.y),
               TensorDataset(splits.holdout.x, splits.holdout.y), TensorDataset(x_asr, y_asr), 0,
               clean=TensorDataset(splits.clean.x, splits.clean.y))
numbers = list(range(0, 240, 2)) + list(range(240, 600, 12))
rows = sweep(model, masks, ev, numbers=numbers)
json.dump(rows, open(f"{run}/dense.json", "w"))
print(run, "done", len(rows))
