"""The TT kernel's cost model of every in-process test here: a fixed calibration
(tests/distributed/test_tt_costs.py), so that no test times the kernel while planning."""
import pytest

from ttdist.distributed.tt_costs import set_calibration


@pytest.fixture(autouse=True)
def fixed_tt_calibration():
    from tests.distributed.test_tt_costs import CALIBRATION
    set_calibration(CALIBRATION)
    yield
    set_calibration(None, "cpu")
