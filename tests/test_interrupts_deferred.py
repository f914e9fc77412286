"""A Ctrl-C that arrives while gemmi's native code runs is held until the call returns and
then raised as an ordinary KeyboardInterrupt (gemmi would otherwise abort the process)."""

import os
import signal

import pytest

from dials_vmerge.io.atomic import interrupts_deferred


def test_interrupt_inside_is_delivered_after_the_block():
    reached_end_of_block = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the Python handler would have run by now
                pass
            reached_end_of_block = True
    assert reached_end_of_block
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_signal_no_effect_and_decorator_form():
    @interrupts_deferred()
    def work(x):
        return 2 * x

    assert work(3) == 6 and work(4) == 8  # the decorator makes a fresh context per call
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
