"""The batched engine's decode thread: the passes that run the batch, one per loop iteration.

Each iteration (`BatchRunner.run_once`) first admits the newcomers the engine handed over, then runs the batch:
- With transformers' forward: the newcomers' prompts are prefilled together (left-padded, in the groups
  `scheduling.plan_prefill_groups` picks) into a fresh KV cache, their first token is sampled straight from the
  prefill logits, and they are merged into the running batch. Then ONE decode step runs for every running row
  (one token each).
- With a lean executor (FAST_DECODE on CPU: the native path's NativeForward, or the lean path's LeanForward;
  inference/cpu/paths.py decides which) an iteration is ONE pass: the running
  rows' decode step and the newcomers' prompts (unpadded, at most `PASS_PROMPT_TOKENS` in all) share the matmuls;
  a newcomer joins the batch after the pass that completes its prompt. A longer prompt is prefilled in chunks over
  several passes while the running rows keep decoding (chunked prefill).
On both, a failing pass is rolled back and rerun in parts (each prompt alone, the running rows in halves), so the
failure stays with the request that causes it. Off the lean passes prompts are prefilled PREFILL_CHUNK_TOKENS at a time.
Rows that end (terminator, `max_new_tokens`, cancelled) leave the batch right after the step; a step needs a
single device-to-host copy (the chosen token ids), which the engine hands to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference.cpu.passes import LeanPass, PromptRow
from inference.engines.batched.kv_cache import (
    Batch,
    cache_layers,
    keep_rows,
    merge_batches,
    new_cache,
    restore_cache,
    snapshot_cache,
    split_rows,
    truncate_cache,
)
from inference.engines.batched.scheduling import (
    PASS_PROMPT_TOKENS,
    PREFILL_OVERHEAD_TOKENS_ACCELERATOR,
    PREFILL_OVERHEAD_TOKENS_CPU,
    PREFILL_TOKEN_BUDGET,
    plan_prefill_groups,
    plan_prompt_chunks,
)
from inference.model.memory import TRIM_AFTER_TOKENS, release_free_heap
from inference.sampling.sampler import GREEDY_BELOW_TEMPERATURE, choose
from inference.types import GenerationFailed, GenerationRequest

if TYPE_CHECKING:
    import torch

    from inference.engines.batched.prefix_cache import PrefixCache
    from inference.sampling.grammar import RowGrammar
    from inference.sampling.logprobs import ScoredToken

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Done:
    """The decode thread's last word on a row: why it ended."""

    finish_reason: str  # "stop" (terminator) or "length"


@dataclass(eq=False)
class Slot:
    """One request inside the engine: what the decode thread needs, and where its tokens go."""

    request: GenerationRequest
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]  # token ids, ScoredTokens, Done or an InferenceError, as the engine delivers them
    submitted_at: float
    cancelled: bool = False
    generated: int = 0  # tokens sampled so far, the terminator excluded
    admitted_at: float | None = None
    generator: torch.Generator | None = None  # made on the logits' device at the first sample
    history: list[int] = field(default_factory=list)  # prompt + output ids, kept for repetition_penalty only
    counts: dict[int, int] | None = None  # output ids' counts, for presence/frequency_penalty only (sampling.choose)
    scored: ScoredToken | None = None  # the last token's score, for rows with logprobs only
    prompt: PromptRow | None = None  # while the lean pass prefills it, chunk by chunk
    prefilled: int = 0  # prompt tokens in `prompt.cache` so far
    grammar: RowGrammar | None = None  # a constrained request's (response_format)

    @property
    def greedy(self) -> bool:
        # Tiny temperatures divide logits into inf/NaN: treat them as greedy, as the sequential engine does.
        return self.request.temperature < GREEDY_BELOW_TEMPERATURE


