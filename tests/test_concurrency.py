"""A patched model shared by threads, and training with gradient checkpointing."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import tomediff
from conftest import assert_close, tiny_sd_unet, unet_inputs


def test_concurrent_calls_equal_sequential_calls() -> None:
    unet = tiny_sd_unet()
    handle = tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    # Different inputs and two resolutions, as a server sharing one pipeline would see.
    cases = [unet_inputs(height=32, width=32, seed=s) for s in range(3)]
    cases += [unet_inputs(height=24, width=40, seed=s) for s in range(3, 6)]
    with torch.no_grad():
        expected = [unet(*case).sample for case in cases]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(cases))

    def worker(index: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):  # overlapping calls, each thread repeating its own
                    results[index] = unet(*cases[index]).sample
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, reference in enumerate(expected):
        assert torch.equal(results[index], reference), f"case {index} differs from its sequential output"
    assert handle.report().effective_ratio is not None


def test_plan_observers_number_each_threads_calls_on_their_own() -> None:
    """A PlanRecorder asked for call 2 gets the second call of each thread, never another thread's."""
    from tomediff.eval.visualize import PlanRecorder

    unet = tiny_sd_unet()
    inputs = {name: [unet_inputs(seed=10 * i + k) for k in range(2)] for i, name in enumerate("ab")}
    with torch.no_grad():
        reference = tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
        expected = {}
        for name, (_, second) in inputs.items():
            with PlanRecorder(reference, calls=None) as recorder:
                unet(*second)
            expected[name] = [plan.slots for plan in recorder.plans]
        handle = tomediff.apply_tome(unet, ratio=0.5, use_rand=False)
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with torch.no_grad():
                for case in inputs[name]:
                    unet(*case)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    with PlanRecorder(handle, calls={2}) as recorder:
        for name in "ab":  # one after the other, so the recorded plans come in a known order
            thread = threading.Thread(target=worker, args=(name,))
            thread.start()
            thread.join()
    assert not errors, errors
    blocks = handle.num_blocks
    assert [plan.call for plan in recorder.plans] == [2] * (2 * blocks)
    recorded = [plan.slots for plan in recorder.plans]
    for got, want in zip(recorded, expected["a"] + expected["b"], strict=True):
        assert np.array_equal(got, want)
    assert handle.report().calls == 4  # the report still counts every call of the patch


@pytest.mark.parametrize("use_rand", [True, False])
def test_gradient_checkpointing_reproduces_the_forward_partition(use_rand: bool) -> None:
    sample, timestep, context = unet_inputs()

    def gradients(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        unet = tiny_sd_unet().train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        tomediff.apply_tome(unet, ratio=0.5, use_rand=use_rand, seed=7)
        x = sample.clone().requires_grad_(True)
        unet(x, timestep, context).sample.square().mean().backward()
        weight = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
        return x.grad, weight.grad

    plain_input, plain_weight = gradients(checkpointing=False)
    ckpt_input, ckpt_weight = gradients(checkpointing=True)
    assert_close(ckpt_input, plain_input, atol=1e-6, rtol=1e-4)
    assert_close(ckpt_weight, plain_weight, atol=1e-6, rtol=1e-4)


def test_settings_that_merge_nothing_say_so() -> None:
    unet = tiny_sd_unet()
    sample, timestep, context = unet_inputs(height=20, width=28)
    tomediff.apply_tome(unet, ratio=0.5, sx=64, sy=1, use_rand=False)
    with (
        pytest.warns(
            UserWarning, match=r"reduces nothing in block .*20x28 token grid has no full 64x1 window"
        ),
        torch.no_grad(),
    ):
        unet(sample, timestep, context)
