"""The engine core: one `step()` = schedule -> run the model -> sample -> detokenize -> emit.

Synchronous and single-threaded on purpose: `LLM` drives it directly, `AsyncEngine` drives it
from a background thread. Every step returns per-request deltas (new text and tokens of each
choice), so a streamed and a collected response are the same stream.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time

from lmserve.chat.formats import chat_format
from lmserve.device import choose_device, choose_dtype, cpu_threads_fixed
from lmserve.engine import prompt_logprobs
from lmserve.engine.batch import build_model_input
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.detokenizer import IncrementalDetokenizer, hidden_special_ids
from lmserve.engine.executor_setup import build_executor
from lmserve.engine.kv_sizing import auto_num_blocks
from lmserve.engine.options import EngineConfig
from lmserve.engine.sampler import Sampler, stream_key
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Request, SeqStatus, Sequence
from lmserve.engine.spec_decode.config import DRAFT_MODEL, SpeculativeConfig
from lmserve.engine.spec_decode.draft_model import DraftModel, check_draft_supported, load_draft
from lmserve.engine.spec_decode.speculator import Speculator
from lmserve.engine.spec_decode.stats import SpecDecodeStats
from lmserve.engine.spec_decode.verify import accepted_prefix, sampling_rows
from lmserve.engine.structured import GrammarBackend, grammar_available
from lmserve.engine.thread_tuner import ThreadTuner
from lmserve.engine.weight_cache import shared_tokenizer
from lmserve.errors import ContextLengthExceeded, InvalidParameter
from lmserve.models.loader import read_config, resolve_checkpoint
from lmserve.outputs import CompletionOutput, RequestOutput, TokenLogprob
from lmserve.sampling_params import SamplingParams

log = logging.getLogger("lmserve.engine")


class LLMEngine:
    def __init__(self, model: str, dtype: str = "auto", **engine_options):
        self.engine_config = cfg = EngineConfig.from_options(**engine_options)  # engine/options.py
        spec_config = SpeculativeConfig.parse(cfg.speculative_config)  # a bad config fails before loading
        if spec_config is not None and spec_config.method == DRAFT_MODEL:
            check_draft_supported(cfg)
        self.device = choose_device(cfg.device)
        self.dtype = choose_dtype(dtype, self.device)
        self.checkpoint = resolve_checkpoint(model)
        self.model_config = read_config(self.checkpoint)
        self.max_model_len = min(cfg.max_model_len or self.model_config.context_length,
                                 self.model_config.context_length)
        started = time.perf_counter()
        self.executor = build_executor(cfg, self.checkpoint, self.model_config, self.dtype, self.device,
                                       self.max_model_len)
        self.model = self.executor.model  # rank 0's shard under tensor parallelism
        self.tokenizer = shared_tokenizer(self.checkpoint)
        log.info("loaded %s (%s, %s) in %.1fs", model, self.dtype, self.device, time.perf_counter() - started)
        self.draft: DraftModel | None = None
        try:
            if spec_config is not None and spec_config.method == DRAFT_MODEL:
                self.draft = load_draft(spec_config, cfg, self.model_config, self.tokenizer, self.dtype, self.device)
            num_blocks = cfg.num_kv_blocks or auto_num_blocks(
                cfg, self.executor, self.model_config, self.dtype, self.device, self.max_model_len,
                spec_config.num_speculative_tokens if spec_config is not None else 0,
                self.draft.kv_bytes_per_block(cfg.block_size) if self.draft is not None else 0)
            started = time.perf_counter()
            self.executor.init_cache(num_blocks, cfg.block_size)
            if self.draft is not None:  # as many blocks as the target's: it can mirror every token
                self.draft.init_cache(num_blocks, cfg.block_size, cfg.attention_backend, cfg.cpu_graphs)
        except BaseException:
            self.executor.shutdown()
            raise
        log.info("KV cache: %d blocks of %d tokens allocated in %.1fs", num_blocks, cfg.block_size,
                 time.perf_counter() - started)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   cfg.long_prefill_token_threshold, cfg.batch_kv_share)
        self.sampler = Sampler()
        # A sequence also can never outgrow the whole cache.
        self.max_seq_len = min(self.max_model_len, self.block_manager.capacity_tokens)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.chat_format = chat_format(self.model_config.architecture)
        if self.tokenizer is not None:
            if self.tokenizer.eos_token_id is not None:
                self.eos_token_ids.add(self.tokenizer.eos_token_id)
            vocab = self.tokenizer.get_vocab()
            self.eos_token_ids.update(vocab[t] for t in self.chat_format.end_of_turn_tokens if t in vocab)
        self.hidden_token_ids = hidden_special_ids(self.tokenizer, self.chat_format.tool_call_tokens)
        self.sampler.eos_token_ids = sorted(self.eos_token_ids)  # held back until min_tokens
        self.speculator = (Speculator(spec_config, self.eos_token_ids, self.max_seq_len, proposer=self.draft)
                           if spec_config is not None else None)
        if self.speculator is not None:
            self.scheduler.on_release = self.speculator.release
        # CPU threads per step by measurement (a busy neighbour core), unless the user fixed them.
        self.thread_tuner = ThreadTuner.for_engine(self.device, cfg.tensor_parallel_size, cpu_threads_fixed(),
                                                   self.dtype)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._grammar: GrammarBackend | None = None
        self._grammar_lock = threading.Lock()

    @property
    def runner(self):
        """Rank 0's model runner (its KV cache, its attention backend)."""
        return self.executor.runner

    @property
    def alive(self) -> bool:
        """False once a tensor-parallel worker died: no step can run any more."""
        return self.executor.alive

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (a no-op for a one-process engine)."""
        self.executor.shutdown()

    def grammar_backend(self) -> GrammarBackend:
        """The structured-output backend, built on first use (thread-safe: the API validates
        schemas on its own threads)."""
        with self._grammar_lock:
            if self._grammar is None:
                if not grammar_available():
                    raise InvalidParameter("response_format", "structured output needs the `xgrammar` package, "
                                           "which this installation lacks (make setup installs it)")
                if self.tokenizer is None:
                    raise InvalidParameter("response_format", "structured output needs the model's tokenizer")
                self._grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size,
                                               sorted(self.eos_token_ids))
                self.sampler.grammar = self._grammar
            return self._grammar

    # ---- requests -------------------------------------------------------------------------

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameter("prompt", "this model has no tokenizer; pass token ids")
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def check_token_ids(self, token_ids: list[int], param: str = "prompt", what: str = "prompt token ids") -> None:
        """Every id inside the model's vocabulary, or InvalidParameter naming `param` (the one
        range check for prompts given as ids and for detokenizing)."""
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise InvalidParameter(param, f"{what} must be in [0, {vocab})")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> Request:
        """Queue a request. `prompt` is text (tokenized here) or token ids."""
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"request id {request_id!r} is already running")
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.encode(prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise InvalidParameter("prompt", "the prompt is empty")
        self.check_token_ids(prompt_ids)
        if len(prompt_ids) >= self.max_seq_len:
            limit = ("the model's context" if self.max_seq_len == self.max_model_len else "the KV cache")
            raise ContextLengthExceeded(
                "messages", f"the prompt has {len(prompt_ids)} tokens, but {limit} holds {self.max_seq_len} "
                "tokens including at least one generated token")
        if params.n > self.engine_config.max_num_seqs:
            raise InvalidParameter("n", f"n ({params.n}) exceeds this engine's max_num_seqs "
                                   f"({self.engine_config.max_num_seqs})")
        if params.structured_output is not None:
            self.grammar_backend().compile(params.structured_output)  # a bad schema fails here
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request = Request(request_id, prompt_ids, params, time.monotonic(), seed, prompt=prompt_text)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        first = self._new_sequence(request, 0, list(prompt_ids))
        self.requests[request_id] = request
        self.scheduler.add(first)
        return request

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        seq = Sequence(
            seq_id=next(self._seq_ids), request=request, index=index, token_ids=token_ids,
            sampling_key=stream_key(request.seed, index),
            detok=IncrementalDetokenizer(self.tokenizer, request.params.stop, self.hidden_token_ids,
                                         request.params.skip_special_tokens))
        if request.params.structured_output is not None:
            seq.grammar = self.grammar_backend().matcher(request.params.structured_output)
        request.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it was not running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
        return True

    def abort_all(self) -> list[str]:
        """Drop every request (after a failed step), leaving the engine clean to go on."""
        ids = list(self.requests)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, self._grammar)
        started = time.perf_counter()  # the step without proposing (the speculator times that itself)
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        spec_lens = self._scheduled_proposals(batch) if self.speculator is not None else {}
        # Decodes and verifications only: a point of the step-time fit the adaptive rule uses.
        timed = self.speculator is not None and all(seq.seq_id in spec_lens for seq, _ in batch.prefills)
        context = sum(seq.num_computed_tokens for seq, _ in batch.prefills)
        rows = len(batch.decodes) + sum(n for _, n in batch.prefills)  # query tokens of the step
        threads = self.thread_tuner.choose(rows) if self.thread_tuner is not None else 0
        run_started = time.perf_counter()
        try:
            outputs = self._run(batch, spec_lens)
        finally:
            if threads:
                self.thread_tuner.release(threads)
        if threads:
            self.thread_tuner.observe(rows, threads, time.perf_counter() - run_started)
        if timed:
            self.speculator.observe_step(rows, context, time.perf_counter() - started)
        return outputs

    def _run(self, batch, spec_lens: dict[int, int]) -> list[RequestOutput]:
        """The scheduled step through the model, the sampler and (for proposals) verification."""
        sample_rows: list = []  # what the sampler draws from, one per logits row
        takers: list[tuple[Sequence, int]] = []  # who takes the draws: (sequence, rows), in order
        logit_ids: list[int] = []
        forks: list[tuple[Sequence, list[Sequence]]] = []
        for seq, n in [(s, 1) for s in batch.decodes] + batch.prefills:
            if seq.num_computed_tokens + n < seq.num_tokens:
                continue  # a chunk in the middle of a prefill: nothing to sample yet
            request = seq.request
            if seq.forks_pending:
                # The other choices fork from this prefill and sample from the same logits row.
                children = [self._new_sequence(request, i, list(seq.token_ids))
                            for i in range(1, request.params.n)]
                forks.append((seq, children))
                sample_rows += [seq, *children]
                takers += [(s, 1) for s in (seq, *children)]
                logit_ids += [seq.seq_id] * request.params.n
            elif seq.seq_id in spec_lens:
                rows = sampling_rows(seq)  # its last token and every proposed one
                sample_rows += rows
                takers.append((seq, len(rows)))
                logit_ids.append(seq.seq_id)
            else:
                sample_rows.append(seq)
                takers.append((seq, 1))
                logit_ids.append(seq.seq_id)

        logits = prompt_logprobs.execute(self.executor, batch, build_model_input(batch, logit_ids, spec_lens))

        for seq in batch.decodes:
            seq.num_computed_tokens += 1
            self.block_manager.cache_full_blocks(seq)
        for seq, n in batch.prefills:
            if seq.seq_id in spec_lens:
                continue  # how much of it stands is known after sampling (_verify)
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
        for parent, children in forks:
            for child in children:
                child.num_computed_tokens = parent.num_computed_tokens
                self.block_manager.fork(parent, child)
                self.scheduler.add_running(child)

        sampled = self.sampler(logits, sample_rows)
        touched: dict[str, Request] = {}
        row = 0
        for seq, count in takers:
            if count == 1:
                self._append_token(seq, sampled.token_ids[row], sampled.logprobs[row])
            else:
                self._verify(seq, sampled.token_ids[row:row + count], sampled.logprobs[row:row + count])
            row += count
            touched[seq.request.request_id] = seq.request
        return [self._make_output(r) for r in touched.values()]

    def _scheduled_proposals(self, batch) -> dict[int, int]:
        """Proposed tokens the scheduler fit into this step, per sequence id: a sequence the
        token budget cut short verifies only the proposals that made it in."""
        spec_lens = {}
        for seq in batch.decodes:
            seq.spec_token_ids = []
        for seq, n in batch.prefills:
            if seq.spec_token_ids:
                fit = max(seq.num_computed_tokens + n - seq.num_tokens, 0)
                seq.spec_token_ids = seq.spec_token_ids[:fit]
                if fit:
                    spec_lens[seq.seq_id] = fit
        return spec_lens

    def _verify(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Keep the proposed tokens the target's draws confirm, then the target's next token
        (engine/spec_decode/verify.py), one at a time as a plain decode would append them, so a
        stop string, stop token or max_tokens inside the run ends it where it ends without
        speculation. Then only the KV of kept tokens counts as computed: the rejected positions'
        blocks go back, and only final tokens are hashed for the prefix cache."""
        proposed = seq.spec_token_ids
        accepted = accepted_prefix(proposed, tokens)
        start = seq.num_tokens  # the position of the first proposed token
        emitted = 0
        for token, logprob in zip(proposed[:accepted] + tokens[accepted:accepted + 1], logprobs[:accepted + 1]):
            self._append_token(seq, token, logprob, release=False)
            emitted += 1
            if seq.finished:
                break
        seq.spec_token_ids, seq.spec_masks = [], []
        # The last real token and the accepted proposals have their KV in the cache now.
        seq.num_computed_tokens = min(start + accepted, seq.num_tokens - 1)
        self.block_manager.rollback(seq)
        self.block_manager.cache_full_blocks(seq)
        self.speculator.record(seq, len(proposed), accepted, emitted)
        if seq.finished:
            self.scheduler.remove(seq)

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None, release: bool = True) -> None:
        params = seq.params
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            log.error("grammar rejected sampled token %d of %s", token, seq.request.request_id)
        seq.token_ids.append(token)
        seq.pending_token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        reason = stop_string = None
        # End-of-sequence and stop tokens end generation without adding their text.
        if token in self.eos_token_ids and not params.ignore_eos:
            reason = "eos"
        elif token in params.stop_token_ids:
            reason = "stop"
        else:
            stop_string = seq.detok.add_token(token)
            reason = "stop" if stop_string is not None else None
        if reason is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len):
            reason = "length"
        # Finishing decodes what still waited for a character to complete (unless a stop
        # string cut the text); that text may itself complete a stop string.
        if reason is not None and stop_string is None and seq.detok.flush() is not None:
            reason = "stop"
        if reason is not None:
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = reason
            if release:
                self.scheduler.remove(seq)

    def _make_output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            if seq.emitted_finish:
                continue
            finished = seq.finished
            text = seq.detok.take_delta(finished)
            if not (text or seq.pending_token_ids or finished):
                continue
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.pending_token_ids,
                finish_reason=seq.finish_reason if finished else None,
                logprobs=seq.pending_logprobs if seq.params.logprobs else None))
            seq.pending_token_ids, seq.pending_logprobs = [], []
            seq.emitted_finish = finished
        done = request.finished
        if done:
            self.requests.pop(request.request_id, None)
        return RequestOutput(request.request_id, request.prompt_token_ids, outputs, done,
                             request.num_cached_tokens, request.prompt, prompt_logprobs.take_finished(request))

    # ---- introspection (metrics, tests) ---------------------------------------------------

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """What speculative decoding proposed, accepted and emitted so far (None: it is off)."""
        return self.speculator.stats if self.speculator is not None else None

    def stats(self) -> dict:
        """A snapshot for metrics (read from the step thread's state without locking: gauges):
        running and waiting sequences, KV cache usage, prefix cache counters, speculation."""
        bm = self.block_manager
        spec = self.spec_decode_stats
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "spec_decode": spec.as_dict() if spec is not None else None,
        }

    @property
    def num_free_blocks(self) -> int:
        """Free blocks of the KV cache, and of the draft model's when speculation has one (so a
        leak in either shows)."""
        draft = self.draft.num_free_blocks if self.draft is not None else 0
        return self.block_manager.num_free_blocks + draft

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks + (self.draft.num_blocks if self.draft is not None else 0)
