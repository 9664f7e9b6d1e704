import pytest

from services.launch.supervisor import RestartBudget


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_replacements_are_allowed_until_a_kind_crash_loops_then_again_once_the_window_passed():
    clock = Clock()
    budget = RestartBudget(max_restarts=2, window_s=60.0, clock=clock)
    assert budget.allow("worker")
    clock.now = 30.0
    assert budget.allow("worker")
    assert not budget.allow("worker")  # a third death within the minute: a crash loop
    assert budget.allow("memserver")  # counted per kind
    clock.now = 59.0
    assert not budget.allow("worker")
    clock.now = 60.0  # the first replacement left the window, the second has not
    assert budget.allow("worker") and not budget.allow("worker")


@pytest.mark.parametrize("kwargs", [{"max_restarts": -1}, {"window_s": 0}])
def test_a_budget_that_makes_no_sense_is_refused(kwargs):
    with pytest.raises(ValueError, match="max_restarts must be >= 0 and window_s > 0"):
        RestartBudget(**kwargs)
