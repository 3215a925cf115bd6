"""clipkit.plan's memory against direct measurement on CPU: DeepSpeed ZeRO 0-3 on 1 and 2 processes (the model states
tensor by tensor, and the step's peak RSS), and the contrastive loss on 1 and 2 processes (peak RSS). Within 15%.

The model here (clipkit-small, 25M parameters) is not one of the two the calibration's transient memory was fitted
on (clipkit-tiny, 9M, and a 46M config: bench/plan_memory.py), so the peak check tests the fit, not its inputs.
"""

import importlib.util
from pathlib import Path

import pytest

from clipkit.plan.calibration import load_calibration
from clipkit.plan.loss import loss_peak_bytes
from clipkit.plan.memory import model_states, rank_memory
from clipkit.plan.model import profile_model

REPO = Path(__file__).resolve().parents[1]
MODEL = "clipkit-small"
pytestmark = pytest.mark.slow


def bench():
    spec = importlib.util.spec_from_file_location("plan_memory_bench", REPO / "bench" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_states_and_peak_against_measured(stage, world):
    calibration = load_calibration()
    if "fp32" not in calibration.get("zero_transient", {}):
        pytest.fail("clipkit/plan/calibration.json lacks zero_transient fp32 (bench/plan_memory.py --calibration)")
    profile = profile_model(MODEL, "fp32")
    predicted_states = model_states(profile.params, profile.trainable, stage, world, "fp32", profile.persistent)
    predicted_peak = rank_memory(profile, 2, world, stage, calibration).total
    for rank in bench().measure_zero(MODEL, stage, world, "fp32", batch=2):
        measured = rank["states"]
        for kind, value in predicted_states.items():
            assert measured.get(kind, 0) == pytest.approx(value, rel=0.15, abs=2**20), (kind, measured)
        assert predicted_peak == pytest.approx(rank["peak_bytes"], rel=0.15), (rank["peak_bytes"], predicted_peak)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("chunk", [None, 256])
def test_loss_memory_against_measured(chunk, world):
    batch, dim = 2048, 256
    predicted = loss_peak_bytes(batch, world, dim, chunk, "fp32")
    for rank in bench().measure_loss(batch, world, dim, chunk, "fp32"):
        assert predicted == pytest.approx(rank["peak_bytes"], rel=0.15), (rank["peak_bytes"], predicted)
