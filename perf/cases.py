"""Sweep cases: a compact grammar and named presets.

Grammar (one case)::

    B x SQ x SK [: OPT, OPT, ...]        e.g.  128x1x16k:h16    4x2x128k:h128,causal,fp16

* ``B`` batch, ``SQ`` queries per request, ``SK`` KV length per request (the mean with ``varlen``); ``SK``
  may end in ``k`` (x1024) or ``m`` (x1048576).
* Options (comma separated, each at most once):

  =====================  =================================================================  =========
  option                 meaning                                                             default
  =====================  =================================================================  =========
  ``h16`` / ``h=16``     query heads h_q                                                     128
  ``kv2`` / ``kv=2``     KV heads h_kv (h_q % h_kv == 0)                                     1
  ``causal``             bottom-right causal mask (no-op when SQ == 1)                        off
  ``fixed`` / ``varlen`` every request SK long / lengths ~ N(SK, (SK/2)^2), at least SQ        fixed
  ``bf16`` / ``fp16``    dtype of q and the cache                                            bf16
  ``d576`` / ``d512``    head dim of q and the cache (V is always the first 512)             576
  ``z0.25``              fraction of requests with length 0 (padding slots)                  0
  ``seed3``              data seed                                                           0
  ``fp8``                FlashMLA's 656-byte FP8 cache, bf16 q (needs bf16, d576, kv1)       off
  ``topk2048``           sparse top-k decode over the FP8 cache (implies ``fp8``); SK is     0 (dense)
                         the cache size indices are drawn from; no causal / varlen / z
  =====================  =================================================================  =========

E.g. ``128x2x32k:h128,fp8,topk2048`` (FlashMLA's V3.2 sparse case), ``128x1x16k:h16,varlen,fp8`` (dense
decode over the FP8 cache).

Several cases: separate them with spaces or ``;``. :func:`parse_case` raises ``ValueError`` naming the bad part.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import torch

__all__ = ["SweepCase", "parse_case", "parse_cases", "PRESETS", "expand_presets", "FLASHMLA_CONFIGS"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SIZE = re.compile(r"^(\d+)([kKmM]?)$")
_OPTION = re.compile(r"^(h|kv|d|z|seed|topk)=?([0-9.]+)$")


@dataclasses.dataclass(frozen=True)
class SweepCase:
    """One decode configuration of a sweep (see the module docstring for the string form, :attr:`spec`)."""

    b: int
    s_q: int
    s_k: int
    h_q: int = 128
    h_kv: int = 1
    causal: bool = False
    varlen: bool = False
    dtype: str = "bf16"
    d: int = 576
    zero_frac: float = 0.0
    seed: int = 0
    fp8: bool = False  # cache in FlashMLA's 656-byte FP8 format (q stays bf16)
    topk: int = 0  # > 0: sparse top-k decode over the FP8 cache; s_k is then the cache size

    def __post_init__(self):
        for name in ("b", "s_q", "h_q", "h_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.s_k, int) or self.s_k < 1:
            raise ValueError(f"s_k must be a positive integer, got {self.s_k!r}")
        if self.h_q % self.h_kv:
            raise ValueError(f"h_q ({self.h_q}) must be a multiple of h_kv ({self.h_kv})")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.d not in (512, 576):
            raise ValueError(f"d must be 512 or 576, got {self.d}")
        if not 0.0 <= self.zero_frac < 1.0:
            raise ValueError(f"zero fraction must be in [0, 1), got {self.zero_frac}")
        self._check_fp8()

    def _check_fp8(self):
        """The FP8 cache holds one 576-dim latent head and is read with bf16 q; sparse decode picks keys by
        index, so lengths, masks and padding slots do not apply to it."""
        if not isinstance(self.topk, int) or self.topk < 0:
            raise ValueError(f"topk must be a non-negative integer, got {self.topk!r}")
        if self.topk and not self.fp8:
            raise ValueError("topk (sparse decode) needs the fp8 cache")
        if self.fp8 and (self.dtype != "bf16" or self.d != 576 or self.h_kv != 1):
            raise ValueError(f"fp8 cache needs bf16, d576 and kv1, got {self.dtype}, d{self.d}, kv{self.h_kv}")
        if self.topk and (self.causal or self.varlen or self.zero_frac):
            raise ValueError("sparse decode (topk) takes no causal, varlen or z option")

    @property
    def kv_format(self) -> str:
        """The cache's format: 'fp8' (656-byte tokens) or q's dtype."""
        return "fp8" if self.fp8 else self.dtype

    @property
    def reference_tokens(self) -> int:
        """Keys the reference gathers: b * s_k dense, b * s_q * topk sparse (it bounds the reference's cost)."""
        return self.b * self.s_q * self.topk if self.topk else self.b * self.s_k

    @property
    def spec(self) -> str:
        """Canonical string; ``parse_case(case.spec) == case``."""
        opts = [f"h{self.h_q}"]
        if self.h_kv != 1:
            opts.append(f"kv{self.h_kv}")
        if self.varlen:
            opts.append("varlen")
        if self.causal:
            opts.append("causal")
        if self.dtype != "bf16":
            opts.append(self.dtype)
        if self.d != 576:
            opts.append(f"d{self.d}")
        if self.zero_frac:
            opts.append(f"z{self.zero_frac:g}")
        if self.seed:
            opts.append(f"seed{self.seed}")
        if self.fp8:
            opts.append("fp8")
        if self.topk:
            opts.append(f"topk{self.topk}")
        return f"{self.b}x{self.s_q}x{_format_size(self.s_k)}:{','.join(opts)}"

    def __str__(self) -> str:
        return self.spec

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def decode_case(self):
        """The ``cutemla.testing.DecodeCase`` that generates this case's inputs (page size 64, dv 512)."""
        from cutemla.testing import DecodeCase

        return DecodeCase(b=self.b, s_q=self.s_q, s_k=self.s_k, h_q=self.h_q, h_kv=self.h_kv, d=self.d,
                          varlen=self.varlen, causal=self.causal, dtype=self.torch_dtype,
                          zero_frac=self.zero_frac, seed=self.seed)

    def shrunk(self, max_b: int = 2, max_s_q: int = 2, max_s_k: int = 96, max_h_q: int = 16,
               max_topk: int = 64) -> "SweepCase":
        """A tiny case of the same kind (same flags) for CPU dry runs."""
        h_q = min(self.h_q, max_h_q)
        h_kv = self.h_kv if h_q % self.h_kv == 0 else 1
        return dataclasses.replace(self, b=min(self.b, max_b), s_q=min(self.s_q, max_s_q),
                                   s_k=min(self.s_k, max_s_k), h_q=h_q, h_kv=h_kv, topk=min(self.topk, max_topk))

    @property
    def baseline_key(self) -> tuple:
        """(b, s_q, s_k, h_q, causal, varlen): the key of perf/baselines/flashmla_h100.csv rows."""
        return (self.b, self.s_q, self.s_k, self.h_q, int(self.causal), int(self.varlen))


def _format_size(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}m"
    if n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


def _parse_size(text: str, what: str, spec: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"bad {what} {text!r} in case {spec!r}: expected an integer, optionally with k or m "
                         "(e.g. 4096, 16k)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"{what} must be positive in case {spec!r}, got {text!r}")
    return value


def parse_case(spec: str) -> SweepCase:
    """Parse one case string (grammar in the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a case must be a non-empty string like '128x1x16k:h16', got {spec!r}")
    text = spec.strip()
    shape, _, options = text.partition(":")
    dims = shape.lower().split("x")
    if len(dims) != 3:
        raise ValueError(f"case {spec!r} must start with BxSQxSK (three sizes separated by 'x'), "
                         f"e.g. '128x1x16k'")
    fields: dict = {
        "b": _parse_size(dims[0], "batch size B", spec),
        "s_q": _parse_size(dims[1], "query length SQ", spec),
        "s_k": _parse_size(dims[2], "KV length SK", spec),
    }
    seen: set = set()

    def set_once(key, value, token):
        if key in seen:
            raise ValueError(f"option {token!r} in case {spec!r} conflicts with an earlier option for {key}")
        seen.add(key)
        fields[key] = value

    if options.strip() or ":" in text:
        for token in options.split(","):
            token = token.strip().lower()
            if not token:
                raise ValueError(f"empty option in case {spec!r} (stray comma or colon)")
            if token == "causal":
                set_once("causal", True, token)
            elif token in ("fixed", "varlen"):
                set_once("varlen", token == "varlen", token)
            elif token in _DTYPES:
                set_once("dtype", token, token)
            elif token == "fp8":
                set_once("fp8", True, token)
            else:
                match = _OPTION.match(token)
                if not match:
                    raise ValueError(
                        f"unknown option {token!r} in case {spec!r}; options are h<N>, kv<N>, causal, fixed, "
                        "varlen, bf16, fp16, d<512|576>, z<fraction>, seed<N>, fp8, topk<N>")
                key, number = match.groups()
                try:
                    value = float(number) if key == "z" else int(number)
                except ValueError:
                    raise ValueError(f"option {token!r} in case {spec!r} needs a number") from None
                set_once({"h": "h_q", "kv": "h_kv", "z": "zero_frac"}.get(key, key), value, token)
    if fields.get("topk"):
        fields["fp8"] = True  # topk<N> implies the FP8 cache; a repeated 'fp8' is not a conflict
    try:
        return SweepCase(**fields)
    except ValueError as exc:
        raise ValueError(f"invalid case {spec!r}: {exc}") from None


def parse_cases(text: str) -> list[SweepCase]:
    """Parse cases separated by whitespace or ';'."""
    parts = [p for p in re.split(r"[;\s]+", text.strip()) if p]
    if not parts:
        raise ValueError("no case given")
    return [parse_case(p) for p in parts]


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

# (b, s_q, s_k, h_q, causal, varlen): the rows of perf/baselines/flashmla_h100.csv, in its order.
FLASHMLA_CONFIGS = [
    *[(128, 1, s_k, 128, 0, 1) for s_k in (4096, 8192, 16384, 32768)],
    *[(128, 2, s_k, 128, 0, 1) for s_k in (4096, 8192, 16384, 32768)],
    *[(128, 2, s_k, 128, 1, 1) for s_k in (4096, 8192, 16384, 32768)],
    *[(128, 1, s_k, h_q, 0, 1) for h_q in (16, 32, 64) for s_k in (4096, 16384)],
    *[(b, 1, s_k, h_q, 0, 0) for b, s_k in ((1, 65536), (4, 32768), (16, 8192), (32, 2048), (256, 1024))
      for h_q in (16, 128)],
]


def _flashmla() -> list[SweepCase]:
    return [SweepCase(b, s_q, s_k, h_q, causal=bool(c), varlen=bool(v)) for b, s_q, s_k, h_q, c, v in FLASHMLA_CONFIGS]


def _memory_bound() -> list[SweepCase]:
    # h_q * s_q <= 64 query rows per KV head: too few rows to keep the tensor cores busy, so the KV stream
    # (576 * 2 bytes per token) sets the time. h_q 16/32/64 = DeepSeek's 128 heads split over TP 8/4/2.
    cases = [SweepCase(128, 1, s_k, h, varlen=True) for h in (16, 32, 64) for s_k in (2048, 8192, 32768)]
    cases += [SweepCase(64, 4, 8192, 16, causal=True, varlen=True)]  # MTP (4 tokens) under TP 8
    return cases


def _compute_bound() -> list[SweepCase]:
    # 128 heads x s_q >= 1: 128+ query rows per KV head, intensity near or past the H100 ridge (~295 FLOP/B).
    cases = [SweepCase(128, s_q, s_k, 128, causal=s_q > 1, varlen=True) for s_q in (1, 2) for s_k in (8192, 32768)]
    cases += [SweepCase(64, 4, s_k, 128, causal=True, varlen=True) for s_k in (8192, 32768)]
    return cases


def _long_context() -> list[SweepCase]:
    # Few requests, very long contexts: the split-KV scheduler must spread one request over many SMs.
    return [SweepCase(b, 1, s_k, h) for b in (1, 4, 16) for s_k in (32768, 65536, 131072) for h in (16, 128)]


def _serving() -> list[SweepCase]:
    # Mixed lengths (varlen: N(s_k, (s_k/2)^2)), padding slots (z), MTP (s_q > 1) and TP head counts.
    return [
        SweepCase(32, 1, 2048, 16, varlen=True),
        SweepCase(64, 1, 4096, 16, varlen=True, zero_frac=0.1),
        SweepCase(128, 1, 1024, 128, varlen=True),
        SweepCase(128, 1, 8192, 16, varlen=True, zero_frac=0.25),
        SweepCase(256, 1, 2048, 16, varlen=True, zero_frac=0.1),
        SweepCase(64, 2, 4096, 128, causal=True, varlen=True),
        SweepCase(128, 2, 4096, 16, causal=True, varlen=True),
        SweepCase(32, 4, 16384, 16, causal=True, varlen=True),
    ]


def _fp8() -> list[SweepCase]:
    # Sparse top-k decode: FlashMLA's V3.2 cases (perf/sparse_fp8.py "flashmla", s_kv = 32k, topk 2048) and two
    # TP ranks (h_q 16/32 of its "tp" set). Dense FP8: the memory-bound, compute-bound and long-context corners
    # of the bf16 flashmla preset, to read against the bf16 rows (656 instead of 1152 bytes per token).
    from .sparse_fp8 import PRESETS as SPARSE

    tp = [row for row in SPARSE["tp"] if row[0] == 128 and row[3] == 2048]
    cases = [SweepCase(b, s_q, s_kv, h_q, fp8=True, topk=topk) for b, s_q, h_q, topk, s_kv in SPARSE["flashmla"] + tp]
    cases += [SweepCase(128, 1, 16384, h, varlen=True, fp8=True) for h in (16, 64, 128)]
    cases += [SweepCase(128, 2, 8192, 128, causal=True, varlen=True, fp8=True),
              SweepCase(1, 1, 65536, 16, fp8=True), SweepCase(32, 1, 2048, 128, fp8=True)]
    return cases


PRESETS = {
    "flashmla": (_flashmla, "the 28 configs of perf/baselines/flashmla_h100.csv (FlashMLA on H100)"),
    "memory-bound": (_memory_bound, "h_q*s_q <= 64 (TP-split heads): bandwidth-bound"),
    "compute-bound": (_compute_bound, "h_q=128, s_q 1-4: near or past the H100 ridge"),
    "long-context": (_long_context, "b 1-16, s_k 32k-128k, h_q 16/128"),
    "serving": (_serving, "mixed lengths, padding slots, MTP, TP head counts"),
    "fp8": (_fp8, "FP8 cache: FlashMLA's V3.2 sparse top-k cases + TP h16/32, and dense FP8 decode"),
}


def expand_presets(names: Iterable[str]) -> list[SweepCase]:
    """Cases of the named presets, in order, without duplicates."""
    cases: list[SweepCase] = []
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
        for case in PRESETS[name][0]():
            if case not in cases:
                cases.append(case)
    return cases
