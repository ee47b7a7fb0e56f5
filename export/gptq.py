"""GPTQ: block-wise weight quantization with error feedback (Frantar et al., 2022).

Round-to-nearest (and the least-squares scale search) quantize every weight on its
own. GPTQ quantizes one input column of a linear layer at a time and moves each
column's rounding error onto the columns not yet quantized, weighted by how the
layer's inputs correlate (the inverse of the Hessian ``H = X^T X`` of the calibration
activations X). What it minimises is the error of the layer's *output* on real
inputs, not of the weights, so weights that matter for the activations the model
actually sees are kept closest.

The output has the MatMulNBits layout of ``graph_builder.block_quantize``: blocks of
``block_size`` along K, one scale (and zero point) per block, chosen when the column
loop reaches the block's first column from the block's weights *as updated so far*
(plain range or ``graph_builder``'s least-squares search). Rows (the output dimension)
are independent, so a weight may be quantized in row slices with the same Hessian.

Columns are taken in their natural order (no "act-order"): MatMulNBits' static blocks
need the block's columns to be quantized together.

Why not onnxruntime's ``GPTQWeightOnlyQuantConfig``: it quantizes MatMul nodes of an
exported float ONNX graph (the optimum path), re-running the whole graph over the
calibration set once per distinct MatMul input (four per layer), 4-bit only; the fused
graph is built from the checkpoint's tensors, one layer at a time, and never exists as a
float graph. This module is the algorithm alone, on the builder's row slices, with the
builder's own scale rules (symmetric blocks mapping their extreme to -8, the
least-squares search).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack  # part of the export extra: missing, `edge-runtime export` says so up front

DAMP = 0.01
"""Dampening added to H's diagonal, as a share of its mean diagonal (GPTQ's default)."""

COLUMN_BATCH = 128
"""Columns whose errors are applied lazily to the rest as one matrix product."""


@dataclass(frozen=True)
class InverseHessian:
    """The upper Cholesky factor of (H + damping)^-1, which the column loop reads, and the
    input columns that never saw a non-zero activation (their weights are set to 0)."""

    upper: np.ndarray  # [K, K] float32
    dead: np.ndarray  # [K] bool


def inverse_hessian(hessian: np.ndarray, *, damp: float = DAMP) -> InverseHessian:
    """Prepare a [K, K] Hessian (X^T X over the calibration tokens, any positive scale) once
    for every row slice of the weights it belongs to, damped. The column loop reads U, the
    upper Cholesky factor of H^-1. With P the permutation that reverses the order,
    P H P = L L^T gives H^-1 = (P L^-T P)(P L^-1 P), and P L^-1 P is upper triangular with a
    positive diagonal, so U = P L^-1 P: one Cholesky factorization (torch) and one
    triangular inverse (LAPACK's strtri through scipy), about 2/3 K^3 operations in float32
    where factor / invert from the factor / factor again took 4/3 K^3 (measured 22.9 ->
    12.2 s at 11008 inputs, a 7B's down_proj, the largest). A Hessian too ill-conditioned
    for that is damped ten times more, then a hundred."""
    import torch

    hessian = np.asarray(hessian)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"a Hessian is square, not {hessian.shape}")
    # P H P, in float32, as the one copy (at 11008 inputs every [K, K] float32 copy is 485 MB)
    h = torch.from_numpy(np.ascontiguousarray(hessian[::-1, ::-1], dtype=np.float32))
    diag = torch.diagonal(h)  # reversed order
    dead_reversed = (diag <= 0).numpy().copy()
    diag[torch.from_numpy(dead_reversed)] = 1.0
    mean = float(diag.mean())
    added = 0.0
    for attempt in range(3):
        wanted = damp * 10 ** attempt * mean
        diag += wanted - added  # in place
        added = wanted
        factor, info = torch.linalg.cholesky_ex(h)  # lower L, row-major
        if int(info) == 0:
            del h, diag
            # row-major L is column-major L^T: invert that upper factor in place, giving
            # L^-T column-major, which is L^-1 row-major
            inverse_t, info = lapack.strtri(factor.numpy().T, lower=0, overwrite_c=1)
            if info != 0:
                raise ValueError(f"the Cholesky factor of the calibration Hessian is singular (strtri info {info})")
            upper = np.ascontiguousarray(inverse_t.T[::-1, ::-1])
            return InverseHessian(upper, dead_reversed[::-1].copy())
    raise ValueError("the calibration Hessian is not positive definite even damped 100x "
                     "(a calibration text too short for this layer?)")


def gptq_quantize(weight_nk: np.ndarray, hinv: InverseHessian, *, bits: int, block_size: int, symmetric: bool,
                  scale_search: bool, scale_dtype: np.dtype = np.dtype(np.float32)):
    """GPTQ-quantize a weight stored as [N, K] (output rows, input columns: the checkpoint's
    layout) into MatMulNBits' layout (``graph_builder.BlockQuantized``). Scales are rounded to
    ``scale_dtype`` (float16 for float16 graphs) before the codes are taken against them."""
    from .graph_builder import SCALE_SEARCH_STEPS, _inverse, _padded_to_blocks, _search_block_scales, pack_codes

    n, k = weight_nk.shape
    if hinv.upper.shape != (k, k):
        raise ValueError(f"the Hessian is for {hinv.upper.shape[0]} inputs, the weight has {k}")
    wt, k_blocks = _padded_to_blocks(np.asarray(weight_nk, dtype=np.float32).T, bits=bits, block_size=block_size)
    # W^T [K padded, N], a private copy updated in place: column j of W is the contiguous row wt[j]
    wt = np.array(wt, dtype=np.float32, order="C", copy=True)
    kp = wt.shape[0]
    upper = hinv.upper
    if kp != k:  # padded columns: no coupling to the others, nothing to correct
        upper = np.eye(kp, dtype=np.float32)
        upper[:k, :k] = hinv.upper
    wt[:k][hinv.dead] = 0.0
    qmax = float((1 << bits) - 1)
    steps = SCALE_SEARCH_STEPS if scale_search else 1
    codes = np.empty((kp, n), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zps = np.empty((n, k_blocks), dtype=np.float32)
    batch = max(block_size, COLUMN_BATCH // block_size * block_size)
    # Errors reach the columns after them lazily, at three ranges: within a block column by
    # column, the rest of the batch after each block, the rest of the weight after each batch
    # (the last two as matrix products).
    for o1 in range(0, kp, batch):
        o2 = min(kp, o1 + batch)
        err = np.empty((o2 - o1, n), dtype=np.float32)
        for b1 in range(o1, o2, block_size):
            b2, b = b1 + block_size, b1 // block_size
            blk = wt[b1:b2]  # a view: the block's columns as updated so far
            s, z = _search_block_scales(np.ascontiguousarray(blk.T)[:, None, :], bits=bits, symmetric=symmetric,
                                        steps=steps)
            scale = s[:, 0].astype(scale_dtype).astype(np.float32)
            zp, inv = z[:, 0], _inverse(scale)
            scales[:, b], zps[:, b] = scale, zp
            u = upper[b1:b2, b1:b2]
            for i in range(block_size):
                x = blk[i]
                q = np.clip(np.rint(x * inv) + zp, 0, qmax)
                codes[b1 + i] = q
                e = (x - (q - zp) * scale) / u[i, i]
                blk[i + 1:] -= np.outer(u[i, i + 1:], e)
                err[b1 - o1 + i] = e
            if b2 < o2:
                wt[b2:o2] -= upper[b1:b2, b2:o2].T @ err[b1 - o1:b2 - o1]
        if o2 < kp:
            wt[o2:] -= upper[o1:o2, o2:].T @ err
    return pack_codes(np.ascontiguousarray(codes.T).reshape(n, k_blocks, block_size), scales, zps, bits=bits,
                      symmetric=symmetric, scale_dtype=scale_dtype)
