"""The command line answers --help and a mistyped flag without importing torch (issue 12.8: it took 15-28 s on
a new user's machine, 2.7 s here; 0.04 s after), and `anp-fast bench` still takes its own flags."""
import subprocess
import sys

import pytest

PROBE = """
import sys
from anp_fast.cli import main
try:
    rc = main({argv!r})
except SystemExit as exc:
    rc = exc.code
print("RC", rc)
print("TORCH", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv, rc", [(["--help"], 0), (["purify", "--help"], 0), (["prune", "--help"], 0),
                                      (["purify", "--chekpoint", "x"], 2), (["nosuchcommand"], 2)])
def test_help_and_typos_never_import_torch(argv, rc):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         timeout=120)
    assert f"RC {rc}" in out.stdout, out.stdout + out.stderr
    assert "TORCH False" in out.stdout, "the command line imported torch before it needed it"


def test_import_anp_fast_is_torch_free_until_a_name_is_used():
    probe = ("import sys, anp_fast; a = 'torch' in sys.modules; from anp_fast import ANPConfig, prune; "
             "print(a, 'torch' in sys.modules, callable(prune), ANPConfig().eps)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True", "True", "0.4"], out.stdout + out.stderr


def test_bench_takes_its_own_flags(capfd):
    from anp_fast.cli import main

    assert main(["bench", "--help"]) == 0
    text = capfd.readouterr().out
    assert text.startswith("usage: anp-fast bench") and "--modes" in text
    assert main(["bench", "--no-such-flag"]) == 2


def test_the_cli_never_imports_the_benchmark_package():
    """`anp-fast bench` runs the benchmark package's own entry point in a child process."""
    probe = ("import sys; from anp_fast.cli import main; rc = main(['bench', '--help']); "
             "print('IMPORTED', 'anp_fast_bench' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "IMPORTED False 0", out.stdout[-500:] + out.stderr[-500:]
    out = subprocess.run([sys.executable, "-m", "anp_fast_bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--modes" in out.stdout


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from anp_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in sub.choices.items():
        if name == "bench":  # its options are the benchmark package's (test_bench_takes_its_own_flags)
            continue
        fmt = sp._get_formatter()
        for action in sp._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = fmt._get_help_string(action) or ""
            if not text or (action.default not in (None, False, []) and "default" not in text):
                missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []
    text = sub.choices["attack"].format_help()
    assert "--epochs EPOCHS       training epochs (default: 30)" in text


def test_anp_flags_are_generated_from_the_config_dataclass(monkeypatch):
    """Every ANPConfig field is a purify flag with the dataclass's default and its docstring's help; a new
    documented field appears in the CLI with nothing else to edit."""
    import dataclasses

    from anp_fast import cli
    from anp_fast.config import ANPConfig, field_help

    helps = field_help(ANPConfig)
    assert set(helps) == set(ANPConfig.field_names())  # every field is documented
    purify = cli.build_parser().purify
    actions = {a.dest: a for a in purify._actions}
    for field in dataclasses.fields(ANPConfig):
        action = actions[field.name]
        assert action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert action.default == field.default, field.name
        assert helps[field.name].replace("%", "%%") == action.help, field.name
    args = purify.parse_args(["--eps", "0.3", "--precision", "bf16", "--no-fused-kernels", "--cuda-graphs"])
    config = cli._config_from(args, skip=())
    assert (config.eps, config.precision, config.fused_kernels, config.cuda_graphs) == (0.3, "bf16", False, True)

    @dataclasses.dataclass
    class Extended(ANPConfig):
        """ANPConfig and one more knob.

        warmup: iterations before the masks move.
        """
        warmup: int = 7

    monkeypatch.setattr(cli, "ANPConfig", Extended)
    extended = {a.dest: a for a in cli.build_parser().purify._actions}
    assert extended["warmup"].default == 7 and extended["warmup"].help == "iterations before the masks move."


def test_python_dash_m_anp_fast_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "anp_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "purify" in out.stdout and "usage: anp-fast" in out.stdout, out.stderr[-500:]
    out = subprocess.run([sys.executable, "-m", "anp_fast", "purify", "--no-such-flag"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--no-such-flag" in out.stderr
