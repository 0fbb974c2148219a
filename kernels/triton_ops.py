"""Triton kernels (CUDA only), each wrapped in an autograd.Function with its own backward.

Imported lazily by the registry the first time a CUDA tensor asks for a Triton implementation, so CPU-only
installs never import Triton. With TRITON_INTERPRET=1 the same kernels run on CPU tensors in Triton's
interpreter (how tests/gpu/test_kernels_gpu.py checks them without a GPU). All math is fp32 in registers;
inputs/outputs keep their dtype. Row kernels put one row of D features in one block (D ≤ 16384 here);
reductions over rows (weight and per-sample gradients) accumulate per program and finish with one atomic
add per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block(d: int) -> int:
    return triton.next_power_of_2(d)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def _row_chunks(batches: int, rows: int, device: torch.device) -> int:
    """Rows per program for reduction kernels: about 8 programs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, triton.cdiv(batches * rows, 8 * sms))


# ---------------------------------------------------------------- RMSNorm (+ adaLN modulation)


@triton.jit
def _rms_fwd(
    X, W, SHIFT, SCALE, Y, RSTD, S, D, eps, HAS_W: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_MOD:
        b = row // S
        sc = tl.load(SCALE + b * D + cols, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b * D + cols, mask=m, other=0.0).to(tl.float32)
        y = y * (1.0 + sc) + sh
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(
    X, W, SCALE, DY, RSTD, DX, DW, DSHIFT, DSCALE, S, D, ROWS,
    HAS_W: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    sc = tl.zeros((BLOCK,), tl.float32)
    if HAS_MOD:
        sc = tl.load(SCALE + b * D + cols, mask=m, other=0.0).to(tl.float32)
    acc_dw = tl.zeros((BLOCK,), tl.float32)
    acc_dsc = tl.zeros((BLOCK,), tl.float32)
    acc_dsh = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, ROWS):
        s = chunk * ROWS + i
        mm = cols < tl.where(s < S, D, 0)  # the row's columns, none past the last row
        row = b * S + s
        x = tl.load(X + row * D + cols, mask=mm, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * D + cols, mask=mm, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * S + tl.minimum(s, S - 1))  # rows past S load zeros below: no effect
        xhat = x * rstd
        g = dy
        if HAS_MOD:
            acc_dsh += dy
            acc_dsc += dy * xhat * w
            g = dy * (1.0 + sc)
        acc_dw += g * xhat
        gw = g * w
        c = tl.sum(gw * xhat, axis=0) / D
        dx = (gw - xhat * c) * rstd
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mm)
    if HAS_W:
        tl.atomic_add(DW + cols, acc_dw, mask=m)
    if HAS_MOD:
        tl.atomic_add(DSHIFT + b * D + cols, acc_dsh, mask=m)
        tl.atomic_add(DSCALE + b * D + cols, acc_dsc, mask=m)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, shift, scale):
        d = x.shape[-1]
        x2 = x.contiguous().view(-1, d)
        rows = x2.shape[0]
        has_mod = shift is not None
        batches = shift.shape[0] if has_mod else 1
        seq = rows // batches
        shift_c = shift.contiguous() if has_mod else x2
        scale_c = scale.contiguous() if has_mod else x2
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = _block(d)
        _rms_fwd[(rows,)](
            x2, weight if weight is not None else x2, shift_c, scale_c, y, rstd, seq, d, eps,
            HAS_W=weight is not None, HAS_MOD=has_mod, BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, scale_c if has_mod else None, rstd)
        ctx.meta = (x.shape, batches, seq, has_mod, shift.dtype if has_mod else None)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, scale_c, rstd = ctx.saved_tensors
        shape, batches, seq, has_mod, mod_dtype = ctx.meta
        d = x2.shape[1]
        dy2 = dy.contiguous().view(-1, d)
        dx = torch.empty_like(x2)
        dw = torch.zeros(d, device=x2.device, dtype=torch.float32)
        dshift = torch.zeros(batches if has_mod else 1, d, device=x2.device, dtype=torch.float32)
        dscale = torch.zeros_like(dshift)
        rows = _row_chunks(batches, seq, x2.device)
        block = _block(d)
        _rms_bwd[(batches, triton.cdiv(seq, rows))](
            x2, weight if weight is not None else x2, scale_c if has_mod else x2, dy2, rstd, dx, dw,
            dshift, dscale, seq, d, rows,
            HAS_W=weight is not None, HAS_MOD=has_mod, BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
        dweight = dw.to(weight.dtype) if weight is not None else None
        if not has_mod:
            return dx.view(shape), dweight, None, None, None
        return dx.view(shape), dweight, None, dshift.to(mod_dtype), dscale.to(mod_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps, None, None)


def rms_norm_modulate(x, weight, eps, shift, scale):
    return _RMSNorm.apply(x, weight, eps, shift, scale)


# ---------------------------------------------------------------- SwiGLU


@triton.jit
def _swiglu_fwd(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DU + offs, (dy * g * sig).to(DU.dtype.element_ty), mask=m)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)


_EW_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        _swiglu_fwd[(triton.cdiv(n, _EW_BLOCK),)](g, u, y, n, BLOCK=_EW_BLOCK, num_warps=4)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        _swiglu_bwd[(triton.cdiv(n, _EW_BLOCK),)](
            g, u, dy.contiguous(), dg, du, n, BLOCK=_EW_BLOCK, num_warps=4
        )
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


