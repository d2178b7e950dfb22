"""The prompt path of quantized weights: block rows dequantized chunk by chunk, multiplied in float."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from runtime.config import native_bf16
from runtime.model.kernels import prompt_rows as pr
from runtime.model.kernels import quantized as qk
from runtime.model.qformat import QK, quantize

rng = np.random.default_rng(7)
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not native_bf16(), reason="this CPU has no native bfloat16 (avx512_bf16/amx_bf16): the prompt path uses fp32"))]


@pytest.fixture(params=DTYPES, ids=["fp32", "bf16"])
def dtype(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.dtype:
    """Each compute type, in chunks of 2 * 32 rows of 96 inputs, so every product spans several chunks."""
    monkeypatch.setattr(pr, "compute_dtype", lambda: request.param)
    monkeypatch.setattr(pr, "CHUNK_ELEMS", 2 * QK * 96)
    return request.param


def _matrix(n: int, k: int, fmt: str = "q8_0") -> qk.QMatrix:
    return qk.QMatrix(quantize(rng.standard_normal((n, k)).astype(np.float32), fmt), fmt, k)


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_dequantized_chunks_are_the_blocks_values(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _matrix(100, 4 * QK, fmt)
    full = w.dequantize()                                        # numpy's reference: scale x 8-bit value, in fp32
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(pr, "compute_dtype", lambda dtype=dtype: dtype)
        for threads in (1, 2):
            got = pr._dequantized(w, "t", slice(3, 70), slice(QK, 3 * QK), threads)
            # bfloat16: rounded to nearest even, as torch rounds
            assert got.dtype == dtype and torch.equal(got, full[3:70, QK:3 * QK].to(dtype))
        assert torch.equal(pr._dequantized(w, "t", slice(0, 100)), full.to(dtype))


def test_chunks_are_whole_blocks_covering_every_row() -> None:
    for n, k in [(1, 64), (100, 96), (4864, 896), (8960, 1536)]:
        parts = pr._chunks(n, k)
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
        assert all((p.stop - p.start) % QK == 0 for p in parts[:-1])


def test_linear_equals_its_float_reference(dtype: torch.dtype) -> None:
    w, x = _matrix(200, 96), torch.randn(40, 96)
    want = x @ w.dequantize().T
    y = pr.prompt_linear(x, w, 2)
    assert y.dtype == torch.float32 and y.shape == (40, 200) and _close(y, want, _tol(dtype))


def _ffn(gated: bool = True, down_t: bool = False, n: int = 160, d: int = 96) -> qk.QNeurons:
    up, gate = _matrix(n, d), _matrix(n, d) if gated else None
    down = _matrix(n, d)
    dt = qk.QMatrix(quantize(np.ascontiguousarray(down.dequantize().numpy().T), "q8_0"), "q8_0", n) if down_t else None
    return qk.QNeurons(up, None if down_t else down, gate, dt)


def _gap_threshold(v: torch.Tensor, dim: int | None = None) -> float | torch.Tensor:
    """A threshold in the widest relative gap between the middle values of |v| (per column along ``dim`` 0): no
    value sits near it, so a rounding of the compute type cannot move one across."""
    s = (v.abs().flatten() if dim is None else v.abs()).sort(dim=0).values
    lo, hi = s.shape[0] // 4, 3 * s.shape[0] // 4
    mid = s[lo:hi]
    gap = (mid[1:] - mid[:-1]) / mid[1:]
    i = gap.argmax(0, keepdim=True)
    tau = (mid.gather(0, i) + mid.gather(0, i + 1)) / 2
    return tau.item() if dim is None else tau.squeeze(0)


@pytest.mark.parametrize("condition", ["every", "down_t", "mask", "gate", "tau_a", "tau_each", "ungated"])
def test_ffn_conditions_equal_their_float_reference(dtype: torch.dtype, condition: str) -> None:
    """Each condition of the 8-bit kernel, on every neuron of the chunk, masked: the same sum, the same count, as
    the float formulation on operands rounded to the compute type."""
    q = _ffn(gated=condition != "ungated", down_t=condition == "down_t")
    act = torch.nn.functional.silu if q.gated else torch.relu

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()
    x = torch.randn(8, q.d)
    u = rounded(rounded(x) @ rounded(q.up.dequantize()).T)
    g = act(rounded(rounded(x) @ rounded(q.gate.dequantize()).T)) if q.gated else None
    a = g * u if q.gated else act(u)
    keep, kw = None, {}
    if condition == "mask":
        keep = torch.rand(*a.shape) < 0.4
        kw = {"row_mask": keep}
    elif condition == "gate":
        tau = _gap_threshold(g)
        keep, kw = g.abs() > tau, {"tau_gate": tau}
    elif condition == "tau_a":
        tau = _gap_threshold(a)
        keep, kw = a.abs() > tau, {"tau_a": tau}
    elif condition == "tau_each":
        each = _gap_threshold(a, dim=0)                                       # [n]: every neuron its own
        keep, kw = a.abs() > each, {"tau_a": each}
    down = q.down.dequantize() if q.down is not None else q.down_t.dequantize().T
    want = rounded(a if keep is None else a * keep) @ rounded(down)
    out = torch.full((x.shape[0], q.d), float("nan"))
    y, used = pr.prompt_ffn(x, q, "silu" if q.gated else "relu", 2, out=out, **kw)
    assert y is out and _close(y, want, _tol(dtype))
    assert used == (a.numel() if keep is None else int(keep.sum()))
    if keep is not None:
        assert 0 < used < a.numel()


def test_engine_prompts_take_the_float_path_and_agree_with_the_8bit_kernels(quant_dir_q8, monkeypatch) -> None:
    """A prompt of PROMPT_ROWS tokens or more runs the float products; its logits track the 8-bit kernels'."""
    from runtime import LLM
    from runtime.model import ffn_shard, transformer

    llm = LLM(str(quant_dir_q8), num_threads=2, weights="q8")
    prompt = list(range(3, 3 + 2 * pr.PROMPT_ROWS))
    calls = []
    real = pr.prompt_ffn
    monkeypatch.setattr(ffn_shard, "prompt_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = llm.token_logits(prompt)
    assert calls                                                                   # the prompt path ran
    monkeypatch.setattr(transformer, "PROMPT_ROWS", 10 ** 9)
    monkeypatch.setattr(ffn_shard, "PROMPT_ROWS", 10 ** 9)
    slow = llm.token_logits(prompt)
    assert _close(fast, slow, 0.05)
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.9
    llm.shutdown()


@pytest.fixture(scope="module")
def quant_dir_q8(tiny_model_dir, tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("prompt_rows") / "tiny"
    shutil.copytree(tiny_model_dir, d)
    return d