class BatchRunner:
    """The running batch and the rows being prefilled, and the passes over them. Touched only by the decode thread.

    The engine owns admission and delivery: it hands newcomers to `run_once`; the runner sends each row's events
    (token ids, `Done`, errors) through `post_many`, gives rows back through `release` when they end, and reports
    the tokens it emitted through `count_tokens`.
    """

    def __init__(
        self,
        release: Callable[[list[Slot]], None],
        post_many: Callable[[Iterable[tuple[Slot, Any]]], None],
        count_tokens: Callable[[int], None],
    ) -> None:
        self._give_back = release
        self._post_many = post_many
        self._count_tokens = count_tokens
        self.batch = Batch()
        self.prefilling: list[Slot] = []  # admitted, prompt not yet fully prefilled (lean passes only)
        self.pass_prompt_tokens = PASS_PROMPT_TOKENS
        self.prefill_chunk_tokens = 0  # PREFILL_CHUNK_TOKENS: columns per prefill forward off the lean passes (0: all)
        self.max_rows_seen = 0  # the largest batch a step has run (for tests and metrics)
        self.model: Any = None
        self.device: Any = None
        self.lean_pass: LeanPass | None = None  # what runs an iteration as one pass, else None (transformers')
        self.prefixes: PrefixCache | None = None  # on the native path (PREFIX_CACHE_TOKENS)
        self.terminators: frozenset[int] = frozenset()
        self.pad_token_id = 0

    def attach(
        self,
        model: Any,
        device: Any,
        lean_pass: LeanPass | None,
        terminators: Iterable[int],
        pad_token_id: int,
        prefixes: PrefixCache | None = None,
    ) -> None:
        """The loaded model to run (once, before the first `run_once`)."""
        self.model, self.device, self.lean_pass, self.prefixes = model, device, lean_pass, prefixes
        self.terminators = frozenset(terminators)
        self.pad_token_id = pad_token_id

    @property
    def idle(self) -> bool:
        """Nothing running and nothing being prefilled: the decode thread may sleep."""
        return not len(self.batch) and not self.prefilling

    def run_once(self, newcomers: list[Slot]) -> None:
        """One iteration of the decode loop: admit `newcomers`, then one pass (lean) or prefills and one step."""
        if self.lean_pass is not None:
            for slot in newcomers:
                self._start_from_a_cached_prefix(slot)
            self.prefilling += newcomers
            self._pass(self.plan_prompt_chunks())
        else:
            if newcomers:
                self._admit(newcomers)
            if len(self.batch):
                self._step()

    def _release(self, slots: list[Slot]) -> None:
        """Rows that ended (their cache rows already dropped) go back to the engine; after a long one the heap is
        trimmed at once, before its last event is posted (its KV cache and prefill left holes that glibc keeps:
        docs/operations.md#memory)."""
        if any(len(slot.prompt_ids) + slot.generated >= TRIM_AFTER_TOKENS for slot in slots):
            release_free_heap()
        self._give_back(slots)

    def _start_from_a_cached_prefix(self, slot: Slot) -> None:
        """A newcomer's prompt cache starts with the longest prefix a recent prompt shares with it (the native path)."""
        if self.prefixes is None:
            return
        import torch

        cache = new_cache(self.model.config)
        shared = self.prefixes.take(slot.prompt_ids, cache)
        if shared:
            slot.prompt = PromptRow(torch.tensor(slot.prompt_ids, dtype=torch.long, device=self.device), cache)
            slot.prefilled = shared

    def drop_all(self) -> list[Slot]:
        """Every running and prefilling row, removed (the engine fails them when the loop ends)."""
        slots = list(self.batch.slots) + self.prefilling
        self.batch.clear()
        self.prefilling = []
        return slots

    def _admit(self, slots: list[Slot]) -> None:
        """Prefill the newcomers in length-sorted groups (shortest first), each merged as soon as it is done."""
        overhead = PREFILL_OVERHEAD_TOKENS_CPU if self.device.type == "cpu" else PREFILL_OVERHEAD_TOKENS_ACCELERATOR
        groups = plan_prefill_groups([len(s.prompt_ids) for s in slots], overhead, PREFILL_TOKEN_BUDGET)
        for group in groups:
            self._admit_group([slots[i] for i in group])

    def _admit_group(self, slots: list[Slot]) -> None:
        """Prefill `slots` together, sample their first tokens and merge the live ones into the batch."""
        try:
            new = self._prefill(slots)
        except Exception as error:  # these prompts' problem (e.g. out of memory): the running batch carries on
            if len(slots) > 1:  # whose? each prompt again alone, so only the one that fails alone fails
                for slot in slots:
                    self._admit_group([slot])
                return
            self._fail_prefill(slots, error)
            return
        try:
            self._emit_and_retire(new)
            if len(new):
                merge_batches(self.batch, new)
        except Exception as error:
            self._fail_running(error, extra=new.slots)

    def _prefill(self, slots: list[Slot]) -> Batch:
        """transformers' forward over the group's prompts (`prefill_group`), their first tokens chosen."""
        new, logits = prefill_group(self.model, slots, self.device, self.pad_token_id, self.prefill_chunk_tokens)
        new.next_tokens = choose(new.slots, logits).to(self.device)
        return new

    def _step(self) -> None:
        """One decoding step of transformers' forward for every running row; if it fails, `_apart`."""
        import torch

        batch = self.batch
        saved = snapshot_cache(batch.cache)
        try:
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
            output = self.model(
                input_ids=batch.next_tokens[:, None],
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                cache=batch.cache,
                use_cache=True,
            )
            next_tokens = choose(batch.slots, output.logits[:, -1, :]).to(self.device)
        except Exception as error:
            restore_cache(batch.cache, saved)
            self._apart(error, self._step)
            return
        # Both hold the cache's tensors: a row that ends in `_emit_and_retire` frees its KV cache before the heap is
        # trimmed (`_release`) only once they are gone, as in `_pass` (measured there; here the cache's buffers are
        # above the pinned mmap threshold, so they leave with or without the trim: tests/test_memory_admission.py).
        del saved, output
        batch.mask, batch.positions, batch.next_tokens = mask, batch.positions + 1, next_tokens
        self.max_rows_seen = max(self.max_rows_seen, len(batch))
        try:
            self._emit_and_retire(batch)
        except Exception as error:
            self._fail_running(error)

    def _apart(self, error: Exception, run: Callable[[], None]) -> None:
        """A shared decoding pass failed (its caches already rolled back) and nobody can tell whose fault it was: run
        it again on each half of the batch (`run` works on `self.batch`), halves that fail again split again, so only
        a row that fails alone ends with the error and the other rows go on. A fault costs ~2 log2(rows) passes."""
        batch = self.batch
        if len(batch) <= 1:
            self._fail_running(error)
            return
        logger.warning("a pass of %d rows failed (%s): rerunning them in halves", len(batch), type(error).__name__)
        half = len(batch) // 2
        parts = [split_rows(batch, list(range(half))), split_rows(batch, list(range(half, len(batch))))]
        survivors: list[Batch] = []
        for part in parts:
            self.batch = part
            run()
            survivors.append(self.batch)
        self.batch = Batch()
        merge_batches(self.batch, *survivors)

    def plan_prompt_chunks(self) -> list[tuple[Slot, int]]:
        """The prompt chunks of the next pass (see `scheduling.plan_prompt_chunks`), cancelled prompts dropped first."""
        cancelled = [slot for slot in self.prefilling if slot.cancelled]
        if cancelled:
            self.prefilling = [slot for slot in self.prefilling if not slot.cancelled]
            self._release(cancelled)
        return plan_prompt_chunks(self.prefilling, self.pass_prompt_tokens)

    def _pass(self, chunks: list[tuple[Slot, int]], with_running: bool = True) -> None:
        """One lean forward (`lean_pass.forward`): the running rows' next tokens and the prompt chunks together.

        A slot whose chunk ends its prompt gets its first token from the prompt's last logits and joins the batch
        after the pass. If the pass fails, nobody knows whose fault it was: every cache it touched is rolled back,
        the running rows run a pass alone (in halves if that fails too: `_apart`), then each chunk alone, so a failure
        stays with the request causing it.
        """
        import torch

        from inference.cpu.passes import DecodeRows

        batch = self.batch
        decode = None
        if with_running and len(batch):
            mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
            decode = DecodeRows(batch.next_tokens, batch.positions, mask, batch.cache)
            lengths = [layer.keys.shape[-2] for layer in cache_layers(batch.cache)]
        if decode is None and not chunks:
            return
        config, device = self.model.config, self.device
        for slot, end in chunks:
            if slot.prompt is None:
                slot.prompt = PromptRow(
                    torch.tensor(slot.prompt_ids, dtype=torch.long, device=device), new_cache(config)
                )
            slot.prompt.start, slot.prompt.end = slot.prefilled, end
        try:
            decode_logits, prompt_logits = self.lean_pass.forward(decode, [slot.prompt for slot, _ in chunks])
        except Exception as error:
            if decode is not None:
                truncate_cache(batch.cache, lengths)
            for slot, _ in chunks:  # back to what the cache held before the pass
                if slot.prefilled:
                    truncate_cache(slot.prompt.cache, [slot.prefilled] * len(cache_layers(slot.prompt.cache)))
                else:
                    slot.prompt.cache = new_cache(config)
            if decode is not None and chunks:
                self._pass([])
                for chunk in chunks:
                    self._pass([chunk], with_running=False)
            elif decode is not None:
                self._apart(error, lambda: self._pass([]))
            elif len(chunks) > 1:
                for chunk in chunks:
                    self._pass([chunk], with_running=False)
            else:
                slot = chunks[0][0]
                self.prefilling.remove(slot)
                slot.prompt = None
                self._fail_prefill([slot], error)
            return
        completed = [(row, slot) for row, (slot, end) in enumerate(chunks) if end == len(slot.prompt_ids)]
        running = decode is not None
        if decode is not None:
            batch.mask = decode.mask
            decode = None  # it holds the cache: a row that ends below frees its KV cache before the trim (69 MB after
            # a 3,000-token request on the embedded model, kept past the trim while it lived: test_memory_admission.py)
        try:
            if running:
                batch.positions = batch.positions + 1
                batch.next_tokens = choose(batch.slots, decode_logits).to(self.device)
                self.max_rows_seen = max(self.max_rows_seen, len(batch))
                self._emit_and_retire(batch)
            for slot, end in chunks:
                slot.prefilled = end
            if completed:
                done = [slot for _, slot in completed]
                self.prefilling = [slot for slot in self.prefilling if slot not in done]
                rows = torch.tensor([row for row, _ in completed], device=prompt_logits.device)
                first_tokens = choose(done, prompt_logits.index_select(0, rows)).to(self.device)
                joining: list[Batch] = []
                for row, slot in enumerate(done):
                    if self.prefixes is not None:
                        self.prefixes.store(slot.prompt_ids, slot.prompt.cache)
                    new = Batch()
                    new.slots, new.cache = [slot], slot.prompt.cache
                    slot.prompt = None
                    new.mask = torch.ones((1, len(slot.prompt_ids)), dtype=torch.long, device=self.device)
                    new.positions = torch.tensor([len(slot.prompt_ids)], dtype=torch.long, device=self.device)
                    new.next_tokens = first_tokens[row : row + 1]
                    self._emit_and_retire(new)
                    joining.append(new)
                merge_batches(self.batch, *joining)
        except Exception as error:
            extra = [slot for slot, _ in chunks]
            self.prefilling = [slot for slot in self.prefilling if slot not in extra]
            self._fail_running(error, extra=extra)

    def _fail_prefill(self, slots: list[Slot], error: Exception) -> None:
        logger.error("generation failed (request %s)", request_ids(slots), exc_info=error)
        self._release(slots)
        self._post_many((slot, GenerationFailed(f"generation failed: {type(error).__name__}")) for slot in slots)

    def _fail_running(self, error: Exception, extra: Iterable[Slot] = ()) -> None:
        slots = list(dict.fromkeys([*self.batch.slots, *extra]))
        # The rows left here failed alone (`_apart`), or after their pass succeeded (delivery); the log names them all.
        logger.error("generation failed (request %s)", request_ids(slots), exc_info=error)
        self.batch.clear()
        self._release(slots)
        self._post_many((slot, GenerationFailed(f"generation failed: {type(error).__name__}")) for slot in slots)

    def _emit_and_retire(self, batch: Batch) -> None:
        """Send each row its new token (one host copy for the whole batch), then drop the rows that ended."""
        events, keep, ended, emitted = outcomes(batch.slots, batch.next_tokens.tolist(), self.terminators)
        self._count_tokens(emitted)
        try:
            if ended:  # free the rows first, so a client that has its result sees the capacity back
                keep_rows(batch, keep)
                self._release(ended)
        finally:
            self._post_many(events)


