"""``python -m attnfuse`` (and ``torchrun -m attnfuse``) runs the command line. The Ctrl-C guard
is already in force: the package's ``__init__`` installed it before importing torch (see
:mod:`attnfuse_cli`)."""

from .cli import main

main()
