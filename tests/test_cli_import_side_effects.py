"""Importing the command line does nothing: no signal handler, no ``sys.excepthook``, neither torch nor Lightning
loaded; the console command installs its stop handling itself, in :func:`lightning_hypergrad.cli.main`, before torch
loads."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_the_cli_in_the_console_commands_process_installs_no_handler_and_loads_no_torch():
    code = (
        "import sys; sys.argv[0] = 'lightning'; import signal\n"
        "before = [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.excepthook]\n"
        "import lightning_hypergrad.cli\n"
        "assert [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.excepthook] == before\n"
        "assert not {'torch', 'lightning'} & set(sys.modules), sorted({'torch', 'lightning'} & set(sys.modules))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]


def test_main_handles_a_stop_signal_before_torch_loads():
    """What the handler of SIGINT is when torch starts to load, in the console command's process: the early one,
    which leaves at once with one line (tests/test_stop_signals.py checks what it does)."""
    code = (
        "import signal, sys\n"
        "sys.argv = ['lightning-hypergrad', '--help']\n"
        "seen = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not seen:\n"
        "            seen.append(signal.getsignal(signal.SIGINT))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "from lightning_hypergrad.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('handler:', seen[0].__qualname__)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "handler: StopSignals._leave"
