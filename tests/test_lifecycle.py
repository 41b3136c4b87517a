"""A model's life: every state change goes through one table; anything else is a manager bug, raised at once."""

from __future__ import annotations

import pytest

from model_manager.config import ModelSpec
from model_manager.slots import IllegalTransition, ModelSlot, ModelState

S = ModelState


def slot() -> ModelSlot:
    return ModelSlot(name="m", spec=ModelSpec(kind="llm", path="/nowhere.gguf", quantization="Q4_1"))


@pytest.mark.parametrize(
    "path",
    [
        [S.LOADING, S.READY, S.UNLOADING, S.UNLOADED],  # load, serve, unload (asked, idle or evicted)
        [S.LOADING, S.FAILED, S.LOADING, S.READY],  # a failed load, then a later request loads it again
        [S.LOADING, S.READY, S.FAILED, S.LOADING],  # the worker died under a loaded model; the next request
        [S.FAILED, S.FAILED, S.LOADING],  # given up before a worker started (no memory), twice, then loaded
    ],
)
def test_the_lives_a_model_leads(path: list[ModelState]) -> None:
    model = slot()
    for state in path:
        model.transition(state)
    assert model.state is path[-1]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([], S.READY),  # ready without a load
        ([], S.UNLOADING),
        ([S.LOADING], S.UNLOADING),  # a load is failed or finished, not unloaded half-way
        ([S.LOADING, S.READY], S.LOADING),
        ([S.LOADING, S.READY, S.UNLOADING], S.READY),  # an exiting worker does not come back
        ([S.LOADING, S.READY, S.UNLOADING], S.FAILED),
        ([S.LOADING, S.READY], S.UNLOADED),  # unloaded only once its worker has exited
    ],
)
def test_state_changes_no_model_makes_raise(before: list[ModelState], after: ModelState) -> None:
    model = slot()
    for state in before:
        model.transition(state)
    with pytest.raises(IllegalTransition):
        model.transition(after)
    assert model.state is (before[-1] if before else S.UNLOADED)
