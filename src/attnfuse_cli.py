"""The ``attnfuse`` console script. It imports the command line inside a guard: importing torch
takes seconds, and Ctrl-C in that time must end like Ctrl-C anywhere else (one line, exit code
130), not with a traceback through torch's import machinery. Everything else is
:func:`attnfuse.cli.main`."""

import sys


def main() -> None:
    try:
        from attnfuse.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (Ctrl-C)\n")
        raise SystemExit(130) from None
    run()
