"""sahabat-ai's shape without a GPU, measured: Gemma2-9B architecture, random weights, bitsandbytes 8-bit and 4-bit.

Writes a checkpoint with sahabat-ai's exact configuration (9,241,705,984 parameters, bench.gemma_shape) and the
real Gemma2 chat template shard by shard (one ~2 GB shard of random bf16 tensors in memory at a time, never the
whole model), then, for each QUANTIZATION, loads it in a fresh process through the service's own path
(`BatchedEngine.load` -> `inference.model.loading.load_model`, memory pre-check included) and reports:

- load time, peak RSS while loading (VmHWM) and the sampled peaks of anonymous (RssAnon) and file-backed
  (RssFile: the memory-mapped shards, which the kernel can drop) memory,
- RSS when ready; for each long conversation (4,096 and 8,192 tokens: --conversation-tokens) its TTFT, the peak
  RSS during it and the RSS after it (anonymous and file-backed apart),
- TTFT of a 512-token prompt and single-stream decode tok/s, then aggregate decode tok/s of 4 concurrent streams.

    python bench/cpu_shape.py --fill docs/cpu-quantization.md   # ~18.5 GB of shards under /work/tmp-9b, deleted after
    python bench/cpu_shape.py --modes 8bit            # one mode; `none` (bf16) runs only if the pre-check lets it
    python bench/cpu_shape.py --tiny                  # the same steps on a tiny Gemma2 in seconds (a test runs this)

A mode the memory pre-check refuses is reported with the pre-check's line instead of numbers. Steps that would
overrun --budget-min are skipped and say so. On a CUDA machine the same steps run on the GPU (device_map="auto")
and the GPU memory after load and at peak is reported too. Random weights give the real shapes, kernels, memory
and timings; the text is noise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/cpu_shape.py`
    sys.path.insert(0, str(ROOT))

from bench.gemma_shape import (  # noqa: E402
    SAHABAT_AI_SHAPE,
    TINY_SHAPE,
    TRAINING_SENTENCES,
    build_tokenizer,
    gemma2_config,
    parameter_count,
)

MODES = ("8bit", "4bit", "none")
MODE_LABELS = {"8bit": "8-bit (`QUANTIZATION=8bit`)", "4bit": "4-bit nf4 (`QUANTIZATION=4bit`)", "none": "bf16"}
TABLE_BEGIN, TABLE_END = "<!-- cpu-shape:begin -->", "<!-- cpu-shape:end -->"
COMPLETE_MARKER = ".complete"
DEFAULT_DIR = Path("/work/tmp-9b") if Path("/work").is_dir() else Path("/tmp/sahabat-9b-shape")
GB = 1e9


@dataclass
class Plan:
    tiny: bool
    model_dir: str
    modes: tuple[str, ...]
    ttft_prompt: int  # tokens of the TTFT prompt
    conversations: tuple[int, ...]  # tokens of each long conversation, its new tokens included
    new_tokens: int  # per request
    streams: int
    stream_prompt: int  # tokens of each concurrent stream's prompt
    shard_bytes: int
    budget_s: float  # the whole run, writing included
    same_process: bool
    conversation_modes: tuple[str, ...] = ()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Gemma2 config, seconds")
    parser.add_argument("--model-dir", type=Path, help=f"where the shards go (default {DEFAULT_DIR}; never in git)")
    parser.add_argument("--modes", default="8bit,4bit,none", help="QUANTIZATION values, in order (default: all)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per request (default 16)")
    parser.add_argument(
        "--conversation-modes", help="modes that run the long conversations (default: all; their prefill is slow)"
    )
    parser.add_argument(
        "--conversation-tokens", default="4096,8192", help="lengths of the long conversations (default 4096,8192)"
    )
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams for the aggregate decode rate")
    parser.add_argument("--budget-min", type=float, default=45.0, help="skip steps that would end the run later")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (default: deleted at the end)")
    parser.add_argument("--same-process", action="store_true", help="measure every mode in this process")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--fill", type=Path, help=f"replace the text between {TABLE_BEGIN} and {TABLE_END} here")
    parser.add_argument("--run-mode", help=argparse.SUPPRESS)  # internal: measure one mode, write --json
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    tiny = bool(args.tiny)
    return Plan(
        tiny=tiny,
        model_dir=str(args.model_dir or (DEFAULT_DIR.parent / (DEFAULT_DIR.name + "-tiny") if tiny else DEFAULT_DIR)),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        ttft_prompt=32 if tiny else 512,
        conversations=(128,) if tiny else tuple(int(n) for n in args.conversation_tokens.split(",") if n.strip()),
        new_tokens=args.new_tokens or (4 if tiny else 16),
        streams=args.streams,
        stream_prompt=16 if tiny else 64,
        shard_bytes=200_000 if tiny else 2_000_000_000,
        budget_s=args.budget_min * 60,
        same_process=bool(args.same_process),
        conversation_modes=tuple(m.strip() for m in (args.conversation_modes or args.modes).split(",") if m.strip()),
    )


def shape_of(plan: Plan) -> dict[str, Any]:
    return TINY_SHAPE if plan.tiny else SAHABAT_AI_SHAPE


# --- the checkpoint, shard by shard ---------------------------------------------------------------------


def tensor_specs(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor `save_pretrained` would write, from a meta-device model (no memory)."""
    import torch
    from transformers import Gemma2ForCausalLM

    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    specs = [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]
    if config.tie_word_embeddings:  # the tied output layer is not stored (as save_pretrained does)
        specs = [(name, shape) for name, shape in specs if name != "lm_head.weight"]
    return specs