# ---------------------------------------------------------------- gated residual x + gate[b] * y


@triton.jit
def _gres_fwd(X, GATE, Y, OUT, S, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    b = row // S
    x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
    y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, (x + g * y).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gres_bwd(DO, GATE, Y, DY, DGATE, S, D, ROWS, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    g = tl.load(GATE + b * D + cols, mask=m, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, ROWS):
        s = chunk * ROWS + i
        mm = cols < tl.where(s < S, D, 0)
        row = b * S + s
        do = tl.load(DO + row * D + cols, mask=mm, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=mm, other=0.0).to(tl.float32)
        tl.store(DY + row * D + cols, (do * g).to(DY.dtype.element_ty), mask=mm)
        acc += do * y
    tl.atomic_add(DGATE + b * D + cols, acc, mask=m)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        b, s, d = x.shape
        xc, yc, gc = x.contiguous(), y.contiguous(), gate.contiguous()
        out = torch.empty_like(xc)
        block = _block(d)
        _gres_fwd[(b * s,)](xc, gc, yc, out, s, d, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(gc, yc)
        return out

    @staticmethod
    def backward(ctx, dout):
        gc, yc = ctx.saved_tensors
        b, s, d = yc.shape
        do = dout.contiguous()
        dy = torch.empty_like(yc)
        dgate = torch.zeros(b, d, device=yc.device, dtype=torch.float32)
        rows = _row_chunks(b, s, yc.device)
        block = _block(d)
        _gres_bwd[(b, triton.cdiv(s, rows))](
            do, gc, yc, dy, dgate, s, d, rows, BLOCK=block, num_warps=_warps(block)
        )
        return dout, dgate.to(gc.dtype), dy


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _GatedResidual.apply(x, gate, y)


# ---------------------------------------------------------------- factorized t/h/w position embeddings


@triton.jit
def _pos_fwd(IDS, TT, TH, TW, OUT, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    it = tl.load(IDS + row * 3).to(tl.int64)
    ih = tl.load(IDS + row * 3 + 1).to(tl.int64)
    iw = tl.load(IDS + row * 3 + 2).to(tl.int64)
    acc = tl.load(TT + it * D + cols, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(TH + ih * D + cols, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(TW + iw * D + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _pos_bwd(IDS, DO, DT, DH, DW, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    do = tl.load(DO + row * D + cols, mask=m, other=0.0).to(tl.float32)
    it = tl.load(IDS + row * 3).to(tl.int64)
    ih = tl.load(IDS + row * 3 + 1).to(tl.int64)
    iw = tl.load(IDS + row * 3 + 2).to(tl.int64)
    tl.atomic_add(DT + it * D + cols, do, mask=m)
    tl.atomic_add(DH + ih * D + cols, do, mask=m)
    tl.atomic_add(DW + iw * D + cols, do, mask=m)


class _FactorizedPosition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, tt, th, tw):
        d = tt.shape[1]
        idc = ids.contiguous()
        rows = idc.numel() // 3
        out = torch.empty(*ids.shape[:-1], d, device=tt.device, dtype=tt.dtype)
        block = _block(d)
        _pos_fwd[(rows,)](
            idc,
            tt.contiguous(),
            th.contiguous(),
            tw.contiguous(),
            out,
            d,
            BLOCK=block,
            num_warps=_warps(block),
        )
        ctx.save_for_backward(idc)
        ctx.shapes = (tt.shape, th.shape, tw.shape, tt.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        (idc,) = ctx.saved_tensors
        st, sh, sw, dtype = ctx.shapes
        grads = [torch.zeros(s, device=dout.device, dtype=torch.float32) for s in (st, sh, sw)]
        d = st[1]
        block = _block(d)
        _pos_bwd[(idc.numel() // 3,)](idc, dout.contiguous(), *grads, d, BLOCK=block, num_warps=_warps(block))
        return (None, *(g.to(dtype) for g in grads))


def factorized_position(ids, table_t, table_h, table_w):
    return _FactorizedPosition.apply(ids, table_t, table_h, table_w)


# ---------------------------------------------------------------- rotary (rotate-half) embedding


@triton.jit
def _rotary(X, COS, SIN, OUT, H, S, HALF, SIGN, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # over B*S*H rows of D = 2*HALF
    s = (row // H) % S
    cols = tl.arange(0, BLOCK)
    m = cols < HALF
    base = row * 2 * HALF
    x1 = tl.load(X + base + cols, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF + cols, mask=m, other=0.0).to(tl.float32)
    c = tl.load(COS + s * HALF + cols, mask=m, other=0.0).to(tl.float32)
    sn = tl.load(SIN + s * HALF + cols, mask=m, other=0.0).to(tl.float32) * SIGN
    tl.store(OUT + base + cols, (x1 * c - x2 * sn).to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + base + HALF + cols, (x2 * c + x1 * sn).to(OUT.dtype.element_ty), mask=m)


def _rotate(x, cos, sin, sign: float):
    b, s, h, d = x.shape
    xc = x.contiguous()
    out = torch.empty_like(xc)
    block = _block(d // 2)
    _rotary[(b * s * h,)](xc, cos.contiguous(), sin.contiguous(), out, h, s, d // 2, sign, BLOCK=block)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return _rotate(dout, cos, sin, -1.0), None, None  # the transpose of a rotation rotates back


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _Rotary.apply(x, cos, sin)
