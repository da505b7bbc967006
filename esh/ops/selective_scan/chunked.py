"""The fast pure-PyTorch selective scan, for the CPU and any device, with its own backward.

How it stays exact and fast without compiling anything:

* **No pairwise decay tensor, no exp of cumulative sums.** The recurrence
  ``h[t] = a[t] * h[t-1] + b[t]`` runs as it is written, one fused ``addcmul_`` per step on
  a time-major buffer, so every step touches one contiguous (batch, dim, N) slab. Products
  of decays are never formed in log space, so nothing overflows however long the sequence
  or large the step; the values are those of the reference loop up to rounding order.
* **Chunks that stay in cache.** The (batch, dim, L, N) state is never materialised. The
  sequence is cut into chunks whose (T, batch, dim, N) working set fits in the cache; each
  chunk computes its decays (``exp2`` of a pre-scaled A: the same value as ``exp``, 3-4x
  cheaper on CPUs), its inputs, its scan and its read-out before the next one starts.
* **Recompute instead of store.** The forward keeps only the state at each chunk boundary.
  The backward walks the chunks in reverse, recomputes the chunk's states from its boundary
  state, runs the adjoint recurrence ``g[t] = C[t] dy[t] + a[t+1] g[t+1]`` the same way and
  reduces every gradient inside the chunk, as the mamba CUDA kernel does per block.
* **An initial state costs nothing extra.** It is the state entering the first chunk, so the
  forward starts its scan from it and keeps it as the first boundary state; in the backward
  the adjoint carried out of the first step, ``a[0] g[0]``, is its gradient.

Peak memory is therefore O(batch * dim * (L + chunk * N)) instead of the loop's
O(batch * dim * L * N).

* **Either memory layout.** The chunks work sequence-major. Inputs stored sequence-major
  (``u`` a (batch, dim, L) view of a contiguous (batch, L, dim) tensor, as a model whose
  activations are (batch, L, channels) naturally has) are used without any transpose, and the
  output and the input gradients come back in that same layout; channel-major inputs are
  transposed once on the way in and the output once on the way out.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import compute_dtype

LOG2E = 1.0 / math.log(2.0)

# Target bytes of one (batch, T, dim, N) chunk buffer. Four such buffers are live in the
# backward, so a chunk's working set stays in a typical shared L3 while each op still works
# on enough data to hide PyTorch's per-op overhead (measured best at 2-4 MiB per buffer).
_CHUNK_BYTES = 4 << 20
_MAX_CHUNK = 64


def default_chunk_size(batch: int, dim: int, dstate: int, seqlen: int, itemsize: int = 4) -> int:
    per_step = max(1, batch * dim * dstate * itemsize)
    return int(max(1, min(seqlen, _MAX_CHUNK, _CHUNK_BYTES // per_step)))


class _BC:
    """B or C as the chunks use it: constant (G, N, dim/G) or sequence-major (batch, L, G, N)."""

    def __init__(self, t: Tensor, groups: int, cdtype: torch.dtype):
        self.is_variable = t.dim() > 2
        self.orig_dim = t.dim()
        self.orig_groups = 1 if t.dim() < 4 else t.shape[1]
        if not self.is_variable:  # (dim, N) -> (G, N, dim/G)
            dim, n = t.shape
            self.t = t.to(cdtype).view(groups, dim // groups, n).transpose(1, 2).contiguous()
            return
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.shape[1] != groups:
            t = t.repeat_interleave(groups // t.shape[1], dim=1)
        self.t = t.to(cdtype).permute(0, 3, 1, 2).contiguous()  # (batch, L, G, N)

    def chunk(self, t0: int, t1: int) -> Tensor:
        """Broadcastable against a (batch, T, G, N, dim/G) chunk buffer."""
        return self.t[:, t0:t1, ..., None] if self.is_variable else self.t

    def contract_n(self, buf: Tensor, t0: int, t1: int) -> Tensor:
        """sum_n buf[b, t, g, n, :] * BC[n] -> (batch, T, G, dim/G)."""
        if not self.is_variable:
            return (buf * self.t).sum(-2)
        batch, T, g, n, dg = buf.shape
        lhs = self.t[:, t0:t1].reshape(batch * T * g, 1, n)
        return torch.bmm(lhs, buf.view(batch * T * g, n, dg)).view(batch, T, g, dg)

    def contract_d(self, buf: Tensor, w: Tensor, scratch: Tensor) -> Tensor:
        """sum over the channels of a group of buf * w[..., None, :], w (batch, T, G, dim/G):
        (batch, T, G, N) for input-dependent B/C, summed over batch and time when constant."""
        if not self.is_variable:
            return torch.mul(buf, w[..., None, :], out=scratch).sum((0, 1))
        batch, T, g, n, dg = buf.shape
        rhs = buf.view(batch * T * g, n, dg).transpose(1, 2)
        return torch.bmm(w.reshape(batch * T * g, 1, dg), rhs).view(batch, T, g, n)

    def accumulate(self, acc: Tensor, part: Tensor, t0: int, t1: int) -> None:
        if self.is_variable:
            acc[:, t0:t1] = part
        else:
            acc.add_(part)

    def grad_to_input_layout(self, grad: Tensor) -> Tensor:
        if not self.is_variable:  # (G, N, dim/G) -> (dim, N)
            g, n, dg = grad.shape
            return grad.transpose(1, 2).reshape(g * dg, n)
        grad = grad.permute(0, 2, 3, 1)  # (batch, G, N, L)
        if self.orig_groups != grad.shape[1]:
            batch, g, n, seqlen = grad.shape
            grad = grad.reshape(batch, self.orig_groups, g // self.orig_groups, n, seqlen).sum(2)
        return grad.squeeze(1) if self.orig_dim == 3 else grad


def is_seq_major(x: Tensor) -> bool:
    """A (batch, dim, L) tensor stored as a contiguous (batch, L, dim) one (and not also
    channel-major, as happens when dim or L is 1)."""
    return x.dim() == 3 and x.transpose(1, 2).is_contiguous() and not x.is_contiguous()


def _groups(B: Tensor, C: Tensor) -> int:
    g = [t.shape[1] for t in (B, C) if t.dim() == 4]
    return math.lcm(*g) if g else 1


def _pre_activation(delta: Tensor, delta_bias: Tensor | None, cdtype: torch.dtype) -> Tensor:
    """delta + delta_bias in a fresh tensor of the arithmetic dtype, stored the way delta is: a
    sequence-major delta gives a sequence-major result, so every later use of it is a free view
    and its products with the other sequence-major inputs need no transpose."""
    seq_major = is_seq_major(delta)
    d = delta.transpose(1, 2) if seq_major else delta  # the bias runs along d's last axis or axis 1
    if delta_bias is None:
        out = d.to(cdtype, copy=True)
    else:
        bias = delta_bias.to(cdtype)
        out = torch.add(d.to(cdtype), bias if seq_major else bias[:, None])
    return out.transpose(1, 2) if seq_major else out


def _effective_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool, cdtype) -> Tensor:
    if not softplus:
        return delta.to(cdtype) if delta_bias is None else _pre_activation(delta, delta_bias, cdtype)
    dt = _pre_activation(delta, delta_bias, cdtype)
    return torch.ops.aten.softplus.out(dt, 1, 20, out=dt)  # in place: one (batch, dim, L) tensor


# Chunk buffers are reused across calls on the CPU: a fresh 4 MiB buffer costs a thousand
# page faults every call. At most a few chunk-sized buffers per thread stay allocated
# (16 MiB for float32 at the default chunk size); ``release_workspace()`` frees them.
_workspace = threading.local()


def _chunk_buffers(count: int, numel: int, like: Tensor) -> list[Tensor]:
    if like.device.type != "cpu":  # the CUDA caching allocator already does this
        return [like.new_empty(numel) for _ in range(count)]
    cache = getattr(_workspace, "buffers", None)
    if cache is None:
        cache = _workspace.buffers = {}
    # tensors made under inference_mode cannot be written outside it: one set per mode
    key = (like.dtype, torch.is_inference_mode_enabled())
    bufs = cache.get(key, [])
    if len(bufs) < count or bufs[0].numel() < numel:
        bufs = cache[key] = [like.new_empty(numel) for _ in range(max(count, len(bufs)))]
    return [b[:numel] for b in bufs[:count]]


def release_workspace() -> None:
    """Free the chunk buffers this thread keeps between calls."""
    _workspace.buffers = {}


def _swap_last2(x: Tensor, out: Tensor | None = None) -> Tensor:
    """Contiguous transpose of the last two axes of a 3-D tensor: a free view when ``x`` is
    stored the other way round already. Large matrices go one 2-D transpose at a time, which
    PyTorch blocks for the cache; small ones in one copy."""
    if out is None and is_seq_major(x):
        return x.transpose(1, 2)
    if out is None:
        out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    if x.shape[1] * x.shape[2] < (1 << 20):  # measured: one strided copy wins below ~1M per matrix
        return out.copy_(x.transpose(1, 2))
    for b in range(x.shape[0]):
        out[b].copy_(x[b].t())
    return out


class _Prepared:
    """Everything a chunk needs, computed once per call (all of it O(batch*dim*L) or less).

    Chunk buffers are (batch, T, G, N, dim/G): the channel axis is innermost, so every
    elementwise op and every contraction over N runs on long contiguous rows, and one time
    step h[:, t] is a (batch, G*N*dim/G) block of contiguous rows.
    """

    def __init__(self, u, A, B, C, dt, dt_s=None, dtu_s=None, scratch=None, whole_dtu=True):
        """``dt`` is the effective step (batch, dim, L); ``dt_s`` and ``dtu_s`` its
        sequence-major form and that of dt * u, when already known (in the backward);
        ``scratch`` a (batch, dim, L) tensor to compute dt * u in. With ``whole_dtu=False``
        (a forward that keeps nothing for a backward) dt * u is never formed for the whole
        sequence: each chunk computes its own slice while it is in cache."""
        self.cdtype = cdtype = dt.dtype
        self.batch, self.dim, self.seqlen = u.shape
        # sequence-major inputs: results go back sequence-major too, as free views
        self.seq_major = is_seq_major(u)
        self.dstate = A.shape[1]
        self.groups = g = _groups(B, C)
        self.dt = dt
        self.dt_s = self.to_seq_major(dt) if dt_s is None else dt_s
        self.u = u
        self._u_s = None
        if dtu_s is None and whole_dtu:
            dtu_s = self.to_seq_major(torch.mul(dt, u.to(cdtype), out=scratch))
        self.dtu_s = dtu_s
        self._dtu_chunk = None
        # exp(dt * A) == exp2(dt * A * log2(e)); exp2 is several times cheaper on CPUs
        self.A = A.to(cdtype).view(g, self.dim // g, self.dstate).transpose(1, 2).contiguous()
        self.A2 = self.A * LOG2E
        self.B = _BC(B, g, cdtype)
        self.C = _BC(C, g, cdtype)

    def buffers(self, chunk: int, count: int) -> list[Tensor]:
        return _chunk_buffers(count, self.batch * chunk * self.dstate * self.dim, self.dt_s)

    def view(self, flat: Tensor, T: int) -> Tensor:
        g = self.groups
        shape = (self.batch, T, g, self.dstate, self.dim // g)
        return flat[: math.prod(shape)].view(shape)

    @property
    def u_s(self) -> Tensor:
        """u as (batch, L, G, dim/G) in the arithmetic dtype: a free view for sequence-major
        inputs of that dtype, made once otherwise."""
        if self._u_s is None:
            self._u_s = self.to_seq_major(self.u)
        return self._u_s

    def dtu_chunk(self, t0: int, t1: int) -> Tensor:
        """dt * u for steps t0..t1-1, (batch, T, G, dim/G)."""
        if self.dtu_s is not None:
            return self.dtu_s[:, t0:t1]
        if self._dtu_chunk is None or self._dtu_chunk.shape[1] < t1 - t0:
            self._dtu_chunk = self.dt_s.new_empty((self.batch, t1 - t0) + self.dt_s.shape[2:])
        return torch.mul(self.dt_s[:, t0:t1], self.u_s[:, t0:t1], out=self._dtu_chunk[:, : t1 - t0])

    def chunk_inputs(self, t0: int, t1: int, a: Tensor, b: Tensor) -> None:
        """Fill a with exp(dt A) and b with dt B u for steps t0..t1-1."""
        torch.mul(self.dt_s[:, t0:t1, :, None, :], self.A2, out=a)
        torch.exp2(a, out=a)
        torch.mul(self.dtu_chunk(t0, t1)[:, :, :, None, :], self.B.chunk(t0, t1), out=b)

    def to_seq_major(self, x: Tensor) -> Tensor:
        """(batch, dim, L) -> contiguous (batch, L, G, dim/G) in the arithmetic dtype."""
        g = self.groups
        return _swap_last2(x.to(self.cdtype)).view(self.batch, self.seqlen, g, self.dim // g)

    def to_channel_major(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """(batch, L, G, dim/G) -> (batch, dim, L): contiguous, or, for sequence-major inputs,
        a view of x's own memory."""
        x = x.reshape(self.batch, self.seqlen, self.dim)
        if out is None and self.seq_major:
            return x.transpose(1, 2)
        return _swap_last2(x, out)

    def state_to_input_layout(self, state: Tensor) -> Tensor:
        """(batch, G, N, dim/G) -> (batch, dim, N)."""
        return state.transpose(2, 3).reshape(self.batch, self.dim, self.dstate)

    def state_from_input_layout(self, state: Tensor) -> Tensor:
        g = self.groups
        return state.to(self.cdtype).view(self.batch, g, self.dim // g, self.dstate).transpose(2, 3)


def _scan_chunk(a: Tensor, h: Tensor, h0: Tensor) -> None:
    """In place along axis 1: h[t] <- a[t] * h[t-1] + h[t], with h[-1] = h0."""
    hs, as_ = h.unbind(1), a.unbind(1)
    hs[0].addcmul_(as_[0], h0)
    for t in range(1, len(hs)):
        hs[t].addcmul_(as_[t], hs[t - 1])


def _scan_chunk_reverse(a: Tensor, g: Tensor) -> None:
    """In place along axis 1: g[t] <- a[t+1] * g[t+1] + g[t], from the end."""
    gs, as_ = g.unbind(1), a.unbind(1)
    for t in range(len(gs) - 2, -1, -1):
        gs[t].addcmul_(as_[t + 1], gs[t + 1])


def _chunks(seqlen: int, chunk: int) -> list[tuple[int, int]]:
    return [(t0, min(seqlen, t0 + chunk)) for t0 in range(0, seqlen, chunk)]


def _scan_forward(
    p: _Prepared,
    chunk: int,
    save_states: bool,
    y_out: Tensor | None = None,
    D: Tensor | None = None,
    h0: Tensor | None = None,
):
    """Returns y + D * u (batch, dim, L; in ``y_out`` if given), the last state
    (batch, G, N, dim/G) and, when asked, the state entering each chunk. ``h0`` is the state
    before the first step, (batch, G, N, dim/G) (zero when None); it is only read.

    The states of consecutive chunks go to two buffers in turn, so each chunk starts from the
    last step of the other buffer without a copy; each chunk's read-out (and its D * u, while
    u's slice is in cache) is written straight into the output."""
    a_flat, *h_flats = p.buffers(chunk, 3)
    h = p.dt_s.new_zeros((p.batch, p.groups, p.dstate, p.dim // p.groups)) if h0 is None else h0
    y_s = torch.empty_like(p.dt_s)
    D_g = None if D is None else D.to(p.cdtype).view(p.groups, p.dim // p.groups)
    spans = _chunks(p.seqlen, chunk)
    states = p.dt_s.new_empty((len(spans),) + h.shape) if save_states else None
    for i, (t0, t1) in enumerate(spans):
        a, hb = p.view(a_flat, t1 - t0), p.view(h_flats[i % 2], t1 - t0)
        if states is not None:
            states[i].copy_(h)
        p.chunk_inputs(t0, t1, a, hb)
        _scan_chunk(a, hb, h)
        y_c = p.C.contract_n(hb, t0, t1)
        if D_g is None:
            y_s[:, t0:t1] = y_c
        else:
            torch.addcmul(y_c, p.u_s[:, t0:t1], D_g, out=y_s[:, t0:t1])
        h = hb[:, -1]
    return p.to_channel_major(y_s, y_out), h.clone(), states


def _scan_backward(p: _Prepared, chunk: int, states: Tensor, dy: Tensor, dlast: Tensor | None):
    """Gradients of sum(y * dy) + sum(h_last * dlast) w.r.t. dt, dt*u (both sequence-major),
    A, B, C (in their chunk layouts) and the initial state (batch, G, N, dim/G)."""
    flats = p.buffers(chunk, 4)
    dy_s = p.to_seq_major(dy)
    carry = torch.zeros_like(states[0]) if dlast is None else p.state_from_input_layout(dlast)
    ddt_s = torch.empty_like(p.dt_s)
    ddtu_s = torch.empty_like(p.dt_s)
    dA = torch.zeros_like(p.A)
    dB = torch.zeros_like(p.B.t)
    dC = torch.zeros_like(p.C.t)
    spans = _chunks(p.seqlen, chunk)
    for i in reversed(range(len(spans))):
        t0, t1 = spans[i]
        a, h, g, s = (p.view(f, t1 - t0) for f in flats)
        h0 = states[i]
        p.chunk_inputs(t0, t1, a, h)
        _scan_chunk(a, h, h0)
        # adjoint recurrence: g[t] = dL/dh[t] = C[t] dy[t] + a[t+1] g[t+1]
        torch.mul(dy_s[:, t0:t1, :, None, :], p.C.chunk(t0, t1), out=g)
        g[:, -1].add_(carry)
        _scan_chunk_reverse(a, g)
        carry = a[:, 0] * g[:, 0]  # dL/dh[t0 - 1]; after the first chunk, dL/d(initial state)
        p.C.accumulate(dC, p.C.contract_d(h, dy_s[:, t0:t1], s), t0, t1)
        # q[t] = g[t] a[t] h[t-1] is the gradient of log a[t] = dt[t] A
        q = a.mul_(g)
        q[:, 1:].mul_(h[:, :-1])
        q[:, 0].mul_(h0)
        dA.add_(torch.mul(q, p.dt_s[:, t0:t1, :, None, :], out=s).sum((0, 1)))
        ddt_s[:, t0:t1] = torch.mul(q, p.A, out=s).sum(-2)
        # b[t] = dt[t] u[t] B[t]
        ddtu_s[:, t0:t1] = p.B.contract_n(g, t0, t1)
        p.B.accumulate(dB, p.B.contract_d(g, p.dtu_s[:, t0:t1], s), t0, t1)
    return ddt_s, ddtu_s, dA, dB, dC, carry


def _float_arithmetic(fn):
    """Runs ``fn(ctx, x, ...)`` with autocast off on x's device: under autocast the contractions
    (bmm, einsum) would run in half precision, while the scan promises float32 arithmetic. The
    inputs are cast to the arithmetic dtype inside anyway; without autocast nothing changes."""

    @functools.wraps(fn)
    def wrapper(ctx, x, *args):
        device = x.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return fn(ctx, x, *args)
        with torch.autocast(device, enabled=False):
            return fn(ctx, x, *args)

    return wrapper


class SelectiveScanChunked(torch.autograd.Function):
    # Every (batch, dim, L) tensor below is written in place where the maths allows: on a
    # CPU a fresh 16 MiB tensor costs more in page faults than the arithmetic done in it.
    @staticmethod
    @_float_arithmetic
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
        cdtype = compute_dtype(u.dtype)
        dt = _effective_delta(delta, delta_bias, delta_softplus, cdtype)
        y = torch.empty_like(dt)  # scratch for dt * u first, then the output
        # (if y is stored sequence-major, dt * u computed in it would be used in place as its
        # sequence-major form and then overwritten by the output: not in y, then)
        needs_grad = any(ctx.needs_input_grad[:9])
        p = _Prepared(u, A, B, C, dt, scratch=None if is_seq_major(y) else y, whole_dtu=needs_grad)
        chunk = chunk or default_chunk_size(p.batch, p.dim, p.dstate, p.seqlen, p.dt_s.element_size())
        h0 = None if initial_state is None else p.state_from_input_layout(initial_state)
        y, last, states = _scan_forward(p, chunk, save_states=needs_grad, y_out=y, D=D, h0=h0)
        out = y if z is None else F.silu(z.to(cdtype)).mul_(y)
        if needs_grad:
            # dt and its sequence-major forms are O(batch * dim * L): keeping them spares
            # the backward three transposes and a softplus
            y_pre_gate = y if z is not None else None
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, y_pre_gate, p.dt, p.dt_s, p.dtu_s)
            ctx.delta_softplus = delta_softplus
            ctx.chunk = chunk
            ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return out.to(u.dtype), p.state_to_input_layout(last)

    @staticmethod
    @_float_arithmetic
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states, y, dt, dt_s, dtu_s = ctx.saved_tensors
        p = _Prepared(u, A, B, C, dt, dt_s, dtu_s)
        cdtype = p.cdtype
        dout = dout.to(cdtype)
        dz = None
        if z is not None:
            # out = y * silu(z); silu'(z) = sigmoid(z) * (1 + z - silu(z))
            zc = z.to(cdtype)
            sig = torch.sigmoid(zc)
            silu = torch.mul(zc, sig)
            dz = torch.sub(zc, silu).add_(1).mul_(sig).mul_(y).mul_(dout).to(z.dtype)
            del sig
            dout = silu.mul_(dout)
        ddt_s, ddtu_s, dA, dB, dC, dh0 = _scan_backward(p, ctx.chunk, states, dout, dlast)
        uc = u.to(cdtype)
        ddtu = p.to_channel_major(ddtu_s)
        ddt = p.to_channel_major(ddt_s).addcmul_(ddtu, uc)  # dtu = dt * u
        del ddt_s, ddtu_s
        du = ddtu.mul_(dt)
        dD = None
        if D is not None:
            du.addcmul_(dout, D.to(cdtype)[:, None])
            dD = torch.einsum("bdl,bdl->d", dout, uc).to(D.dtype)
        if ctx.delta_softplus:
            ddt.mul_(_pre_activation(delta, delta_bias, cdtype).sigmoid_())
        ddelta_bias = None if delta_bias is None else ddt.sum((0, 2)).to(delta_bias.dtype)
        dA = dA.transpose(1, 2).reshape(p.dim, p.dstate)
        dinitial = None
        if ctx.needs_input_grad[8]:
            dinitial = p.state_to_input_layout(dh0).to(ctx.initial_state_dtype)
        return (
            du.to(u.dtype),
            ddt.to(delta.dtype),
            dA.to(A.dtype),
            p.B.grad_to_input_layout(dB).to(B.dtype),
            p.C.grad_to_input_layout(dC).to(C.dtype),
            dD,
            dz,
            ddelta_bias,
            dinitial,
            None,
            None,
        )


def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    out, last = SelectiveScanChunked.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_size
    )
    return (out, last) if return_last_state else out
