"""Losses between student and teacher intermediate features.

Conv features are NHWC ``[B, H, W, C]``, vectors ``[B, D]``. Per-example losses
return ``[B]``. Relational (batch-level) losses (``sp``, ``rkd_distance``,
``rkd_angle``, ``pkt``, ``cc``) return per-anchor values ``[B]`` whose mean is
the paper's batch loss; they take no ``where=`` (masking an anchor would still
leave it in the other anchors' relations). Learnable adapters (FitNet
regressor, VID regressor and ``log_scale``, FT paraphraser/translator, AB
connector) live in ``kdlab.models.connectors``; these functions only see their
outputs. Spatial sizes must match (pool in a connector) except inside an FSP
pair, which pools like RepDistiller. Everything is computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdlab.losses import _checks


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis``, like ``torch.nn.functional.normalize``, with a finite gradient at 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


def _relational(s: jax.Array, t: jax.Array, s_name: str = "s",
                t_name: str = "t") -> tuple[jax.Array, jax.Array]:
  """Validates batch-relational inputs ``[B, ...]`` (dims may differ); returns float32 ``[B, D]``."""
  s = _checks.floating(s_name, s)
  t = _checks.floating(t_name, t)
  _checks.min_rank(s_name, s, 2)
  _checks.min_rank(t_name, t, 2)
  _checks.same_leading(s_name, s, t_name, t, 1, "batch size")
  return _flat(s), _flat(t)


def _per_example_pair(s_name: str, s: jax.Array, t_name: str, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  s = _checks.floating(s_name, s)
  t = _checks.floating(t_name, t)
  _checks.same_shape(s_name, s, t_name, t)
  _checks.min_rank(s_name, s, 2)
  return s, t


def _smooth_l1(x: jax.Array) -> jax.Array:
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def fitnet(s_feat: jax.Array, t_feat: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
  """FitNet hint loss: mean squared error over all non-batch axes.

  Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (ICLR). The
  regressor that maps the student's guided layer to the teacher's hint shape
  is a connector; ``s_feat`` is its output.

  Args:
    s_feat: ``[B, ...]`` regressed student features.
    t_feat: ``[B, ...]`` teacher hint, same shape.
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example ``mean((s - t)^2)``; the batch mean equals ``MSELoss``.
  """
  s, t = _per_example_pair("s_feat", s_feat, "t_feat", t_feat)
  return _checks.apply_where(jnp.mean(jnp.square(_flat(s - t)), axis=-1), where)


def sp(s_feat: jax.Array, t_feat: jax.Array) -> jax.Array:
  """Similarity-preserving KD.

  ``G = normalize_rows(F F^T)`` for the flattened features ``F`` ``[B, D]``;
  batch loss ``||G_t - G_s||_F^2 / B^2``. Tung & Mori 2019,
  "Similarity-Preserving Knowledge Distillation" (ICCV).

  Args:
    s_feat: ``[B, ...]`` student features.
    t_feat: ``[B, ...]`` teacher features (any width, same batch size).

  Returns:
    ``[B]`` per-anchor ``sum_j (G_t - G_s)_ij^2 / B``; their mean is the batch loss.
  """
  s, t = _relational(s_feat, t_feat, "s_feat", "t_feat")
  g_s = l2_normalize(s @ s.T)
  g_t = l2_normalize(t @ t.T)
  return jnp.sum(jnp.square(g_t - g_s), axis=-1) / s.shape[0]


def _pairwise_distances(x: jax.Array) -> jax.Array:
  """Euclidean distances (0 on the diagonal) of ``[B, D]`` rows."""
  # Distances are translation invariant; centering first keeps the
  # Gram-matrix form accurate when the rows share a large offset.
  x = x - jnp.mean(x, axis=0, keepdims=True)
  gram = x @ x.T
  sq_norm = jnp.diagonal(gram)
  sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * gram
  off = ~jnp.eye(x.shape[0], dtype=bool)
  return jnp.where(off, jnp.sqrt(jnp.maximum(sq, 1e-12)), 0.0)


def _check_pairs(s: jax.Array) -> None:
  if s.shape[0] < 2:
    raise ValueError(f"s: relational losses need a batch of at least 2, got shape {s.shape}")


def rkd_distance(s: jax.Array, t: jax.Array) -> jax.Array:
  """RKD distance-wise loss.

  ``psi_ij = ||x_i - x_j|| / mu`` with ``mu`` the mean distance over pairs
  ``i != j``; loss = smooth-L1 (delta 1) between student and teacher ``psi``,
  averaged over all ``B^2`` entries (as RepDistiller's ``smooth_l1_loss`` on
  the full matrix). Park et al. 2019, "Relational Knowledge Distillation"
  (CVPR). The paper weight is 25 (a config weight, not applied here).

  Args:
    s: ``[B, ...]`` student embeddings, ``B >= 2``.
    t: ``[B, ...]`` teacher embeddings (any width).

  Returns:
    ``[B]`` per-anchor means over ``j``; their mean is the batch loss.
  """
  s, t = _relational(s, t)
  _check_pairs(s)
  num_pairs = s.shape[0] * (s.shape[0] - 1)

  def psi(x):
    d = _pairwise_distances(x)
    return d / (jnp.sum(d) / num_pairs)

  return jnp.mean(_smooth_l1(psi(s) - psi(t)), axis=-1)


def rkd_angle(s: jax.Array, t: jax.Array) -> jax.Array:
  """RKD angle-wise loss.

  ``psi_ijk = <e_ij, e_ik>`` with ``e_ij = (x_j - x_i) / ||x_j - x_i||``
  (0 when ``x_j == x_i``), over all ``B^3`` triplets with vertex ``i``; loss =
  smooth-L1 (delta 1) between student and teacher ``psi`` averaged over
  triplets. Park et al. 2019 (CVPR); paper weight 50. Uses explicit
  difference vectors (exact for near-duplicate rows), so memory is
  ``O(B^2 D + B^3)``.

  Args:
    s: ``[B, ...]`` student embeddings, ``B >= 2``.
    t: ``[B, ...]`` teacher embeddings (any width).

  Returns:
    ``[B]`` per-vertex means over ``(j, k)``; their mean is the batch loss.
  """
  s, t = _relational(s, t)
  _check_pairs(s)

  def psi(x):
    e = l2_normalize(x[None, :, :] - x[:, None, :])
    return jnp.einsum("ijd,ikd->ijk", e, e)

  return jnp.mean(_smooth_l1(psi(s) - psi(t)), axis=(1, 2))


def pkt(s: jax.Array, t: jax.Array, *, eps: float = 1e-7) -> jax.Array:
  """Probabilistic knowledge transfer.

  Cosine similarities mapped to ``[0, 1]`` by ``(cos + 1) / 2`` and
  row-normalised into conditional distributions ``p_{j|i}``; loss =
  ``mean_{i,j} p^t_{j|i} log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))``, the
  mean over all ``B^2`` entries as in RepDistiller (so each row's KL is
  divided by ``B``). Rows are normalised as ``x / (||x|| + eps)``. Passalis &
  Tefas 2018, "Learning Deep Representations with Probabilistic Knowledge
  Transfer" (ECCV).

  Args:
    s: ``[B, ...]`` student features.
    t: ``[B, ...]`` teacher features (any width).
    eps: numerical floor, > 0.

  Returns:
    ``[B]`` per-anchor ``KL(p^t_i || p^s_i) / B``; their mean is the batch loss.
  """
  s, t = _relational(s, t)
  _checks.positive("eps", eps)

  def cond(x):
    norm = jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30))
    x = x / (norm + eps)
    sim = (x @ x.T + 1.0) / 2.0
    return sim / jnp.sum(sim, axis=-1, keepdims=True)

  p_s, p_t = cond(s), cond(t)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)), axis=-1)


def _positions(name: str, x: jax.Array) -> jax.Array:
  """``[B, ..., C]`` -> ``[B, C, P]`` (channels by flattened positions)."""
  x = _checks.floating(name, x)
  _checks.min_rank(name, x, 3)
  return jnp.swapaxes(x.reshape(x.shape[0], -1, x.shape[-1]), 1, 2)


def _check_spatial(s_name: str, s: jax.Array, t_name: str, t: jax.Array) -> None:
  if s.shape[:-1] != t.shape[:-1]:
    raise ValueError(f"{s_name} and {t_name} must have the same batch and spatial shape "
                     f"(channels may differ), got {s.shape} and {t.shape}; pool in a connector")


def nst(s_feat: jax.Array, t_feat: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
  """Neuron selectivity transfer with the degree-2 polynomial kernel.

  Each channel's activation map is flattened over positions and
  L2-normalised; with ``k(a, b) = (a . b)^2`` the squared MMD is
  ``mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(s_i, t_j)`` over
  channel pairs. Huang & Wang 2017, "Like What You Like: Knowledge Distill via
  Neuron Selectivity Transfer".

  Args:
    s_feat: ``[B, H, W, C_s]`` student features.
    t_feat: ``[B, H, W, C_t]`` teacher features (same spatial size).
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example MMD^2 (>= 0); the batch mean equals RepDistiller's.
  """
  _check_spatial("s_feat", s_feat, "t_feat", t_feat)
  s = l2_normalize(_positions("s_feat", s_feat))
  t = l2_normalize(_positions("t_feat", t_feat))

  def k(a, b):
    return jnp.mean(jnp.square(jnp.einsum("bip,bjp->bij", a, b)), axis=(1, 2))

  return _checks.apply_where(k(t, t) + k(s, s) - 2.0 * k(s, t), where)


def cc(s: jax.Array, t: jax.Array, *, gamma: float = 0.4, order: int = 2) -> jax.Array:
  """Correlation congruence with a Taylor-expanded Gaussian kernel.

  Rows are L2-normalised; with ``c_ij = <x_i, x_j>`` the correlation is
  ``K_ij = sum_{p=0}^{order} exp(-2 gamma) (2 gamma)^p / p! * c_ij^p``
  (the order-``P`` expansion of ``exp(-gamma ||x_i - x_j||^2)`` for unit
  vectors); batch loss ``mean_ij (K^s_ij - K^t_ij)^2``. Peng et al. 2019,
  "Correlation Congruence for Knowledge Distillation" (ICCV). This is the
  paper's kernel form; RepDistiller's ``Correlation`` criterion is a different
  (author-supplied) formula, so its weight (0.02) does not carry over.

  Args:
    s: ``[B, ...]`` student embeddings.
    t: ``[B, ...]`` teacher embeddings (any width).
    gamma: kernel width, > 0.
    order: Taylor order ``P``, a positive int.

  Returns:
    ``[B]`` per-anchor means over ``j``; their mean is the batch loss.
  """
  s, t = _relational(s, t)
  _checks.positive("gamma", gamma)
  _checks.positive_int("order", order)

  def corr(x):
    x = l2_normalize(x)
    c = x @ x.T
    return sum(jnp.exp(-2.0 * gamma) * (2.0 * gamma)**p / math.factorial(p) * c**p
               for p in range(order + 1))

  return jnp.mean(jnp.square(corr(s) - corr(t)), axis=-1)


def vid(s_mean: jax.Array, t_feat: jax.Array, *, log_scale: jax.Array, eps: float = 1e-5,
        where: jax.Array | None = None) -> jax.Array:
  """Variational information distillation: Gaussian negative log-likelihood.

  ``sigma^2 = softplus(log_scale) + eps`` per channel; loss =
  ``mean 0.5 * ((mu - t)^2 / sigma^2 + log sigma^2)`` over positions and
  channels (the constant ``0.5 log 2 pi`` dropped, as RepDistiller). Ahn et al.
  2019, "Variational Information Distillation for Knowledge Transfer" (CVPR).

  Args:
    s_mean: ``[B, ..., C]`` predicted mean (the VID regressor's output).
    t_feat: ``[B, ..., C]`` teacher features, same shape.
    log_scale: ``[C]`` learnable per-channel parameter (owned by the connector;
      gradients flow into it).
    eps: variance floor, > 0.
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example NLL (can be negative); the batch mean equals RepDistiller's.
  """
  s, t = _per_example_pair("s_mean", s_mean, "t_feat", t_feat)
  log_scale = _checks.floating("log_scale", log_scale)
  if log_scale.shape != s.shape[-1:]:
    raise ValueError(f"log_scale: expected shape {s.shape[-1:]} (one per channel), got {log_scale.shape}")
  _checks.positive("eps", eps)
  var = jax.nn.softplus(log_scale) + eps
  nll = 0.5 * (jnp.square(s - t) / var + jnp.log(var))
  return _checks.apply_where(jnp.mean(_flat(nll), axis=-1), where)


def _pool_to(name: str, x: jax.Array, h: int, w: int) -> jax.Array:
  """Average-pools NHWC ``x`` to ``h x w`` (integer factors only: equals adaptive pooling)."""
  _, big_h, big_w, c = x.shape
  if big_h % h or big_w % w:
    raise ValueError(f"{name}: cannot pool spatial size {(big_h, big_w)} to {(h, w)} "
                     "by an integer factor")
  return x.reshape(x.shape[0], h, big_h // h, w, big_w // w, c).mean(axis=(2, 4))


def _fsp_matrix(name: str, pair: tuple[jax.Array, jax.Array]) -> jax.Array:
  if not isinstance(pair, (tuple, list)) or len(pair) != 2:
    raise TypeError(f"{name}: expected a pair (f1, f2) of feature maps, got {type(pair).__name__}")
  f1 = _checks.floating(f"{name}[0]", pair[0])
  f2 = _checks.floating(f"{name}[1]", pair[1])
  _checks.rank(f"{name}[0]", f1, 4)
  _checks.rank(f"{name}[1]", f2, 4)
  _checks.same_leading(f"{name}[0]", f1, f"{name}[1]", f2, 1, "batch size")
  h = min(f1.shape[1], f2.shape[1])
  w = min(f1.shape[2], f2.shape[2])
  f1 = _pool_to(f"{name}[0]", f1, h, w)
  f2 = _pool_to(f"{name}[1]", f2, h, w)
  return jnp.einsum("bhwi,bhwj->bij", f1, f2) / (h * w)


def fsp(s_pair: tuple[jax.Array, jax.Array], t_pair: tuple[jax.Array, jax.Array], *,
        where: jax.Array | None = None) -> jax.Array:
  """Flow of solution procedure (FSP) matrix matching.

  For a pair of taps ``(f1, f2)`` of one network, ``G = f1^T f2 / (H W)``
  ``[C1, C2]`` (sum over positions). If the two taps differ in spatial size
  the larger is average-pooled to the smaller, as RepDistiller does; only
  integer pooling factors are supported (else ``ValueError``). Loss =
  ``mean (G_s - G_t)^2``. Yim et al. 2017, "A Gift from Knowledge
  Distillation: Fast Optimization, Network Minimization and Transfer
  Learning" (CVPR).

  Args:
    s_pair: ``(f1, f2)`` student NHWC taps ``[B, H, W, C1]``, ``[B, H', W', C2]``.
    t_pair: teacher taps giving the same ``[C1, C2]`` FSP shape.
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example mean squared difference of the FSP matrices.
  """
  g_s = _fsp_matrix("s_pair", s_pair)
  g_t = _fsp_matrix("t_pair", t_pair)
  if g_s.shape != g_t.shape:
    raise ValueError(f"s_pair and t_pair must give FSP matrices of the same shape "
                     f"(same batch and channels), got {g_s.shape} and {g_t.shape}")
  return _checks.apply_where(jnp.mean(jnp.square(g_s - g_t), axis=(1, 2)), where)


def ab(s_preact: jax.Array, t_preact: jax.Array, *, margin: float = 1.0,
       where: jax.Array | None = None) -> jax.Array:
  """Activation-boundary transfer (the alternative L2 criterion).

  Per element: ``(s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]``,
  summed over all non-batch axes. Heo et al. 2019, "Knowledge Transfer via
  Distillation of Activation Boundaries Formed by Hidden Neurons" (AAAI).
  RepDistiller's per-layer weights ``2^(i - n + 1)`` and ``3 / 1000`` scale
  belong in the config weight.

  Args:
    s_preact: ``[B, ...]`` student pre-activations (after the AB connector).
    t_preact: ``[B, ...]`` teacher pre-activations, same shape.
    margin: ``m``, > 0.
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example sums (>= 0); the batch mean equals RepDistiller's
    criterion divided by the batch size. Zero when ``s`` is beyond the margin
    on the teacher's side everywhere.
  """
  s, t = _per_example_pair("s_preact", s_preact, "t_preact", t_preact)
  _checks.positive("margin", margin)
  loss = (jnp.square(s + margin) * ((s > -margin) & (t <= 0))
          + jnp.square(s - margin) * ((s <= margin) & (t > 0)))
  return _checks.apply_where(jnp.sum(_flat(loss), axis=-1), where)


def ft(s_factor: jax.Array, t_factor: jax.Array, *, p: float = 1,
       where: jax.Array | None = None) -> jax.Array:
  """Factor transfer between L2-normalised flattened factors.

  ``mean |s / ||s|| - t / ||t|| |^p`` over the flattened factor. Kim et al.
  2018, "Paraphrasing Complex Network: Network Compression via Factor
  Transfer" (NeurIPS, eq. 3). The teacher paraphraser and student translator
  are connectors; these are their outputs. (RepDistiller first reduces each
  factor to ``mean_c f^2`` over channels, an attention-map-like step that the
  paper does not have; apply it in the connector to reproduce that.)

  Args:
    s_factor: ``[B, ...]`` student factor (translator output).
    t_factor: ``[B, ...]`` teacher factor (paraphraser output), same shape.
    p: exponent, > 0 (the paper uses 1).
    where: optional ``[B]`` boolean mask; masked entries give 0.

  Returns:
    ``[B]`` per-example losses, >= 0, zero where ``s == t``.
  """
  s, t = _per_example_pair("s_factor", s_factor, "t_factor", t_factor)
  _checks.positive("p", p)
  diff = l2_normalize(_flat(s)) - l2_normalize(_flat(t))
  return _checks.apply_where(jnp.mean(jnp.abs(diff)**p, axis=-1), where)
