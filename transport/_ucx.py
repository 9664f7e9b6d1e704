"""The one import of ucxx. UCX reads some variables when the library loads (and ``import ucxx``
sets its own defaults), so the environment is prepared first; per-node settings are passed to the
UCX context (``TransportConfig.ucx_options``) and override these."""

from transport.config import TransportConfig, apply_ucx_env

apply_ucx_env(TransportConfig())

import ucxx._lib.libucxx as ucx_api  # noqa: E402
from ucxx._lib.arr import Array  # noqa: E402
from ucxx.types import Tag  # noqa: E402

__all__ = ["Array", "Tag", "ucx_api"]
