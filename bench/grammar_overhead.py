"""Structured output's cost in the batched engine: 8 closed-loop clients, 0, 1 and 4 of them constrained, in one run.

    python -m bench.grammar_overhead --clients 8 --constrained 0 1 4 --rounds 3 --max-new-tokens 48 --repeat 2

Each client sends `--rounds` requests back to back, greedy, cycling through fixed prompts; a constrained client asks
for a JSON schema (`SCHEMA`, strings up to 40 characters so a reply runs about as long as a plain one). The
configurations alternate (0, 1, 4, 0, 1, 4, ... with `--repeat`), so other load on the machine hits them alike.
Reported per configuration: aggregate output tok/s, the plain rows' per-stream tok/s (do unconstrained streams keep
their speed?), the constrained rows' per-stream tok/s, and the mask work per constrained row per step (llguidance's
bitmask fill, its unpacking onto the logits, the token's consumption), measured around `apply_masks`/`advance`.
Then the grammar compile time: the tokenizer's one-time conversion, a new schema (cold) and the same schema again
(cached: a copy of the compiled matcher).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from inference import BatchedEngine, GenerationRequest, GenerationResult, Message, ResponseFormat
from inference.model.loading import LoadedModel, load_model
from inference.sampling import grammar as grammar_module
from inference.sampling import sampler as sampling
from webapp.settings import Settings

PROMPTS = [
    "Apa ibu kota Indonesia?",
    "Write a short story about a cat who lives in Jakarta and loves to eat fish.",
    "Jelaskan apa itu fotosintesis dengan bahasa yang mudah dipahami oleh anak sekolah dasar.",
    "What are three tips for learning a new language?",
    "Tolong buatkan resep sederhana untuk membuat nasi goreng di rumah.",
    "Explain the difference between weather and climate in two sentences.",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "summary": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "rating": {"enum": [1, 2, 3, 4, 5]},
    },
    "required": ["title", "summary", "tags", "rating"],
}


@dataclass
class Run:
    constrained: int
    clients: int
    output_tokens: int
    wall_s: float
    aggregate_tok_s: float
    plain_stream_tok_s: float | None
    constrained_stream_tok_s: float | None
    valid_json: int
    constrained_replies: int
    mask_ms_per_row_step: float | None
    grammar_share_of_wall: float  # the decode thread's time in mask + consume, as a share of the run's wall time


class MaskTimer:
    """Wall time spent in `apply_masks` and `RowGrammar.advance`, per constrained row-step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.row_steps = 0
        self._apply = grammar_module.apply_masks
        self._advance = grammar_module.RowGrammar.advance

    def __enter__(self) -> MaskTimer:
        timer = self

        def apply_masks(scores: Any, rows: Any) -> None:
            rows = list(rows)
            started = time.perf_counter()
            timer._apply(scores, rows)
            timer.seconds += time.perf_counter() - started
            timer.row_steps += len(rows)

        def advance(grammar: Any, token: int) -> bool:
            started = time.perf_counter()
            done = timer._advance(grammar, token)
            timer.seconds += time.perf_counter() - started
            return done

        sampling.apply_masks = apply_masks  # type: ignore[assignment]
        grammar_module.RowGrammar.advance = advance  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        sampling.apply_masks = self._apply  # type: ignore[assignment]
        grammar_module.RowGrammar.advance = self._advance  # type: ignore[method-assign]


def request(index: int, constrained: bool, max_new_tokens: int) -> GenerationRequest:
    prompt = PROMPTS[index % len(PROMPTS)]
    response_format = None
    if constrained:
        prompt = f"{prompt} Answer as JSON with a title, a summary, tags and a rating."
        response_format = ResponseFormat("json_schema", json.dumps(SCHEMA, sort_keys=True))
    return GenerationRequest(
        messages=(Message("user", prompt),),
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        response_format=response_format,
    )


