import pytest

from tests.e2e import cluster as cluster_lib


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for c in cluster_lib.ACTIVE:
            report.sections.append(("kvmesh process logs", c.log_tails()))
