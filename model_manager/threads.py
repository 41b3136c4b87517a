"""CPU threads for the models that compute at once, so that together they never ask for more than the cores.

llama.cpp's threads spin while they wait for each other (CTranslate2's and ONNX Runtime's too): two engines whose
threads add up to more than the cores slow each other far beyond their share (on 2 cores, a prompt of 0.6 s took
3-8 s beside a transcription). So the manager hands threads out, from a budget (the cores this process may use,
or ``devices.cpu_threads``):

- a speech model gets a fixed share when it loads (its engine cannot change it later): half the budget;
- an LLM is re-assigned, each time the set of models computing changes, what the computing speech models leave,
  split evenly among the computing LLMs (at least one each): alone, it gets every core.

A model whose YAML sets ``n_threads`` keeps it (counted like a speech model's share), and a model that runs on a
GPU takes no share. Nothing here talks to a worker; the lifecycle sends what changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from model_manager.config import ModelSpec


def cpu_budget(setting: int | str) -> int | None:
    """The threads to hand out; None for 0: none handed out (each engine takes its own default)."""
    if setting == "auto":
        return len(os.sched_getaffinity(0))
    return int(setting) or None


def computes_on_cpu(spec: ModelSpec) -> bool:
    """``spec`` as placed: a speech model on a GPU, or an LLM with every layer there, leaves the cores alone."""
    if spec.kind == "llm":
        return spec.n_gpu_layers != -1
    return spec.device == "cpu"


def adjustable(spec: ModelSpec) -> bool:
    """Only llama.cpp changes its threads between steps, and only where the YAML left them to the manager."""
    return spec.kind == "llm" and spec.n_threads is None


def fixed_share(budget: int) -> int:
    return max(1, budget // 2)


@dataclass(frozen=True)
class Computing:
    """A model with requests running: its name, the threads it holds, and whether they can be re-assigned."""

    name: str
    threads: int
    adjustable: bool


def shares(budget: int, computing: list[Computing]) -> dict[str, int]:
    """Threads for each adjustable model in ``computing``: the budget the others leave, split evenly."""
    fixed = sum(c.threads for c in computing if not c.adjustable)
    names = sorted(c.name for c in computing if c.adjustable)
    if not names:
        return {}
    each, extra = divmod(max(0, budget - fixed), len(names))
    return {name: max(1, each + (1 if i < extra else 0)) for i, name in enumerate(names)}
