"""Triton Python-backend generation model written by `kvconvert export triton` (decoupled, streaming).

Request: `text_input` (string) or `input_ids` (int64 [n]); optional `max_tokens`, `temperature` (0 = greedy),
`top_k`, `seed`, `ignore_eos` (generate exactly max_tokens: load tests). Responses: one per new token with
`token_ids` [1] and `text_output` (the text it adds), then an empty final response (also after every error).

In-flight batching: `execute()` only checks a request and queues it; one scheduler thread per instance admits
queued requests between steps (up to `max_active` sequences, `max_queued` waiting, `queue_timeout_s`),
prefills them in chunks (`prefill_chunk` tokens per step in all), decodes every active sequence in ONE
batched graph call and drops finished, cancelled or disconnected sequences before the next step.
"onnxruntime": each sequence owns one row of a preallocated batch cache [max_active, ...] per buffer, updated
in place (IOBinding binds present_* to past_* on the same rows). "engine": the same scheduler calls the
TensorRT model `engine_model` per sequence by BLS with a correlation id, all sequences of a step at once
(Triton keeps each sequence's KV cache as implicit state).
Needs numpy, tokenizers and, for "onnxruntime", onnxruntime; not kvconvert.
"""

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton: kvconvert's tests drive the scheduler directly
    pb_utils = None


def _param(cfg, key, default=None):
    value = cfg.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class Rejected(Exception):
    """An admission limit refused the request (the client gets this message and a final response)."""


