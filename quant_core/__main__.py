"""``python -m quant_core`` and the ``quant-core`` command: the command line, with Ctrl-C handled
for the whole process.

The first Ctrl-C raises ``KeyboardInterrupt`` (the run stops, its temp file is removed, its
threads are joined); further ones are ignored, so that they cannot cut that cleanup short
(SIGTERM and SIGHUP: ``signals.py``). The CLI is imported inside ``run``, after the handler is in
place, so that Ctrl-C while torch imports (seconds on a cold disk) ends quietly instead of with a
traceback. An interrupted or stopped run then leaves at once: torch's interpreter teardown takes
0.6-1.6 s on two loaded cores, and nothing is left to finish.
"""

import os
import signal
import sys


def _interrupt(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run() -> int:
    signal.signal(signal.SIGINT, _interrupt)
    try:
        from .cli import main

        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if code > 128:  # interrupted or stopped by a signal, and cleaned up
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