def request_ids(slots: Iterable[Slot]) -> str:
    """The failure log's names for these rows: the request ids the clients saw, `-` where a request has none."""
    return ", ".join(slot.request.request_id or "-" for slot in slots)


def outcomes(
    slots: list[Slot], tokens: list[int], terminators: frozenset[int]
) -> tuple[list[Any], list[int], list[Slot], int]:
    """What one pass's new tokens do to its rows: (events to send, rows kept, slots that ended, tokens emitted).

    Each row's own state moves on: its count, its penalties' history and counts, its grammar."""
    events: list[tuple[Slot, Any]] = []
    keep: list[int] = []
    ended: list[Slot] = []
    emitted = 0
    for row, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
        if slot.cancelled:
            ended.append(slot)
            continue
        if token in terminators:
            events.append((slot, Done("stop")))
            ended.append(slot)
            continue
        slot.generated += 1
        emitted += 1
        events.append((slot, slot.scored if slot.scored is not None else token))
        if slot.history:
            slot.history.append(token)
        if slot.counts is not None:
            slot.counts[token] = slot.counts.get(token, 0) + 1
        if slot.grammar is not None and slot.grammar.advance(token):  # the JSON is complete
            events.append((slot, Done("stop")))
            ended.append(slot)
        elif slot.generated >= slot.request.max_new_tokens:
            events.append((slot, Done("length")))
            ended.append(slot)
        else:
            keep.append(row)
    return events, keep, ended, emitted