async def run(engine: BatchedEngine, clients: int, constrained: int, rounds: int, max_new_tokens: int) -> Run:
    streams: dict[bool, list[float]] = {True: [], False: []}
    replies: list[GenerationResult] = []

    async def client(index: int) -> int:
        tokens = 0
        is_constrained = index < constrained
        for round_ in range(rounds):
            started = time.perf_counter()
            result = await engine.generate(request(index + round_ * clients, is_constrained, max_new_tokens))
            streams[is_constrained].append(result.output_length / max(1e-9, time.perf_counter() - started))
            if is_constrained:
                replies.append(result)
            tokens += result.output_length
        return tokens

    with MaskTimer() as timer:
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client(i) for i in range(clients))))
        wall = time.perf_counter() - started
    valid = 0
    for reply in replies:
        try:
            json.loads(reply.text)
            valid += 1
        except ValueError:
            pass
    return Run(
        constrained=constrained,
        clients=clients,
        output_tokens=tokens,
        wall_s=round(wall, 2),
        aggregate_tok_s=round(tokens / wall, 2),
        plain_stream_tok_s=round(statistics.median(streams[False]), 2) if streams[False] else None,
        constrained_stream_tok_s=round(statistics.median(streams[True]), 2) if streams[True] else None,
        valid_json=valid,
        constrained_replies=len(replies),
        mask_ms_per_row_step=round(1000 * timer.seconds / timer.row_steps, 3) if timer.row_steps else None,
        grammar_share_of_wall=round(timer.seconds / wall, 4),
    )


def compile_times(engine: BatchedEngine) -> dict[str, float]:
    grammars = engine.grammars
    assert grammars is not None
    started = time.perf_counter()
    grammars.ll_tokenizer  # noqa: B018 - the one-time tokenizer conversion
    tokenizer_s = time.perf_counter() - started
    cold: list[float] = []
    cached: list[float] = []
    for index in range(5):
        schema = dict(SCHEMA, properties=dict(SCHEMA["properties"], **{f"extra{index}": {"type": "integer"}}))
        response_format = ResponseFormat("json_schema", json.dumps(schema))
        for times in (cold, cached):
            started = time.perf_counter()
            grammars.compile(response_format)
            times.append(time.perf_counter() - started)
    return {
        "tokenizer_s": round(tokenizer_s, 3),
        "compile_cold_ms_median": round(1000 * statistics.median(cold), 3),
        "compile_cached_ms_median": round(1000 * statistics.median(cached), 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(model_id=args.model_id, max_batch=args.clients, _env_file=None)  # type: ignore[call-arg]
    with ThreadPoolExecutor(max_workers=1) as pool:  # see LocalEngine.run_on_model_thread
        loaded: LoadedModel = pool.submit(load_model, settings).result()
    engine = BatchedEngine(settings, loader=lambda _settings: loaded)
    engine.load()
    try:
        compile_report = compile_times(engine)
        await engine.generate(request(0, True, 8))  # warm up both paths
        await engine.generate(request(0, False, 8))
        runs: list[Run] = []
        for _ in range(args.repeat):
            for constrained in args.constrained:
                result = await run(engine, args.clients, constrained, args.rounds, args.max_new_tokens)
                print(json.dumps(asdict(result)), flush=True)
                runs.append(result)
    finally:
        engine.close()
    summary = {}
    for constrained in args.constrained:
        mine = [r for r in runs if r.constrained == constrained]
        summary[constrained] = statistics.median(r.aggregate_tok_s for r in mine)
    baseline = summary.get(0)
    print("constrained rows | aggregate tok/s (median) | vs 0 constrained")
    for constrained, tok_s in summary.items():
        ratio = f"{tok_s / baseline:.2f}x" if baseline else "-"
        print(f"{constrained:>16} | {tok_s:>24.1f} | {ratio}")
    print("compile:", json.dumps(compile_report))
    return {"runs": [asdict(r) for r in runs], "compile": compile_report}


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--constrained", nargs="+", type=int, default=[0, 1, 4])
    parser.add_argument("--rounds", type=int, default=3, help="requests per client, back to back")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--model-id", default="embedded")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
