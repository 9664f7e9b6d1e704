"""SIZE parsing and launch-config validation: pure, no processes."""

from __future__ import annotations

import argparse

import pytest

from services.launch.config import LaunchConfig
from services.runtime.sizes import format_size, parse_size, size_arg
from services.launch.view import view_from_cluster_json, view_from_worker_stats


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 << 20), ("8GiB", 8 << 30), ("8gib", 8 << 30), ("1.5G", 3 << 29), ("4096", 4096),
    ("64 KiB", 64 << 10), ("2GB", 2 * 10**9), ("1TiB", 1 << 40), ("100b", 100),
])
def test_parse_size_accepts_binary_and_decimal_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "expected a number"), ("GiB", "expected a number"), ("-1GiB", "expected a number"),
    ("12XB", "unknown unit 'XB'"), ("0MiB", "greater than zero"), ("1.5.2G", "expected a number"),
])
def test_parse_size_errors_name_the_problem(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)


def test_size_arg_is_an_argparse_type_with_the_message():
    parser = argparse.ArgumentParser()
    parser.add_argument("--capacity", type=size_arg)
    assert parser.parse_args(["--capacity", "8GiB"]).capacity == "8GiB"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown unit"):
        size_arg("8GiBs")


def test_format_size_round_trips():
    for n in (512 << 20, 8 << 30, 3 << 29, 100):
        assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_workers": 0}, "--workers"), ({"num_memservers": -1}, "--memservers"),
    ({"block_size": 12}, "power of two"), ({"dtype": "float16"}, "--dtype"), ({"port": 70000}, "--port"),
    ({"memserver_capacity": "lots"}, "invalid size"), ({"model": "/no/such/dir"}, "--model"),
    ({"worker_kv_blocks": 0}, "--worker-kv-blocks"), ({"served_model_name": " "}, "--served-model-name"),
    ({"max_model_len": 0}, "--max-model-len must be >= 1"), ({"max_num_seqs": 0}, "--max-num-seqs must be >= 1"),
    ({"max_num_batched_tokens": -5}, "--max-num-batched-tokens must be >= 1, got -5"),
    ({"generation_config": "/no/such/dir"}, "--generation-config must be 'auto', 'vllm' or a directory"),
    ({"chat_template": "/no/such/template.jinja"}, "--chat-template '/no/such/template.jinja': no such file"),
    ({"lora_modules": (("tiny", "/a/tiny"),), "enable_lora": True},
     "--lora-modules name 'tiny' is already the base model's name"),
    ({"lora_modules": (("sql", "/a/sql"),)}, "--lora-modules needs --enable-lora"),
    ({"max_lora_rank": 0}, "--max-lora-rank must be >= 1"),
    ({"speculative_config": '{"method": "medusa"}'}, "method 'medusa' is not supported"),
    ({"responses_store_size": -1}, "--responses-store-size must be >= 0"),
])
def test_launch_config_rejects_bad_options(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LaunchConfig(cluster_token="t", **kwargs)


def test_cluster_view_from_worker_stats_counts_tokens():
    view = view_from_worker_stats([
        {"num_total_blocks": 256, "num_used_blocks": 3, "block_size": 16},
        {"num_total_blocks": 128, "num_used_blocks": 0, "block_size": 16},
    ])
    assert (view.capacity_tokens, view.num_used_blocks, view.free_tokens) == (384 * 16, 3, 381 * 16)


def test_cluster_view_from_cluster_json_sums_nodes_when_no_totals():
    body = {"block_size": 16,
            "workers": [{"num_total_blocks": 100, "num_free_blocks": 90}],
            "memservers": [{"num_total_blocks": 1000, "num_used_blocks": 5}, {"num_total_blocks": 1000}]}
    view = view_from_cluster_json(body)
    assert (view.num_workers, view.num_memservers, view.num_total_blocks, view.num_used_blocks) == (1, 2, 2100, 15)
    assert view_from_cluster_json({**body, "num_total_blocks": 7, "num_used_blocks": 0}).num_used_blocks == 0


def test_cluster_view_reads_the_routers_cluster_route():
    body = {"block_size": 16, "max_context_tokens": 20480, "num_used_blocks": 2,
            "workers": [{"worker_id": "w0", "num_blocks": 256, "num_free_blocks": 254, "num_used_blocks": 2}],
            "memservers": [{"memserver_id": "m0", "num_blocks": 1024, "num_free_blocks": 1024, "num_used_blocks": 0}]}
    view = view_from_cluster_json(body)
    assert (view.capacity_tokens, view.num_used_blocks, view.max_context_tokens) == (1280 * 16, 2, 20480)
    assert "longest context 20,480 tokens" in view.describe()


@pytest.mark.parametrize("parsers, expected", [
    ({}, []),
    ({"tool_call_parser": "hermes"}, ["--tool-call-parser", "hermes"]),
    ({"tool_call_parser": "hermes", "reasoning_parser": "qwen3"},
     ["--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]),
    ({"allow_runtime_lora_updating": True, "responses_store_size": 0},
     ["--allow-runtime-lora-updating", "--responses-store-size", "0"]),
    ({"return_tokens_as_token_ids": True}, ["--return-tokens-as-token-ids"]),
])
def test_up_passes_the_parsers_to_the_router(tmp_path, parsers, expected):
    from services.launch.cluster import LocalCluster

    class Spawned(Exception):
        pass

    def spawn(name, kind, cli_args, port):
        raise Spawned(cli_args)

    cluster = LocalCluster(LaunchConfig(**parsers, cluster_token="t"), tmp_path)
    cluster._spawn = spawn
    with pytest.raises(Spawned) as e:
        cluster.start()
    args = e.value.args[0]
    assert args[0] == "router" and args[5:] == expected


@pytest.mark.parametrize("keys", [[""], [" sk-padded"]])
def test_up_refuses_an_empty_or_padded_api_key(keys, capsys):
    from services import launcher

    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    args = parser.parse_args([arg for key in keys for arg in ("--api-key", key)])
    assert launcher.main(args) == 2
    assert "API key must be non-empty, without surrounding spaces" in capsys.readouterr().err


@pytest.mark.parametrize("options, expected", [
    ({}, []),
    ({"max_model_len": 2048, "max_num_seqs": 8, "max_num_batched_tokens": 512},
     ["--max-model-len", "2048", "--max-num-seqs", "8", "--max-num-batched-tokens", "512"]),
    ({"generation_config": "vllm"}, ["--generation-config", "vllm"]),
    ({"chat_template": "{{ messages }}"}, ["--chat-template", "{{ messages }}"]),
    ({"enable_lora": True, "lora_modules": (("sql", "/a/sql"),), "max_lora_rank": 32},
     ["--enable-lora", "--max-lora-rank", "32", "--lora-modules", "sql=/a/sql"]),
    ({"speculative_config": '{"method": "ngram", "num_speculative_tokens": 3}'},
     ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']),
])
def test_up_passes_the_engine_limits_to_every_worker(tmp_path, options, expected):
    from services.launch.cluster import LocalCluster
    from services.launch.procs import Child

    cluster = LocalCluster(LaunchConfig(**options, cluster_token="t"), tmp_path)
    cluster.router = Child("router", "router", None, tmp_path / "router.log", 1, "http://127.0.0.1:1")
    spawned = []
    cluster._spawn = lambda name, kind, cli_args, port: spawned.append(cli_args)
    cluster._start_worker(0)
    (args,) = spawned
    named = ("--max-", "--generation-config", "--chat-template", "--enable-lora", "--lora-modules",
             "--speculative-config")
    limits = [a for i, a in enumerate(args) if a.startswith(named) or (i and args[i - 1].startswith(named))]
    assert limits == expected
