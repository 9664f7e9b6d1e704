import subprocess
import sys


def test_router_never_imports_torch():
    code = ("import sys, services.router.app, services.router.cli, services.chat; "
            "assert 'torch' not in sys.modules, 'router imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
