"""The step watchdog names the rank, the step and the collective in flight, then exits non-zero."""

import time

from megagen.train.watchdog import EXIT_CODE, StepWatchdog


class _Counter:
    in_flight = "all_gather (_c10d_functional.all_gather_into_tensor)"


def test_a_stuck_step_is_reported_and_exits(capfd):
    exits = []
    dog = StepWatchdog(0.2, rank=3, counter=_Counter(), poll_s=0.05, exit_fn=exits.append)
    dog.step_started(7)
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.close()
    assert exits == [EXIT_CODE]
    err = capfd.readouterr().err
    assert "rank 3: step 7" in err and "inside collective all_gather" in err


def test_steps_within_the_timeout_pass(capfd):
    exits = []
    dog = StepWatchdog(0.5, rank=0, poll_s=0.05, exit_fn=exits.append)
    for step in range(3):
        dog.step_started(step)
        time.sleep(0.1)
        dog.step_finished()
    time.sleep(0.6)  # idle between steps never trips it
    dog.close()
    assert exits == []
