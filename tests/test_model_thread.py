"""The local engines load and run the model on one thread, and bf16 CPU linears run oneDNN's prepacked kernel.

Both are speed measures (see LocalEngine.run_on_model_thread and inference/cpu_kernels.py; the timings are in
bench/cpu_kernels.py); these tests check the behaviour they rest on, not the speed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import pytest
import torch

from inference import BatchedEngine, GenerationRequest, Message, SequentialEngine
from inference.cpu_kernels import PackedLinear, is_packed, pack_linears, packing_available
from inference.loading import LoadedModel
from webapp.settings import Settings


def recording_loader(loaded: LoadedModel, threads: list[threading.Thread]) -> Callable[[Settings], LoadedModel]:
    def load(_settings: Settings) -> LoadedModel:
        threads.append(threading.current_thread())
        return loaded

    return load


@pytest.mark.parametrize("engine_class", [SequentialEngine, BatchedEngine])
async def test_the_model_loads_on_the_thread_that_runs_it(
    engine_class: type, settings: Settings, embedded_model: LoadedModel
) -> None:
    load_threads: list[threading.Thread] = []
    engine = engine_class(settings, loader=recording_loader(embedded_model, load_threads))
    try:
        await engine.start()  # the server's way: from the event loop
        assert engine.state == "ready"
        assert load_threads and load_threads[0] is not threading.main_thread()

        run_threads: list[threading.Thread] = []

        def recording(forward: Callable[..., object]) -> Callable[..., object]:
            def record(*args: object, **kwargs: object) -> object:
                run_threads.append(threading.current_thread())
                return forward(*args, **kwargs)

            return record

        # The batched engine's passes run on its lean decoder (FAST_DECODE) where it applies, else on the model.
        runner = getattr(engine, "decoder", None) or embedded_model.model
        runner.forward = recording(runner.forward)
        try:
            request = GenerationRequest(messages=[Message(role="user", content="Halo")], max_new_tokens=2)
            await engine.generate(request)
        finally:
            del runner.forward  # back to the class's forward
        assert run_threads and {id(t) for t in run_threads} == {id(load_threads[0])}
    finally:
        engine.close()


async def test_a_failed_load_on_the_decode_thread_is_reported(settings: Settings) -> None:
    def broken(_settings: Settings) -> LoadedModel:
        raise RuntimeError("disk on fire")

    engine = BatchedEngine(settings, loader=broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await engine.start()
    assert engine.state == "failed" and "disk on fire" in engine.state_reason
    engine.close()


needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear packing")


@needs_onednn
def test_packed_linears_give_the_same_output_and_fall_back_when_they_must() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32, bias=False))
    model = model.to(torch.bfloat16).eval()
    inputs = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(inputs)
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and is_packed(model[0])
    with torch.inference_mode():
        assert torch.equal(model(inputs), expected)
        assert torch.equal(model(inputs[None]), expected[None])  # (batch, tokens, features) too
    # With gradients on, the plain kernel runs (the packed one has no backward).
    inputs.requires_grad_(False)
    trained = model(inputs.clone())
    assert trained.requires_grad and torch.allclose(trained.detach(), expected)
    # A float32 copy (as the equality tests make) is a plain model again, not stale bf16 weights.
    copy32 = copy.deepcopy(model).to(torch.float32)
    assert not is_packed(copy32[0])
    with torch.inference_mode():
        assert torch.allclose(copy32(inputs.float()), expected.float(), atol=0.1)
    # Weights converted in place are not served from the stale packed copy either.
    model.to(torch.float32)
    with torch.inference_mode():
        assert model(inputs.float()).dtype == torch.float32


@needs_onednn
def test_only_bf16_cpu_linears_are_packed() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    assert pack_linears(model) == 1
    assert not is_packed(model[0]) and is_packed(model[1])


def test_the_embedded_model_is_packed_when_it_runs_in_bf16(embedded_model: LoadedModel) -> None:
    linears = [m for m in embedded_model.model.modules() if isinstance(m, torch.nn.Linear)]
    if embedded_model.info.dtype != "bfloat16" or not packing_available():
        pytest.skip(f"the embedded model runs in {embedded_model.info.dtype} here")
    assert linears and all(is_packed(m) for m in linears)