class OrtBatchStepper:
    """The exported decoder in ONNX Runtime over one preallocated batch cache.

    `buffers[i]`: [max_active, *past_shape_i] (graph order of `past_*`), zero pages mapped only when written.
    A sequence holds one row from `acquire` to `release`. Slots at or beyond a row's length are scratch:
    every step writes slot `cache_length + s` before attending to slots <= it, so a row may be fed as a
    dummy (slot max_context - 1, which no sequence ever fills: prompt + max_tokens <= max_context and the
    last token is not fed back).
    """

    def __init__(self, path, meta, max_active, threads=0):
        import onnxruntime as ort

        self.ort = ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        # no busy-waiting between ops: the scheduler thread, Triton and other instances share the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = list(meta["inputs"][3:]) if "inputs" in meta else [n for n in inputs if n.startswith("past_")]
        self.present = (list(meta["outputs"][1:]) if "outputs" in meta
                        else [n.replace("past_", "present_", 1) for n in self.past])
        dtype = np.float16 if "float16" in inputs[self.past[0]].type else np.float32
        self.max_context = int(meta["max_context"])
        self.buffers = [np.zeros((max_active, *inputs[n].shape[1:]), dtype) for n in self.past]
        out_dims = {o.name: o.shape for o in self.session.get_outputs()}["logits"]
        self.last_only = meta.get("logits") == "last" or out_dims[1] == 1
        self.free = list(range(max_active))
        self.row = {}
        self._views = {}

    def acquire(self, seq):
        self.free.sort()
        self.row[seq] = self.free.pop(0)

    def release(self, seq):
        self.free.append(self.row.pop(seq))

    def _bound(self, a, b):
        """OrtValues over rows [a, b) of every buffer (views: the graph writes the batch cache itself)."""
        if (a, b) not in self._views:
            self._views[(a, b)] = [self.ort.OrtValue.ortvalue_from_numpy(buf[a:b]) for buf in self.buffers]
        return self._views[(a, b)]

    def _run(self, a, b, ids, pos, cache_length):
        """One graph call on rows [a, b): ids/pos [b-a, S], cache_length [b-a] -> logits [b-a, S|1, V]."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        binding.bind_cpu_input("cache_length", np.ascontiguousarray(cache_length, np.int64))
        binding.bind_output("logits")
        for past, present, value in zip(self.past, self.present, self._bound(a, b)):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _runs(self, chunks):
        """Split [(seq, ids, start)] into calls on contiguous rows whose right padding fits in the buffers and
        costs at most half the real tokens (prefill is compute-bound: padding is paid in full).
        A last-position-logits graph gives each row the logits of the call's last column, so its calls hold
        chunks of one length only (a graph with all positions pads ragged chunks and reads each row's own)."""
        runs, cur = [], []
        for c in sorted(chunks, key=lambda c: self.row[c[0]]):
            width = max([len(x[1]) for x in cur] + [len(c[1])])
            real = sum(len(x[1]) for x in cur) + len(c[1])
            if cur and (self.row[c[0]] == self.row[cur[-1][0]] + 1
                        and not (self.last_only and len(c[1]) != len(cur[0][1]))
                        and width * (len(cur) + 1) <= 1.5 * real + 8
                        and max(x[2] for x in cur + [c]) + width <= self.max_context):
                cur.append(c)
            else:
                if cur:
                    runs.append(cur)
                cur = [c]
        return runs + ([cur] if cur else [])

    def prefill(self, chunks):
        """chunks [(seq, ids [n], start)] -> yields (seq, logits [V] after its chunk's last token), one call
        after another, the call of the shortest chunks first (their first tokens go out before the next call)."""
        for run in sorted(self._runs(chunks), key=lambda run: max(len(c[1]) for c in run)):
            width = max(len(ids) for _, ids, _ in run)
            ids = np.zeros((len(run), width), np.int64)
            for r, (_, x, _) in enumerate(run):
                ids[r, : len(x)] = x
            start = np.array([s for _, _, s in run], np.int64)
            a = self.row[run[0][0]]
            logits = self._run(a, a + len(run), ids, start[:, None] + np.arange(width), start)
            for r, (seq, x, _) in enumerate(run):
                yield seq, (logits[r, 0] if logits.shape[1] == 1 else logits[r, len(x) - 1])

    def decode(self, items):
        """items [(seq, token, position)] -> {seq: logits [V]}: one call on rows [0, highest + 1)."""
        hi = max(self.row[s] for s, _, _ in items) + 1
        ids = np.zeros((hi, 1), np.int64)
        length = np.full(hi, self.max_context - 1, np.int64)
        for seq, tok, p in items:
            ids[self.row[seq], 0], length[self.row[seq]] = tok, p
        logits = self._run(0, hi, ids, length[:, None], length)
        return {seq: logits[self.row[seq], -1] for seq, _, _ in items}


class EngineStepper:
    """Calls the TensorRT model per sequence (BLS) with a correlation id; Triton holds each cache. The
    requests of one step are issued together, so Triton's sequence batcher runs them as one batch."""

    def __init__(self, model_name, max_active):
        self.model = model_name
        self.pool = ThreadPoolExecutor(max_active)
        self.state = {}
        self.next_id = 0

    def acquire(self, seq):
        self.next_id += 1
        self.state[seq] = {"id": (os.getpid() << 20) + self.next_id, "first": True}

    def release(self, seq):
        st = self.state.pop(seq)
        if not st["first"]:
            try:
                self._exec(st, np.zeros(1, np.int64), 0, last=True)
            except RuntimeError:
                pass

    def _exec(self, st, ids, start, last=False):
        flags = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if st["first"] else 0
        if last:
            flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        st["first"] = False
        inputs = [pb_utils.Tensor("input_ids", ids[None].astype(np.int64)),
                  pb_utils.Tensor("position_ids", np.arange(start, start + len(ids), dtype=np.int64)[None]),
                  pb_utils.Tensor("cache_length", np.array([[start]], np.int64))]
        req = pb_utils.InferenceRequest(model_name=self.model, inputs=inputs, requested_output_names=["logits"],
                                        correlation_id=st["id"], flags=flags)
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        return pb_utils.get_output_tensor_by_name(resp, "logits").as_numpy()[0, -1]

    def _all(self, jobs):
        futures = {seq: self.pool.submit(self._exec, self.state[seq], ids, start) for seq, ids, start in jobs}
        return {seq: f.result() for seq, f in futures.items()}

    def prefill(self, chunks):
        return self._all(chunks).items()

    def decode(self, items):
        return self._all([(seq, np.array([tok], np.int64), p) for seq, tok, p in items])


def _sample(logits, temperature, top_k, rng):
    logits = logits.astype(np.float32)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if 0 < top_k < z.shape[0]:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.shape[0], p=p))


