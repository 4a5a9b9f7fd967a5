"""ANP over 2 processes (torch.distributed, gloo on the CPU) against one process: from identical states every
phase agrees (the noise-ascent and mask gradients summed over the processes, the batch statistics of every
perturbed BatchNorm, the mask after the step).

The models run in fp64 here. In fp32 a ReLU network's gradients are not a smooth function of its input at the
level of rounding: a pre-activation within an ulp of 0 flips its ReLU, and measured on the CIFAR ResNet-18 of
these tests, ONE process's noise gradient moved by 6.4e-3 (relative to its largest entry) when its input was
jittered by 1e-7 relative, in 2 of 4 draws. Two processes compute the same sums in another order, so in fp32
they agree with one process only as well as that (measured: up to 2e-2); fp64 removes the kinks' lottery and
checks the semantics: the sums, the shares of the loss and the global statistics."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
from anp_fast import ops

F64 = torch.float64
CASES = [
    {"model": "cifar_resnet18", "batch": 128, "steps": 1, "fused": False, "dtype": F64},
    {"model": "cifar_resnet18", "batch": 127, "steps": 2, "fused": True, "dtype": F64},
    {"model": "digits", "batch": 128, "steps": 1, "fused": None, "dtype": F64},
    {"model": "mixed", "batch": 127, "steps": 2, "fused": None, "dtype": F64},
    # the fused C++ kernels normalising with the global statistics (fp32: no kernel takes fp64). Small batches,
    # where one fp32 ulp rarely flips a ReLU (measured 1e-7 at batch 16, see above)
    {"model": "cifar_resnet18", "batch": 16, "steps": 2, "fused": True, "dtype": torch.float32},
    {"model": "mixed", "batch": 15, "steps": 1, "fused": True, "dtype": torch.float32},
]
TOL = 1e-5  # relative to the largest value of the tensor compared


def _close(a, b) -> float:
    """max |a - b| / max |b| (0 for two zero tensors)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    for case in CASES:
        case["steps_run"] = 2
    refs = [dist_worker.run(case) for case in CASES]
    states = [ref[1] for ref in refs]
    mp.spawn(dist_worker.worker, args=(2, str(tmp / "init"), str(tmp), CASES, states), nprocs=2, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return refs, ranks


@pytest.mark.parametrize("k", range(len(CASES)), ids=[f"{c['model']}-b{c['batch']}-steps{c['steps']}-"
                                                      f"fused{c['fused']}-{str(c['dtype'])[6:]}" for c in CASES])
def test_two_processes_take_the_step_of_one(two_ranks, k):
    refs, ranks = two_ranks
    ref_records, _, ref_masks, _ = refs[k]
    fused_fp32 = bool(CASES[k]["fused"]) and CASES[k]["dtype"] == torch.float32
    for r in range(2):  # the kernels ran with the global statistics where they take the input, else eager
        assert (ranks[r][k][2] > 0) == (fused_fp32 and "cpp" in ops.backends("perturbed_batch_norm", "cpu"))
    worst = {"grad": 0.0, "stats": 0.0, "mask": 0.0}
    for step in range(2):
        ref = ref_records[step]
        per_rank = [ranks[r][k][0][step] for r in range(2)]
        assert [kind for kind, _ in per_rank[0]] == [kind for kind, _ in ref], "the phases differ"
        grads = 0
        for i, (kind, tensors) in enumerate(ref):
            for j, t in enumerate(tensors):
                if kind == "grad":  # each process's share of the gradient: their sum is one process's
                    got = per_rank[0][i][1][j].double() + per_rank[1][i][1][j].double()
                    grads += 1
                else:  # the global batch statistics, the same on both
                    got = per_rank[0][i][1][j]
                    assert torch.equal(got, per_rank[1][i][1][j])
                err = _close(got, t.detach().double())
                worst[kind] = max(worst[kind], err)
                assert err <= TOL, (step, i, kind, err)
        assert grads == 2 * CASES[k]["steps"] + 1  # noise (w, b) per ascent step, then the mask
        for r in range(2):
            worst["mask"] = max(worst["mask"], _close(ranks[r][k][1][step], ref_masks[step]))
        assert worst["mask"] <= TOL
    print(CASES[k], worst)


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from anp_fast.commands import run_attack

    out = tmp_path_factory.mktemp("attack")
    run_attack(arch="resnet18", data="digits", out=str(out), epochs=3, arch_args={"width": 8}, reserve_clean=300,
               progress=False, log=lambda *a: None)
    return str(out / "backdoored.safetensors")


def _purify_args(checkpoint, out, iters, *extra):
    return ["purify", "--arch", "resnet18", "--arch-arg", "width=8", "--data", "digits", "--checkpoint", checkpoint,
            "--clean-count", "300", "--holdout-fraction", "0.5", "--trigger", "badnets", "--target", "0",
            "--iters", str(iters), "--prune", "threshold:0.2", "--force", "--no-progress", "--out", str(out), *extra]


def _run(argv, **env):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _masks_and_report(out):
    import json

    from anp_fast import load_masks

    return load_masks(os.path.join(out, "masks.txt")), json.loads(open(os.path.join(out, "report.json")).read())


def test_torchrun_gives_the_single_process_report(tmp_path, digits_checkpoint):
    """`torchrun --nproc-per-node 2 -m anp_fast purify ...` writes what one process writes (3 iterations: the runs
    are chaotic over hundreds, see the module docstring). `anp-fast purify --nproc 2` (torch's launcher API) is
    the same launch: the resume and fault tests below run it."""
    from anp_fast.cli import main

    assert main(_purify_args(digits_checkpoint, tmp_path / "one", 3)) == 0
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "anp_fast",
          *_purify_args(digits_checkpoint, tmp_path / "torchrun", 3)])
    masks, report = _masks_and_report(tmp_path / "one")
    other_masks, other = _masks_and_report(tmp_path / "torchrun")
    assert max(float((other_masks[k] - m).abs().max()) for k, m in masks.items()) <= 1e-4
    assert other["pruned_neurons"] == report["pruned_neurons"]
    assert (other["after"]["acc"], other["after"]["asr"]) == (report["after"]["acc"], report["after"]["asr"])


