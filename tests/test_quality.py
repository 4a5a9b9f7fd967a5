"""The quality runner (python -m anp_fast_bench.quality) on a tiny matrix, its resume and its table."""
import json
import os
import shutil

import pytest

from anp_fast_bench import quality

TINY = ["--data", "digits-cifar", "--attacks", "badnets,sig,benign", "--rates", "0.1", "--seeds", "0",
        "--methods", "anp,rnp", "--iters", "4", "--epochs", "1", "--width", "4", "--clean-count", "40",
        "--snapshot-every", "2", "--dense-step", "40"]


def test_tiny_matrix_runs_resumes_and_reports(tmp_path, capsys, monkeypatch):
    work, report = tmp_path / "work", tmp_path / "report"
    assert quality.main(["--work", str(work), *TINY, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    cells = json.loads((report / "cells.json").read_text())
    assert {(c["attack"], c["method"]) for c in cells} == {(a, m) for a in ("badnets", "sig", "benign")
                                                           for m in ("anp", "rnp")}
    for c in cells:
        assert set(c["before"]) >= {"acc", "asr", "holdout_acc"} and 0 <= c["pruned"] <= c["neurons"]
        assert c["oracle"]["number"] >= 0  # a reference only: never what is pruned
        assert set(c["rules"]) == {"walk", "masks", "evidence"} and c["rules"]["walk"]["after"] == c["after"]
        assert c["rules"]["evidence"]["pruned"] <= c["rules"]["evidence"]["evidence"]["suspects"]
        if c["method"] == "anp":
            assert c["stop"]["iters"] == 4 and len(c["stop"]["checks"]) >= 1
    attack = json.loads((work / "digits-cifar" / "sig@0.1" / "s0" / "attack.json").read_text())
    assert attack["clean_label"] and attack["trigger"] == quality.ATTACKS["sig"]
    benign = json.loads((work / "digits-cifar" / "benign@0" / "s0" / "attack.json").read_text())
    assert benign["poisoned"] == 0
    table = (report / "quality.md").read_text()
    main_table, stop_table = table.split("\n\nStop rule")
    assert main_table.count("\n") == 1 + 6 and "| digits-cifar | benign |" in main_table
    assert sum(line.startswith("| digits-cifar/") and "| anp |" in line
               for line in stop_table.splitlines()) == 3 * len(quality.STOP_REPLAYS)  # a row per ANP cell and variant
    assert (report / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (report / "quality.csv").read_text().splitlines()
    assert rows[0].startswith("data,attack,rate,method,seeds") and len(rows) == 7
    assert "masks_asr_worst" in rows[0] and "evidence_drop_worst" in rows[0]
    assert quality.main(["--work", str(tmp_path / "fresh"), *TINY, "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 of 3 cells evaluated under the current rule"
    assert not (tmp_path / "fresh").exists()  # --status writes nothing, not even the digits export
    assert quality.main(["--work", str(work), *TINY, "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[-1] == "3 of 3 cells evaluated under the current rule"
    assert status[0].startswith("digits-cifar/badnets@0.1/s0: model trained; anp: ACC ") and "; rnp: ACC " in status[0]
    # a second run finds every stage done: nothing is trained or learned again
    stamps = {p: os.path.getmtime(p) for p in work.rglob("*") if p.name in ("backdoored.safetensors", "masks.txt",
                                                                            "eval.json")}
    assert len(stamps) == 3 + 6 + 6
    assert quality.main(["--work", str(work), *TINY]) == 0
    assert all(os.path.getmtime(p) == t for p, t in stamps.items())
    # a cell evaluated under an earlier default rule is listed apart from the table and re-evaluated, alone
    old = work / "digits-cifar" / "sig@0.1" / "s0" / "rnp" / "eval.json"
    record = json.loads(old.read_text())
    assert record["walk_floor"] == quality.current_rule()["walk_floor"]
    del record["walk_floor"]  # as cells from before it was recorded: floor 0.2
    old.write_text(json.dumps(record))
    assert quality.main(["--work", str(work), "--seeds", "", "--report", str(report)]) == 0
    table = (report / "quality.md").read_text()
    assert len(json.loads((report / "cells.json").read_text())) == 5
    assert "| digits-cifar/sig@0.1/s0 | rnp | {'walk_floor': 0.2," in table.split("earlier default rule")[1]
    capsys.readouterr()
    assert quality.main(["--work", str(work), *TINY, "--seeds", "0,1", "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[-1] == "2 of 6 cells evaluated under the current rule"
    assert status[1] == "digits-cifar/badnets@0.1/s1: no model yet"
    assert [line for line in status if "earlier rule" in line] == [
        line for line in status if line.startswith("digits-cifar/sig@0.1/s0:")]
    stamps[old] = os.path.getmtime(old)
    assert quality.main(["--work", str(work), *TINY]) == 0
    assert [p for p, t in stamps.items() if os.path.getmtime(p) != t] == [old]
    assert json.loads(old.read_text())["walk_floor"] == quality.current_rule()["walk_floor"]
    # the stop rule's replay is kept apart: an ANP cell re-evaluated takes it over instead of replaying it
    anp = work / "digits-cifar" / "sig@0.1" / "s0" / "anp"
    stop = json.loads((anp / "stop.json").read_text())
    assert stop == json.loads((anp / "eval.json").read_text())["stop"] and stop["iters"] == 4
    (anp / "stop.json").write_text(json.dumps(dict(stop, marker=1)))
    assert quality.main(["--work", str(work), *TINY, "--force-eval"]) == 0
    assert json.loads((anp / "eval.json").read_text())["stop"] == dict(stop, marker=1)
    # a model trained again (lost, or its cells seeded back from a report): nothing of the earlier one is kept
    (anp / ".." / "attack.json").unlink()
    learned = os.path.getmtime(anp / "masks.txt")
    assert quality.main(["--work", str(work), *TINY]) == 0
    assert "removing anp/ of the earlier one" in capsys.readouterr().out
    assert os.path.getmtime(anp / "masks.txt") > learned
    assert "marker" not in json.loads((anp / "eval.json").read_text())["stop"]
    # an evaluation from before a replay existed gets the replay alone (nothing else is evaluated again)
    record = json.loads((anp / "eval.json").read_text())
    del record["stop_overlap"]
    record["before"]["marker"] = 1  # gone if the cell were evaluated again
    (anp / "eval.json").write_text(json.dumps(record))
    (anp / "stop_overlap.json").unlink()
    assert quality.main(["--work", str(work), *TINY]) == 0
    again = json.loads((anp / "eval.json").read_text())
    assert again["stop_overlap"]["options"] == quality.STOP_REPLAYS["stop_overlap"][1]
    assert {k: v for k, v in again.items() if k != "stop_overlap"} == record
    # a replay that stops (here at the last check, 4): the default rule's outcome on the masks there
    monkeypatch.setitem(quality.STOP_REPLAYS, "stop_overlap",
                        ("stop_overlap.json", {"patience": 1, "threshold": 0.999, "overlap": 0.5}))
    (anp / "stop_overlap.json").unlink()
    s = quality.Settings(work=str(work), iters=4, epochs=1, width=4, clean_count=40, snapshot_every=2, dense_step=40)
    r = quality.eval_stage(quality.Cell("digits-cifar", "sig", 0.1, 0), "anp", s, print, force=True)
    st = r["stop_overlap"]
    assert st["stopped_at"] == 4 and st["saved"] == 0 and st["outcome_mode"] == "walk"
    assert 0.5 <= st["checks"][1]["overlap"] < 1  # the sets moved: the exact rule would not have stopped
    assert st["walk_rule"] == quality.current_rule() and st["same_set"] and st["after"] == r["after"]
    assert json.loads((anp / "stop_overlap.json").read_text()) == st
    assert quality.main(["--work", str(work), "--seeds", "", "--report", str(report)]) == 0
    row = [line for line in (report / "quality.md").read_text().splitlines()
           if line.startswith("| digits-cifar/sig@0.1/s0 | anp | `--stop-patience 1 --stop-threshold 0.999 "
                              "--stop-overlap 0.5` |")]
    assert len(row) == 1 and "| 4 | 0 | yes |" in row[0] and row[0].count(" / ") == 1
    # a replay file newer than eval.json (a run stopped between writing the two) is taken into eval.json
    (anp / "stop_overlap.json").write_text(json.dumps(dict(st, marker=2)))
    assert quality.main(["--work", str(work), *TINY]) == 0
    assert json.loads((anp / "eval.json").read_text())["stop_overlap"] == dict(st, marker=2)
    # --force-eval runs again the replays that stopped (their outcome is the walk's), and takes over the others
    never = json.loads((anp / "stop.json").read_text())
    (anp / "stop.json").write_text(json.dumps(dict(never, marker=3)))
    r = quality.eval_stage(quality.Cell("digits-cifar", "sig", 0.1, 0), "anp", s, print, force=True)
    assert never["stopped_at"] is None and r["stop"] == dict(never, marker=3) and r["stop_overlap"] == st


def test_a_run_without_snapshots_gets_an_empty_replay(tmp_path):
    """A run shorter than --snapshot-every kept no snapshot: each replay records that it never stopped, and is
    not asked for again."""
    import torch

    (tmp_path / "anp").mkdir()
    torch.save({"iterations": [], "masks": torch.zeros(0), "layers": []}, tmp_path / "anp" / "snapshots.pt")
    s = quality.Settings(work=str(tmp_path))
    replays = quality._stop_replays(None, {}, None, {"number": 0}, str(tmp_path / "anp"), None, s)
    assert set(replays) == set(quality.STOP_REPLAYS)
    for key, replay in replays.items():
        assert replay["stopped_at"] is None and replay["saved"] == 0 and not quality._replay_needed(replay, key)
        assert json.loads((tmp_path / "anp" / quality.STOP_REPLAYS[key][0]).read_text()) == replay


def _row(attack, asr_worst, drop_worst):
    return {"attack": attack, "asr_after_worst": asr_worst, "acc_drop_worst": drop_worst}


@pytest.mark.parametrize("row, verdict", [
    (_row("badnets", 0.05, 0.02), True), (_row("badnets", 0.051, 0.0), False), (_row("wanet", 0.0, 0.021), False),
    (_row("benign", 1.0, 0.01), True), (_row("benign", 0.0, 0.011), False), (_row("blend", 0.9, 0.3), None)])
def test_the_acceptance_bar(row, verdict):
    assert quality.passes(row) is verdict


def test_summary_takes_median_and_worst_seed():
    def result(seed, acc_after, asr_after):
        return {"data": "d", "attack": "badnets", "rate": 0.1, "method": "anp", "seed": seed, "pruned": 10 + seed,
                "before": {"acc": 0.99, "asr": 1.0}, "after": {"acc": acc_after, "asr": asr_after},
                "oracle": {"acc": 0.98, "asr": 0.0},
                "rules": {"masks": {"after": {"acc": acc_after - 0.01, "asr": 2 * asr_after}},
                          "evidence": {"after": {"acc": 0.99, "asr": 0.5 + seed / 10}}}}
    (row,) = quality.summarise([result(0, 0.98, 0.0), result(1, 0.96, 0.2), result(2, 0.985, 0.01)])
    assert row["seeds"] == 3 and row["worst_seed"] == 1
    assert row["asr_after_worst"] == 0.2 and row["asr_after"] == 0.01
    assert row["acc_drop_worst"] == pytest.approx(0.03) and row["acc_drop_median"] == pytest.approx(0.01)
    assert row["masks_asr_worst"] == 0.4 and row["masks_drop_worst"] == pytest.approx(0.04)
    assert row["evidence_asr_worst"] == pytest.approx(0.7) and row["evidence_drop_worst"] == 0.0


def test_a_data_set_with_its_own_trigger_is_named_in_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "plot", lambda results, path: None)

    def result(data, attack):
        return {"data": data, "attack": attack, "rate": 0.1, "method": "anp", "seed": 0, "pruned": 3,
                "before": {"acc": 0.99, "asr": 1.0}, "after": {"acc": 0.98, "asr": 0.0},
                "oracle": {"acc": 0.98, "asr": 0.0}, "rules": {}}
    assert quality.attack_spec("digits-cifar", "wanet") == "wanet:s=1.0,cross_ratio=0"
    assert quality.attack_spec("mnist5k", "wanet") == "wanet"
    quality.write_report([result("digits-cifar", "wanet"), result("mnist5k", "wanet")], str(tmp_path))
    table = (tmp_path / "quality.md").read_text()
    assert "| digits-cifar | wanet* |" in table and "| mnist5k | wanet |" in table
    assert "digits-cifar wanet: `wanet:s=1.0,cross_ratio=0` (not the published `wanet`" in table


def test_the_csv_takes_the_columns_of_every_row(tmp_path):
    """Cells measured before a reference rule existed have no column for it; the CSV still holds every row."""
    from anp_fast.report import write_csv

    write_csv(str(tmp_path / "t.csv"), [{"a": 1, "b": 2}, {"a": 3, "c": 4}])
    assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b,c", "1,2,", "3,,4"]


ONE = ["--data", "digits-cifar", "--attacks", "badnets", "--rates", "0.1", "--seeds", "0", "--methods", "anp",
       "--iters", "6", "--epochs", "1", "--width", "4", "--clean-count", "40", "--snapshot-every", "2",
       "--dense-step", "40"]


@pytest.fixture(scope="module")
def one_cell(tmp_path_factory):
    """A work folder with ONE's cell run to the end (each test works on a copy)."""
    work = tmp_path_factory.mktemp("one") / "work"
    assert quality.main(["--work", str(work), *ONE]) == 0
    return work


def test_a_killed_masks_stage_resumes_with_the_masks_and_snapshots_of_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                           one_cell):
    """A runner killed mid-run (a machine going away: no Ctrl-C handler runs), in a step or between saving the
    state and taking the snapshot of the same iteration, loses at most --snapshot-every iterations: the next run
    goes on from the saved state, and its masks and snapshots are those of a run never stopped; no state is left
    behind."""
    import torch

    import anp_fast.engine
    import anp_fast.fileio

    work = tmp_path / "work"
    shutil.copytree(one_cell, work)
    folder = work / "digits-cifar" / "badnets@0.1" / "s0" / "anp"
    whole = (folder / "masks.txt").read_text()
    whole_snaps = torch.load(folder / "snapshots.pt", weights_only=True)
    assert whole_snaps["iterations"] == [2, 4, 6]
    cell = quality.Cell("digits-cifar", "badnets", 0.1, 0)
    s = quality.Settings(work=str(work), iters=6, epochs=1, width=4, clean_count=40, snapshot_every=2,
                         dense_step=40)

    class Killed(Exception):
        pass

    step, save = anp_fast.engine.ANPEngine.step, anp_fast.fileio.atomic_torch_save
    calls = []

    def dying_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Killed()
        return step(self, *args, **kwargs)

    def dying_save(obj, path, *args, **kwargs):
        if str(path).endswith("snapshots_partial.pt") and 4 in obj["iterations"]:
            raise Killed()
        return save(obj, path, *args, **kwargs)

    for target, name, dying in ((anp_fast.engine.ANPEngine, "step", dying_step),
                                (anp_fast.fileio, "atomic_torch_save", dying_save)):
        shutil.rmtree(folder)
        with monkeypatch.context() as mp:
            mp.setattr(target, name, dying)
            with pytest.raises(Killed):
                quality.masks_stage(cell, "anp", s, print)
        assert torch.load(folder / "anp_state.pt", weights_only=True)["iteration"] == 4, name
        assert not (folder / "learn.json").exists()
        assert quality.cell_status(cell, ["anp"], s) == ("digits-cifar/badnets@0.1/s0: model trained; anp: masks at "
                                                         "iteration 4 (resumes there)", False)
        quality.masks_stage(cell, "anp", s, print)
        assert (folder / "masks.txt").read_text() == whole, name
        snaps = torch.load(folder / "snapshots.pt", weights_only=True)
        assert snaps["iterations"] == whole_snaps["iterations"] and torch.equal(snaps["masks"], whole_snaps["masks"])
        assert json.loads((folder / "learn.json").read_text())["resumed_at"] == 4
        assert sorted(p.name for p in folder.iterdir()) == ["learn.json", "masks.txt", "snapshots.pt"], name


def test_a_killed_eval_stage_goes_on_with_the_rule_it_was_measuring(tmp_path, monkeypatch, one_cell):
    """The evaluation stage keeps each rule's outcome as it is measured: killed in the second rule, the next run
    measures the second and third only and writes the evaluation of a run never stopped, and leaves nothing
    behind; outcomes kept under another default rule are measured again."""
    from anp_fast import selection

    work = tmp_path / "work"
    shutil.copytree(one_cell, work)
    folder = work / "digits-cifar" / "badnets@0.1" / "s0" / "anp"
    whole = json.loads((folder / "eval.json").read_text())
    cell = quality.Cell("digits-cifar", "badnets", 0.1, 0)
    s = quality.Settings(work=str(work), iters=6, epochs=1, width=4, clean_count=40, snapshot_every=2,
                         dense_step=40)
    real, calls = selection.choose, []

    class Killed(Exception):
        pass

    def counted(*args, mode="walk", **kwargs):
        calls.append(mode)
        if mode == "masks" and kill:
            raise Killed()
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(selection, "choose", counted)
    (folder / "eval.json").unlink()
    kill = True
    with pytest.raises(Killed):
        quality.eval_stage(cell, "anp", s, print)
    assert calls == ["walk", "masks"] and not (folder / "eval.json").exists()
    assert list(json.loads((folder / quality.RULES_PARTIAL).read_text())["rules"]) == ["walk"]
    calls.clear()
    kill = False
    assert quality.eval_stage(cell, "anp", s, print) == whole
    assert calls == ["masks", "evidence"]
    assert json.loads((folder / "eval.json").read_text()) == whole and not (folder / quality.RULES_PARTIAL).exists()
    # kept under another default rule: measured again
    other = dict(quality.current_rule(), walk_tau=1.0)
    (folder / quality.RULES_PARTIAL).write_text(json.dumps({"rule": other, "rules": {"walk": {}, "masks": {}}}))
    (folder / "eval.json").unlink()
    calls.clear()
    assert quality.eval_stage(cell, "anp", s, print) == whole and calls == ["walk", "masks", "evidence"]
    # --force-eval killed in its second rule: the forced run goes on (the evaluation it replaces is the same);
    # a run without it takes the evaluation as it stands and drops what the forced run measured
    calls.clear()
    kill = True
    with pytest.raises(Killed):
        quality.eval_stage(cell, "anp", s, print, force=True)
    line, done = quality.cell_status(cell, ["anp"], s)
    assert done and "ACC" in line  # the evaluation in place still stands
    kill = False
    assert quality.eval_stage(cell, "anp", s, print, force=True) == whole and calls == ["walk", "masks", "masks",
                                                                                        "evidence"]
    assert not (folder / quality.RULES_PARTIAL).exists()
    kill = True
    with pytest.raises(Killed):
        quality.eval_stage(cell, "anp", s, print, force=True)
    assert (folder / quality.RULES_PARTIAL).exists()
    assert quality.eval_stage(cell, "anp", s, print) == whole and not (folder / quality.RULES_PARTIAL).exists()
    # the status of an evaluation under way names what it has measured
    (folder / "eval.json").unlink()
    with pytest.raises(Killed):
        quality.eval_stage(cell, "anp", s, print)
    assert quality.cell_status(cell, ["anp"], s) == (
        "digits-cifar/badnets@0.1/s0: model trained; anp: masks learned, evaluation under way (measured: walk)", False)


def test_the_readme_table_is_the_committed_report_and_the_report_its_cells(tmp_path):
    """The README's quality table is the committed report's, and that report's tables are what the runner writes
    from the committed per-cell results (cells.json): nobody edited a number by hand or forgot to regenerate."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("- Quality matrix ("):readme.index("## Coming from the published code")]
    folder = root / re.search(r"under it so far: `(benchmarks/results/[^`]+?)/?`", section).group(1)
    committed = (folder / "quality.md").read_text()
    table = committed.split("\n\nStop rule")[0].split("\n\nCells evaluated under")[0].strip()
    assert table.count("\n") >= 2 and table in section
    quality.write_report(json.loads((folder / "cells.json").read_text()), str(tmp_path))
    again = (tmp_path / "quality.md").read_text()
    current = lambda text: text.split("\n\nCells evaluated under")[0].rstrip()  # noqa: E731 (stale: not in it)
    assert current(again) == current(committed)
