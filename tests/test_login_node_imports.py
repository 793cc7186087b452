"""The login-node side never imports torch: `wattsweep` must start fast on a login
node and work where torch is not installed."""
import pkgutil
import subprocess
import sys

import orchestrator
import pytest


def _orchestrator_modules():
    for mod in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        yield mod.name


def test_no_orchestrator_module_imports_torch():
    modules = sorted(_orchestrator_modules())
    assert len(modules) > 20
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    if 'torch' in sys.modules:\n"
        "        print(m); break\n"
        "else:\n"
        "    print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean", f"{out.stdout.strip()} imports torch"


def test_gpu_and_telemetry_layers_do_not_import_torch():
    code = "import sys, workers.gpu, workers.gpu.caps, workers.telemetry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--help"], capture_output=True, text=True, check=True)
    from orchestrator.cli import COMMANDS

    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_names_the_valid_ones():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweeep"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "valid: sweep, status" in out.stderr


@pytest.mark.parametrize("command", ["sweep", "status", "resubmit", "cancel", "logs", "reduce", "report", "compare", "audit", "caps", "doctor"])
def test_every_command_has_help(command, capsys):
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: wattsweep " + command in capsys.readouterr().out


def test_sweep_help_lists_every_top_level_key(capsys):
    import dataclasses

    from orchestrator.cli import main
    from orchestrator.config.schema import CONFIG_GROUPS, SweepConf

    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    listed = text.split("top-level keys:")[1].split("(and model.*")[0].split()
    expected = [f.name for f in dataclasses.fields(SweepConf) if f.name not in (*CONFIG_GROUPS, "grid", "description")]
    assert listed == expected and "kv_cache_dtype" in listed
