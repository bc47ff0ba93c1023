"""Calibration: token windows for data-dependent methods, the statistics they collect, and the
sequential (block-by-block) driver that ``quantize_model`` hands those methods to."""
from polyquant.calibration.arch import LAYOUTS, MODEL_TYPES, Group, block_groups, layout_for
from polyquant.calibration.data import as_samples, calibration_data, calibration_stream, window_offsets
from polyquant.calibration.driver import Calibration, run_sequential
from polyquant.calibration.stats import COLLECTORS, HessianCollector, collector_factory

__all__ = ["COLLECTORS", "Calibration", "Group", "HessianCollector", "LAYOUTS", "MODEL_TYPES", "as_samples",
           "block_groups", "calibration_data", "calibration_stream", "collector_factory", "layout_for", "run_sequential",
           "window_offsets"]
