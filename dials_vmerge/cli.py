"""The command line every dials.vmerge program shares: files, PHIL, flags, logs and errors.

A program is `Program(name, phil_files, run, help)`; `run(params, inputs, log)` does the work.
User errors (VmergeError, bad PHIL) become one line on stderr and exit code 1; `--debug`
shows the traceback instead. The log is kept in memory and written atomically at the end, so
a failed run leaves no output files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, List, Optional, Sequence

from . import __version__
from .errors import PhilError, VmergeError
from .memory import freeze_import_time_objects, return_large_frees_to_os

# DIALS-guide names and short forms that would otherwise be unknown or ambiguous. Each maps to
# the full parameter paths it sets (only those present in the program's scope are used).
ALIASES = {
    "scale_term": ["physical.scale_correction"],
    "decay_term": ["physical.decay_correction", "array.decay_correction", "KB.decay_correction",
                   "dose_decay.decay_correction"],
    "absorption_term": ["physical.absorption_correction", "array.absorption_correction",
                        "dose_decay.absorption_correction"],
    "modulation_term": ["array.modulation_correction"],
    "include_datasets": ["dataset_selection.use_datasets"],
    "intensity": ["reflection_selection.intensity_choice"],
    "nproc": ["compute.nproc"],
    "d_min": ["cut_data.d_min", "merging.d_min"],
    "d_max": ["cut_data.d_max", "merging.d_max"],
    "error_model": ["weighting.error_model.error_model"],
    # Unique to the physical scope until dose_decay repeated them (DIALS then calls them
    # ambiguous); the short forms keep meaning physical.*, dose_decay.* is given in full.
    "lmax": ["physical.lmax"],
    "surface_weight": ["physical.surface_weight"],
    "scale_interval": ["physical.scale_interval"],
    "fix_initial": ["physical.fix_initial"],
    # dials.vmerge.simulate: images per sweep (or the number of stills with mode=stills)
    "n_images": ["simulate.rotation.n_images"],
}
# Aliases that switch a term in every model scope; the others pick their first target
# present in the program (e.g. d_min means cut_data.d_min in dials.vmerge, merging.d_min in
# dials.vmerge.merge).
SET_ALL_TARGETS = {"scale_term", "decay_term", "absorption_term", "modulation_term"}


def load_phil_text(names: Sequence[str]) -> str:
    return "\n".join(
        resources.files("dials_vmerge.phil").joinpath(f"{n}.phil").read_text() for n in names
    )


def _first_line(message: str) -> str:
    lines = [l.strip() for l in str(message).strip().splitlines() if l.strip()]
    if not lines:
        return "unknown error"
    # libtbx reads numbers as Python expressions: nproc=abc would say "NameError: name 'abc'
    # is not defined"; say what is wrong instead
    numeric = re.match(r'Error interpreting (\S+)="(.*)" as a numeric expression', lines[0])
    if numeric:
        return f"{numeric.group(1)}={numeric.group(2)}: not a number"
    # a choice error lists the choices with the default marked *; the mark is PHIL syntax
    lines = [lines[0]] + [l.lstrip("*") for l in lines[1:]]
    if lines[0].startswith("Ambiguous") and len(lines) > 2:
        return f"{lines[0]} (could be: {', '.join(lines[2:])})"
    if lines[0].startswith("Not a possible choice") and len(lines) > 2:
        return f"{lines[0]} (choices: {', '.join(lines[2:])})"
    return lines[0]


@dataclass
class Inputs:
    experiments: object = None
    reflections: object = None
    experiment_paths: List[str] = field(default_factory=list)
    reflection_paths: List[str] = field(default_factory=list)
    mtz_paths: List[str] = field(default_factory=list)  # programs with accepts_mtz

    @property
    def paths(self) -> List[str]:
        return self.experiment_paths + self.reflection_paths


class _Usage(Exception):
    pass


class Program:
    def __init__(
        self,
        name: str,
        phil_files: Sequence[str],
        run: Optional[Callable],
        help: str = "",
        needs_data: bool = True,
        write_log: bool = True,
        accepts_mtz: bool = False,
        experiments_alone: bool = False,
    ):
        self.name = name
        self.phil_files = list(phil_files)
        self.run = run
        self.help = help
        self.needs_data = needs_data
        self.write_log = write_log
        # issue 15: .mtz inputs (read by the program itself), and .expt files without .refl
        self.accepts_mtz = accepts_mtz
        self.experiments_alone = experiments_alone

    # -- parsing -------------------------------------------------------------------------
    def master_phil(self):
        import iotbx.phil

        return iotbx.phil.parse(load_phil_text(self.phil_files), process_includes=True)

    def _assignment_sources(self, master, assignments: List[str]):
        interpreter = master.command_line_argument_interpreter()
        definitions = master.all_definitions()
        paths = {d.path for d in definitions}
        # choices offering "auto": `x=auto` must select that word (`*auto`), or PHIL reads it
        # as its Auto keyword, a different value from the default that is echoed as a change
        auto_choices = {d.path for d in definitions if d.object.type.phil_type == "choice"
                        and "auto" in [w.value.lstrip("*") for w in d.object.words]}
        sources = []
        for arg in assignments:
            name, _, value = arg.partition("=")
            name = name.strip()
            args = [arg]
            if name in ALIASES and name not in paths:
                targets = [p for p in ALIASES[name] if p in paths]
                if name in SET_ALL_TARGETS:
                    args = [f"{t}={value}" for t in targets] or args
                elif targets:
                    args = [f"{targets[0]}={value}"]
            if value.strip().lower() == "auto":
                args = [f"{n}=*auto" if any(p == n or p.endswith("." + n) for p in auto_choices)
                        else f"{n}={v}" for n, _, v in (a.partition("=") for a in args)]
            for a in args:
                try:
                    sources.append(interpreter.process(arg=a))
                except Exception as e:  # libtbx raises Sorry / RuntimeError
                    raise PhilError(f"parameter {arg}: {_first_line(e)}") from None
        return sources

    def parse(self, argv: Sequence[str]):
        flags = {"show": False, "expert": 0, "attributes": 0, "debug": False, "help": False,
                 "mtz_paths": []}
        assignments, phil_paths, expt_paths, refl_paths = [], [], [], []
        argv = list(argv)
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                flags["help"] = True
            elif arg == "--version":
                flags["version"] = True
            elif arg == "--debug":
                flags["debug"] = True
            elif arg == "-c":
                flags["show"] = True
            elif arg in ("-e", "-a") or (arg[:2] in ("-e", "-a") and arg[2:].isdigit()):
                value = arg[2:]
                if not value:
                    i += 1
                    value = argv[i] if i < len(argv) else ""
                if not value.isdigit():
                    raise PhilError(f"option {arg} needs a whole number")
                flags["expert" if arg.startswith("-e") else "attributes"] = int(value)
            elif arg.startswith("-"):
                raise PhilError(f"unknown option {arg} (see -h)")
            elif "=" in arg and not os.path.exists(arg):
                assignments.append(arg)
            else:
                lower = arg.lower()
                if lower.endswith(".phil") or lower.endswith(".params"):
                    phil_paths.append(arg)
                elif lower.endswith(".refl") or lower.endswith(".pickle") or lower.endswith(".refl.gz"):
                    refl_paths.append(arg)
                elif lower.endswith(".expt") or lower.endswith(".json"):
                    expt_paths.append(arg)
                elif lower.endswith(".mtz") and self.accepts_mtz:
                    flags["mtz_paths"].append(arg)
                else:
                    kinds = ".expt/.refl/.mtz/.phil" if self.accepts_mtz else ".expt/.refl/.phil"
                    raise PhilError(
                        f"argument '{arg}' is not a {kinds} file or a name=value parameter"
                    )
            i += 1
        return flags, assignments, phil_paths, expt_paths, refl_paths

    def extract(self, assignments, phil_paths):
        import iotbx.phil

        master = self.master_phil()
        sources = []
        for path in phil_paths:
            if not os.path.isfile(path):
                raise PhilError(f"{path}: parameter file not found")
            try:
                sources.append(iotbx.phil.parse(file_name=path))
            except Exception as e:
                raise PhilError(f"{path}: {_first_line(e)}") from None
        sources += self._assignment_sources(master, assignments)
        try:
            working = master.fetch(sources=sources)
            params = working.extract()
        except Exception as e:
            raise PhilError(_first_line(e)) from None
        return master, working, params

    # -- running -------------------------------------------------------------------------
    def main(self, argv: Optional[Sequence[str]] = None) -> int:
        restore_interrupt_handler()
        return_large_frees_to_os()
        freeze_import_time_objects()
        _deliver_interrupts_from_callbacks()
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv
        from .backends import mpi_world

        try:
            mpi_world.silence_non_output_ranks()  # under mpiexec: only rank 0 talks
            code = self._main(argv)
        except BrokenPipeError:
            # the reader of our output went away (`dials.vmerge -h | head`): not an error of
            # ours; stdout is pointed at devnull so that the interpreter's final flush is quiet
            _silence_stdout()
            return 0
        except VmergeError as e:
            if debug:
                raise
            # one process: print; MPI: printed once, every rank stops (backends/mpi_world.py)
            code = mpi_world.stop_after_error(f"{self.name}: error: {e}")
        except KeyboardInterrupt:
            print(f"{self.name}: interrupted; no output files were changed", file=sys.stderr)
            code = 130
        except MemoryError:
            if debug:
                raise
            code = mpi_world.stop_after_error(f"{self.name}: error: out of memory")
        except Exception as e:  # a bug: still one line unless --debug
            if debug:
                raise
            code = mpi_world.stop_after_error(
                f"{self.name}: internal error: {type(e).__name__}: {_first_line(e)} "
                "(rerun with --debug for the traceback)"
            )
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        return code

    def _main(self, argv) -> int:
        flags, assignments, phil_paths, expt_paths, refl_paths = self.parse(argv)
        if flags.get("version"):
            print(version_line(self.name))  # the log's first line says the same
            return 0
        if flags["help"]:
            print(self.help.strip() or self.name)
            print("\nParameters (-c to show them all, -e 1/-e 2 for expert levels, -a 1 for attributes):")
            master = self.master_phil()
            print(master.as_str(expert_level=0, attributes_level=1))
            return 0
        from .io.files import check_input_file

        mtz_paths = flags["mtz_paths"]
        for paths, kind in ((expt_paths, ".expt"), (refl_paths, ".refl"), (mtz_paths, ".mtz")):
            for path in paths:
                check_input_file(path, kind)
        master, working, params = self.extract(assignments, phil_paths)
        if flags["show"]:
            print(master.format(params).as_str(expert_level=flags["expert"], attributes_level=flags["attributes"]))
            return 0
        read_seconds = 0.0
        inputs = Inputs(experiment_paths=expt_paths, reflection_paths=refl_paths,
                        mtz_paths=mtz_paths)
        if mtz_paths and (expt_paths or refl_paths) and not self.experiments_alone:
            raise VmergeError("give either .mtz files or .expt/.refl files, not both")
        if self.experiments_alone and expt_paths and not refl_paths:
            from .io.expt import ExperimentList, read_experiments

            inputs.experiments = ExperimentList()
            for path in expt_paths:
                inputs.experiments.extend(read_experiments(path))
        elif self.needs_data and (expt_paths or refl_paths or not mtz_paths):
            if not expt_paths or not refl_paths:
                raise VmergeError(
                    "needs experiment (.expt) and reflection (.refl) files, e.g. "
                    f"{self.name} scaled.expt scaled.refl"
                )
            from .io.combine import load_experiments_and_reflections

            read_start = time.perf_counter()
            inputs.experiments, inputs.reflections = load_experiments_and_reflections(
                expt_paths, refl_paths
            )
            read_seconds = time.perf_counter() - read_start
        log_path = _output_param(params, "log") or f"{self.name}.log"
        with contextlib.ExitStack() as outputs:
            # The log is written line by line as the run goes, to a temporary file (in the
            # system's temporary directory) that becomes log_path when the run succeeds and
            # is removed if it fails: a failed or killed run leaves no output files.
            stream_path = None
            if self.write_log:
                from .io.atomic import streamed_output_path

                stream_path = outputs.enter_context(streamed_output_path(log_path))
            log, log_file = _make_logger(self.name, stream_path)
            try:
                log.info(version_line(self.name))
                log.info("Command line: " + " ".join([self.name] + list(argv)))
                diff = master.fetch_diff(working).as_str().strip()
                if diff and self.write_log:
                    log.info("Parameters that differ from the defaults:\n" + diff)
                from .progress import MIN_LOGGED_SECONDS

                if read_seconds >= MIN_LOGGED_SECONDS:
                    log.info(f"Reading the input files: {read_seconds:.1f} s")
                start = time.time()
                result = self.run(params, inputs, log)
                from .backends import mpi_world

                if mpi_world.n_ranks() > 1:
                    log.info(mpi_world.summary())
                log.info(f"Total time: {time.time() - start:.2f} s")
            finally:
                _close_log_file(log, log_file)
        return 0 if result is None else int(result)


def version_line(program: str) -> str:
    """What --version prints and the log starts with: 'dials.vmerge (dials-vmerge 0.1.0)'."""
    return f"{program} (dials-vmerge {__version__})"


def _output_param(params, name):
    out = getattr(params, "output", None)
    return getattr(out, name, None) if out is not None else None


class _StdoutHandler(logging.StreamHandler):
    """The terminal handler: a reader that went away (`| head`) ends the terminal output
    quietly; the log file is still complete."""

    def handleError(self, record):
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            _silence_stdout()
            return
        super().handleError(record)


def _make_logger(name: str, path: Optional[str] = None):
    """The program's logger: stdout, and the file `path` (flushed after every line) if
    given. Returns (logger, the file's handler or None)."""
    log = logging.getLogger(f"dials_vmerge.program.{name}")
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    stdout = _StdoutHandler(sys.stdout)
    stdout.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(stdout)
    log_file = None
    if path is not None:
        # StreamHandler flushes after each record
        log_file = logging.StreamHandler(open(path, "w", encoding="utf-8"))
        log_file.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(log_file)
    return log, log_file


def _close_log_file(log, log_file) -> None:
    if log_file is not None:
        log.removeHandler(log_file)
        log_file.stream.close()
        log_file.close()


def write_json(path: str, obj) -> None:
    from .io.atomic import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=float)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def restore_interrupt_handler() -> None:
    """Put back the SIGINT handler that the programs' package replaced while their modules
    loaded (command_line/__init__.py), so that a Ctrl-C from here on is a KeyboardInterrupt
    that Program.main reports."""
    import signal
    import threading

    programs = sys.modules.get("dials_vmerge.command_line")
    before = getattr(programs, "handler_before_startup", None)
    if before is None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is programs._interrupted_while_starting:
        signal.signal(signal.SIGINT, before)


def _deliver_interrupts_from_callbacks() -> None:
    """A Ctrl-C that lands inside a C callback (numba's object cache, while kernels load) is
    "ignored" by Python with a printed traceback and the run goes on. Hand it to the main
    thread instead, where Program.main turns it into the one-line "interrupted" message."""
    import _thread
    import threading

    previous = sys.unraisablehook
    if getattr(previous, "_dials_vmerge", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # raised here it would be "ignored" again: re-send it from another thread, to
            # arrive once the callback has returned (again, should it land in another one)
            threading.Timer(0.05, _thread.interrupt_main).start()
            return
        previous(unraisable)

    hook._dials_vmerge = True
    sys.unraisablehook = hook
