"""Analysis tools beside the library core (``import ttdist`` never loads them): the step-time and
scaling model (``perf_model``) and the byte count of every collective of a plan (``comm_volume``),
used by the benchmarks and their tests."""
