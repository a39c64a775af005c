"""VLLMServerGenerator: the `Generator` protocol (see `base.py`) on a vLLM server started on its own.

    # on the inference GPUs (or node), once:
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve <base model> --enable-lora --max-lora-rank 64 \\
        --logprobs-mode processed_logprobs --port 8000
    # the trainer: generation.backend=vllm_server, generation.vllm.server.url=http://<host>:8000
    gen = VLLMServerGenerator(loaded, recipe.generation)   # or generation.make_generator(...)
    outs = gen.generate(prompts, n=8, max_new_tokens=256, temperature=1.0, stop=["\\n\\n"], seed=0)
    ...optimizer step...
    gen.update_weights(loaded.model)                       # the server samples from the new weights

Only the OpenAI-compatible HTTP API vLLM already serves is used (standard library `urllib`, so
the trainer needs no vLLM install):

- generation: ``POST /v1/completions`` with the prompt as token ids (encoded here with
  `models.encode_prompts`, as the other backends), one request per prompt (``n`` samples, seed
  ``base + i * n`` as the in-process backend), sent concurrently so the server batches them. The
  sampled ids come back with ``return_token_ids`` and their log-probs with ``logprobs: 0`` (the
  tokens as ``token_id:<id>`` with ``return_tokens_as_token_ids``, checked against the ids). Every
  sampling parameter the server could default from the model's generation_config (penalties,
  min_p) is sent explicitly. Text is decoded here and cut with `cut_at_stop`, as the other
  backends; the server only detects stop strings.
- log-probs: the convention of `base.py` needs the server started with
  ``--logprobs-mode processed_logprobs`` (its default, raw_logprobs, gives the temperature-1
  values). With top-k/top-p and T > 0 the completions are re-scored with the in-memory model, as
  in `vllm.py`.
- LoRA: `update_weights` saves the adapter to ``<shared_dir>/spiral-<tag>-<k>`` and loads it with
  ``POST /v1/load_lora_adapter`` (the server needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and
  ``--enable-lora``), then unloads the previous one and removes its directory. A new name per sync,
  so the prefix cache never serves blocks of an older adapter.
- full weights: saved as a checkpoint (safetensors) to the shared directory and reloaded in place
  with vLLM's ``reload_weights`` through ``POST /collective_rpc`` (a development endpoint: the
  server needs ``VLLM_SERVER_DEV_MODE=1``), then ``POST /reset_prefix_cache``. Single process only.
  (vLLM's NCCL weight-transfer engine, the faster path between GPUs, is not used.)
- health: at start ``GET /health``, ``GET /v1/models`` (the served base model), ``POST /tokenize``
  (the server's tokenizer must give our ids) and, with ``verify``, a probe: 12 tokens sampled by
  the server at temperature 2 (with the current adapter) must have the log-probs the in-memory
  model gives them (mean |diff| <= `VERIFY_TOLERANCE`); repeated after every weight sync. A server
  that serves another model, or raw log-probs, is refused in one line (`ServerError`, a
  ModelError: exit code 2, no traceback).
- failures: every request has a timeout (``timeout``) and is retried ``retries`` times after a
  connection error, a timeout or a 5xx, 2, 4, 8... s apart; then a `ServerError` says the server
  stopped answering. A training run keeps the state it saved every ``save_every`` steps and
  resumes from it when the same command is run again. A LoRA adapter the server lost (it was
  restarted) is loaded again before the request is retried.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from spiral_cli.adapters import AGGREGATOR_ADAPTER
from spiral_cli.generation.base import (
    Completion,
    check_generate_args,
    completions_from_samples,
    teacher_forced_logprobs,
    vllm_request_seeds,
)
from spiral_cli.models import ModelError, encode_prompts, eos_token_ids

log = logging.getLogger(__name__)

MAX_CONCURRENT_REQUESTS = 64  # prompts in flight at once (the server batches them)
BACKOFF_SECONDS = 2.0  # the first retry waits this long, each later one twice as long (capped at 30 s)
HEALTH_TIMEOUT = 10.0  # seconds for the start-up checks other than the probe
PROBE_TEXT = "Using the numbers [3, 7, 12], make 22. answer: (12 - 7) * 3 + 7\n\n"
PROBE_TOKENS = 12
PROBE_TEMPERATURE = 2.0  # far from 1: raw (T = 1) log-probs differ from the processed ones
VERIFY_TOLERANCE = 0.1  # mean |logprob diff| per probe token, nats (bf16 vs fp32: ~1e-2)
# what the server must not default from the model's generation_config: sent explicitly
NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}


class ServerError(ModelError):
    """The vLLM server is unreachable, serves another model, refuses a request or stopped
    answering: one line, exit code 2 (a ModelError)."""


class _HTTPStatus(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code = code
        self.message = message


def _unwrap(model):
    while hasattr(model, "module") and hasattr(model.module, "parameters"):
        model = model.module
    return model


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _error_message(body: bytes) -> str:
    """The message of a vLLM / FastAPI error body ({"error": {"message"}} or {"detail"})."""
    try:
        data = json.loads(body)
    except ValueError:
        return " ".join(body.decode("utf-8", "replace").split())[:300]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return " ".join(str(err["message"]).split())[:300]
        if data.get("detail"):
            return " ".join(str(data["detail"]).split())[:300]
        if data.get("message"):
            return " ".join(str(data["message"]).split())[:300]
    return " ".join(str(data).split())[:300]


def _reason(e: BaseException) -> str:
    """A short cause for a failed connection: 'connection refused', 'timed out after 600 s'..."""
    inner = getattr(e, "reason", None)
    if isinstance(inner, BaseException):
        e = inner
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        return "the connection was closed"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e.strerror or e})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return " ".join(str(e).split())[:200] or type(e).__name__


class VLLMServerGenerator:
    """Samples from a vLLM server (generation.backend=vllm_server); see the module docstring."""

    def __init__(self, loaded, section) -> None:
        cfg = section.vllm.server
        if not cfg.url:
            raise ServerError("generation.vllm.server.url: required with generation.backend=vllm_server")
        self.loaded = loaded
        self.section = section
        self.url = cfg.url.rstrip("/")
        self.timeout = float(cfg.timeout)
        self.retries = int(cfg.retries)
        self.verify = bool(cfg.verify)
        self.tokenizer = loaded.tokenizer
        self.is_lora = bool(loaded.is_lora)
        self.batch_size = int(getattr(section, "batch_size", 64))
        model = _unwrap(loaded.model)
        self.eos_ids = eos_token_ids(model, self.tokenizer)
        self.last_sync_seconds = 0.0
        self.sync_seconds_total = 0.0
        self.num_syncs = 0
        self.last_verify_error: float | None = None  # mean |diff| of the last probe
        self.max_model_len: int | None = None
        self._closed = False
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        self._pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_REQUESTS, thread_name_prefix="spiral-vllm-server")
        rank = int(os.environ.get("RANK", "0") or 0)
        self._tag = f"{secrets.token_hex(4)}" + (f"-r{rank}" if _world_size() > 1 else "")
        self._k = 0
        self._adapter: tuple[str, str] | None = None  # (name, directory) the server serves now
        self._full_dir: str | None = None
        self._server_device: str | None = None  # known with VLLM_SERVER_DEV_MODE=1 only
        self._own_dirs: list[str] = []
        if cfg.shared_dir:
            self.shared = Path(cfg.shared_dir).expanduser().resolve()
            self.shared.mkdir(parents=True, exist_ok=True)
        else:
            self.shared = Path(tempfile.mkdtemp(prefix="spiral-vllm-server-"))
            self._own_dirs.append(str(self.shared))
        weakref.finalize(self, _cleanup, self._own_dirs, self._pool)
        try:
            self._check_model(model)
            self._health()
            self._served = self._served_model()
            mml = self._served.get("max_model_len")
            # the server's context (its --max-model-len), read by prompt_fit like the engine's
            self.max_model_len = int(mml) if isinstance(mml, int) and mml > 0 else None
            self._check_tokenizer()
            self._dev_mode = self._has_dev_endpoints()
            trainable = any(p.requires_grad for p in model.parameters())
            if not self.is_lora and trainable:
                self._check_full_sync_possible()
            if self.is_lora:
                self._sync_lora(model)
            if self.verify:
                err = self._probe_error()
                if err is not None and not self.is_lora and self._dev_mode and trainable:
                    # a full model the server does not serve yet (an SFT checkpoint of its base): push it
                    log.warning("the vLLM server's weights differ from %s: pushing them", loaded.source)
                    self._sync_full(model)
                    err = self._probe_error()
                self._raise_on_probe(err, "at start")
        except BaseException:
            self.close()
            raise

    # -- protocol ------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p, top_k)
        if not prompts:
            return []
        if self._closed:
            raise RuntimeError("VLLMServerGenerator is closed")
        stop = [s for s in (stop or []) if s]
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        seeds = vllm_request_seeds(seed, len(prompts), n)
        vn = 1 if temperature == 0 else n  # vLLM refuses n > 1 for greedy: copy the one sample
        bodies = [self._completion_body(ids, n=vn, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, stop=stop, seed=sd) for ids, sd in zip(prompt_ids, seeds)]
        futures = [self._pool.submit(self._complete, body) for body in bodies]
        answers = [f.result() for f in futures]
        for choices in answers:
            if len(choices) != vn:
                raise ServerError(f"the vLLM server at {self.url} returned {len(choices)} samples for a prompt, expected {vn}")
        return completions_from_samples(self.loaded, prompt_ids, answers, n, temperature, top_p, top_k, stop,
                                        self._decode_batch, self.batch_size)

    def update_weights(self, model=None) -> None:
        """Make the server sample from `model`'s current weights (default: the loaded model)."""
        if self._closed:
            raise RuntimeError("VLLMServerGenerator is closed")
        model = _unwrap(model if model is not None else self.loaded.model)
        t0 = time.perf_counter()
        if self.is_lora:
            if not _is_peft(model):
                raise TypeError("update_weights: this generator serves a LoRA adapter; pass the peft model")
            self._sync_lora(model)
        else:
            if _is_peft(model):
                raise TypeError("update_weights: this generator serves a full model; got a peft model")
            self._sync_full(model)
        if self.verify:
            self._raise_on_probe(self._probe_error(), "after a weight update")
        dt = time.perf_counter() - t0
        self.last_sync_seconds = dt
        self.sync_seconds_total += dt
        self.num_syncs += 1

    def close(self) -> None:
        """Unload this generator's adapter from the server (best effort) and remove the directories
        it wrote. The server keeps running. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._adapter is not None:
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": self._adapter[0]},
                              timeout=HEALTH_TIMEOUT, retries=0)
            except Exception as e:  # noqa: BLE001 - best effort: the server may be gone
                log.debug("unload %s: %s", self._adapter[0], e)
            self._remove(self._adapter[1])
            self._adapter = None
        if self._full_dir is not None:
            self._remove(self._full_dir)
            self._full_dir = None
        _cleanup(self._own_dirs, self._pool)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None,
                 retries: int | None = None, retry_5xx: bool = True) -> Any:
        """One call of the server's API -> the decoded JSON (or text). Connection errors, timeouts
        and (with retry_5xx) 5xx answers are retried `retries` times with a growing pause; then a
        ServerError. Other HTTP errors raise _HTTPStatus at once."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        tries = 1 + (self.retries if retries is None else retries)
        wait = BACKOFF_SECONDS
        why = ""
        t0 = time.monotonic()
        for attempt in range(tries):
            if attempt:
                time.sleep(min(wait, 30.0))
                wait *= 2
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                msg = _error_message(e.read() or b"")
                if e.code >= 500 and retry_5xx:
                    why = f"HTTP {e.code}: {msg}"
                    continue
                raise _HTTPStatus(e.code, msg) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                why = _reason(e)
                if why == "timed out":
                    why = f"no answer within {timeout or self.timeout:g} s"
                continue
            if not raw:
                return None
            try:
                return json.loads(raw)
            except ValueError:
                return raw.decode("utf-8", "replace")
        took = time.monotonic() - t0
        raise ServerError(
            f"the vLLM server at {self.url} stopped answering ({path}: {why}; {tries} tries over {took:.0f} s): "
            "start it again and rerun the same command; a training run resumes from the last step it saved "
            "(every save_every steps)")

    def _health(self) -> None:
        try:
            self._request("GET", "/health", timeout=HEALTH_TIMEOUT)
        except ServerError:
            raise ServerError(
                f"generation.backend=vllm_server: no vLLM server answers at {self.url} ({self.retries + 1} tries); "
                f"start one first, e.g. `vllm serve {self._base_source()} --port 8000 --logprobs-mode processed_logprobs"
                + (" --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" if self.is_lora else "`")
                + " (docs/scaling.md)") from None
        except _HTTPStatus as e:
            raise ServerError(f"the vLLM server at {self.url} is not healthy (/health: {e})") from None

    def _served_model(self) -> dict[str, Any]:
        try:
            listing = self._request("GET", "/v1/models", timeout=HEALTH_TIMEOUT)
        except _HTTPStatus as e:
            raise ServerError(f"{self.url} does not look like a vLLM server (/v1/models: {e})") from None
        cards = [c for c in (listing or {}).get("data", []) if isinstance(c, dict) and not c.get("parent")]
        if not cards:
            raise ServerError(f"the vLLM server at {self.url} lists no model (/v1/models)")
        return cards[0]

    def _served_name(self) -> str:
        return str(self._served.get("root") or self._served.get("id"))

    def _base_source(self) -> str:
        return str((self.loaded.base_source if self.is_lora else self.loaded.source) or self.loaded.source)

    def _has_dev_endpoints(self) -> bool:
        """Whether the server runs with VLLM_SERVER_DEV_MODE=1 (/server_info, /collective_rpc...);
        keeps the device it runs on (`self._server_device`)."""
        try:
            info = self._request("GET", "/server_info?config_format=json", timeout=4 * HEALTH_TIMEOUT, retries=0)
        except (_HTTPStatus, ServerError):
            return False
        try:
            self._server_device = str(info["vllm_config"]["device_config"]["device"])
        except (KeyError, TypeError):
            pass
        return True

    # -- checks --------------------------------------------------------------------------------

    def _check_model(self, model) -> None:
        src = self._base_source()
        if src.startswith("scratch:"):
            raise ServerError(f"generation.backend=vllm_server: {src} exists in this process only, so no server can serve "
                              "it; save it first (spiral sft, or a checkpoint directory) and serve that directory")
        if AGGREGATOR_ADAPTER in (getattr(model, "peft_config", None) or {}):  # served as one adapter only
            raise ServerError("a model with an aggregator adapter needs generation.backend=hf or vllm (in-process)")
        if not self.is_lora and self.loaded.quantization != "none":
            raise ServerError(f"model.quantization={self.loaded.quantization}: generation.backend=vllm_server cannot push "
                              "quantized full weights; use LoRA (model.lora) or model.quantization=none")

    def _check_full_sync_possible(self) -> None:
        if _world_size() > 1:
            raise ServerError("generation.backend=vllm_server: full fine-tuning under several processes is not built "
                              "(one process pushes the weights); train a LoRA adapter (model.lora) or run one process")
        if not self._dev_mode:
            raise ServerError(
                f"full fine-tuning with generation.backend=vllm_server reloads the weights through vLLM's /collective_rpc, "
                f"which the server at {self.url} does not expose: start it with VLLM_SERVER_DEV_MODE=1, or train a LoRA "
                "adapter (model.lora) with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        config = getattr(_unwrap(self.loaded.model), "config", None)
        tied = bool(getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                            "tie_word_embeddings", False))
        if tied and self._server_device == "cpu":
            raise ServerError(
                f"the vLLM server at {self.url} runs on the CPU, where vLLM 0.32 keeps a tied LM head's old weights after "
                f"a reload: full fine-tuning of {self._base_source()} (tie_word_embeddings) cannot sync through it; train a "
                "LoRA adapter (model.lora), or use generation.backend=vllm (which re-packs the head)")

    def _check_tokenizer(self) -> None:
        ours = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        try:
            got = self._request("POST", "/tokenize", {"model": self._served.get("id"), "prompt": PROBE_TEXT,
                                                      "add_special_tokens": False}, timeout=HEALTH_TIMEOUT)
        except _HTTPStatus as e:
            log.warning("the vLLM server at %s did not tokenize a probe (%s): its tokenizer is not checked", self.url, e)
            return
        theirs = (got or {}).get("tokens") if isinstance(got, dict) else None
        if theirs != ours:
            raise ServerError(
                f"the vLLM server at {self.url} serves {self._served_name()}, whose tokenizer differs from the one of "
                f"{self._base_source()} (the model of the recipe): serve {self._base_source()}")

    def _probe_error(self) -> float | None:
        """Mean |server - model| log-prob of the probe's tokens; None when within VERIFY_TOLERANCE.
        Sets last_verify_error. Raises at once when the server gives temperature-1 (raw) values."""
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        body = self._completion_body(ids, n=1, max_tokens=PROBE_TOKENS, temperature=PROBE_TEMPERATURE, top_p=1.0,
                                     top_k=0, stop=[], seed=12345)
        body["ignore_eos"] = True
        (tokens, lps, _, _), = self._complete(body)
        # the in-memory model's values at T (expected) and at T = 1 (what raw_logprobs gives)
        at_t = teacher_forced_logprobs(self.loaded, [ids], [tokens], PROBE_TEMPERATURE, 1)[0]
        at_1 = teacher_forced_logprobs(self.loaded, [ids], [tokens], 1.0, 1)[0]
        d_t = sum(abs(a - b) for a, b in zip(lps, at_t)) / max(1, len(lps))
        d_1 = sum(abs(a - b) for a, b in zip(lps, at_1)) / max(1, len(lps))
        self.last_verify_error = d_t
        if d_t <= VERIFY_TOLERANCE:
            return None
        if d_1 <= VERIFY_TOLERANCE and d_1 < d_t:
            raise ServerError(
                f"the vLLM server at {self.url} returns temperature-1 log-probs (its default, raw_logprobs): start it "
                "with --logprobs-mode processed_logprobs (the RL loss needs the sampling distribution's)")
        return d_t

    def _raise_on_probe(self, err: float | None, when: str) -> None:
        if err is None:
            return
        what = "the adapter just loaded" if self.is_lora else "the model's weights"
        hint = (f"serves another model than the recipe's {self._base_source()} (it serves {self._served_name()})"
                if when == "at start" else f"does not serve {what}")
        raise ServerError(
            f"the vLLM server at {self.url} {hint}: {when}, its log-probs of a probe differ from the model's by "
            f"{err:.3f} nats per token on average (tolerance {VERIFY_TOLERANCE}); set "
            "generation.vllm.server.verify=false to skip this check")

    # -- completions ---------------------------------------------------------------------------

    def _model_field(self) -> str:
        return self._adapter[0] if self._adapter is not None else str(self._served.get("id"))

    def _completion_body(self, ids: list[int], *, n: int, max_tokens: int, temperature: float, top_p: float,
                         top_k: int, stop: list[str], seed: int) -> dict[str, Any]:
        return {
            "prompt": list(map(int, ids)), "n": int(n), "max_tokens": int(max_tokens),
            "temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k), **NEUTRAL_SAMPLING,
            "stop": list(stop), "stop_token_ids": list(self.eos_ids), "include_stop_str_in_output": False,
            "skip_special_tokens": True, "seed": int(seed), "logprobs": 0, "return_tokens_as_token_ids": True,
            "return_token_ids": True, "stream": False,
        }

    def _complete(self, body: dict[str, Any]) -> list[tuple[list[int], list[float], str, Any]]:
        """One /v1/completions call -> per sample (token ids, log-probs, finish reason, stop reason)."""
        for attempt in range(2):
            body = {**body, "model": self._model_field()}
            try:
                answer = self._request("POST", "/v1/completions", body)
                break
            except _HTTPStatus as e:
                lost = e.code == 404 and self._adapter is not None and attempt == 0
                if lost:  # the server was restarted and lost our adapter: load it again, retry once
                    log.warning("the vLLM server at %s lost adapter %s; loading it again", self.url, self._adapter[0])
                    self._load_adapter(*self._adapter)
                    continue
                raise ServerError(f"the vLLM server at {self.url} refused a generation request ({e})") from None
        choices = (answer or {}).get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list):
            raise ServerError(f"the vLLM server at {self.url} answered /v1/completions without choices")
        out = []
        for c in sorted(choices, key=lambda c: c.get("index", 0)):
            ids = c.get("token_ids")
            lp = c.get("logprobs") or {}
            lps, toks = lp.get("token_logprobs"), lp.get("tokens")
            if not isinstance(ids, list) or not isinstance(lps, list) or len(lps) != len(ids) or any(x is None for x in lps):
                raise ServerError(f"the vLLM server at {self.url} returned no token ids or log-probs for the sampled tokens "
                                  "(a vLLM older than 0.10?)")
            if isinstance(toks, list) and toks and toks != [f"token_id:{t}" for t in ids]:
                raise ServerError(f"the vLLM server at {self.url} returned log-probs for other tokens than the sampled ones")
            finish = c.get("finish_reason")
            if finish not in ("stop", "length"):
                raise ServerError(f"the vLLM server at {self.url} ended a request with finish_reason={finish!r}")
            out.append(([int(t) for t in ids], [float(x) for x in lps], finish, c.get("stop_reason")))
        return out

    def _decode_batch(self, seqs: list[list[int]]) -> list[str]:
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "decode_batch"):
            return backend.decode_batch(seqs, skip_special_tokens=True)
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- weights -------------------------------------------------------------------------------

    def _new_dir(self, kind: str) -> str:
        self._k += 1
        d = self.shared / f"spiral-{self._tag}-{kind}{self._k}"
        d.mkdir(parents=True, exist_ok=False)
        self._own_dirs.append(str(d))
        return str(d)

    def _remove(self, d: str) -> None:
        shutil.rmtree(d, ignore_errors=True)
        if d in self._own_dirs:
            self._own_dirs.remove(d)

    def _load_adapter(self, name: str, d: str) -> None:
        try:
            self._request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": d}, retry_5xx=False)
        except _HTTPStatus as e:
            if e.code == 400 and "already been loaded" in e.message:
                return  # an earlier try got through (its answer was lost)
            if e.code in (404, 405):
                raise ServerError(f"the vLLM server at {self.url} does not load LoRA adapters at run time: start it with "
                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora") from None
            raise ServerError(f"the vLLM server at {self.url} could not load the LoRA adapter ({e}); it needs --enable-lora "
                              "and --max-lora-rank >= model.lora.r, and must see the directory "
                              f"{d} (generation.vllm.server.shared_dir)") from None

    def _sync_lora(self, model) -> None:
        d = self._new_dir("lora")
        name = Path(d).name
        model.save_pretrained(d)  # the adapter only (adapter_config.json + safetensors)
        self._load_adapter(name, d)
        old, self._adapter = self._adapter, (name, d)
        if old is not None:
            try:
                self._request("POST", "/v1/unload_lora_adapter", {"lora_name": old[0]}, retries=0)
            except (ServerError, _HTTPStatus) as e:  # evicted by the server anyway
                log.debug("unload %s: %s", old[0], e)
            self._remove(old[1])

    def _sync_full(self, model) -> None:
        self._check_full_sync_possible()
        d = self._new_dir("full")
        model.save_pretrained(d, safe_serialization=True)
        try:
            self._request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": d}},
                          retry_5xx=False)
            self._request("POST", "/reset_prefix_cache", retries=1)
        except _HTTPStatus as e:
            raise ServerError(f"the vLLM server at {self.url} could not reload the weights ({e}); it must see the "
                              f"directory {d} (generation.vllm.server.shared_dir)") from None
        old, self._full_dir = self._full_dir, d
        if old is not None:
            self._remove(old)


def _cleanup(dirs: list[str], pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    while dirs:
        shutil.rmtree(dirs.pop(), ignore_errors=True)