def prefill_group(model: Any, slots: list[Slot], device: Any, pad: int, chunk: int) -> tuple[Batch, Any]:
    """The group's prompts left-padded into one batch and prefilled by transformers' forward into a fresh cache:
    (the batch, without next tokens; each row's last logits).

    Chunked prefill: each forward takes `chunk` columns (PREFILL_CHUNK_TOKENS, 0 for all) against the cache so far,
    so eager attention's scores hold rows x heads x chunk x columns, not columns squared (docs/operations.md#memory).
    """
    import torch

    longest = max(len(s.prompt_ids) for s in slots)
    ids = torch.full((len(slots), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(slots), longest), dtype=torch.long)
    positions = torch.zeros((len(slots), longest), dtype=torch.long)
    for row, slot in enumerate(slots):
        n = len(slot.prompt_ids)
        ids[row, longest - n :] = torch.tensor(slot.prompt_ids, dtype=torch.long)
        mask[row, longest - n :] = 1
        positions[row, longest - n :] = torch.arange(n)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    cache = new_cache(model.config)
    chunk = chunk or longest
    for start in range(0, longest, chunk):
        end = min(longest, start + chunk)
        output = model(
            input_ids=ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    new = Batch()
    new.slots, new.cache, new.mask = list(slots), cache, mask
    new.positions = mask.sum(1)  # the next token's position: the prompt length
    return new, output.logits[:, -1, :]
