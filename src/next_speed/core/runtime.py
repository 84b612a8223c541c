"""Seeding, determinism, device choice and logging shared by every stage."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys

import numpy as np

from next_speed.core.errors import ConfigError, NextSpeedError

log = logging.getLogger("next_speed")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch (when imported); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))

    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False


def pick_device(requested: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={requested!r} but no CUDA device is available: use DEVICE=auto or cpu")
    return requested


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX or AVX512-BF16): there bf16 autocast
    roughly halves a training step; elsewhere it is emulated and slower than fp32."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


def resolve_amp(amp: str, device: str) -> str:
    """AMP=auto|bf16|off to what training uses on `device`: 'bf16' or 'off'. auto: bf16 on CUDA and
    on CPUs with native bf16, off elsewhere (mps included)."""

    if amp == "auto":
        return "bf16" if device.startswith("cuda") or (device == "cpu" and cpu_has_native_bf16()) else "off"
    if amp == "bf16" and device.startswith("mps"):
        raise ConfigError("AMP=bf16 is for cuda and cpu devices: use AMP=off or auto on mps")
    return amp


def resolve_dtype(dtype: str, device: str) -> str:
    """DTYPE=auto|fp32|bf16 to the decoder's weight type at generation: 'bf16' or 'fp32'. auto: bf16
    on CUDA (where it is the norm), fp32 elsewhere. bf16 on a CPU is opt-in: with AMX it is faster,
    above all for batches, but bf16 rounding turns the tiny differences between batch shapes into
    different tokens, so a server request's text may depend on its batchmates (fp32 keeps them
    equal; vLLM makes the same trade)."""

    if dtype == "auto":
        if device.startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"  # pre-Ampere GPUs emulate it
        return "fp32"
    if dtype == "bf16" and device.startswith("mps"):
        raise ConfigError("DTYPE=bf16 is for cuda and cpu devices: use DTYPE=fp32 or auto on mps")
    return dtype


def autocast(amp: str, device: str):
    """The autocast context for a resolved AMP choice ('bf16' or 'off'). Weights and optimizer
    state stay fp32 (mixed precision); only the matrix products run in bf16."""
    import torch

    if amp != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for BACKEND=ray (steps 02 and 03): join the cluster at `address`, or start a local
    instance on this machine's CPUs; a session started here is shut down on exit. Yields the
    `ray` module. Errors are one line naming the knob."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise NextSpeedError("BACKEND=ray needs Ray: pip install 'next-speed[ray]' (or uv sync --extra ray)") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": os.cpu_count()}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        except Exception as e:  # noqa: BLE001 - a cluster that cannot be reached is the user's to fix
            raise NextSpeedError(
                f"RAY_ADDRESS={address!r}: could not start or join Ray ({str(e).splitlines()[0][:200]})"
            ) from None
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
