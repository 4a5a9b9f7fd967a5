"""A finished demo run (DIR named sS_tT) as the demo saw it: model, masks and the demo's evaluator."""
import torch
from torch.utils.data import TensorDataset
from anp_fast.datasets import load_digits
from anp_fast.attacks import parse_trigger, triggered_test_set
from anp_fast.models import resnet18
from anp_fast.maskfile import load_masks
from anp_fast.pipeline import Evaluator


def load_run(run):
    seed = int(run.rstrip("/").split("/")[-1].split("_")[0][1:])
    splits = load_digits(seed=seed, holdout_fraction=0.1)
    x_asr, y_asr = triggered_test_set(splits.test.x, splits.test.y, parse_trigger("badnets", (1, 16, 16)), 0)
    model = resnet18(num_classes=10, in_channels=1, width=16)
    model.load_state_dict(torch.load(f"{run}/backdoored.pt", weights_only=True))
    model.eval()
    ev = Evaluator(torch.device("cpu"), TensorDataset(splits.test.x, splits.test.y),
                   TensorDataset(splits.holdout.x, splits.holdout.y), TensorDataset(x_asr, y_asr), 0,
                   clean=TensorDataset(splits.clean.x, splits.clean.y))
    return model, load_masks(f"{run}/masks.txt"), ev