class Sequence:
    """One request from queueing to its final response. `sink`: send(token, text) / close(error) /
    cancelled() (TritonSink in a server)."""

    def __init__(self, prompt, max_tokens, temperature, top_k, seed, sink, ignore_eos=False):
        self.prompt, self.max_tokens, self.temperature, self.top_k = prompt, max_tokens, temperature, top_k
        self.ignore_eos = ignore_eos
        self.rng = np.random.default_rng(seed)
        self.sink = sink
        self.arrived = time.monotonic()
        self.prefilled = 0
        self.tokens = []
        self.text = ""
        self.last_sent = None


class Scheduler:
    """In-flight batching over a stepper (OrtBatchStepper or EngineStepper), on its own thread.

    Each loop: drop cancelled / timed-out requests, admit queued ones into free rows, prefill up to
    `prefill_chunk` prompt tokens in all (shortest remaining prompt first, a long one in chunks over several
    loops; requests that arrived during that prefill are admitted and prefilled too), then one decode step
    for every sequence that has a token to feed. Finished sequences release
    their row at once.
    """

    def __init__(self, stepper, decode_text, eos, max_active, max_queued, queue_timeout_s, prefill_chunk,
                 metrics, cancel_poll_s=0.05):
        self.stepper, self.decode_text, self.eos = stepper, decode_text, eos
        self.max_active, self.max_queued = max_active, max_queued
        self.queue_timeout_s, self.prefill_chunk = queue_timeout_s, prefill_chunk
        self.metrics = metrics
        self.cancel_poll_s = cancel_poll_s
        self.queue = deque()
        self.active = []
        self.cond = threading.Condition()
        self.stopping = False
        self._queue_checked = 0.0
        self.thread = threading.Thread(target=self._loop, name="kvconvert-scheduler", daemon=True)
        self.thread.start()

    def submit(self, seq):
        with self.cond:
            if self.stopping:
                raise Rejected("the model is unloading; retry on another instance")
            if len(self.queue) >= self.max_queued + self.max_active - len(self.active):
                raise Rejected(f"the queue is full ({self.max_queued} requests waiting, {len(self.active)} "
                               f"running; max_queued); retry later")
            self.queue.append(seq)
            self.metrics.queue(len(self.queue))
            self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ---- the loop ----
    def _loop(self):
        while True:
            with self.cond:
                while not self.stopping and not self.active and not self.queue:
                    self.cond.wait()
                if not self.active and not self.queue:
                    return
            try:
                if self.stopping:
                    return self._fail_all("the model is unloading", queued=True)
                self._expire_queue()
                self._admit()
                if self._prefill() and self.queue:  # arrivals during that prefill: theirs too, then decode
                    self._admit()
                    self._prefill()
                self._decode()
            except Exception as exc:  # noqa: BLE001 (a failed step ends the sequences in it; the model keeps serving)
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def _finish(self, seq, error=None, outcome="completed"):
        if seq in self.active:
            self.active.remove(seq)
            self.stepper.release(seq)
        seq.sink.close(error)
        self.metrics.outcome(outcome)
        self.metrics.active(len(self.active))

    def _fail_all(self, message, queued=False):
        """End every running sequence (and with `queued` every waiting request) with an error."""
        waiting = []
        if queued:
            with self.cond:
                waiting, self.queue = list(self.queue), deque()
        for seq in list(self.active) + waiting:
            self._finish(seq, message, "failed")
        self.metrics.queue(len(self.queue))

    def _expire_queue(self):
        now = time.monotonic()
        poll = now - self._queue_checked >= self.cancel_poll_s
        self._queue_checked = now if poll else self._queue_checked
        with self.cond:
            keep, gone = deque(), []
            for seq in self.queue:
                if now - seq.arrived > self.queue_timeout_s:
                    gone.append((seq, f"waited {now - seq.arrived:.1f} s in the queue (queue_timeout_s "
                                      f"{self.queue_timeout_s:g}, {len(self.active)} sequences running); retry later",
                                 "timed_out"))
                elif poll and seq.sink.cancelled():
                    gone.append((seq, None, "cancelled"))
                else:
                    keep.append(seq)
            self.queue = keep
        for seq, error, outcome in gone:
            seq.sink.close(error)
            self.metrics.outcome(outcome)
        self.metrics.queue(len(self.queue))

    def _admit(self):
        for seq in list(self.active):
            if seq.sink.cancelled():
                self._finish(seq, None, "cancelled")
        while len(self.active) < self.max_active:
            with self.cond:
                if not self.queue:
                    break
                seq = self.queue.popleft()
            self.stepper.acquire(seq)
            self.active.append(seq)
        self.metrics.queue(len(self.queue))
        self.metrics.active(len(self.active))

    def _prefill(self):
        reading = sorted((s for s in self.active if s.prefilled < len(s.prompt)),
                         key=lambda s: len(s.prompt) - s.prefilled)
        chunks, budget = [], self.prefill_chunk
        for s in reading:  # shortest remaining prompt first: the most first tokens per step
            if budget <= 0:
                break
            n = min(budget, len(s.prompt) - s.prefilled)
            chunks.append((s, s.prompt[s.prefilled: s.prefilled + n], s.prefilled))
            budget -= n
        if not chunks:
            return False
        sizes = {seq: len(ids) for seq, ids, _ in chunks}
        for seq, logits in self.stepper.prefill(chunks):
            seq.prefilled += sizes[seq]
            if seq.prefilled == len(seq.prompt):
                self._emit(seq, logits)
        return True

    def _decode(self):
        items = [(s, s.tokens[-1], len(s.prompt) + len(s.tokens) - 1) for s in self.active
                 if s.prefilled == len(s.prompt) and s.tokens]
        if not items:
            return
        logits = self.stepper.decode(items)
        for seq, _, _ in items:
            self._emit(seq, logits[seq])

    def _emit(self, seq, logits):
        tok = _sample(logits, seq.temperature, seq.top_k, seq.rng)
        seq.tokens.append(tok)
        full = self.decode_text(seq.tokens)
        piece, seq.text = full[len(seq.text):], full
        now = time.monotonic()
        if seq.last_sent is None:
            self.metrics.first_token(now - seq.arrived)
        else:
            self.metrics.inter_token(now - seq.last_sent)
        seq.last_sent = now
        self.metrics.tokens(1)
        if not seq.sink.send(tok, piece):
            return self._finish(seq, None, "cancelled")
        if (tok in self.eos and not seq.ignore_eos) or len(seq.tokens) == seq.max_tokens:
            self._finish(seq)


