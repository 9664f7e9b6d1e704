import pytest

from services.launch.cluster import LocalCluster
from services.launch.config import LaunchConfig

TOKEN = "loadtest-cluster-token"


def small_cluster(log_dir) -> LocalCluster:
    config = LaunchConfig(num_memservers=0, worker_kv_blocks=256, worker_threads=1, port=0, log_dir=log_dir,
                          cluster_token=TOKEN, stop_timeout_s=20)
    return LocalCluster(config, log_dir)


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    with small_cluster(tmp_path_factory.mktemp("cluster_a")) as c:
        yield c


@pytest.fixture(scope="package")
def cluster_b(tmp_path_factory):
    with small_cluster(tmp_path_factory.mktemp("cluster_b")) as c:
        yield c
