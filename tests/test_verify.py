"""Kernels that check themselves (issue 12.3): a compiled backend runs once against the eager op for each new
signature; a wrong or failing kernel is disabled for that signature with one warning and the eager op runs;
ANP_FAST_VERIFY=0 turns the check off; `anp-fast doctor` reports it all."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from anp_fast import ops
from anp_fast.ops import eager, fused, loaders, verify

CPP, _ = loaders.cpp_kernels()
needs_cpp = pytest.mark.skipif(CPP is None, reason="C++ CPU kernels not built (ANP_FAST_BUILD_CPP=0)")


class _Wrong:
    """The C++ kernels with one thing broken: ``what`` of forward output / backward coefficient sums / raise."""

    def __init__(self, what):
        self.what = what

    def supports(self, x):
        return CPP.supports(x)

    def forward(self, *args):
        if self.what == "raise":
            raise RuntimeError("kernel launch failed")
        y, mean, rstd, var = CPP.forward(*args)
        return (y * 1.001 if self.what == "output" else y), mean, rstd, var

    def backward(self, *args):
        dx, dres, sum_dy, sum_dyxc = CPP.backward(*args)
        return dx, dres, sum_dy, (sum_dyxc * 1.01 if self.what == "grad" else sum_dyxc)


_defined = {}


def _broken(what):
    if what not in _defined:  # a custom op name can be defined once per process
        _defined[what] = fused.define_batch_norm(f"verify_test_{what}", _Wrong(what))
    return _defined[what]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("ANP_FAST_VERIFY", raising=False)
    verify.forget()
    yield
    verify.forget()


def _args(c=16, training=True):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(c, generator=gen), torch.randn(c, generator=gen), torch.rand(1, c, generator=gen) + 0.5,
            torch.rand(1, c, generator=gen) + 0.5, torch.zeros(c), torch.ones(c), training, 0.1, 1e-5)


@needs_cpp
@pytest.mark.parametrize("what", ["output", "grad", "raise"])
def test_a_wrong_kernel_is_disabled_for_its_signature_and_eager_runs(what):
    fn = _broken(what)
    x = torch.randn(8, 16, 5, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fn(x, *_args())
        fn(x.detach(), *_args())  # the same signature again: no second warning, no second check
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert f"perturbed_batch_norm backend 'verify_test_{what}' disabled for cpu/float32/contiguous/plain/train" \
        in messages[0]
    assert {"output": "output differs", "grad": "grad scale differs", "raise": "kernel launch failed"}[what] \
        in messages[0]
    ref = eager.perturbed_batch_norm(x.detach(), *_args())
    assert torch.equal(y.detach(), ref)  # the eager op ran
    (row,) = verify.report()
    assert not row["ok"] and row["backend"] == f"verify_test_{what}"
    # another signature is checked on its own (and fails on its own)
    with pytest.warns(RuntimeWarning, match="cpu/float32/contiguous/relu/eval"):
        fn(x.detach(), *_args(training=False), relu=True)


@needs_cpp
def test_verify_off_runs_the_kernel_as_it_is(monkeypatch):
    monkeypatch.setenv("ANP_FAST_VERIFY", "0")
    fn = _broken("output")
    x = torch.randn(8, 16, 5, 5, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fn(x, *_args())
    assert not torch.allclose(y, eager.perturbed_batch_norm(x, *_args()), rtol=1e-4, atol=1e-4)  # unchecked
    assert verify.report() == []
    monkeypatch.setenv("ANP_FAST_VERIFY", "maybe")
    with pytest.raises(ValueError, match="ANP_FAST_VERIFY='maybe'"):
        fn(x, *_args(training=False))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpp_backend_passes_its_checks_on_every_signature(dtype):
    fn = ops.implementation("perturbed_batch_norm", "cpp")
    for channels_last in (False, True):
        for residual, relu in ((False, False), (False, True), (True, True), (True, False)):
            for training in (True, False):
                x = torch.randn(6, 9, 4, 3, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                res = torch.randn_like(x) if residual else None
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    fn(x, *_args(9, training), residual=res, relu=relu)
    rows = verify.report()
    assert len(rows) == 16 and all(r["ok"] for r in rows), rows
    assert {r["signature"].split("/")[2] for r in rows} == {"contiguous", "channels_last"}


def test_doctor_reports_and_fails_on_an_unusable_requested_backend():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ANP_FAST_BACKEND", None)
    done = subprocess.run([sys.executable, "-m", "anp_fast.cli", "doctor"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"torch {torch.__version__}" in done.stdout
    if CPP is not None:
        assert "cpp: built" in done.stdout
        assert "perturbed_batch_norm on cpp: 24/24 signatures match the eager op" in done.stdout
    ops.load()
    missing = next((name for name in ops.COMPILED if name in ops._missing), None)
    if missing is None:
        pytest.skip("every compiled backend is built here: no unusable one to request")
    done = subprocess.run([sys.executable, "-m", "anp_fast.cli", "doctor"], capture_output=True, text=True,
                          env={**env, "ANP_FAST_BACKEND": missing}, timeout=300)
    assert done.returncode == 1, done.stdout
    assert f"problem: ANP_FAST_BACKEND='{missing}': not built here" in done.stdout


@needs_cpp
def test_a_wrong_backend_in_a_run_is_caught_and_the_masks_equal_the_eager_runs(tiny_resnet):
    """A test double that returns a wrong output is registered as the preferred CPU backend of the batch norm:
    the first use of each signature catches it, disables it with the warning, and the run's masks equal those
    of the same run on the eager ops."""
    import copy

    from anp_fast import ANPConfig, optimize_masks

    g = torch.Generator().manual_seed(3)
    clean = (torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g))
    config = ANPConfig(iters=4, batch_size=16, seed=0, channels_last=False, merge_passes=False, compile=False)
    eager_run = optimize_masks(copy.deepcopy(tiny_resnet), clean, config.replace(fused_kernels=False),
                               progress=False)
    ops.register("perturbed_batch_norm", "verify_test_output", _broken("output"), devices=("cpu",))
    try:
        assert ops.backends("perturbed_batch_norm", "cpu")[0] == "verify_test_output"
        with pytest.warns(RuntimeWarning, match="backend 'verify_test_output' disabled for cpu/float32"):
            run = optimize_masks(copy.deepcopy(tiny_resnet), clean, config.replace(fused_kernels=True),
                                 progress=False)
    finally:
        ops._REGISTRY["perturbed_batch_norm"].pop("verify_test_output")
    checked = [r for r in verify.report() if r["backend"] == "verify_test_output"]
    assert checked and not any(r["ok"] for r in checked)
    for name, mask in eager_run.masks.items():
        assert torch.equal(mask, run.masks[name]), name


@needs_cpp
def test_a_first_use_under_no_grad_inference_or_autocast_is_checked_properly():
    """Evaluation calls the op under no_grad / inference_mode (and ANP's bf16 under autocast): the check must
    still compute its gradients and pass a correct kernel."""
    fn = ops.implementation("perturbed_batch_norm", "cpp")
    x = torch.randn(6, 9, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fn(x, *_args(9, training=False))
        with torch.inference_mode():
            fn(x, *_args(9, training=True), relu=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(x.bfloat16(), *_args(9, training=True))
    rows = verify.report()
    assert len(rows) == 3 and all(r["ok"] for r in rows), rows
