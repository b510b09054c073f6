"""``python -m attnfuse`` (and ``torchrun -m attnfuse``) runs the command line."""

from .cli import main

main()
