"""``python -m quant_core`` and the ``quant-core`` command: the command line, with Ctrl-C handled
for the whole process.

The first Ctrl-C raises ``KeyboardInterrupt`` (the run stops, its temp file is removed, its
threads are joined); further ones are ignored, so that they cannot cut that cleanup short
(SIGTERM and SIGHUP: ``signals.py``). The CLI is imported inside ``run``, after the handler is in
place, so that Ctrl-C while torch imports (seconds on a cold disk) ends quietly instead of with a
traceback. Every run then leaves at once, once its output is flushed and the exit handlers have
run: the interpreter's teardown of torch's modules takes 0.6-1.6 s on two loaded cores, a large
part of a small conversion's time, and nothing is left to finish (the output is published and on
disk, or removed).
"""

import atexit
import os
import signal
import sys
from typing import NoReturn


def _interrupt(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run() -> NoReturn:
    signal.signal(signal.SIGINT, _interrupt)
    try:
        from .cli import main

        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    atexit._run_exitfuncs()  # what a normal exit would run (logging's flush, temp files of unfinished writes)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(run())
