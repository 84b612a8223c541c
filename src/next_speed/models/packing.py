"""CPU inference: the decoder's matrices packed once into oneDNN's blocked layout."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (x86 and arm64 CPU wheels do)."""

    try:
        return (
            bool(torch.backends.mkldnn.is_available())
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


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


def pack_linears(model, rows: int = 4) -> int:
    """Reorder every fp32 nn.Linear weight of `model` (CPU) into oneDNN's blocked layout once, for
    inference; returns how many were packed (0, with a warning, where this torch has no oneDNN or its
    op fails the check). Why: for the few rows of a decoding step, the default CPU matrix product (MKL's
    sgemm) spends its time re-packing each weight at every call (the measured gain:
    `bench/bench_generate.py`, `forward_ms_by_batch`, in docs/results.md). `rows` is oneDNN's
    batch-size hint (4 serves 1 to 32 rows best). Values equal nn.Linear's up to float rounding (as between
    batch shapes). The copy holds the weights a second time; a weight edited in place is packed
    anew at the layer's next call."""

    cls = PackedLinear
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