class TritonSink:
    """A request's response sender: token responses, one final response whatever happens."""

    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()
        self.closed = False

    def cancelled(self):
        try:
            return self.sender.is_cancelled()
        except Exception:  # noqa: BLE001 (a sender that cannot answer belongs to a gone client)
            return True

    def send(self, tok, piece):
        try:
            self.sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("token_ids", np.array([tok], np.int64)),
                pb_utils.Tensor("text_output", np.array([piece.encode()], dtype=np.object_))]))
            return True
        except Exception:  # noqa: BLE001 (client disconnected)
            return False

    def close(self, error=None):
        if self.closed:
            return
        self.closed = True
        try:
            if error is not None:
                self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
        except Exception:  # noqa: BLE001 (the final flag below still has to go)
            pass
        try:
            self.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 (client gone)
            pass


TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
OUTCOMES = ("completed", "cancelled", "rejected", "timed_out", "failed")


class TritonMetrics:
    """Custom metrics on Triton's endpoint (labels model, version, instance)."""

    def __init__(self, labels):
        M = pb_utils.MetricFamily
        self.families = [
            M(name="kvconvert_time_to_first_token_seconds", kind=M.HISTOGRAM,
              description="request arrival to its first token"),
            M(name="kvconvert_inter_token_latency_seconds", kind=M.HISTOGRAM,
              description="time between consecutive tokens of a sequence"),
            M(name="kvconvert_generated_tokens_total", kind=M.COUNTER, description="tokens generated"),
            M(name="kvconvert_queue_depth", kind=M.GAUGE, description="requests waiting for a free sequence slot"),
            M(name="kvconvert_active_sequences", kind=M.GAUGE, description="sequences being prefilled or decoded"),
            M(name="kvconvert_requests_total", kind=M.COUNTER,
              description="finished requests by outcome (completed, cancelled, rejected, timed_out, failed)"),
        ]
        ttft, itl, tokens, queue, active, outcomes = self.families
        self._ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        self._itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self._tokens = tokens.Metric(labels=labels)
        self._queue = queue.Metric(labels=labels)
        self._active = active.Metric(labels=labels)
        self._outcomes = {o: outcomes.Metric(labels={**labels, "outcome": o}) for o in OUTCOMES}
        self._last = {}

    def first_token(self, seconds):
        self._ttft.observe(seconds)

    def inter_token(self, seconds):
        self._itl.observe(seconds)

    def tokens(self, n):
        self._tokens.increment(n)

    def queue(self, n):
        if n != self._last.get("queue"):
            self._last["queue"] = n
            self._queue.set(n)

    def active(self, n):
        if n != self._last.get("active"):
            self._last["active"] = n
            self._active.set(n)

    def outcome(self, kind):
        self._outcomes[kind].increment(1)


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        cfg = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        self.meta = json.loads(_param(cfg, "kvconvert"))
        self.max_context = int(self.meta["max_context"])
        self.default_tokens = int(_param(cfg, "max_new_tokens", 64))
        self.max_tokens_limit = int(_param(cfg, "max_tokens_limit", self.max_context))
        eos = self.meta.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.tokenizer = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        max_active = int(_param(cfg, "max_active", 8))
        if _param(cfg, "mode") == "engine":
            stepper = EngineStepper(_param(cfg, "engine_model"), max_active)
        else:
            stepper = OrtBatchStepper(os.path.join(here, "model.onnx"), self.meta, max_active,
                                      int(_param(cfg, "ort_threads", 0)))
        self.metrics = TritonMetrics({"model": args["model_name"], "version": args["model_version"],
                                      "instance": args.get("model_instance_name", "0")})
        self.scheduler = Scheduler(stepper, self.tokenizer.decode, self.eos, max_active,
                                   int(_param(cfg, "max_queued", 64)), float(_param(cfg, "queue_timeout_s", 30)),
                                   int(_param(cfg, "prefill_chunk", 256)), self.metrics)

    def _prompt(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        if ids is not None:
            prompt = ids.as_numpy().reshape(-1).astype(np.int64)
        elif text is not None:
            raw = text.as_numpy().reshape(-1)[0]
            prompt = np.array(self.tokenizer.encode(raw.decode() if isinstance(raw, bytes) else str(raw)).ids,
                              np.int64)
        else:
            raise ValueError("send text_input (string) or input_ids (int64 [n])")
        vocab = int(self.meta["vocab_size"])
        if prompt.size == 0 or prompt.min() < 0 or prompt.max() >= vocab:
            raise ValueError(f"the prompt must hold 1 or more token ids in [0, {vocab})")
        return prompt

    def _scalar(self, request, name, default, kind):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return default if t is None else kind(t.as_numpy().reshape(-1)[0])

    def _sequence(self, request, sink):
        prompt = self._prompt(request)
        max_tokens = self._scalar(request, "max_tokens", self.default_tokens, int)
        if max_tokens > self.max_tokens_limit:
            raise Rejected(f"max_tokens {max_tokens} is over this server's limit of {self.max_tokens_limit} "
                           "(max_tokens_limit)")
        if max_tokens < 1 or len(prompt) + max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) must be within "
                             f"1..{self.max_context} (the export's max_context)")
        return Sequence(prompt, max_tokens, self._scalar(request, "temperature", 0.0, float),
                        self._scalar(request, "top_k", 0, int), self._scalar(request, "seed", 0, int), sink,
                        self._scalar(request, "ignore_eos", False, bool))

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request)
            try:
                self.scheduler.submit(self._sequence(request, sink))
            except Rejected as exc:
                sink.close(str(exc))
                self.metrics.outcome("rejected")
            except Exception as exc:  # noqa: BLE001 (a bad request gets an error response; the model keeps serving)
                sink.close(f"{type(exc).__name__}: {exc}")
                self.metrics.outcome("failed")
        return None

    def finalize(self):
        self.scheduler.stop()
