"""QUANTIZATION=8bit|4bit on CPU: bitsandbytes layers through the service's own loader, engines and routes.

A tiny random Gemma2 (sahabat-ai's architecture, bench.gemma_shape) is loaded in 8-bit and 4-bit through
`load_model`'s local-directory path and served over the documented routes and /v1; the embedded model is loaded
in 8-bit once (through the model cache's safetensors) and must still answer a factual question correctly.

What greedy equality holds with quantized layers (docs/cpu-quantization.md, "Greedy equality between the
engines"): a request alone gives the same tokens on both engines (both run transformers' forward on one row).
Requests sharing the batched engine's passes may differ from their lone run: LLM.int8 picks its fp16 outlier
columns from every row of a pass, and batched matmuls round differently, so that is not asserted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from bench.gemma_shape import END_OF_TURN
from inference import BatchedEngine, EngineBusy, SequentialEngine
from inference.cpu.lean_forward import LeanForward
from inference.cpu.packed import PackedLinear
from inference.cpu.paths import native_bf16
from inference.model import loading
from inference.model.cache import load_directory
from inference.model.loading import LoadedModel, build_quantization_config, load_model, resolve_quantization
from inference.types import Message, ModelLoadError
from tests.helpers import (
    API_KEY,
    AUTH,
    chat_request,
    model_settings,
    on_a_loader_thread,
    result_of,
    sse_events_from_lines,
)
from webapp.server import create_app
from webapp.settings import Settings
from webapp.ui.chat import banner_markdown

BNB_CLASSES = {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}


def engine_of(cls: type, settings: Settings, loaded: LoadedModel, **overrides: object) -> SequentialEngine:
    engine = cls(settings.model_copy(update=overrides), loader=lambda _settings: loaded)
    engine.load()
    return engine


# --- the tiny Gemma2 in 8-bit and 4-bit -------------------------------------------------------------------


@pytest.fixture(scope="module", params=["8bit", "4bit"])
def gemma(request: pytest.FixtureRequest, gemma_dir: Path) -> tuple[Settings, LoadedModel]:
    settings = model_settings(gemma_dir, quantization=request.param)
    return settings, on_a_loader_thread(settings)


def test_cpu_honours_quantization_and_auto_stays_unquantized() -> None:
    for requested in ("8bit", "4bit", "none"):
        settings = Settings(quantization=requested, _env_file=None)  # type: ignore[call-arg]
        assert resolve_quantization(settings, has_cuda=False) == requested
    assert resolve_quantization(Settings(_env_file=None), has_cuda=False) == "none"  # type: ignore[call-arg]
    assert build_quantization_config("4bit", torch.float32).bnb_4bit_compute_dtype == torch.float32


def test_tiny_gemma2_loads_with_bitsandbytes_layers(gemma: tuple[Settings, LoadedModel], gemma_dir: Path) -> None:
    settings, loaded = gemma
    info = loaded.info
    bf16 = native_bf16(settings.cpu_isa)  # the dtype follows the CPU: bf16 where bf16 matmuls are native
    assert (info.model_id, info.quantization, info.device, info.dtype) == (
        str(gemma_dir),
        settings.quantization,
        "cpu",
        "bfloat16" if bf16 else "float32",
    )
    model = loaded.model
    expected = BNB_CLASSES[settings.quantization]
    for layer in model.model.layers:
        linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj]
        linears += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        assert {type(linear).__name__ for linear in linears} == {expected}
    # The output head stays a plain linear (bitsandbytes skips it) and, in bf16, is the only prepacked one:
    # PACK_CPU_WEIGHTS never touches a bitsandbytes layer. In float32 a Gemma2 keeps one copy of its head.
    assert model.lm_head.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert type(model.lm_head) is (PackedLinear if bf16 else torch.nn.Linear)
    assert not any(isinstance(m, PackedLinear) and type(m).__name__ in BNB_CLASSES.values() for m in model.modules())
    assert [type(m) for m in model.modules() if isinstance(m, PackedLinear)] == ([PackedLinear] if bf16 else [])


async def test_a_lone_greedy_request_gives_the_same_tokens_on_both_engines(gemma: tuple[Settings, LoadedModel]) -> None:
    settings, loaded = gemma
    sequential = engine_of(SequentialEngine, settings, loaded)
    batched = engine_of(BatchedEngine, settings, loaded)
    try:
        assert batched.lean_pass is None  # Gemma2 and bitsandbytes layers take transformers' forward
        for question in ("Apa ibu kota Indonesia?", "Sebutkan tiga pulau besar di Indonesia.", "Halo!"):
            request = chat_request(("system", "Jawab singkat."), ("user", question), max_new_tokens=20)
            expected = await sequential.generate(request)
            got = await batched.generate(request)
            assert expected.output_length == 20  # a random model runs to the limit: 20 tokens compared
            assert (got.text, got.output_length, got.input_length) == (
                expected.text,
                expected.output_length,
                expected.input_length,
            )
    finally:
        batched.close()
        sequential.close()


def test_spec_routes_and_v1_serve_the_quantized_gemma2(gemma: tuple[Settings, LoadedModel], gemma_dir: Path) -> None:
    settings, loaded = gemma
    engine = engine_of(BatchedEngine, settings, loaded)
    with TestClient(create_app(settings, engine, [API_KEY], with_ui=False)) as client:
        body = {
            "text": "Apa kabar?",
            "conversation_history": [{"role": "user", "content": "Halo"}, {"role": "assistant", "content": "Hai"}],
            "max_new_tokens": 4,
            "temperature": 0,
        }
        response = client.post("/api/v1/generate-text", headers=AUTH, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == str(gemma_dir) and 0 < response.json()["output_length"] <= 4

        # /api/v1/chat adds its system message, which Gemma2's template refuses: folded into the user turn.
        with client.stream(
            "POST", "/api/v1/chat", headers=AUTH, json={"text": "Halo", "max_new_tokens": 4, "stream": True}
        ) as streamed:
            assert streamed.status_code == 200
            events = list(sse_events_from_lines(streamed.iter_lines()))
        deltas = "".join(json.loads(data)["delta"] for event, data in events if event == "delta")
        complete = json.loads(next(data for event, data in events if event == "complete"))
        assert complete["generated_text"] == deltas and 0 < complete["output_length"] <= 4
        assert complete["full_conversation"][0]["role"] == "system"

        messages = [{"role": "system", "content": "Jawab singkat."}, {"role": "user", "content": "Halo"}]
        response = client.post(
            "/v1/chat/completions", headers=AUTH, json={"messages": messages, "max_tokens": 3, "temperature": 0}
        )
        assert response.status_code == 200, response.text
        folded = engine.prompt_builder.build((Message("system", "Jawab singkat."), Message("user", "Halo")))
        assert response.json()["usage"]["prompt_tokens"] == len(folded)
        assert "Jawab singkat.\n\nHalo" in engine.tokenizer.decode(folded)

        metrics = client.get("/metrics", headers=AUTH).text
        assert f'quantization="{settings.quantization}"' in metrics and 'engine="batched"' in metrics


def test_generation_stops_at_end_of_turn_over_v1(gemma_dir: Path) -> None:
    """Swap the lm_head rows of the token greedy decoding emits at step 3 and <end_of_turn>: it stops there."""
    settings = model_settings(gemma_dir, quantization="8bit")
    loaded = on_a_loader_thread(settings)  # its own copy: its lm_head is edited below
    engine = engine_of(BatchedEngine, settings, loaded)
    with TestClient(create_app(settings, engine, [API_KEY], with_ui=False)) as client:
        body = {"messages": [{"role": "user", "content": "Halo!"}], "max_tokens": 6, "temperature": 0}
        before = client.post("/v1/chat/completions", headers=AUTH, json=body).json()
        assert before["choices"][0]["finish_reason"] == "length" and before["usage"]["completion_tokens"] == 6
        prompt = engine.prompt_builder.build((Message("user", "Halo!"),))
        with torch.no_grad():
            output = loaded.model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
            )
        tokens = output[0, len(prompt) :].tolist()
        step = next(k for k in range(len(tokens), 1, -1) if tokens[k - 1] not in tokens[: k - 1])
        eot = engine.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        with torch.no_grad():
            head = loaded.model.lm_head.weight
            head[[tokens[step - 1], eot]] = head[[eot, tokens[step - 1]]]
        with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={**body, "stream": True}) as streamed:
            chunks = [json.loads(data) for _, data in sse_events_from_lines(streamed.iter_lines()) if data != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == ["stop"]
        assert text == engine.tokenizer.decode(tokens[: step - 1], skip_special_tokens=True)
        assert END_OF_TURN not in text


async def test_batched_engine_cancels_and_limits_with_quantized_layers(gemma_dir: Path) -> None:
    settings = model_settings(gemma_dir, quantization="4bit")
    loaded = on_a_loader_thread(settings)
    engine = engine_of(BatchedEngine, settings, loaded, max_batch=2, max_queue=1)
    try:
        survivor = chat_request(("user", "Apa ibu kota Indonesia?"), max_new_tokens=12)
        alone = await engine.generate(survivor)
        leaver = await engine.submit(chat_request(("user", "Halo!"), max_new_tokens=60))
        kept = await engine.submit(survivor)
        waiting = await engine.submit(chat_request(("user", "Kumaha damang?"), max_new_tokens=4))
        with pytest.raises(EngineBusy):  # 2 running + 1 waiting: full
            await engine.submit(chat_request(("user", "Halo"), max_new_tokens=4))
        async for _event in leaver:
            break  # the client reads one delta and leaves
        await leaver.aclose()  # type: ignore[attr-defined]
        kept_result, waiting_result = await asyncio.gather(result_of(kept), result_of(waiting))
        # The leaver's slot went to the waiting request; the kept one ran to its limit beside them.
        assert kept_result.output_length == 12 == alone.output_length and kept_result.finish_reason == "length"
        assert 0 < waiting_result.output_length <= 4
        assert engine.running == 0
    finally:
        engine.close()


# --- bitsandbytes missing or broken --------------------------------------------------------------------------


def test_missing_bitsandbytes_on_cpu_is_a_readable_error(gemma_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args),
    )
    with pytest.raises(ModelLoadError) as caught:
        load_model(model_settings(gemma_dir, quantization="8bit"))
    message = str(caught.value)
    assert message.startswith("QUANTIZATION=8bit needs the bitsandbytes package, which is not installed")
    assert "QUANTIZATION=none" in message and "\n" not in message


def test_broken_bitsandbytes_on_cpu_is_a_readable_error(gemma_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *args: object())
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ModelLoadError) as caught:
        load_model(model_settings(gemma_dir, quantization="4bit"))
    assert str(caught.value).startswith(
        "QUANTIZATION=4bit needs bitsandbytes, which failed to import (ModuleNotFoundError"
    )
    assert "QUANTIZATION=none" in str(caught.value) and "\n" not in str(caught.value)


def test_a_gguf_quantization_record_in_a_saved_config_is_dropped(gemma_dir: Path, tmp_path: Path) -> None:
    """A config saved from a GGUF-loaded model names GgufConfig; transformers then refuses a BitsAndBytesConfig."""
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "from-gguf"
    copy.mkdir()
    for item in gemma_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": True}
    (copy / "config.json").write_text(json.dumps(config))
    bnb = build_quantization_config("8bit")
    with pytest.raises(ValueError, match="quantized with GgufConfig but you are passing a BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16, quantization_config=bnb, device_map="cpu")
    model = load_directory(copy, torch.bfloat16, bnb)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"


# --- the embedded model in 8-bit ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_8bit(settings: Settings) -> tuple[Settings, LoadedModel]:
    quantized = settings.model_copy(update={"quantization": "8bit"})
    return quantized, on_a_loader_thread(quantized)


async def test_embedded_model_in_8bit_answers_correctly_on_both_engines(
    embedded_8bit: tuple[Settings, LoadedModel],
) -> None:
    settings, loaded = embedded_8bit
    assert loaded.info.quantization == "8bit (bitsandbytes, from the dequantised Q4_1 GGUF)"
    assert type(loaded.model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    assert not LeanForward.supports(loaded.model)  # the lean bf16 decoder does not apply
    question = chat_request(("user", "What is the capital of France?"), max_new_tokens=8)
    texts = {}
    for cls in (SequentialEngine, BatchedEngine):
        engine = engine_of(cls, settings, loaded)
        try:
            assert getattr(engine, "lean_pass", None) is None
            texts[cls.name] = (await engine.generate(question)).text
        finally:
            engine.close()
    assert "Paris" in texts["sequential"], texts
    assert texts["batched"] == texts["sequential"]  # alone in the batch: the same tokens


async def test_embedded_model_in_8bit_serves_4_concurrent_streams(embedded_8bit: tuple[Settings, LoadedModel]) -> None:
    settings, loaded = embedded_8bit
    engine = engine_of(BatchedEngine, settings, loaded)
    try:
        questions = ["What is the capital of France?", "Halo!", "Apa ibu kota Indonesia?", "Name a color."]
        results = await asyncio.gather(
            *(engine.generate(chat_request(("user", q), max_new_tokens=8)) for q in questions)
        )
        assert engine.runner.max_rows_seen >= 2  # they shared passes
        assert all(0 < r.output_length <= 8 for r in results)
        assert "Paris" in results[0].text, results[0].text
        assert "8bit" in banner_markdown(engine, "en")
    finally:
        engine.close()


def test_the_lean_decoder_refuses_bitsandbytes_layers_even_with_bf16_weights() -> None:
    """Its rule is the layer's type: a Linear8bitLt that still holds bf16 weights (has_fp16_weights) runs its own
    forward, so a model with one takes transformers' forward."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    assert LeanForward.supports(model)
    attention = model.model.layers[0].self_attn
    replacement = bnb.nn.Linear8bitLt(32, 32, bias=False, has_fp16_weights=True)
    replacement.weight = bnb.nn.Int8Params(attention.q_proj.weight.data.clone(), has_fp16_weights=True)
    attention.q_proj = replacement
    assert attention.q_proj.weight.dtype == torch.bfloat16 and isinstance(attention.q_proj, torch.nn.Linear)
    assert not LeanForward.supports(model)
