"""The local engines load and run the model on one thread, and CPU linears run oneDNN's prepacked kernel where the
path in force packs them (bf16 where bf16 matmuls are native, float32 anywhere; not on the native path).

Both are speed measures (see LocalEngine.run_on_model_thread and inference/cpu/packed.py; the timings are in
bench/cpu_kernels.py); these tests check the behaviour they rest on, not the speed.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable

import pytest
import torch

from inference import BatchedEngine, GenerationRequest, Message, SequentialEngine
from inference.cpu.packed import PackedLinear, is_packed, pack_linears, packing_available
from inference.cpu.paths import native_bf16
from inference.model.loading import LoadedModel, load_model
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

        # The batched engine's passes run on its lean pass (FAST_DECODE) where it applies, else on the model.
        runner = getattr(engine, "lean_pass", None) or embedded_model.model
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


def packed_dtype(settings: Settings) -> torch.dtype:
    """The dtype this CPU prepacks natively: bf16 where bf16 matmuls are native (CPU_ISA in force), else float32."""
    return torch.bfloat16 if native_bf16(settings.cpu_isa) else torch.float32


@needs_onednn
def test_packed_linears_give_the_same_output_and_fall_back_when_they_must(settings: Settings) -> None:
    dtype = packed_dtype(settings)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32, bias=False))
    model = model.to(dtype).eval()
    inputs = torch.randn(5, 64, dtype=dtype)
    with torch.inference_mode():
        expected = model(inputs)
    assert pack_linears(model, (dtype,)) == 2
    assert isinstance(model[0], PackedLinear) and is_packed(model[0])
    with torch.inference_mode():
        # bf16: the same bits as F.linear (measured); float32: oneDNN's blocked sgemm sums in another order
        same = torch.equal if dtype == torch.bfloat16 else functools.partial(torch.allclose, atol=1e-5, rtol=1e-5)
        assert same(model(inputs), expected)
        assert same(model(inputs[None]), expected[None])  # (batch, tokens, features) too
    # With gradients on, the plain kernel runs (the packed one has no backward).
    inputs.requires_grad_(False)
    trained = model(inputs.clone())
    assert trained.requires_grad and torch.allclose(trained.detach(), expected, atol=1e-5)
    # A copy in another dtype (as the equality tests make) is a plain model again, not stale packed weights.
    other = torch.float64
    copied = copy.deepcopy(model).to(other)
    assert not is_packed(copied[0])
    with torch.inference_mode():
        assert torch.allclose(copied(inputs.to(other)), expected.to(other), atol=0.1)
    # Weights converted in place are not served from the stale packed copy either (nor repacked in a dtype this
    # CPU may not pack).
    model.to(other)
    with torch.inference_mode():
        assert model(inputs.to(other)).dtype == other


@needs_onednn
def test_only_the_dtypes_asked_for_are_packed() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).to(torch.bfloat16))
    assert pack_linears(model, (torch.float32,)) == 1
    assert is_packed(model[0]) and not is_packed(model[1])
    half = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.float16))
    assert pack_linears(half, (torch.float16,)) == 0  # oneDNN's prepack is used for bf16 and float32 only


def test_the_embedded_model_is_packed_where_its_path_packs(settings: Settings, embedded_model: LoadedModel) -> None:
    """The native path serves every pass from the GGUF's blocks: nothing is prepacked (the memory is saved). The lean
    path (GGUF_INT4=false) prepacks every linear, in the dtype this CPU runs."""
    assert embedded_model.info.decode_path == "native"
    linears = [m for m in embedded_model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(is_packed(m) for m in linears)
    lean = load_model(settings.model_copy(update={"gguf_int4": False}))
    assert lean.info.decode_path == "lean" and lean.model.dtype == packed_dtype(settings)
    linears = [m for m in lean.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_packed(m) for m in linears)
