"""``python -m quant_core`` and the ``quant-core`` command.

The CLI is imported inside ``run`` so that Ctrl-C while torch imports (seconds on a cold disk)
ends quietly instead of with a traceback.
"""

import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