def test_a_state_saved_by_two_processes_resumes_in_one(tmp_path, digits_checkpoint):
    """The run state does not depend on the number of processes: saved by 2 after 3 of 6 iterations, the run
    continues in 1 from there and ends near the uninterrupted single-process masks."""
    from anp_fast.cli import main
    from anp_fast.commands import PURIFY_OUTPUTS

    two = tmp_path / "two"
    launched = _run(["-m", "anp_fast", *_purify_args(digits_checkpoint, two, 6, "--nproc", "2", "--save-every", "3")])
    assert launched.stdout.count("wrote purified.safetensors") == 1  # rank 0 alone reports
    for name in PURIFY_OUTPUTS:  # as if the two processes had died after the state of iteration 3
        os.remove(two / name)
    assert main(["purify", "--resume", str(two)]) == 0
    assert main(_purify_args(digits_checkpoint, tmp_path / "one", 6)) == 0
    resumed_masks, resumed = _masks_and_report(two)
    masks, _ = _masks_and_report(tmp_path / "one")
    assert resumed["anp"]["resumed_at"] == 3
    assert max(float((resumed_masks[k] - m).abs().max()) for k, m in masks.items()) <= 1e-3


def _pid_of_rank(rank: int, marker: str):
    """The pid of the launched process of ``rank`` whose command line names ``marker`` (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if marker in cmdline and f"RANK={rank}" in environ and "purify" in cmdline:
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the processes through /proc")
def test_a_killed_process_stops_the_run_cleanly_and_the_state_resumes(tmp_path, digits_checkpoint):
    """SIGKILL one of 2 processes mid-run: the survivor stops at once with one line naming what happened, the
    launcher exits non-zero within 60 s with one line, no output is written (the run state is), and --resume
    with 2 processes ends with the masks of an uninterrupted 2-process run."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from anp_fast.commands import PURIFY_OUTPUTS

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "anp_fast", *_purify_args(digits_checkpoint, out, 30, "--nproc", "2",
                                                             "--save-every", "5")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = out / "anp_state.pt"
    deadline = time.time() + 300
    while time.time() < deadline:  # until the state of iteration 10 is saved
        time.sleep(0.5)
        try:
            if torch.load(state, weights_only=True)["iteration"] >= 10:
                break
        except Exception:
            continue
    pid = _pid_of_rank(1, str(out))
    assert pid is not None and proc.poll() is None
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - killed < 60
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("anp-fast: error")]
    assert lines[-1].startswith("anp-fast: error: process 1 of 2 failed first (killed by signal 9)"), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not any((out / name).exists() for name in PURIFY_OUTPUTS)
    saved = torch.load(state, weights_only=True)["iteration"]
    assert 10 <= saved < 30
    _run(["-m", "anp_fast", "purify", "--resume", str(out), "--nproc", "2"])
    _run(["-m", "anp_fast", *_purify_args(digits_checkpoint, tmp_path / "whole", 30, "--nproc", "2")])
    resumed = json.loads((out / "report.json").read_text())
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert resumed["anp"]["resumed_at"] == saved
    assert (out / "masks.txt").read_text() == (tmp_path / "whole" / "masks.txt").read_text()
    assert resumed["anp"]["final_loss"] == whole["anp"]["final_loss"]


