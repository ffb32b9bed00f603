"""One long prompt's memory, measured against the memory admission's estimate (inference/engines/memory_budget.py).

Loads the model in this process through the service's engine, then serves one raw prompt of about --tokens tokens and
reports: RSS and VmSize at ready, the peak during the request (VmHWM), RSS when it has ended (after the engine gave the
heap back), and what the admission estimated for it. The estimate must be above the measured growth.

    python bench/prompt_memory.py --tokens 7900                        # the default engine and model
    python bench/prompt_memory.py --tokens 7900 FAST_DECODE=false      # transformers' forward, chunked prefill
    python bench/prompt_memory.py --tokens 7900 FAST_DECODE=false PREFILL_CHUNK_TOKENS=0   # the whole prompt at once
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/prompt_memory.py`
    sys.path.insert(0, str(ROOT))

GB = 1e9


def status() -> dict[str, float]:
    """VmSize, VmRSS, VmHWM and RssAnon of this process, in GB."""
    values: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmSize", "VmRSS", "VmHWM", "RssAnon"):
            values[key] = round(int(rest.split()[0]) * 1024 / GB, 3)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=7900, help="prompt tokens (about; never more)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("settings", nargs="*", help="NAME=value settings (as environment variables)")
    args = parser.parse_args(argv)
    for pair in args.settings:
        name, _, value = pair.partition("=")
        os.environ[name.upper()] = value

    from inference.engines.factory import build_engine
    from inference.types import GenerationRequest
    from webapp.settings import Settings

    engine = build_engine(Settings())  # type: ignore[call-arg]
    engine.load()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on
    ready = status()
    sentence = "kalimat nomor {} tentang pulau Jawa. "
    text, n = "", 0
    while len(engine.raw_prompt_ids(text + sentence.format(n))) <= args.tokens:
        text, n = text + sentence.format(n), n + 1
    request = GenerationRequest(messages=(), prompt=text, max_new_tokens=args.new_tokens, temperature=0)
    started = time.perf_counter()
    result = asyncio.run(engine.generate(request))
    elapsed = time.perf_counter() - started
    time.sleep(1.0)  # the decode thread gives the heap back after the row ends
    after = status()
    budget = engine.memory
    estimate = budget.cost([result.input_length + args.new_tokens], [result.input_length]) if budget else None
    print(f"settings: {' '.join(args.settings) or '(defaults)'}; path {engine.info.decode_path}")
    print(f"ready: {ready}")
    print(f"prompt {result.input_length} tokens, {elapsed:.1f} s; peak VmHWM {after['VmHWM']} GB")
    print(f"after: {after}")
    print(
        f"growth at the peak {after['VmHWM'] - ready['VmRSS']:.3f} GB; admission's estimate "
        f"{'n/a' if estimate is None else f'{estimate / GB:.3f} GB'}"
    )
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
