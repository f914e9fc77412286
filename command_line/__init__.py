"""The programs: thin wrappers that parse, call the library and report."""

import os
import signal
import sys
import threading


def _interrupted_while_starting(signum, frame):
    # Ctrl-C while a program's modules load (cctbx, numba and the kernel cache: seconds on a
    # busy machine) would print a traceback from the middle of an import. Nothing has been
    # read or written yet, so one line and exit; Program.main puts the previous handler back
    # before it reads anything (cli.restore_interrupt_handler).
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if not program.startswith("dials.vmerge"):
        program = "dials.vmerge"
    os.write(2, f"{program}: interrupted while starting; no output files were changed\n".encode())
    os._exit(130)


# signal handlers can only be set from the main thread (a library caller may import from
# another one; then Python's default KeyboardInterrupt stays)
if threading.current_thread() is threading.main_thread():
    handler_before_startup = signal.signal(signal.SIGINT, _interrupted_while_starting)