def _evaluator_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from anp_fast.distributed import current

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = _evaluate(current())
        torch.save(rows, os.path.join(out_dir, f"eval{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from anp_fast.distributed import exit_now

    exit_now(0)  # see dist_worker.worker


def _evaluate(collective):
    """An Evaluator's rows (every metric, and the held-out ones alone) on seeded data sets of odd sizes."""
    from torch.utils.data import TensorDataset

    from anp_fast.evaluation import Evaluator

    g = torch.Generator().manual_seed(5)
    sets = [TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in (101, 37, 50, 23)]
    torch.manual_seed(0)
    model = dist_worker.MixedNorms().eval()
    evaluator = Evaluator(torch.device("cpu"), sets[0], sets[1], sets[2], 3, clean=sets[3], collective=collective)
    return [evaluator(model), evaluator(model, holdout_only=True)]


def test_the_sweep_evaluation_is_shared_between_processes(tmp_path):
    """Each process evaluates its part of every data set; the summed counts give one process's row."""
    mp.spawn(_evaluator_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    alone = _evaluate(None)
    for r in range(2):
        shared = torch.load(tmp_path / f"eval{r}.pt", weights_only=True)
        for row, ref in zip(shared, alone):
            assert row.keys() == ref.keys()
            for key in ref:
                assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


MISMATCHES = [("option", "option eps"), ("weights", "model weights"), ("layers", "perturbable layer layout"),
              ("data", "clean data"), ("nothing", None)]


def _mismatch_worker(rank, world, init_file, out_dir):
    """For each scenario, rank 1 builds its engine (or runs its loop) with one thing changed; both record what
    they raise (one process group for all the scenarios)."""
    import torch.distributed as dist

    from anp_fast import ANPConfig, ANPEngine, optimize_masks
    from anp_fast.errors import ConfigError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for differ, _ in MISMATCHES:
        torch.manual_seed(0)
        model = dist_worker.MixedNorms()
        config = ANPConfig(iters=2, batch_size=8, device="cpu")
        x, y = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
        if rank == 1:
            if differ == "option":
                config = ANPConfig(iters=2, batch_size=8, device="cpu", eps=0.3)
            elif differ == "weights":
                with torch.no_grad():
                    model.head.weight[0, 0] += 1e-3
            elif differ == "layers":
                model.ln = torch.nn.Identity()
            elif differ == "data":
                x = x.clone()
                x[3, 0, 0, 0] += 0.5
        try:
            if differ == "data":
                optimize_masks(model, (x, y), config, progress=False)
            else:
                ANPEngine(model, config)
            message = "accepted"
        except ConfigError as exc:
            message = str(exc)
        with open(os.path.join(out_dir, f"mismatch-{differ}-{rank}.txt"), "w") as f:
            f.write(message)
    dist.destroy_process_group()
    from anp_fast.distributed import exit_now

    exit_now(0)  # see dist_worker.worker


def test_processes_given_different_models_or_options_refuse_to_start(tmp_path):
    """A hash of the options, the perturbable layer layout, the weights and the clean data is compared at the
    start: any difference stops every process with one error naming it (and the same run goes on when all
    agree)."""
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for differ, named in MISMATCHES:
        messages = [(tmp_path / f"mismatch-{differ}-{r}.txt").read_text() for r in range(2)]
        if named is None:
            assert messages == ["accepted", "accepted"]
            continue
        assert messages[0] == messages[1], messages
        assert named in messages[0] and "rank 1 differs from rank 0" in messages[0], messages[0]
        assert messages[0].startswith("the 2 processes were given different"), messages[0]


def _hung_worker(rank, world, init_file, out_dir):
    """Rank 1 stops answering at iteration 3 (a monitor that waits until rank 0 has given up); rank 0's loop
    must end with a ProcessGroupError once the group's timeout passes."""
    import datetime
    import time

    import torch.distributed as dist

    from anp_fast import ANPConfig, optimize_masks
    from anp_fast.errors import ProcessGroupError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))
    torch.manual_seed(0)
    given_up = os.path.join(out_dir, "given_up.txt")

    def hang(iteration, engine):
        if rank == 1 and iteration == 3:
            deadline = time.time() + 60
            while not os.path.exists(given_up) and time.time() < deadline:
                time.sleep(0.1)
        return False

    x, y = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    start = time.time()
    try:
        optimize_masks(dist_worker.MixedNorms(), (x, y), ANPConfig(iters=50, batch_size=8, device="cpu"),
                       progress=False, monitor=hang, monitor_every=1)
        message = "finished"
    except ProcessGroupError as exc:
        message = f"{time.time() - start:.1f} {exc}"
    if rank == 0:
        with open(given_up + ".tmp", "w") as f:
            f.write(message)
        os.replace(given_up + ".tmp", given_up)
    from anp_fast.distributed import exit_now

    exit_now(0)  # see dist_worker.worker


def test_a_hung_process_stops_the_others_after_the_timeout(tmp_path):
    """Not a dead process (seen at once) but one that stops answering: the others wait for the process group's
    timeout (3 s here; `purify --dist-timeout`, default 600 s), then stop with one error."""
    mp.spawn(_hung_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    seconds, message = (tmp_path / "given_up.txt").read_text().split(" ", 1)
    assert message.startswith("process 0 of 2: another process of the run stopped at iteration 4"), message
    assert 2.5 <= float(seconds) < 20, seconds
    assert "/gloo/" not in message  # the reason without the library's source path


def test_the_process_group_timeout_reaches_init_process_group(monkeypatch):
    import datetime

    from anp_fast import distributed
    from anp_fast.errors import ConfigError

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    assert distributed.init_from_env(7.5)
    assert seen["timeout"] == datetime.timedelta(seconds=7.5)
    assert distributed.init_from_env()
    assert seen["timeout"] == datetime.timedelta(seconds=distributed.DEFAULT_TIMEOUT_S)
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        distributed.init_from_env(0)