def random_tensor(name: str, shape: tuple[int, ...], std: float, generator: Any) -> Any:
    import torch

    if name.endswith("norm.weight"):  # Gemma's RMSNorm scales by (1 + weight): zeros is its initialisation
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)


def write_checkpoint(directory: Path, config: Any, shard_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Random bf16 weights written one shard at a time (+ index, config, generation config, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)
    specs = tensor_specs(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, config.initializer_range, generator) for name, shape in shard}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
        print(f"  wrote {filename} ({time.perf_counter() - started:.0f} s)", flush=True)
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    config.save_pretrained(directory)
    generation = GenerationConfig.from_model_config(config)
    generation.cache_implementation = "hybrid"  # as sahabat-ai's generation_config.json
    generation.save_pretrained(directory)
    build_tokenizer(config.vocab_size).save_pretrained(directory)
    (directory / COMPLETE_MARKER).write_text(json.dumps(config.to_dict(), sort_keys=True))
    return {"bytes": total, "shards": len(shards), "seconds": time.perf_counter() - started}


# --- memory -------------------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in bytes ({} where /proc is missing)."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the load's peak is its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


class Sampler:
    """Samples /proc/self/status every `interval_s` in a thread; keeps each field's peak."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in proc_status().items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for key, value in proc_status().items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)


def snapshot() -> dict[str, int]:
    gc.collect()
    return proc_status()


def load_average() -> str:
    """`uptime`'s three load averages (1, 5, 15 min)."""
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


# --- requests -----------------------------------------------------------------------------------------------


