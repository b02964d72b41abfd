"""Triton Python-backend generation model written by `kvconvert export triton` (decoupled, streaming).

Request: `text_input` (string) or `input_ids` (int64 [n]); optional `max_tokens`, `temperature` (0 = greedy),
`top_k`, `seed`. Responses: one per new token with `token_ids` [1] and `text_output` (the text it adds), then
an empty final response. Each request owns its KV buffers (prefill, then one decode step per token), so
concurrent sequences never share state. Needs numpy, tokenizers and, for "onnxruntime", onnxruntime.
Mode "engine" calls the TensorRT model `engine_model` per step with a sequence id: Triton keeps that
sequence's KV cache as implicit state.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _param(cfg, key, default=None):
    value = cfg.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else value


class OrtStepper:
    """Runs the exported decoder in ONNX Runtime; the cache buffers are fed back each step."""

    def __init__(self, path, meta):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = int(os.environ.get("KVCONVERT_ORT_THREADS", "0"))
        gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        self.session = ort.InferenceSession(path, opts, providers=(["CUDAExecutionProvider"] if gpu else [])
                                            + ["CPUExecutionProvider"])
        # cache buffers in graph order: past_key_0, past_value_0, ... or a latent model's past_*_latent_*
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.shapes = [tuple(i.shape[1:]) for i in self.past]
        self.dtype = np.float16 if "float16" in self.past[0].type else np.float32

    def start(self, request_id):
        return [np.zeros((1, *s), self.dtype) for s in self.shapes]

    def step(self, state, ids, start):
        feed = {"input_ids": ids[None].astype(np.int64),
                "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
                "cache_length": np.array([start], np.int64)}
        feed.update((i.name, buf) for i, buf in zip(self.past, state))
        outs = self.session.run(None, feed)
        state[:] = outs[1:]
        return outs[0][0, -1].astype(np.float32)

    def end(self, state):
        state.clear()


class EngineStepper:
    """Calls the TensorRT model step by step (BLS) with a correlation id; Triton holds the cache."""

    def __init__(self, model_name):
        self.model = model_name
        self.next_id = 1

    def start(self, request_id):
        self.next_id += 1
        return {"id": (os.getpid() << 20) + self.next_id, "first": True}

    def step(self, state, ids, start, last=False):
        flags = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if state["first"] else 0
        if last:
            flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
        state["first"] = False
        inputs = [pb_utils.Tensor("input_ids", ids[None].astype(np.int64)),
                  pb_utils.Tensor("position_ids", np.arange(start, start + len(ids), dtype=np.int64)[None]),
                  pb_utils.Tensor("cache_length", np.array([[start]], np.int64))]
        req = pb_utils.InferenceRequest(model_name=self.model, inputs=inputs, requested_output_names=["logits"],
                                        correlation_id=state["id"], flags=flags)
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        logits = pb_utils.get_output_tensor_by_name(resp, "logits").as_numpy()
        return logits[0, -1].astype(np.float32)

    def end(self, state):
        if not state["first"]:
            try:
                self.step(state, np.zeros(1, np.int64), 0, last=True)
            except RuntimeError:
                pass


def _sample(logits, temperature, top_k, rng):
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if 0 < top_k < z.shape[0]:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.shape[0], p=p))


class TritonPythonModel:
    def initialize(self, args):
        from tokenizers import Tokenizer

        cfg = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        self.meta = json.loads(_param(cfg, "kvconvert"))
        self.max_context = int(self.meta["max_context"])
        self.default_tokens = int(_param(cfg, "max_new_tokens", 64))
        eos = self.meta.get("eos_token_id")
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.tokenizer = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        if _param(cfg, "mode") == "engine":
            self.stepper = EngineStepper(_param(cfg, "engine_model"))
        else:
            self.stepper = OrtStepper(os.path.join(here, "model.onnx"), self.meta)

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

    def _generate(self, request, sender):
        prompt = self._prompt(request)
        max_tokens = self._scalar(request, "max_tokens", self.default_tokens, int)
        temperature = self._scalar(request, "temperature", 0.0, float)
        top_k = self._scalar(request, "top_k", 0, int)
        rng = np.random.default_rng(self._scalar(request, "seed", 0, int))
        if max_tokens < 1 or len(prompt) + max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) must be within "
                             f"1..{self.max_context} (the export's max_context)")
        state = self.stepper.start(request.request_id())
        try:
            logits = self.stepper.step(state, prompt, 0)
            length, out, text = len(prompt), [], ""
            for _ in range(max_tokens):
                tok = _sample(logits, temperature, top_k, rng)
                out.append(tok)
                full = self.tokenizer.decode(out)
                piece, text = full[len(text):], full
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("token_ids", np.array([tok], np.int64)),
                    pb_utils.Tensor("text_output", np.array([piece.encode()], dtype=np.object_))]))
                if tok in self.eos or len(out) == max_tokens:
                    break
                logits = self.stepper.step(state, np.array([tok], np.int64), length)
                length += 1
        finally:
            self.stepper.end(state)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except Exception as exc:  # noqa: BLE001 (a bad request ends with an error response; the model keeps serving)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
