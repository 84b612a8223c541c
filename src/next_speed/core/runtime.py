"""Seeding, determinism, device choice and logging shared by every stage."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any

import numpy as np

log = logging.getLogger("next_speed")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, numpy and torch (when imported); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    import sys

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

    from next_speed.core.errors import ConfigError

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
    from next_speed.core.errors import ConfigError

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
    from next_speed.core.errors import ConfigError

    if dtype == "auto":
        if device.startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"  # pre-Ampere GPUs emulate it
        return "fp32"
    if dtype == "bf16" and device.startswith("mps"):
        raise ConfigError("DTYPE=bf16 is for cuda and cpu devices: use DTYPE=fp32 or auto on mps")
    return dtype


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (x86 and arm64 CPU wheels do)."""
    import torch

    try:
        return (
            bool(torch.backends.mkldnn.is_available())
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


_PACKED = None


def _packed_linear_class():
    global _PACKED
    if _PACKED is not None:
        return _PACKED
    import torch
    import torch.nn.functional as F

    class PackedLinear(torch.nn.Linear):
        """An nn.Linear whose forward multiplies by a copy of its weight reordered into oneDNN's
        blocked layout (what torch.compile's CPU freezing does for linears). Same parameters and
        state_dict as nn.Linear. The copy is made anew when the weight changed since (an in-place
        edit, another tensor); where it cannot serve (autograd, another dtype or device) the layer
        is the plain F.linear."""

        packed: Any = None
        packed_rows: int = 4
        packed_from: tuple = ()  # (data_ptr, version) of the weight the copy was made from

        def forward(self, x):
            w = self.weight
            if (
                x.dtype != torch.float32
                or w.dtype != torch.float32
                or x.device.type != "cpu"
                or w.device.type != "cpu"
                or (
                    torch.is_grad_enabled()
                    and (x.requires_grad or w.requires_grad or (self.bias is not None and self.bias.requires_grad))
                )
            ):
                return F.linear(x, w, self.bias)
            if self.packed_from != (w.data_ptr(), w._version):
                self.repack()
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

        def repack(self) -> None:
            w = self.weight
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.packed_rows)
            self.packed_from = (w.data_ptr(), w._version)

    _PACKED = PackedLinear
    return PackedLinear


def pack_linears(model, rows: int = 4) -> int:
    """Reorder every fp32 nn.Linear weight of `model` (CPU) into oneDNN's blocked layout once, for
    inference; returns how many were packed (0, with a warning, where this torch has no oneDNN or its
    op fails the check). Why: for the few rows of a decoding step, the default CPU matrix product (MKL's
    sgemm) spends its time re-packing each weight at every call (the measured gain:
    `bench/bench_generate.py`, `forward_ms_by_batch`, in docs/results.md). `rows` is oneDNN's
    batch-size hint (4 serves 1 to 32 rows best). Values equal nn.Linear's up to float rounding (as between
    batch shapes). The copy holds the weights a second time; a weight edited in place is packed
    anew at the layer's next call."""
    import torch
    import torch.nn.functional as F

    cls = _packed_linear_class()
    mods = [
        m
        for m in model.modules()
        if type(m) in (torch.nn.Linear, cls) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    if not mods:
        return 0
    if not onednn_linear_available():
        log.warning(
            "PACK_WEIGHTS: this torch build has no oneDNN linear; the decoder runs unpacked (PACK_WEIGHTS=0 "
            "silences this)"
        )
        return 0
    try:
        with torch.no_grad():
            packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows) for m in mods]
            # one product checked against nn.Linear's: a torch whose private op changed fails here, once
            m = mods[0]
            x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0))
            ok = torch.allclose(
                torch.ops.mkldnn._linear_pointwise(x, packed[0], m.bias, "none", [], ""),
                F.linear(x, m.weight, m.bias),
                rtol=1e-4,
                atol=1e-4,
            )
    except (RuntimeError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning(
            "PACK_WEIGHTS: oneDNN's packed linear of this torch build fails its check against nn.Linear; "
            "the decoder runs unpacked (PACK_WEIGHTS=0 silences this)"
        )
        return 0
    for mod, w in zip(mods, packed):
        mod.__class__ = cls
        mod.packed, mod.packed_rows, mod.packed_from = w, rows, (mod.weight.data_ptr(), mod.weight._version)
    return len(mods)


def autocast(amp: str, device: str):
    """The autocast context for a resolved AMP choice ('bf16' or 'off'). Weights and optimizer
    state stay fp32 (mixed precision); only the matrix products run in bf16."""
    import torch

    if amp != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Offline, the hub client logs each failed request; our own one-line error says what to do.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def progress(iterable=None, **kw):
    """tqdm that shows only on an interactive terminal (or when NEXT_SPEED_PROGRESS=1)."""
    from tqdm.auto import tqdm

    force = os.environ.get("NEXT_SPEED_PROGRESS")
    if force is not None:
        kw["disable"] = force in ("0", "false")
    kw.setdefault("disable", None)
    return tqdm(iterable, dynamic_ncols=True, **kw)


def quiet_hf() -> None:
    """Silence transformers' own progress bars and advisory warnings (we log what matters)."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for BACKEND=ray (steps 02 and 03): join the cluster at `address`, or start a local
    instance on this machine's CPUs; a session started here is shut down on exit. Yields the
    `ray` module. Errors are one line naming the knob."""
    try:
        import ray
        import ray.data
    except ImportError:
        from next_speed.core.errors import NextSpeedError

        raise NextSpeedError("BACKEND=ray needs Ray: pip install 'next-speed[ray]' (or uv sync --extra ray)") from None
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {"num_cpus": os.cpu_count()}
        try:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
        except Exception as e:  # noqa: BLE001 - a cluster that cannot be reached is the user's to fix
            from next_speed.core.errors import NextSpeedError

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
