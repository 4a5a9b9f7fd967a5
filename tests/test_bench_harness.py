"""The benchmark harness runs and reports every field (timings themselves are not asserted: they belong to
benchmarks/results, not to tests)."""
import json

import pytest

from anp_fast.cli import main
from anp_fast_bench import bench


def test_parse_mode():
    assert bench.parse_mode("published") is None
    assert bench.parse_mode("cl+bf16+compile") == dict(channels_last=True, merge_passes=False, compile=True,
                                                       precision="bf16", fused_kernels=False, cuda_graphs=False)
    assert bench.parse_mode("nchw+fused")["fused_kernels"] is True
    assert bench.parse_mode("cl+graphs")["cuda_graphs"] is True
    assert "CUDA graphs" in bench.describe("cl+graphs")
    with pytest.raises(ValueError, match="unknown token 'fast'"):
        bench.parse_mode("cl+fast")


def test_bench_cli_writes_results(tmp_path, capfd):
    rc = main(["bench", "--model", "digits_resnet18", "--batch", "8", "--modes", "published,nchw,cl+mixed",
               "--rounds", "2", "--warmup", "1", "--no-memory", "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".csv", ".json", ".md"]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [r["mode"] for r in result["rows"]] == ["published", "nchw", "cl+mixed"]
    assert result["input"] == [1, 16, 16] and result["batch"] == 8
    for row in result["rows"]:
        assert row["s_per_iter"] > 0 and row["F_s"] > 0 and row["step_over_6F"] > 0
    assert result["rows"][0]["speedup_vs_published"] == 1.0
    assert set(result["forward_s"]) == {"F_nchw_fp32", "F_cl_fp32"}  # mixed is held to the fp32 F
    assert all(len(v) == 2 for v in result["raw_s"].values())
    assert result["env"]["torch"] and "commit" in result["env"]
    assert "| cl+mixed |" in capfd.readouterr().out


def test_bench_profile_phases(tmp_path, capfd):
    trace = tmp_path / "trace.json"
    rc = main(["bench", "--model", "digits_resnet18", "--batch", "8", "--profile", "cl", "--rounds", "2",
               "--warmup", "1", "--trace", str(trace), "--top-ops", "5"])
    assert rc == 0
    out = capfd.readouterr().out
    for phase in ("noise step", "mask forward", "mask backward", "update"):
        assert f"| {phase} |" in out
    assert "convolutions" in out and "| aten::" in out
    result = bench.profile("digits_resnet18", 8, "cl", rounds=1, warmup=1, top_ops=3, log=lambda s: None)
    ops = result["ops"]
    assert len(ops["top"]) == 3 and ops["top"][0]["s"] >= ops["top"][-1]["s"] > 0
    assert 0 < ops["conv_s"] < ops["total_s"]  # a ResNet spends time in convolutions, and not only there
    assert json.loads(trace.read_text())["traceEvents"]


def test_timed_run_writes_a_record(tmp_path, capsys):
    from anp_fast_bench import timed_run

    assert timed_run.main(["--model", "digits_resnet18", "--batch", "8", "--iters", "3", "--clean", "20",
                           "--device", "cpu", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("digits_resnet18_b8_cpu_run3_*.json")).read_text())
    assert record["iters"] == 3 and record["total_s"] >= record["loop_s"] > 0
    assert record["config"]["batch_size"] == 8 and record["env"]["torch"]
    assert "3 iterations" in capsys.readouterr().out


def test_memory_probe_runs():
    assert bench.peak_memory("digits_resnet18", 8, "nchw", "cpu", steps=1) >= 0


@pytest.mark.parametrize("argv,message", [
    (["--rounds", "0"], "--rounds 0: must be >= 1"), (["--warmup", "0"], "--warmup 0: must be >= 1"),
    (["--model", "foo"], "unknown benchmark model 'foo'"), (["--top-ops", "3"], "go with --profile"),
])
def test_bench_refuses_bad_arguments(argv, message, capfd):
    assert main(["bench", *argv]) != 0
    assert message in capfd.readouterr().err
    with pytest.raises(SystemExit, match=message):  # the package's own entry point, in this process
        bench.main(argv)


def test_bench_nproc_times_the_distributed_layouts(tmp_path, capfd):
    """`anp-fast bench --nproc 2`: one process against 2 (global and local statistics), each a real launch:
    the 2-process layouts spend time in collectives, local statistics use fewer of them, and the masks stay
    near the one-process ones over the few steps."""
    import json
    import os

    from anp_fast_bench.bench import main

    assert main(["--nproc", "2", "--model", "digits_resnet18", "--batch", "8", "--mode", "nchw", "--rounds", "1",
                 "--iters", "1", "--warmup", "1", "--threads", "2", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "| 2x1 local |" in out
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    rows = {r["layout"]: r for r in json.loads((tmp_path / name).read_text())["rows"]}
    assert rows["1x2"]["collectives_per_step"] == 0 and rows["1x2"]["max_mask_diff"] == 0
    assert rows["2x1"]["collectives_per_step"] > rows["2x1 local"]["collectives_per_step"] > 0
    assert rows["2x1"]["collective_ms"] > 0
    assert rows["2x1"]["max_mask_diff"] < 0.05


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "1"], "N >= 2"),
    (["--nproc", "2", "--batch", "1"], "cannot be split"),
    (["--nproc", "2", "--mode", "published"], "engine mode"),
])
def test_bench_nproc_refuses_bad_arguments(argv, message, capfd):
    from anp_fast_bench.bench import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capfd.readouterr().err