def prompt_text(engine: Any, target: int, salt: str, history: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """`history` + one user message, the templated prompt as close to `target` tokens as possible (not above)."""
    from inference.types import Message

    tokenizer, builder = engine.tokenizer, engine.prompt_builder
    corpus = " ".join(TRAINING_SENTENCES)
    text = f"{salt} {corpus}"
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
        text = f"{text} {corpus}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    low, high = 1, min(len(ids), target)
    while low < high:
        middle = (low + high + 1) // 2
        if len(builder.build((*history, Message("user", tokenizer.decode(ids[:middle]))))) <= target:
            low = middle
        else:
            high = middle - 1
    return (*history, Message("user", tokenizer.decode(ids[:low])))


def conversation(engine: Any, target: int) -> tuple[Any, ...]:
    """A multi-turn conversation (alternating turns of ~target/8 tokens) whose prompt is about `target` tokens."""
    from inference.types import Message

    history: tuple[Any, ...] = ()
    turn = max(8, target // 8)
    turn_number = 0
    while len(engine.prompt_builder.build((*history, Message("user", "x")))) + 2 * turn + 16 < target:
        asked = prompt_text(engine, turn, f"Pertanyaan {turn_number}:")[-1].content
        answered = prompt_text(engine, turn, f"Jawaban {turn_number}:")[-1].content
        history = (*history, Message("user", asked), Message("assistant", answered))
        turn_number += 1
    return prompt_text(engine, target, "Pertanyaan terakhir:", history)


def request_of(messages: tuple[Any, ...], new_tokens: int) -> Any:
    from inference.types import GenerationRequest

    return GenerationRequest(messages=messages, max_new_tokens=new_tokens, temperature=0)


async def arrivals(stream: Any) -> tuple[list[float], Any]:
    """(arrival time of each text delta, the result): with the random checkpoint one token is one delta
    (nearly every id of the 256k vocabulary decodes to a word of its own)."""
    from inference.types import GenerationResult

    times: list[float] = []
    async for event in stream:
        if isinstance(event, GenerationResult):
            return times, event
        times.append(time.perf_counter())
    raise RuntimeError("the stream ended without a result")


def decode_rate(result: Any) -> float | None:
    """Tokens per second after the first one (the first one's time is the TTFT)."""
    ttft = result.time_to_first_token_s
    if ttft is None or result.output_length < 2 or result.duration_s <= ttft:
        return None
    return (result.output_length - 1) / (result.duration_s - ttft)


# --- one mode --------------------------------------------------------------------------------------------


def precheck(settings: Any) -> dict[str, Any]:
    """What the service's memory pre-check says for this mode (the load runs it again; this records it)."""
    import torch

    from inference.model import loading, memory
    from inference.types import ModelLoadError

    has_cuda = torch.cuda.is_available()
    dtype = loading.resolve_dtype(settings, has_cuda)
    config = loading.model_config(settings, settings.model_id, dtype)
    counts = memory.count_weights(config)
    packing = not has_cuda and dtype == torch.bfloat16 and settings.pack_cpu_weights
    choices = memory.options(counts, torch.finfo(dtype).bits // 8, packing)
    available, where = loading.available_memory(has_cuda)
    label = f"QUANTIZATION={settings.quantization}"
    out = {"needs": dict(choices)[label], "available": available, "where": where, "refused": None}
    try:
        memory.check_fits(settings.model_id, label, choices, available, where)
    except ModelLoadError as error:
        out["refused"] = str(error)
    return out


def mode_settings(mode: str, plan: Plan) -> Any:
    from webapp.settings import Settings

    return Settings(  # type: ignore[call-arg]
        model_id=plan.model_dir,
        quantization=mode,
        max_new_tokens_cap=max(plan.new_tokens, 8),
        queue_timeout=3600,
        _env_file=None,
    )


def run_mode(mode: str, plan: Plan, deadline: float) -> dict[str, Any]:
    import torch

    from inference.engines.batched.engine import BatchedEngine

    cuda = torch.cuda.is_available()
    settings = mode_settings(mode, plan)
    out: dict[str, Any] = {"mode": mode, "load_average_before": load_average(), "precheck": precheck(settings)}
    if out["precheck"]["refused"]:
        print(f"{mode}: refused by the memory pre-check: {out['precheck']['refused']}", flush=True)
        out["skipped"] = "refused by the memory pre-check"
        return out
    engine = BatchedEngine(settings)
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = snapshot()
    started = time.perf_counter()
    with Sampler() as sampler:
        engine.load()  # on the engine's decode thread, as the service does
    out["load_s"] = time.perf_counter() - started
    out["load_peaks"] = {**sampler.peaks, "VmHWM": proc_status().get("VmHWM", 0)}
    out["before_load"] = before
    assert engine.info is not None
    out["info"] = {k: getattr(engine.info, k) for k in ("quantization", "dtype", "device", "engine")}
    out["ready"] = snapshot()
    if cuda:
        out["gpu_after_load"] = torch.cuda.memory_allocated()
    print(f"{mode}: loaded in {out['load_s']:.0f} s as {out['info']}; ready RSS {gb(out['ready'].get('VmRSS'))} GB")

    async def measure() -> None:
        await engine.generate(request_of(prompt_text(engine, 16, "warm-up"), 2))
        one = await engine.generate(request_of(prompt_text(engine, plan.ttft_prompt, "Prompt:"), plan.new_tokens))
        out["single"] = {
            "prompt_tokens": one.input_length,
            "output_tokens": one.output_length,
            "ttft_s": one.time_to_first_token_s,
            "decode_tok_s": decode_rate(one),
        }
        print(f"{mode}: single stream {out['single']}", flush=True)
        prompts = [prompt_text(engine, plan.stream_prompt, f"Permintaan {i}:") for i in range(plan.streams)]
        streams = [await engine.submit(request_of(p, plan.new_tokens)) for p in prompts]
        timed = await asyncio.gather(*(arrivals(stream) for stream in streams))
        # The decode thread may start the first request before the others arrive, and they join a pass later:
        # count only the text that arrives once every stream has produced some (all of them decoding together).
        together = max(times[0] for times, _ in timed if times) if all(times for times, _ in timed) else None
        end = max(times[-1] for times, _ in timed if times) if together is not None else None
        later = sum(1 for times, _ in timed for t in times if together is not None and t > together)
        out["streams"] = {
            "streams": len(timed),
            "rows_seen": engine.runner.max_rows_seen,
            "prompt_tokens": [r.input_length for _, r in timed],
            "output_tokens": [r.output_length for _, r in timed],
            "ttft_s": [r.time_to_first_token_s for _, r in timed],
            "deltas_together": later,
            "aggregate_tok_s": later / (end - together) if together is not None and end and end > together else None,
        }
        print(f"{mode}: {plan.streams} streams {out['streams']}", flush=True)
        if mode not in plan.conversation_modes:
            out["conversations"] = [
                {"tokens": n, "skipped": "not asked (--conversation-modes)"} for n in plan.conversations
            ]
            return
        out["conversations"] = [
            await long_conversation(engine, plan, tokens, out, deadline) for tokens in plan.conversations
        ]

    try:
        asyncio.run(measure())
    finally:
        engine.close()
    if cuda:
        out["gpu_peak"] = torch.cuda.max_memory_allocated()
    out["load_average_after"] = load_average()
    return out


async def long_conversation(
    engine: Any, plan: Plan, tokens: int, out: dict[str, Any], deadline: float
) -> dict[str, Any]:
    """One long conversation of `tokens` tokens: its TTFT, the peak RSS during it, the RSS after it."""
    # It costs about tokens/ttft_prompt times the TTFT prompt's prefill (more: attention grows with the square).
    single_ttft = out["single"]["ttft_s"] or 0.0
    estimate = 1.5 * single_ttft * tokens / plan.ttft_prompt + plan.new_tokens * 2.0
    left = deadline - time.time()
    if estimate > left:
        skipped = {"tokens": tokens, "skipped": f"estimated {estimate:.0f} s, {left:.0f} s left of the time budget"}
        print(f"{out['mode']}: {tokens}-token conversation skipped ({skipped['skipped']})", flush=True)
        return skipped
    messages = conversation(engine, tokens - plan.new_tokens)
    with Sampler() as during:
        long = await engine.generate(request_of(messages, plan.new_tokens))
    await asyncio.sleep(1.0)  # the decode thread gives the heap back after the long row ends
    result = {
        "tokens": tokens,
        "turns": len(messages),
        "prompt_tokens": long.input_length,
        "total_tokens": long.input_length + long.output_length,
        "ttft_s": long.time_to_first_token_s,
        "peaks": during.peaks,
        "after": snapshot(),
    }
    print(f"{out['mode']}: {tokens}-token conversation {result}", flush=True)
    return result


def run_mode_in_child(mode: str, plan: Plan, deadline: float) -> dict[str, Any]:
    """One mode in a fresh process: its RSS is its own, and memory freed by the last mode cannot blur it."""
    result = Path(plan.model_dir) / f".result-{mode}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--run-mode", mode, "--plan", json.dumps(asdict(plan))]
    command += ["--deadline", str(deadline), "--json", str(result)]
    done = subprocess.run(command, cwd=ROOT, check=False, timeout=max(60.0, deadline - time.time() + 600))
    if done.returncode != 0 or not result.is_file():
        return {"mode": mode, "skipped": f"failed (exit status {done.returncode}; see its output above)"}
    return json.loads(result.read_text())


# --- report ------------------------------------------------------------------------------------------------


def gb(value: float | None) -> str:
    """Bytes as GB (10^9), two decimals (three below 0.1 GB, for --tiny)."""
    if value is None:
        return "n/a"
    return f"{value / GB:.2f}" if value >= 0.1 * GB else f"{value / GB:.3f}"


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def render_table(plan: Plan, results: dict[str, dict[str, Any]], environment: str) -> str:
    modes = [m for m in plan.modes if m in results]
    rows: list[tuple[str, dict[str, str]]] = []

    def row(label: str, pick: Any) -> None:
        cells = {}
        for mode in modes:
            result = results[mode]
            try:
                cells[mode] = pick(result)
            except (KeyError, TypeError):
                cells[mode] = "skipped" if "skipped" in result else "n/a"
        rows.append((label, cells))

    def rss(where: str, key: str) -> Any:
        return lambda r: gb(r[where][key])

    row(
        "memory pre-check: needs / available (GB)",
        lambda r: (
            f"{gb(r['precheck']['needs'])} / {gb(r['precheck']['available'])}"
            + (" → **refused**" if r["precheck"]["refused"] else " → loads")
        ),
    )
    row("load time (s)", lambda r: fmt(r["load_s"], ".0f"))
    row("served as", lambda r: f"{r['info']['quantization']}, {r['info']['dtype']}, {r['info']['device']}")
    row("peak RSS while loading, VmHWM (GB)", rss("load_peaks", "VmHWM"))
    row("peak RssAnon while loading (GB)", rss("load_peaks", "RssAnon"))
    row("peak RssFile while loading (GB)", rss("load_peaks", "RssFile"))
    row("RSS when ready: total / anon / file (GB)", lambda r: " / ".join(gb(r["ready"][k]) for k in KEYS))
    row(
        f"TTFT, {plan.ttft_prompt}-token prompt (s)",
        lambda r: fmt(r["single"]["ttft_s"], ".1f") + f" ({r['single']['prompt_tokens']} tokens)",
    )
    row("decode tok/s, 1 stream", lambda r: fmt(r["single"]["decode_tok_s"], ".2f"))
    row(
        f"decode tok/s, {plan.streams} concurrent streams (aggregate)",
        lambda r: fmt(r["streams"]["aggregate_tok_s"], ".2f"),
    )
    for index, tokens in enumerate(plan.conversations):
        conversation_rows(row, index, tokens)
    if any("gpu_after_load" in results[m] for m in modes):
        row("GPU memory after load / peak (GB)", lambda r: f"{gb(r['gpu_after_load'])} / {gb(r['gpu_peak'])}")
    row(
        "load average (1 min) before → after",
        lambda r: f"{r['load_average_before'].split()[0]} → {r['load_average_after'].split()[0]}",
    )
    header = "| | " + " | ".join(MODE_LABELS.get(m, m) for m in modes) + " |"
    lines = [environment, "", header, "|---|" + "---|" * len(modes)]
    lines += [f"| {label} | " + " | ".join(cells[m] for m in modes) + " |" for label, cells in rows]
    return "\n".join(lines)


KEYS = ("VmRSS", "RssAnon", "RssFile")


def conversation_rows(row: Any, index: int, tokens: int) -> None:
    """The table's rows for the `index`th long conversation."""

    def pick(r: dict[str, Any]) -> dict[str, Any]:
        return r["conversations"][index]

    row(
        f"{tokens}-token conversation: TTFT (s)",
        lambda r: pick(r)["skipped"] if "skipped" in pick(r) else fmt(pick(r)["ttft_s"], ".0f"),
    )
    row(
        "peak RSS / RssAnon during it (GB)",
        lambda r: f"{gb(pick(r)['peaks']['VmRSS'])} / {gb(pick(r)['peaks']['RssAnon'])}",
    )
    row("RSS after it: total / anon / file (GB)", lambda r: " / ".join(gb(pick(r)["after"][k]) for k in KEYS))


def environment_line(plan: Plan) -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu}, {os.cpu_count()} cores)"
    parts = [
        device,
        f"{_total_ram_gb():.0f} GB RAM",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        parts.append(f"bitsandbytes {version('bitsandbytes')}")
    total = parameter_count(gemma2_config(shape_of(plan)))["total"]
    shape = "tiny Gemma2 (--tiny)" if plan.tiny else "sahabat-ai's shape (Gemma2-9B)"
    return f"{shape}, {total:,} parameters, random weights; " + ", ".join(parts) + "."


def _total_ram_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GB


def fill_file(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8")
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{path} has no {TABLE_BEGIN} ... {TABLE_END} markers to fill")
    path.write_text(text[: begin + len(TABLE_BEGIN)] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    print(f"table written into {path}")


# --- main --------------------------------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    values = json.loads(args.plan)
    values["modes"] = tuple(values["modes"])
    values["conversation_modes"] = tuple(values["conversation_modes"])
    values["conversations"] = tuple(values["conversations"])
    plan = Plan(**values)
    result = run_mode(args.run_mode, plan, args.deadline)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_mode:
        return child_main(args)
    plan = make_plan(args)
    unknown = [m for m in plan.modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}: use 8bit, 4bit, none")
    started = time.time()
    deadline = started + plan.budget_s
    directory = Path(plan.model_dir)
    if ROOT in directory.resolve().parents or directory.resolve() == ROOT:
        raise SystemExit(f"--model-dir {directory} is inside the repository: put the shards outside git")
    config = gemma2_config(shape_of(plan))
    weights = 2 * parameter_count(config)["total"]
    free_disk = shutil.disk_usage(directory.parent if directory.parent.exists() else "/").free
    print(f"load average before: {load_average()}; free disk {free_disk / GB:.1f} GB; writing {weights / GB:.1f} GB")
    if free_disk < 1.1 * weights and not (directory / COMPLETE_MARKER).is_file():
        raise SystemExit(
            f"not enough free disk for the checkpoint: {free_disk / GB:.1f} GB < {1.1 * weights / GB:.1f} GB"
        )
    results: dict[str, dict[str, Any]] = {}
    written: dict[str, Any] = {}
    try:
        marker = directory / COMPLETE_MARKER
        if marker.is_file() and marker.read_text() == json.dumps(config.to_dict(), sort_keys=True):
            print(f"reusing the checkpoint in {directory}")
        else:
            print(f"writing {config.num_hidden_layers}-layer Gemma2 shards to {directory} ...", flush=True)
            written = write_checkpoint(directory, config, plan.shard_bytes)
            print(
                f"checkpoint written: {written['bytes'] / GB:.2f} GB in {written['shards']} shards, "
                f"{written['seconds']:.0f} s",
                flush=True,
            )
        runnable = []
        for mode in plan.modes:  # modes the pre-check refuses take no time: the others share the budget
            checked = precheck(mode_settings(mode, plan))
            if checked["refused"]:
                print(f"{mode}: refused by the memory pre-check: {checked['refused']}", flush=True)
                results[mode] = {"mode": mode, "precheck": checked, "skipped": "refused by the memory pre-check"}
            else:
                runnable.append(mode)
        for index, mode in enumerate(runnable):
            # The time left is shared by the modes still to run; one with the long conversation weighs 3.
            weights = [3 if m in plan.conversation_modes else 1 for m in runnable[index:]]
            mode_deadline = time.time() + (deadline - time.time()) * weights[0] / sum(weights)
            if time.time() > deadline:
                results[mode] = {"mode": mode, "skipped": "over the time budget"}
                continue
            print(f"--- {mode} (load average {load_average()})", flush=True)
            run = run_mode if plan.same_process else run_mode_in_child
            try:
                results[mode] = run(mode, plan, mode_deadline)
            except Exception as error:  # one mode failing must not hide the others' numbers
                message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                print(f"{mode} failed: {message}", flush=True)
                results[mode] = {"mode": mode, "skipped": f"failed: {message}"}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
            print(f"removed {directory}")
    table = render_table(plan, results, environment_line(plan))
    elapsed = time.time() - started
    print(f"\nload average after: {load_average()}; whole run {elapsed / 60:.1f} min\n")
    print(table)
    if args.json:
        payload = {"plan": asdict(plan), "written": written, "results": results, "elapsed_s": elapsed}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.fill:
        fill_file(args.fill, table)
    failed = [m for m, r in results.items() if str(r.get("skipped", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
