"""The command line every dials.vmerge program shares: files, PHIL, flags, logs and errors.

A program is `Program(name, phil_files, run, help)`; `run(params, inputs, log)` does the work.
User errors (VmergeError, bad PHIL) become one line on stderr and exit code 1; `--debug`
shows the traceback instead. The log is kept in memory and written atomically at the end, so
a failed run leaves no output files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, List, Optional, Sequence

from . import __version__
from .errors import PhilError, VmergeError
from .memory import return_large_frees_to_os

# DIALS-guide names and short forms that would otherwise be unknown or ambiguous. Each maps to
# the full parameter paths it sets (only those present in the program's scope are used).
ALIASES = {
    "scale_term": ["physical.scale_correction"],
    "decay_term": ["physical.decay_correction", "array.decay_correction", "KB.decay_correction"],
    "absorption_term": ["physical.absorption_correction", "array.absorption_correction"],
    "modulation_term": ["array.modulation_correction"],
    "include_datasets": ["dataset_selection.use_datasets"],
    "intensity": ["reflection_selection.intensity_choice"],
    "nproc": ["compute.nproc"],
    "d_min": ["cut_data.d_min", "merging.d_min"],
    "d_max": ["cut_data.d_max", "merging.d_max"],
    "error_model": ["weighting.error_model.error_model"],
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
    ):
        self.name = name
        self.phil_files = list(phil_files)
        self.run = run
        self.help = help
        self.needs_data = needs_data
        self.write_log = write_log

    # -- parsing -------------------------------------------------------------------------
    def master_phil(self):
        import iotbx.phil

        return iotbx.phil.parse(load_phil_text(self.phil_files), process_includes=True)

    def _assignment_sources(self, master, assignments: List[str]):
        interpreter = master.command_line_argument_interpreter()
        paths = {d.path for d in master.all_definitions()}
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
            for a in args:
                try:
                    sources.append(interpreter.process(arg=a))
                except Exception as e:  # libtbx raises Sorry / RuntimeError
                    raise PhilError(f"parameter {arg}: {_first_line(e)}") from None
        return sources

    def parse(self, argv: Sequence[str]):
        flags = {"show": False, "expert": 0, "attributes": 0, "debug": False, "help": False}
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
                else:
                    raise PhilError(
                        f"argument '{arg}' is not a .expt/.refl/.phil file or a name=value parameter"
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
        return_large_frees_to_os()
        argv = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in argv
        from .backends import mpi_world

        try:
            mpi_world.silence_non_output_ranks()  # under mpiexec: only rank 0 talks
            code = self._main(argv)
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
        sys.stdout.flush()
        return code

    def _main(self, argv) -> int:
        flags, assignments, phil_paths, expt_paths, refl_paths = self.parse(argv)
        if flags.get("version"):
            print(f"{self.name} (dials-vmerge) {__version__}")
            return 0
        if flags["help"]:
            print(self.help.strip() or self.name)
            print("\nParameters (-c to show them all, -e 1/-e 2 for expert levels, -a 1 for attributes):")
            master = self.master_phil()
            print(master.as_str(expert_level=0, attributes_level=1))
            return 0
        from .io.files import check_input_file

        for paths, kind in ((expt_paths, ".expt"), (refl_paths, ".refl")):
            for path in paths:
                check_input_file(path, kind)
        master, working, params = self.extract(assignments, phil_paths)
        if flags["show"]:
            print(master.format(params).as_str(expert_level=flags["expert"], attributes_level=flags["attributes"]))
            return 0
        inputs = Inputs(experiment_paths=expt_paths, reflection_paths=refl_paths)
        if self.needs_data:
            if not expt_paths or not refl_paths:
                raise VmergeError(
                    "needs experiment (.expt) and reflection (.refl) files, e.g. "
                    f"{self.name} scaled.expt scaled.refl"
                )
            from .io.combine import load_experiments_and_reflections

            inputs.experiments, inputs.reflections = load_experiments_and_reflections(
                expt_paths, refl_paths
            )
        log, buffer = _make_logger(self.name)
        log.info(f"{self.name} (dials-vmerge {__version__})")
        log.info("Command line: " + " ".join([self.name] + list(argv)))
        diff = master.fetch_diff(working).as_str().strip()
        if diff and self.write_log:
            log.info("Parameters that differ from the defaults:\n" + diff)
        start = time.time()
        result = self.run(params, inputs, log)
        from .backends import mpi_world

        if mpi_world.n_ranks() > 1:
            log.info(mpi_world.summary())
        log.info(f"Total time: {time.time() - start:.2f} s")
        log_path = _output_param(params, "log") or f"{self.name}.log"
        if self.write_log:
            from .io.atomic import atomic_write

            with atomic_write(log_path, "w") as f:
                f.write(buffer.getvalue())
        return 0 if result is None else int(result)


def _output_param(params, name):
    out = getattr(params, "output", None)
    return getattr(out, name, None) if out is not None else None


def _make_logger(name: str):
    log = logging.getLogger(f"dials_vmerge.program.{name}")
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(logging.Formatter("%(message)s"))
    buffer = io.StringIO()
    memory = logging.StreamHandler(buffer)
    memory.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(stdout)
    log.addHandler(memory)
    return log, buffer


def write_json(path: str, obj) -> None:
    from .io.atomic import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=float)
