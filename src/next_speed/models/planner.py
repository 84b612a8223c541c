"""The planner (Sentence-LM): a causal transformer over sentences' RVQ code tuples.

Each sentence enters as the sum of its K code embeddings (one table per level) plus a position
embedding; K categorical heads predict the next sentence's tuple. The blocks are a standard
pre-norm GPT (nanoGPT's `model.py`), with `scaled_dot_product_attention(is_causal=True)`.

With `head_mode="chained"`, level k's head also sees the embeddings of levels 0..k-1 of the
tuple being predicted (true codes in training, sampled ones in generation), the way RVQ levels
refine each other; `"independent"` is the spec's design (K heads on the same hidden state).

With `emb_dim > 0` (step 05's `PLANNER_INPUT=emb`) each input sentence also enters as its
encoder embedding, projected to the model width: the tuple is a lossy summary of a sentence
(cosine ~0.8 to the embedding it quantizes), while generation has the real vectors at hand anyway
(the prompt is embedded, each chosen sentence is re-encoded by the rerank). This is the input of
the Large Concept Model (Barrault et al. 2024), kept here with discrete targets.

With `pointer=True` (step 05's `POINTER`, default) each level's distribution is a pointer-generator
mixture (See et al. 2017): attention over the context sentences' codes, mixed with the heads' by
a learned gate, since the next sentence's code is often one an earlier sentence had.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from next_speed.core.artifacts import StaleInputError, read_jsonl
from next_speed.core.errors import ConfigError, NextSpeedError

FORMAT = "next-speed-planner/1"


@dataclass
class PlannerModelConfig:
    K: int
    V: int
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    dropout: float = 0.1
    max_len: int = 64  # longest input sequence (BOS + context tuples)
    head_mode: str = "independent"  # or "chained"
    codebook_dim: int = 0  # > 0: the RVQ codewords (K, V, codebook_dim) also feed the input and the heads
    copy_gate: bool = False  # a learned, context-dependent bonus for repeating the previous sentence's codes
    emb_dim: int = 0  # > 0: the input sentences' encoder embeddings (emb_dim wide) also feed the input
    pointer: bool = False  # mix in a copy distribution over every context sentence's codes (pointer-generator)
    ptr_dim: int = 32  # the pointer's query/key width per level

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: PlannerModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.p_drop = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p_drop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class Planner(nn.Module):
    """Input codes (B, T, K) with BOS = V and PAD = V + 1 in every level -> logits (B, T, K, V)
    (log-probabilities when `cfg.pointer`: the pointer mixes distributions, not scores)."""

    def __init__(self, cfg: PlannerModelConfig):
        super().__init__()
        self.cfg = cfg
        K, V, D = cfg.K, cfg.V, cfg.d_model
        self.bos_id, self.pad_id = V, V + 1
        self.code_emb = nn.ModuleList(nn.Embedding(V + 2, D) for _ in range(K))  # per-level tables
        self.pos_emb = nn.Embedding(cfg.max_len, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.heads = nn.Linear(D, K * V)  # K heads of V classes, fused
        if cfg.codebook_dim:
            # Codebook features: a tuple also enters as its RVQ reconstruction (an approximate
            # sentence embedding), and each head adds a score by similarity to its level's codewords,
            # so codes with nearby codewords share statistics ("the same topic again" is easy).
            self.register_buffer("codebooks", torch.zeros(K, V, cfg.codebook_dim))
            self.in_proj = nn.Linear(cfg.codebook_dim, D)
            self.out_proj = nn.Linear(D, K * cfg.codebook_dim)
            self.out_scale = nn.Parameter(torch.full((K,), 10.0))
        if cfg.copy_gate:
            # Consecutive sentences often share codes (same topic): the "copy previous" baseline is
            # strong. A gate per level lets the model add a bonus to the previous sentence's code,
            # as pointer-generator networks do (See et al. 2017), instead of rediscovering identity.
            self.copy = nn.Linear(D, K)
        if cfg.pointer:
            # Pointer-generator (See et al. 2017; pointer networks, Vinyals et al. 2015): the next
            # code is often one that an earlier context sentence had (not only the previous one), so
            # each level mixes its generated distribution with attention over the context's codes.
            self.ptr_q = nn.Linear(D, K * cfg.ptr_dim)
            self.ptr_k = nn.Linear(D, K * cfg.ptr_dim)
            self.ptr_gate = nn.Linear(D, K)
        if cfg.emb_dim:
            self.emb_proj = nn.Sequential(nn.LayerNorm(cfg.emb_dim), nn.Linear(cfg.emb_dim, D))
        if cfg.head_mode == "chained":
            self.cond_emb = nn.ModuleList(nn.Embedding(V, D) for _ in range(max(K - 1, 0)))
            self.cond_mlp = nn.Sequential(nn.Linear(D, D), nn.GELU())
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, codes: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, K) codes [+ (B, T, E) embeddings of the same sentences, zero at BOS/PAD] ->
        (B, T, D) causal hidden states."""
        B, T, K = codes.shape
        if self.cfg.max_len < T:
            raise ValueError(f"sequence of {T} sentences is longer than the planner's max_len {self.cfg.max_len}")
        x = sum(self.code_emb[k](codes[:, :, k]) for k in range(K))  # (B, T, D)
        if self.cfg.emb_dim:
            if emb is None or emb.shape[:2] != codes.shape[:2] or emb.shape[-1] != self.cfg.emb_dim:
                raise ValueError(
                    f"this planner reads {self.cfg.emb_dim}-d sentence embeddings beside the codes "
                    f"(PLANNER_INPUT=emb); got {None if emb is None else tuple(emb.shape)}"
                )
            real = (codes < self.cfg.V).all(-1, keepdim=True)  # (B, T, 1)
            x = x + self.emb_proj(emb.to(x.dtype)) * real
        if self.cfg.codebook_dim:
            real = (codes < self.cfg.V).all(-1, keepdim=True)  # BOS/PAD rows have no codewords: (B, T, 1)
            safe = codes.clamp(max=self.cfg.V - 1)
            recon = sum(self.codebooks[k][safe[:, :, k]] for k in range(K)) * real  # (B, T, Dc)
            x = x + self.in_proj(recon)
        x = x + self.pos_emb(torch.arange(T, device=codes.device))[None]
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def head_logits(self, h: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) hidden -> (..., K, V) logits. `prefix` (..., K) gives levels < k to level k's
        head in chained mode (only the first K-1 levels of it are read)."""
        K, V = self.cfg.K, self.cfg.V
        if self.cfg.head_mode != "chained":
            return self.heads(h).view(*h.shape[:-1], K, V) + self._codebook_scores(h)
        w = self.heads.weight.view(K, V, -1)  # (K, V, D)
        b = self.heads.bias.view(K, V)
        ctx = torch.zeros_like(h)
        out = []
        for k in range(K):
            hk = h + self.cond_mlp(ctx) if k > 0 else h
            cb = self._codebook_scores(hk)[..., k, :] if self.cfg.codebook_dim else 0.0
            out.append(hk @ w[k].T + b[k] + cb)  # (..., V)
            if k < K - 1 and prefix is not None:
                ctx = ctx + self.cond_emb[k](prefix[..., k])
        return torch.stack(out, dim=-2)

    def _codebook_scores(self, h: torch.Tensor) -> torch.Tensor | float:
        """(..., D) -> (..., K, V): scaled cosine between a per-level projection and the codewords."""
        if not self.cfg.codebook_dim:
            return 0.0
        K = self.cfg.K
        q = F.normalize(self.out_proj(h).view(*h.shape[:-1], K, self.cfg.codebook_dim), dim=-1)  # (..., K, Dc)
        cb = F.normalize(self.codebooks, dim=-1)  # (K, V, Dc)
        return torch.einsum("...kd,kvd->...kv", q, cb) * self.out_scale[:, None]

    def set_codebooks(self, codebooks) -> None:
        """Copy the RVQ codebooks (K, V, Dc) in; they are saved with the weights."""
        self.codebooks.copy_(torch.as_tensor(codebooks, dtype=self.codebooks.dtype))

    def add_copy(self, logits: torch.Tensor, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Add the copy bonus: logits (..., K, V), h (..., D), prev (..., K) = the input tuple at
        that position, i.e. the previous sentence's codes (BOS/PAD there get no bonus)."""
        if not self.cfg.copy_gate:
            return logits
        V = self.cfg.V
        bonus = self.copy(h) * (prev < V)  # (..., K)
        onehot = F.one_hot(prev.clamp(max=V - 1), V).to(logits.dtype)  # (..., K, V)
        return logits + onehot * bonus[..., None]

    def add_pointer(
        self, logits: torch.Tensor, hs: torch.Tensor, codes: torch.Tensor, at: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mix each level's distribution with a pointer over the context's codes. hs (B, T, D) and
        codes (B, T, K) are the whole input sequence; the outputs are asked at every position
        (`at` None: logits (B, T, K, V)) or at one position per row (`at` (B,): logits (B, K, V)).
        Returns float32 log-probabilities of the same shape. Position t points at the inputs
        s <= t (the sentences read so far, the previous one included); BOS/PAD inputs are never
        pointed at, and a position with nothing to point at keeps the generated distribution."""
        if not self.cfg.pointer:
            return logits
        B, T, K = codes.shape
        V, P = self.cfg.V, self.cfg.ptr_dim
        rows = torch.arange(B, device=codes.device)
        t = torch.arange(T, device=codes.device)[None].expand(B, T) if at is None else at[:, None]  # (B, Q)
        hq = hs[rows[:, None], t]  # (B, Q, D): the asking positions
        Q = t.shape[1]
        q = self.ptr_q(hq).view(B, Q, K, P).transpose(1, 2)  # (B, K, Q, P)
        k = self.ptr_k(hs).view(B, T, K, P).transpose(1, 2)  # (B, K, S=T, P)
        real = (codes < V).all(-1)  # (B, S): a sentence, not BOS/PAD
        allowed = (torch.arange(T, device=codes.device)[None, None] <= t[..., None]) & real[:, None]  # (B, Q, S)
        scores = ((q @ k.transpose(-1, -2)) / P**0.5).float()  # (B, K, Q, S)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        some = allowed.any(-1)  # (B, Q): anything to point at
        # a softmax over a row of -inf only is NaN: such rows get zeros here and mixture weight 0 below
        attn = torch.softmax(scores.masked_fill(~some[:, None, :, None], 0.0), -1)  # (B, K, Q, S)
        # attention summed per code; a one-hot product rather than scatter_add_, which is not
        # deterministic on CUDA
        onehot = F.one_hot(codes.clamp(max=V - 1), V).float()  # (B, S, K, V)
        p_ptr = torch.einsum("bkqs,bskv->bqkv", attn, onehot)  # (B, Q, K, V)
        z = self.ptr_gate(hq).float()  # (B, Q, K): the gate's logit
        log_g = F.logsigmoid(z).masked_fill(~some[..., None], float("-inf"))  # (B, Q, K)
        log_not_g = F.logsigmoid(-z).masked_fill(~some[..., None], 0.0)  # (B, Q, K)
        gen = F.log_softmax(logits.float().view(B, Q, K, V), -1)  # (B, Q, K, V); float32 even under bf16 autocast
        # clamp: a code no context sentence has gets log(1e-12) (then weighted by g), never log(0),
        # whose backward would be 0 * inf = NaN
        out = torch.logaddexp(gen + log_not_g[..., None], p_ptr.clamp_min(1e-12).log() + log_g[..., None])
        return out if at is None else out[:, 0]

    def outputs_at(
        self, hs: torch.Tensor, codes: torch.Tensor, at: torch.Tensor, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, K, V) for the tuple after position `at` (B,) of each sequence: heads (with
        `prefix` (B, K) for chained levels), copy gate and pointer. hs (B, T, D), codes (B, T, K)."""
        rows = torch.arange(len(at), device=at.device)
        h = hs[rows, at]  # (B, D)
        logits = self.add_copy(self.head_logits(h, prefix), h, codes[rows, at])  # (B, K, V)
        return self.add_pointer(logits, hs, codes, at)

    def forward(
        self, codes: torch.Tensor, targets: torch.Tensor | None = None, emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, K) input codes [+ (B, T, E) embeddings] -> (B, T, K, V) logits for the next tuple
        at every position. In chained mode, `targets` (B, T, K) supply the teacher-forced lower levels."""
        h = self.hidden(codes, emb)
        if self.cfg.head_mode == "chained" and targets is not None:
            return self.add_pointer(
                self.add_copy(self.head_logits(h, targets.clamp(0, self.cfg.V - 1)), h, codes), h, codes
            )
        return self.add_pointer(self.add_copy(self.head_logits(h), h, codes), h, codes)

    @torch.no_grad()
    def next_logits_levelwise(
        self, codes: torch.Tensor, choose, emb: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the next tuple after the last position of `codes` (B, T, K), level by level.
        `choose(level, logits (B, V)) -> (B,)` picks each level's code (greedy or sampled).
        Returns (chosen codes (B, K), logits (B, K, V))."""
        hs = self.hidden(codes, emb)  # (B, T, D)
        at = torch.full((codes.shape[0],), codes.shape[1] - 1, dtype=torch.long, device=codes.device)
        K = self.cfg.K
        if self.cfg.head_mode != "chained":
            logits = self.outputs_at(hs, codes, at)  # (B, K, V)
            chosen = torch.stack([choose(k, logits[:, k]) for k in range(K)], dim=1)
            return chosen, logits
        prefix = torch.zeros(codes.shape[0], K, dtype=torch.long, device=codes.device)
        all_logits = []
        for k in range(K):
            logits = self.outputs_at(hs, codes, at, prefix)[:, k]  # (B, V): level k sees prefix[:, :k]
            prefix[:, k] = choose(k, logits)
            all_logits.append(logits)
        return prefix, torch.stack(all_logits, dim=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------- rows and inference


def load_rows(path: str) -> list[dict]:
    return list(read_jsonl(path, required=("context", "target", "pos")))


def tensorize(rows: Sequence[dict], K: int, V: int, path: str = "rows"):
    """Rows -> inputs (N, L, K) with BOS/PAD, targets (N, L, K) with -100 padding, last index (N,)."""
    import torch

    bos, pad = V, V + 1
    L = max(len(r["context"]) + 1 for r in rows)
    inp = torch.full((len(rows), L, K), pad, dtype=torch.long)
    tgt = torch.full((len(rows), L, K), -100, dtype=torch.long)
    last = torch.empty(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        ctx, target = r["context"], r["target"]
        full = ctx + [target]
        arr = np.asarray(full, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != K:
            raise StaleInputError(
                f"{path}: row {i + 1} has tuples of {arr.shape[-1] if arr.ndim == 2 else '?'} codes, expected "
                f"K={K}: rerun step 04"
            )
        if arr.min() < 0 or arr.max() >= V:
            raise StaleInputError(f"{path}: row {i + 1} has codes out of range [0, {V}): rerun step 04 with this V")
        at_start = r["pos"] == len(ctx)
        x = ([[bos] * K] if at_start else []) + full[:-1]
        y = full if at_start else full[1:]
        if not x:  # a window with no context and not at a document start cannot be scored
            x, y = [[bos] * K], [target]
        inp[i, : len(x)] = torch.tensor(x)
        tgt[i, : len(y)] = torch.tensor(y)
        last[i] = len(y) - 1
    return inp, tgt, last


def input_sids(rows: Sequence[dict], L: int, path: str = "rows"):
    """The sentence-file row of every input position of `tensorize`'s layout: (N, L) int64, -1 at
    BOS and padding. Row i's context sentences are rows sid-len(context) .. sid-1 (step 04)."""
    import torch

    out = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if "sid" not in r:
            raise StaleInputError(
                f"{path}: row {i + 1} has no sentence id ('sid'), which PLANNER_INPUT=emb needs: rerun step 04"
            )
        n = len(r["context"])
        ids = list(range(r["sid"] - n, r["sid"]))
        if r["pos"] == n or not ids:  # a BOS tuple comes first
            ids = [-1] + ids
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class EmbeddingTable:
    """The sentence embeddings that some planner input needs, from one or more sources (this
    run's step-02 file, other runs' for EXTRA_DATA), held once as a compact (U, E) table.
    `add(emb, sids)` copies the rows `sids` names and returns them renumbered into the table;
    `lookup(ids)` maps (..., L) table ids (-1 = none: BOS, padding) to (..., L, E) vectors."""

    def __init__(self, dim: int):
        import torch

        self.dim = dim
        self.table = torch.zeros(0, dim)

    def add(self, emb, sids, what: str = "embeddings"):
        import torch

        sids = torch.as_tensor(sids)
        ids = np.unique(sids[sids >= 0].numpy())
        if len(ids) and ids[-1] >= len(emb):
            raise StaleInputError(
                f"the rows name sentence {int(ids[-1])}, but {what} has {len(emb)} rows: rerun steps 02-04"
            )
        if emb.shape[1] != self.dim:
            raise StaleInputError(f"{what} has {emb.shape[1]}-d vectors, expected {self.dim}-d")
        base = len(self.table)
        self.table = torch.cat([self.table, torch.from_numpy(np.ascontiguousarray(emb[ids], dtype=np.float32))])
        pos = torch.from_numpy(np.searchsorted(ids, sids.clamp(min=0).numpy())) + base
        return torch.where(sids >= 0, pos, torch.full_like(sids, -1))

    def lookup(self, ids):
        out = self.table[ids.clamp(min=0)] if len(self.table) else self.table.new_zeros(*ids.shape, self.dim)
        return out * (ids >= 0).unsqueeze(-1).to(out.dtype)


def load_planner(out_dir: str, device: str = "cpu"):
    """Load a trained planner: (model in eval mode, its config.json)."""
    d = Path(out_dir)
    cfg_path, weights = d / "config.json", d / "sentence_lm.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise StaleInputError(f"no trained planner in {d}: run step 05 (05_train_sentence_lm.py)")
    info = json.loads(cfg_path.read_text())
    if info.get("format") != FORMAT:
        raise StaleInputError(f"{cfg_path} is not a next-speed planner ({info.get('format')}): rerun step 05")
    known = set(PlannerModelConfig.__dataclass_fields__)
    unknown = sorted(set(info.get("model", {})) - known)
    if unknown:
        raise StaleInputError(
            f"{cfg_path} has model settings this next-speed does not know ({', '.join(unknown)}): "
            f"rerun step 05 with this version"
        )
    model = Planner(PlannerModelConfig(**info["model"]))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval(), info


class PlannerRunner:
    """Next-tuple distributions and choices for generation, deterministic under an explicit Generator."""

    def __init__(self, model, context_sents: int, codebooks=None):
        """`codebooks` (K, V, D): the RVQ codewords, for `deep="mean"` (default: the planner's own copy)."""
        self.model = model
        self.K, self.V = model.cfg.K, model.cfg.V
        self.context_sents = context_sents
        if codebooks is None and model.cfg.codebook_dim:
            codebooks = model.codebooks
        self.codebooks = None if codebooks is None else torch.as_tensor(codebooks, dtype=torch.float32).cpu()

    @property
    def reads_embeddings(self) -> bool:
        return bool(self.model.cfg.emb_dim)

    def _inputs(self, context: Sequence[Sequence[int]], at_doc_start: bool, embeddings=None):
        """(1, T, K) codes and, for a planner that reads them, (1, T, E) embeddings: `embeddings`
        (len(context), E) are the context sentences' encoder vectors, in the same order."""
        import torch

        device = next(self.model.parameters()).device
        n = min(len(context), self.context_sents) if self.context_sents else 0
        ctx = [list(t) for t in context][len(context) - n :] if n else []
        start = at_doc_start and len(context) <= self.context_sents
        bos = start or not ctx
        seq = ([[self.V] * self.K] if bos else []) + ctx
        cut = max(0, len(seq) - self.model.cfg.max_len)
        codes = torch.tensor([seq[cut:]], dtype=torch.long, device=device)
        if not self.reads_embeddings:
            return codes, None
        if embeddings is None or len(embeddings) != len(context):
            raise NextSpeedError(
                f"this planner reads the previous sentences' embeddings (PLANNER_INPUT=emb): pass one "
                f"vector per context sentence ({len(context)}), got "
                f"{'none' if embeddings is None else len(embeddings)}"
            )
        e = torch.as_tensor(
            np.asarray(embeddings, dtype=np.float32)[len(context) - n :]
            if n
            else np.zeros((0, self.model.cfg.emb_dim), np.float32)
        )
        if bos:
            e = torch.cat([torch.zeros(1, e.shape[-1]), e])
        return codes, e[cut:][None].to(device)

    def distributions(self, context: Sequence[Sequence[int]], at_doc_start: bool = True, embeddings=None):
        """Per-level probabilities (K, V) for the next tuple (greedy lower levels in chained mode)."""
        import torch

        codes, emb = self._inputs(context, at_doc_start, embeddings)
        _, logits = self.model.next_logits_levelwise(codes, lambda k, lg: lg.argmax(-1), emb)
        return torch.softmax(logits[0].float(), -1)

    def next_tuple(
        self,
        context: Sequence[Sequence[int]],
        *,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        generator=None,
        at_doc_start: bool = True,
        fixed: Sequence[int] = (),
        embeddings=None,
        deep: str = "levels",
    ) -> list[int]:
        """Choose the next tuple: greedy, or sampled per level with temperature and top-k. The
        first `len(fixed)` levels are pinned to `fixed` (plan control); a chained planner conditions
        the levels it still chooses on them. `embeddings`: the context sentences' vectors (one per
        tuple of `context`), needed by a planner trained with PLANNER_INPUT=emb, ignored otherwise.
        `deep="mean"`: level 0 is chosen so, the deeper levels are `mean_detail`'s (the generation
        knob PLAN_DEEP defaults to it; this method's default stays the per-level choice)."""
        import torch

        if deep not in ("levels", "mean"):
            raise ConfigError(f"PLAN_DEEP={deep!r}: choose mean or levels")
        fixed = [int(c) for c in fixed]
        if len(fixed) >= self.model.cfg.K:
            return fixed[: self.model.cfg.K]

        def choose(k, logits):
            if k < len(fixed):
                return torch.full(logits.shape[:1], fixed[k], dtype=torch.long, device=logits.device)
            if greedy or temperature <= 0:
                return logits.argmax(-1)
            lg = logits.float() / temperature
            if top_k and top_k < lg.shape[-1]:
                kth = lg.topk(top_k, -1).values[..., -1:]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            probs = torch.softmax(lg, -1)
            return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)

        codes, emb = self._inputs(context, at_doc_start, embeddings)
        chosen, logits = self.model.next_logits_levelwise(codes, choose, emb)
        if deep == "mean":
            # a sampled level 0 is a decision (the sample's diversity stays), a greedy one the planner's guess
            sampled = not (greedy or temperature <= 0)
            return mean_detail(
                torch.softmax(logits.float().cpu(), -1),
                chosen.cpu(),
                self._books(),
                pinned=max(len(fixed), int(sampled)),
            )[0].tolist()
        return chosen[0].tolist()

    def _books(self):
        if self.codebooks is None:
            raise NextSpeedError(
                "PLAN_DEEP=mean needs the RVQ codebooks: this planner was trained without them (use PLAN_DEEP=levels)"
            )
        return self.codebooks


def mean_detail(probs: torch.Tensor, chosen: torch.Tensor, codebooks, pinned: int = 0) -> torch.Tensor:
    """Keep level 0 and the `pinned` first levels of `chosen`; fill the deeper levels with the codes
    that best render the planner's expected next sentence: minimum Bayes risk decoding (Kumar &
    Byrne 2004) under the cosine of the Large Concept Models paper's evaluation. For a unit-norm
    target y, E[cos(rec(t), y)] is about cos(rec(t), E[y]); the planner's expected reconstruction
    mu = sum_k sum_v p_k(v) C_k[v] stands in for E[y], and RVQ's greedy encoding of mu / |mu|, after
    the kept levels' codewords, picks the deeper codes. Why not each level's own argmax: deeper
    levels are predicted barely above chance, so their argmax codewords add near-random directions;
    the mean keeps what the planner knows. A greedy level 0 still counts with its probabilities in
    mu (a hedge that beats a mu built on the argmax codeword: docs/results.md); pinned levels (plan control,
    or a sampled level 0, which generation passes as pinned) are decided, and count with their own
    codeword. With chained heads, `probs` are those of the path chosen so far.

    probs (N, K, V) per-level probabilities, chosen (N, K) the codes chosen so far, codebooks
    (K, V, D) -> (N, K) codes."""
    chosen = chosen.long().clone()
    books = torch.as_tensor(codebooks).float().to(probs.device)  # (K, V, D)
    K, keep = books.shape[0], max(1, pinned)
    p = probs.float().clone()  # (N, K, V)
    if pinned:
        p[:, :pinned] = F.one_hot(chosen[:, :pinned], p.shape[-1]).float()
    mu = torch.einsum("nkv,kvd->nd", p, books)  # (N, D) expected reconstruction
    kept = sum(books[k][chosen[:, k]] for k in range(keep))  # (N, D)
    r = mu / mu.norm(dim=-1, keepdim=True).clamp_min(1e-12) - kept  # (N, D): what is left to render
    for k in range(keep, K):
        c = torch.cdist(r, books[k]).argmin(-1)  # (N,)
        chosen[:, k] = c
        r = r - books[k][c]
    return chosen
