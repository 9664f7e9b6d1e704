"""`kvmesh up` as a user runs it: a real launcher process with a router and a worker on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai
import pytest

from services.launch import probe
from services.runtime.auth import DEV_CLUSTER_TOKEN

from tests.launcher.up_process import (
    REPO, SMALL, cleanup, free_port, pid_alive, port_free, start_up, wait_gone, wait_manifest,
)


def test_up_serves_a_streamed_chat_and_sigint_stops_every_child(tmp_path):
    port = free_port()
    proc = start_up(tmp_path, *SMALL, "--port", str(port), "--served-model-name", "kvmesh-tiny",
                    "--api-key", "sk-first", "--api-key", "sk-second", "--max-model-len", "2048")
    with cleanup(proc, tmp_path):
        manifest = wait_manifest(proc, tmp_path)
        assert manifest["url"] == f"http://127.0.0.1:{port}"
        kinds = sorted(p["kind"] for p in manifest["processes"])
        assert kinds == ["router", "worker"]
        router = next(p for p in manifest["processes"] if p["kind"] == "router")
        assert "sk-first" not in Path(f"/proc/{router['pid']}/cmdline").read_text()  # keys stay out of ps
        with openai.OpenAI(base_url=manifest["url"] + "/v1", api_key="sk-wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError, match="API key"):
                client.models.list()
        with openai.OpenAI(base_url=manifest["url"] + "/v1", api_key="sk-second", max_retries=0) as client:
            models = client.models.list().data
            assert [(m.id, m.max_model_len) for m in models] == [("kvmesh-tiny", 2048)]
            with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens"):
                client.completions.create(model="kvmesh-tiny", prompt="hello", max_tokens=2048)
            stream = client.chat.completions.create(
                model="kvmesh-tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text
        view = probe.wait_zero_used_blocks(manifest["url"], DEV_CLUSTER_TOKEN)
        assert view.num_used_blocks == 0  # the router's view: every worker's pool is free again

        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        out, err = proc.communicate()
        pids = [p["pid"] for p in manifest["processes"]]
        assert wait_gone(pids) == []
        assert all(port_free(p["port"]) for p in manifest["processes"])
    assert f"http://127.0.0.1:{port}/v1" in out and "--api-key KEY" in out and "api keys   2:" in out
    assert "sk-first" not in out + err  # never printed
    assert "KV capacity 4,096 tokens (256 blocks x 16)" in out
    assert str(tmp_path) in out  # where the logs are
    assert {f.name for f in tmp_path.glob("*.log")} == {"router.log", "worker0.log"}
    assert "stopped 2 process(es)" in err and "non-zero" not in err


def test_up_chat_reads_stdin_and_stops_the_cluster_when_chat_ends(tmp_path):
    proc = start_up(tmp_path, *SMALL, "--port", "0", "--chat", "--chat-max-tokens", "8", "--api-key", "sk-chat",
                    stdin=subprocess.PIPE)
    with cleanup(proc, tmp_path):
        out, err = proc.communicate("hello there\nand again\n", timeout=240)
        assert proc.returncode == 0, err
        manifest = wait_manifest(proc, tmp_path, timeout=0)
        assert wait_gone([p["pid"] for p in manifest["processes"]]) == []
    assert err.count("tok/s]") == 2  # one answer summary per line of stdin


def test_launcher_death_takes_its_children_along(tmp_path):
    """PR_SET_PDEATHSIG: a SIGKILLed launcher leaves no orphans."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from services.launch.procs import spawn
        child = spawn("sleeper", "test", [sys.executable, "-c", "import time; time.sleep(120)"],
                      Path({str(tmp_path)!r}), 0, "127.0.0.1", {{}})
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert pid_alive(child_pid)
        parent.kill()
        parent.wait(10)
        assert wait_gone([child_pid], timeout=10) == []
    finally:
        parent.stdout.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_up_rejects_a_bad_size_before_starting_anything(tmp_path):
    proc = start_up(tmp_path, "--memserver-capacity", "8GB!", "--port", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "invalid size '8GB!'" in err


def _wait_cluster(proc: subprocess.Popen, url: str, done, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kvmesh up exited with {proc.returncode}:\n{proc.stderr.read()}"
        status, body = probe.get_json(url + "/cluster", DEV_CLUSTER_TOKEN)
        if status == 200 and done(body):
            return body
        time.sleep(0.2)
    raise TimeoutError(f"/cluster never became what the test waits for; last: {body}")


def test_up_replaces_a_dead_memserver_and_worker_and_keeps_serving(tmp_path):
    proc = start_up(tmp_path, "--memservers", "1", "--memserver-capacity", "4MiB", "--worker-kv-blocks", "64",
                    "--worker-threads", "1", "--stop-timeout", "20", "--port", "0")
    with cleanup(proc, tmp_path):
        manifest = wait_manifest(proc, tmp_path)
        url, pids = manifest["url"], {p["name"]: p["pid"] for p in manifest["processes"]}
        os.killpg(pids["memserver0"], signal.SIGKILL)
        _wait_cluster(proc, url, lambda c: [m["memserver_id"] for m in c["memservers"]] == ["memserver1"])
        os.killpg(pids["worker0"], signal.SIGKILL)
        _wait_cluster(proc, url, lambda c: [(w["worker_id"], w["live"]) for w in c["workers"]] == [("worker0-2", True)])

        # The replacements serve: a prompt longer than the worker's own 64 blocks spills to memserver1.
        prompt = list(range(1000, 2500))
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            done = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
        assert probe.wait_zero_used_blocks(url, DEV_CLUSTER_TOKEN).num_used_blocks == 0

        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
        out, err = proc.communicate()
        latest = json.loads((tmp_path / "cluster.json").read_text())
        assert sorted(p["name"] for p in latest["processes"]) == ["memserver1", "router", "worker0-2"]
        assert wait_gone([*pids.values(), *(p["pid"] for p in latest["processes"])]) == []
    assert "memserver0 exited with status -9" in err and "started memserver1 in its place" in err
    assert "worker0 exited with status -9" in err and "started worker0-2 in its place" in err
    assert "non-zero" not in err  # the replacements drained and exited cleanly on Ctrl-C


def test_up_chat_keeps_its_cluster_whole_while_the_user_chats(tmp_path):
    # The main job (`kvmesh up --chat`) replaces a dead memserver too; the chat goes on.
    proc = start_up(tmp_path, "--memservers", "1", "--memserver-capacity", "4MiB", "--worker-kv-blocks", "64",
                    "--worker-threads", "1", "--stop-timeout", "20", "--port", "0", "--chat",
                    "--chat-max-tokens", "8", stdin=subprocess.PIPE)
    with cleanup(proc, tmp_path):
        manifest = wait_manifest(proc, tmp_path)
        memserver0 = next(p["pid"] for p in manifest["processes"] if p["name"] == "memserver0")
        os.killpg(memserver0, signal.SIGKILL)
        _wait_cluster(proc, manifest["url"], lambda c: [m["memserver_id"] for m in c["memservers"]] == ["memserver1"],
                      timeout=60)
        proc.stdin.write("hello there\n")
        proc.stdin.flush()
        err = ""
        while "tok/s]" not in err:  # the answer's summary line
            line = proc.stderr.readline()
            assert line, f"kvmesh up ended before answering:\n{err}"
            err += line
        assert probe.wait_zero_used_blocks(manifest["url"], DEV_CLUSTER_TOKEN).num_used_blocks == 0
        out, rest = proc.communicate("and again\n", timeout=240)
        err += rest
        assert proc.returncode == 0, err
        latest = json.loads((tmp_path / "cluster.json").read_text())
        assert wait_gone([memserver0, *(p["pid"] for p in latest["processes"])]) == []
    assert "started memserver1 in its place" in err
    assert err.count("tok/s]") == 2  # both questions answered
