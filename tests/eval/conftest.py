import pytest


@pytest.fixture(autouse=True)
def _eval_one_thread(one_thread):
    """Every eval test runs on one thread (the shared ``one_thread`` fixture of tests/conftest.py)."""
    yield
