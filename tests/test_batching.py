"""The micro-batch planner and the runtime defaults."""

import dataclasses
import itertools
import random

import pytest
import torch

from models.base import resolve_runtime
from models.batching import padded_slots, plan_micro_batches


@pytest.mark.parametrize("budget,max_items", [(1, 1), (50, 4), (100, 64), (1000, 3), (10**6, 10**6)])
def test_every_item_planned_once_within_budget(budget, max_items):
    rng = random.Random(budget)
    lengths = [rng.randint(1, 120) for _ in range(97)]
    groups = plan_micro_batches(lengths, budget, max_items)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths)))
    for group in groups:
        assert len(group) <= max_items
        # Only a single item longer than the budget may pass it, alone.
        assert padded_slots([lengths[i] for i in group]) <= budget or len(group) == 1


def test_groups_are_length_sorted_so_padding_stays_small():
    lengths = [10, 500, 12, 480, 11, 490]
    groups = plan_micro_batches(lengths, token_budget=1500, max_items=64)
    assert [sorted(lengths[i] for i in g) for g in groups] == [[480, 490, 500], [10, 11, 12]]


def test_empty_and_invalid():
    assert plan_micro_batches([], 10, 10) == []
    with pytest.raises(ValueError):
        plan_micro_batches([1], 0, 1)


def test_cpu_runtime_defaults():
    runtime = resolve_runtime("cpu")
    assert runtime.dtype == torch.float32 and runtime.attn_implementation == "sdpa"
    assert not runtime.pack_sequences and runtime.expand_shared_head
    assert resolve_runtime("cpu", "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_runtime("cpu", "int3")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_runtime("cuda")


def test_micro_batch_defaults_follow_the_device():
    cpu = resolve_runtime("cpu")
    assert (cpu.default_token_budget, cpu.default_max_batch_items) == (1024, 64)
    # A CUDA runtime as resolve_runtime would make it (constructed directly: this machine may have no GPU).
    cuda = dataclasses.replace(cpu, device=torch.device("cuda"), dtype=torch.bfloat16)
    assert (cuda.default_token_budget, cuda.default_max_batch_items) == (32768, 96)
