"""The worker's torch thread default leaves a core to the event loop that streams tokens."""

import os

import pytest

from services.runtime.host import default_logits_threads, default_num_threads
from services.worker.config import WorkerConfig


def test_default_threads_are_all_usable_cores_but_one_shared_by_the_workers():
    cores = len(os.sched_getaffinity(0))
    assert default_num_threads() == max(1, cores - 1)
    assert default_num_threads(num_workers=cores) == 1  # never zero
    assert WorkerConfig(cluster_token="t").engine_config().num_threads == default_num_threads()
    assert WorkerConfig(cluster_token="t", num_threads=3).engine_config().num_threads == 3


def test_the_lm_head_may_use_every_core_but_never_fewer_threads_than_the_rest():
    cores = len(os.sched_getaffinity(0))
    assert default_logits_threads(1) == cores
    assert default_logits_threads(1, num_workers=cores + 1) == 1  # never zero
    assert default_logits_threads(cores + 2) == cores + 2  # never fewer than the step's own threads
    config = WorkerConfig(cluster_token="t").engine_config()
    assert config.logits_threads == max(config.num_threads, cores)
    assert WorkerConfig(cluster_token="t", num_threads=cores + 2).engine_config().logits_threads == cores + 2
    assert WorkerConfig(cluster_token="t", logits_threads=1).engine_config().logits_threads == 1


@pytest.mark.parametrize("field", ["num_threads", "logits_threads"])
def test_bad_thread_count_is_refused(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        WorkerConfig(cluster_token="t", **{field: 0})


@pytest.mark.parametrize("flag, field", [("--max-num-batched-tokens", "max_num_batched_tokens"),
                                         ("--max-model-len", "max_model_len")])
def test_engine_flags_reach_the_engine_and_a_bad_value_is_refused(flag, field):
    import argparse

    from services.worker.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([flag, "2048", "--cluster-token", "t"])
    assert getattr(config_from_args(args).engine_config(), field) == 2048
    bad = config_from_args(parser.parse_args([flag, "0", "--cluster-token", "t"]))
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        bad.engine_config()


def test_generation_config_reaches_the_engine_and_a_directory_without_one_is_refused(tmp_path):
    import argparse

    from services.worker.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def parse(*flags):
        return config_from_args(parser.parse_args([*flags, "--cluster-token", "t"])).engine_config()

    assert parse().generation_config == "auto" and parse("--generation-config", "vllm").generation_config == "vllm"
    with pytest.raises(ValueError, match="a directory holding a generation_config.json"):
        parse("--generation-config", str(tmp_path))
    (tmp_path / "generation_config.json").write_text("{}")
    assert parse("--generation-config", str(tmp_path)).generation_config == str(tmp_path)


def test_worker_cli_refuses_a_zero_step_budget_before_loading_anything(capfd):
    import argparse

    from services.worker.cli import add_arguments, main

    import structlog

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    try:
        assert main(parser.parse_args(["--max-num-batched-tokens", "0", "--cluster-token", "t"])) == 2
    finally:
        structlog.reset_defaults()  # main() bound the logger to this test's captured stderr
    captured = capfd.readouterr()
    assert "max_num_batched_tokens must be >= 1" in captured.out + captured.err



def test_lora_flags_reach_the_engine_as_vllm_takes_them(tmp_path, monkeypatch):
    """--enable-lora --lora-modules name=path (or vLLM's JSON form) -> absolute adapter directories;
    without --enable-lora, naming a missing directory, or reusing a name is refused before loading anything."""
    import argparse
    import json

    from services.worker.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def parse(*flags):
        return config_from_args(parser.parse_args([*flags, "--cluster-token", "t"])).engine_config()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    spec_b = json.dumps({"name": "b", "path": str(tmp_path / "b")})
    monkeypatch.chdir(tmp_path)
    config = parse("--enable-lora", "--lora-modules", "a=a", spec_b, "--max-lora-rank", "64")
    assert config.lora_modules == (("a", str(tmp_path / "a")), ("b", str(tmp_path / "b")))
    assert config.max_lora_rank == 64 and parse().lora_modules == ()
    for flags, message in [
        (("--lora-modules", "a=a"), "--lora-modules needs --enable-lora"),
        (("--enable-lora", "--lora-modules", "a=nowhere"), "a=nowhere: not a directory"),
        (("--enable-lora", "--lora-modules", "a=a", "a=b"), "needs distinct names"),
        (("--enable-lora", "--lora-modules", "tiny=a"), "'tiny' is already the base model's name"),
        (("--enable-lora", "--lora-modules", "a"), "expected name=path"),
        (("--enable-lora", "--lora-modules", "a=a", "--max-lora-rank", "0"), "max_lora_rank must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(*flags)
