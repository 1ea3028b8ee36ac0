"""Predicting the peak memory of a training step before a run: arithmetic on the model shape, no
tensors and no GPU.

    estimate_peak_bytes(model_cfg, ...)  the peak of one step, phase by phase, term by term (step.py)
    estimate_report(cfg, world_size)     the same for a run config, with loading and export
                                         (`ftcore bench --estimate CONFIG`; run.py)

shapes.py names the dimensions and dtypes; activations.py says what each op of ftcore's model keeps
for backward; step.py adds the terms up per phase. It follows what the model actually allocates and
is tested against measured peaks of tiny CPU runs (tests/test_memory.py, ftcore.memory.AllocationTrace);
bench/bench_step.py prints it beside the measured CUDA peak.
"""
from ftcore.estimate.run import estimate_load_bytes, estimate_report, estimate_run  # noqa: F401
from ftcore.estimate.shapes import GiB, MiB, PRECISIONS, Dtypes, Shape, precision_dtypes  # noqa: F401
from ftcore.estimate.step import AC_MODES, PHASES, estimate_peak_bytes  # noqa: F401
