"""``python -m quant_core``: the command line, with Ctrl-C handled for a whole process.

The first Ctrl-C raises ``KeyboardInterrupt`` (the run stops, its temp file is removed, its
threads are joined); further ones are ignored, so that they cannot cut that cleanup short. An
interrupted run then leaves at once: torch's interpreter teardown takes 0.6-1.6 s on two loaded
cores, and nothing is left to finish.
"""

import os
import signal
import sys


def _interrupt(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


signal.signal(signal.SIGINT, _interrupt)

from .cli import main  # noqa: E402 - after the handler: importing torch takes seconds

code = main()
if code == 130:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
