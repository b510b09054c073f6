"""How the ``attnfuse`` program starts and ends: the console script, ``python -m attnfuse`` (the
form torchrun runs) and :func:`attnfuse.cli.main` all come through here.

Ctrl-C (SIGINT) or SIGTERM at any moment ends the program with one line on stderr and exit code
130 or 143. Three stretches of a run need their own handling:

- Start-up. Importing torch takes seconds, and parts of it run Python code inside C++ (pybind11)
  callbacks: the KeyboardInterrupt that Python's default handler raises there becomes a C++
  exception and ``std::terminate`` (SIGABRT, exit -6); elsewhere it is a traceback. So
  :func:`guard` installs, before anything heavy is imported, handlers that raise nothing: they
  write the line and end the process with ``os._exit`` (nothing needs cleaning up before a
  command runs).
- A command. :mod:`attnfuse.cli` hands over to the usual handling while a command runs (SIGINT
  raises KeyboardInterrupt, SIGTERM :class:`attnfuse.cli.common.Terminated`, ``train`` stops at a
  step boundary and writes its state), so that the command's clean-up runs; then the guard is
  back. The handlers are swapped, never removed: there is no moment without one.
- The end. Python's own exit puts back the default signal dispositions before it tears down the
  modules (with torch loaded, a long stretch), and a signal then kills the process without a
  word (exit -2 or -15). :func:`run` ends the process itself once the command is done: it runs
  the atexit handlers, flushes stdout and stderr, and calls ``os._exit`` with the command's exit
  code, the guard in force throughout.

A closed stdout (``attnfuse datasets | head -1``, a reader that exits early) ends the program
quietly with exit code 141, 128 + SIGPIPE: what the shell reports for ``cat``, ``grep`` or
``git log`` there, so that a script under ``set -o pipefail`` treats attnfuse like any other
producer (0 would claim the output was read; 1 is this program's "internal error"). Stdout is
then pointed at /dev/null, so that nothing tries to write the rest of it again.

This module imports the standard library only, and at first only what Python has loaded before it
(and the C signal module): the console script, and the package's ``__init__`` under
``python -m attnfuse``, import it before torch, and the guard is in force a moment after the
interpreter starts. The moment before (Python's own start-up, some tens of milliseconds) is
outside any program's reach."""

import _signal  # the C module: `signal` imports enum, and every millisecond before the guard counts
import os
import sys

EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_CLOSED_STDOUT = 130, 143, 141

_ENDINGS = {
    _signal.SIGINT: (EXIT_INTERRUPTED, b"error: interrupted (Ctrl-C)\n"),
    _signal.SIGTERM: (EXIT_TERMINATED, b"error: terminated (SIGTERM)\n"),
}


def end_now(signum: int, frame: object = None) -> None:
    """The guard's handler: the signal's line on stderr, then the process ends at once. It raises
    nothing, so it is safe inside any C++ callback."""
    code, line = _ENDINGS.get(signum, (128 + signum, b"error: stopped by a signal\n"))
    try:  # noqa: SIM105 (no contextlib: nothing more is imported before the guard)
        os.write(2, line)
    except OSError:
        pass
    os._exit(code)


def guard() -> None:
    """SIGINT and SIGTERM end the process at once with one line (:func:`end_now`). A no-op outside
    the main thread (where no handler can be installed)."""
    try:
        for signum in _ENDINGS:
            _signal.signal(signum, end_now)
    except ValueError:  # not the main thread
        pass


def guard_if_run_as_module() -> None:
    """:func:`guard`, when this process is ``python -m attnfuse`` (``torchrun -m attnfuse`` runs
    that too); called by the package's ``__init__`` before it imports torch."""
    argv = getattr(sys, "orig_argv", [])
    names = ("attnfuse", "attnfuse.__main__")
    after_m = [b for a, b in zip(argv, argv[1:]) if a == "-m"]  # noqa: RUF007 (no itertools, as above)
    if any(name in names for name in after_m + [a[2:] for a in argv if a[:2] == "-m"]):
        guard()


def stdout_closed() -> None:
    """After a BrokenPipeError on stdout: stdout goes to /dev/null from now on (its buffered rest
    is dropped rather than written again at exit, which would fail once more)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured output in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _code(exit) -> int:
    """The process exit code of a SystemExit, as Python's own exit computes it."""
    import contextlib

    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code & 0xFF
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{exit.code}\n")
    return 1


def _flush(code: int) -> int:
    """Stdout and stderr flushed; a closed stdout gives :data:`EXIT_CLOSED_STDOUT`."""
    import contextlib

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()
        code = code or EXIT_CLOSED_STDOUT
    except (OSError, ValueError, AttributeError):
        pass
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    return code


def run(app) -> None:
    """Run ``app()`` (a command line that ends with SystemExit) under the guard and end the process
    with its exit code, without Python's teardown (see the module's docstring): non-daemon threads
    joined, atexit handlers run, stdout and stderr flushed, then ``os._exit``."""
    import atexit
    import threading

    guard()
    try:
        try:
            app()
            code = 0
        except SystemExit as e:
            code = _code(e)
        finally:
            guard()  # a command's handling that was not handed back (a Ctrl-C while it was)
    except KeyboardInterrupt:  # raised by that handling after the command's error boundary
        end_now(_signal.SIGINT)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    os._exit(_flush(code))


def main() -> None:
    """The console script: the guard first, then the command line (torch loads here)."""
    guard()
    from attnfuse.cli import main as command_line

    command_line()
