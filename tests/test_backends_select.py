"""compute.device: auto picks the GPU only when numba sees one; cuda without one is an error."""

import os
import subprocess
import sys

import dials_vmerge  # noqa: F401  (before numba)
import pytest

from dials_vmerge.backends import select
from dials_vmerge.errors import PhilError, VmergeError


def test_cpu_when_no_gpu(monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: False)
    assert select.choose_device("auto") == "cpu"
    assert select.choose_device("cpu") == "cpu"
    with pytest.raises(VmergeError) as err:
        select.choose_device("cuda")
    assert str(err.value) == ("compute.device=cuda: no GPU visible to numba "
                              "(see dials.vmerge.devices)")


def test_cuda_when_gpu_visible(monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: True)
    assert select.choose_device("auto") == "cuda"
    assert select.choose_device("cuda") == "cuda"
    assert select.choose_device("cpu") == "cpu"  # an explicit cpu request is honoured


def test_unknown_device_names_the_parameter():
    with pytest.raises(PhilError, match=r"compute.device=tpu: expected one of auto, cpu, cuda"):
        select.choose_device("tpu")


def test_real_numba_without_visible_devices():
    # No GPU is visible with CUDA_VISIBLE_DEVICES empty, on any machine: the real numba check
    # (not a monkeypatch) must then choose cpu and refuse cuda.
    code = ("import dials_vmerge\n"
            "from dials_vmerge.backends.select import choose_device\n"
            "print(choose_device('auto'))\n"
            "choose_device('cuda')\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.strip() == "cpu"
    assert run.returncode != 0
    assert "VmergeError: compute.device=cuda: no GPU visible to numba" in run.stderr


def test_no_driver_means_no_numba_cuda_import():
    # Without a loadable CUDA driver, auto decides cpu without importing numba.cuda (~6 MB
    # resident for the rest of a run); the driver search is made to fail here on any machine.
    code = ("import sys, ctypes\n"
            "import dials_vmerge\n"
            "from dials_vmerge.backends.select import choose_device\n"
            "real = ctypes.CDLL\n"
            "def no_cuda(name, *a, **k):\n"
            "    if 'libcuda' in str(name):\n"
            "        raise OSError(name)\n"
            "    return real(name, *a, **k)\n"
            "ctypes.CDLL = no_cuda\n"
            "print(choose_device('auto'), 'numba.cuda' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "NUMBA_CUDA_DRIVER")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "False"]


def test_simulator_still_asks_numba(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert select._cuda_driver_loadable()
