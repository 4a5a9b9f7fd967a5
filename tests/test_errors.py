"""Bad input gets a clear error of anp_fast's own, never a deep traceback from inside torch."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from anp_fast import (ANPConfig, ANPEngine, ConfigError, DataError, DivergenceError, Interrupted, ModelError,
                      optimize_masks)


@pytest.mark.parametrize("kwargs,match", [
    ({"epsilon": 0.4}, "no field 'epsilon'; valid fields: eps, steps"),
    ({"eps": -1}, r"ANPConfig.eps=-1: must be >= 0"),
    ({"eps": float("nan")}, "eps=nan: must be a finite number"),
    ({"steps": 0}, "steps=0: must be >= 1"),
    ({"steps": 1.5}, "steps=1.5: must be an integer"),
    ({"alpha": 1.2}, r"alpha=1.2: must be in \[0, 1\]"),
    ({"lr": 0}, "lr=0: must be > 0"),
    ({"momentum": 1.0}, r"momentum=1.0: must be in \[0, 1\)"),
    ({"iters": 0}, "iters=0: must be >= 1"),
    ({"batch_size": True}, "batch_size=True: must be an integer"),
    ({"layers": "convs"}, "layers='convs': must be one of auto, norms, gates"),
    ({"train_mode": "eval"}, "train_mode='eval': must be one of all, norms"),
    ({"precision": "fp8"}, "precision='fp8': must be one of fp32"),
    ({"project_noise": "yes"}, "project_noise='yes': must be True or False"),
    ({"seed": 2 ** 64}, r"seed=18446744073709551616: must be < 2\*\*63"),
    ({"cuda_graphs": 1}, "cuda_graphs=1: must be True or False"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ANPConfig(**kwargs)


def test_config_is_a_value_error_and_replace_validates():
    with pytest.raises(ValueError):
        ANPConfig().replace(eps=-0.1)


def _data(tiny_batches):
    return torch.cat([b[0] for b in tiny_batches]), torch.cat([b[1] for b in tiny_batches])


@pytest.mark.parametrize("wrap", ["tensors", "dataset", "loader"])
def test_labels_out_of_range(tiny_resnet, tiny_batches, wrap):
    x, y = _data(tiny_batches)
    y = y.clone()
    y[-1] = 9  # the model has 5 outputs
    data = {"tensors": (x, y), "dataset": TensorDataset(x, y),
            "loader": DataLoader(TensorDataset(x, y), batch_size=8)}[wrap]
    with pytest.raises(DataError, match=r"labels must lie in \[0, 5\) .* found labels from [01] to 9"):
        optimize_masks(tiny_resnet, data, ANPConfig(iters=30, batch_size=8), progress=False)


def test_negative_and_float_labels(tiny_resnet, tiny_batches):
    x, y = _data(tiny_batches)
    with pytest.raises(DataError, match="found labels from -1"):
        optimize_masks(tiny_resnet, (x, y - 1), ANPConfig(iters=2, batch_size=4), progress=False)
    with pytest.raises(DataError, match="integer class indices"):
        optimize_masks(tiny_resnet, (x, y.float()), ANPConfig(iters=2, batch_size=4), progress=False)


@pytest.mark.parametrize("data", [
    (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)),
    TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)),
    DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4),
])
def test_empty_clean_set(tiny_resnet, data):
    with pytest.raises(DataError, match="clean set is empty"):
        optimize_masks(tiny_resnet, data, ANPConfig(iters=2), progress=False)


def test_bad_clean_data_types(tiny_resnet):
    with pytest.raises(DataError, match="must be a Dataset, a DataLoader or an"):
        optimize_masks(tiny_resnet, [1, 2, 3], ANPConfig(iters=2), progress=False)
    with pytest.raises(DataError, match="differ in length: 4 vs 3"):
        optimize_masks(tiny_resnet, (torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long)),
                       ANPConfig(iters=2), progress=False)


def test_nan_loss_names_the_iteration(tiny_resnet, tiny_batches):
    calls = []

    def noise(noise_w, noise_b, eps):
        calls.append(1)
        noise_w.uniform_(-eps, eps)
        noise_b.uniform_(-eps, eps)
        if len(calls) == 7:
            noise_w.fill_(float("nan"))

    with pytest.raises(DivergenceError, match="became nan at iteration 7") as info:
        optimize_masks(tiny_resnet, _data(tiny_batches), ANPConfig(iters=12, batch_size=8), progress=False,
                       noise_init=noise, check_every=5)
    assert info.value.iteration == 7
    assert len(calls) == 10  # stopped at the first check after the NaN, not at the end


def test_model_errors(tiny_batches):
    with pytest.raises(ModelError, match="nothing to perturb"):
        ANPEngine(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)))

    class Seg(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.c(x))

    with pytest.raises(ModelError, match=r"logits must be \(batch, classes\); got shape \(12, 3, 8, 8\)"):
        ANPEngine(Seg()).step(*tiny_batches[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(tiny_resnet):
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        ANPEngine(tiny_resnet, ANPConfig(device="cuda"))


def test_interrupt_keeps_the_masks(tiny_resnet, tiny_batches):
    def noise(noise_w, noise_b, eps):
        if noise.calls == 3:
            raise KeyboardInterrupt
        noise.calls += 1
        noise_w.zero_()
        noise_b.zero_()
    noise.calls = 0
    with pytest.raises(Interrupted) as info:
        optimize_masks(tiny_resnet, _data(tiny_batches), ANPConfig(iters=10, batch_size=8), progress=False,
                       noise_init=noise)
    result = info.value.result
    assert len(result.loss_history) == 3 and result.timings["iters"] == 3
    assert any(float((1 - m).abs().max()) > 0 for m in result.masks.values())
