"""GPU tests: registers the ``gpu`` marker here too, so tests/gpu works on its own."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
