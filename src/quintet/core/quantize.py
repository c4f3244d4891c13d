"""Vector quantizers, written once: one codebook (VQ-VAE) and a stack of residual codebooks (RQ-VAE).

Shape glossary: ``...`` any leading shape (batch, positions), ``n`` vectors flattened from it,
``d`` input dim, ``c`` codebook dim (``d`` unless projected), ``k`` codebook size, ``D`` depth.

- :class:`VectorQuantizer` (van den Oord et al. 2017) replaces each vector by its nearest code.
- :class:`ResidualQuantizer` (Lee et al. 2022) codes each vector as ``D`` codes, each quantizing
  the residual the earlier ones left: ``r_0 = z``, ``k_d = argmin ||r_d - e(k)||``,
  ``r_{d+1} = r_d - e(k_d)``, ``ẑ = sum_d e(k_d)``; one codebook shared by every depth (the
  paper's choice) or one per depth.

Training behaviour (``module.train()``; evaluation, ``encode`` and ``decode`` never change state):

- Initialisation: by default (``codebook_init="data"``) the codes are set from the first training
  batch: ``k`` input vectors drawn at random (without replacement when the batch has ``k``;
  with replacement and a 1 % jitter when it has fewer). ``"normal"`` keeps the N(0, 1) init.
- EMA codebooks (``ema_decay`` set; VQ-VAE appendix A.1): per code, the count ``N`` and the sum
  ``m`` of the vectors assigned to it decay by ``ema_decay`` and take in this batch's; the code
  is ``m / N`` (``N`` Laplace-smoothed). Under ``torch.distributed`` the batch statistics are
  summed over processes first (one all-reduce), so every rank keeps an identical codebook.
  With ``ema_decay=None`` the codebook is an ``nn.Parameter`` learned by the codebook loss
  ``||sg[r_d] - e(k_d)||²``.
- Dead codes: a code no process used for ``dead_code_threshold`` consecutive updates is re-seeded
  with an input vector of this batch, drawn with a seed shared by all ranks from all ranks' vectors
  together (only the chosen rows travel), so the result is identical on every rank and equal to a
  single process seeing the concatenated batch. Checking for dead codes reads one number back from
  the device per update.
- Loss: ``commitment_weight * ||z - sg[ẑ^(d)]||²`` averaged over depths (RQ-VAE's commitment
  loss on every partial sum ``ẑ^(d)``, averaged as in its official code), plus the codebook loss
  when the codebook is learned.
- Gradients: the output's value is exactly the quantized vector; its gradient reaches ``z``
  straight through, or with ``rotation_trick=True`` rotated and rescaled as in Fifty et al. (2024).

Distances are computed in float32 with autocast off, so codes do not depend on the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quintet.core.validation import check_ids, check_int, check_number, check_tensor

DISTANCES = ("euclidean", "cosine")
CODEBOOK_INITS = ("data", "normal")
DEAD_CODE_WINDOW = 100
"""with restarts off (``dead_code_threshold=0``) the ``dead_codes`` metric counts codes unused this long"""


@dataclass
class QuantizerOutput:
    """What a quantizer's forward returns.

    - ``quantized (..., d)``: the quantized vectors (exact values); gradients reach the input.
    - ``codes``: int64, ``(...)`` for :class:`VectorQuantizer`, ``(..., D)`` for :class:`ResidualQuantizer`.
    - ``loss``: scalar commitment loss (+ codebook loss when the codebook is learned, not EMA).
    - ``metrics``: detached 0-dim float tensors: ``codebook_usage`` (fraction of codes used in this
      batch, this process), ``perplexity`` (exp of the entropy of code use), ``dead_codes`` (codes
      unused for the dead-code threshold), ``commitment`` (the unweighted commitment term); for a
      residual quantizer also ``codebook_usage_d{i}`` / ``perplexity_d{i}`` per depth, and
      ``dead_codes_d{i}`` when each depth has its own codebook.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


# --------------------------------------------------------------------------- processes


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sample_rows(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` rows of ``(n, c)`` ``rows`` drawn from the rows of every process together.

    The indices come from ``generator`` (seeded alike on every rank) over the concatenation of all
    ranks' rows in rank order; each rank fills in the rows it holds and one all-reduce sums them (a
    row is non-zero on one rank only, so the sum is that row exactly). The result is identical on
    every rank and equal to sampling the concatenated rows in one process.
    """
    rank, world = _world()
    n = rows.shape[0]
    sizes = [n]
    if world > 1:
        gathered = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([n], device=rows.device))
        sizes = [int(size) for size in gathered]
    total, offset = sum(sizes), sum(sizes[:rank])
    if total >= count:
        index = torch.randperm(total, generator=generator)[:count]
    else:
        index = torch.randint(total, (count,), generator=generator)
    index = index.to(rows.device)
    if world == 1:
        picked = rows[index]
    else:
        mine = (index >= offset) & (index < offset + n)
        picked = rows.new_zeros(count, rows.shape[1])
        picked[mine] = rows[index[mine] - offset]
        dist.all_reduce(picked)
    if total < count:  # drawn with replacement: jitter the repeats apart so they can win different vectors
        noise = torch.randn(count, rows.shape[1], generator=generator).to(rows.device)
        picked = picked + noise * 0.01 * picked.std().clamp_min(1e-6)
    return picked


# --------------------------------------------------------------------------- one codebook


class Codebook(nn.Module):
    """``k`` code vectors of size ``c``; with EMA, their running statistics, all as buffers.

    Buffers (kept by ``state_dict``, safetensors and FSDP): ``weight (k, c)`` (an ``nn.Parameter``
    when learned by gradient), ``ema_count (k)`` and ``ema_sum (k, c)`` (EMA only; counts start at 1
    with sums equal to the codes, so an unused code keeps its vector while both decay),
    ``unused_updates (k)`` (consecutive training updates without a vector), ``updates`` and
    ``initialized``.
    """

    def __init__(
        self, size: int, dim: int, *, cosine: bool, ema_decay: float | None, init: str, eps: float, seed: int
    ):
        super().__init__()
        self.size, self.dim, self.cosine, self.ema_decay, self.eps, self.seed = size, dim, cosine, ema_decay, eps, seed
        weight = torch.randn(size, dim)
        if cosine:
            weight = F.normalize(weight, dim=-1)
        if ema_decay is None:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("ema_count", torch.ones(size))
            self.register_buffer("ema_sum", weight.clone())
        self.register_buffer("initialized", torch.tensor(init == "normal"))
        self.register_buffer("unused_updates", torch.zeros(size, dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._initialized_known: bool | None = None  # host copy of `initialized`: no device read per step

    @property
    def learned(self) -> bool:
        return self.ema_decay is None

    def is_initialized(self) -> bool:
        if self._initialized_known is None:
            self._initialized_known = bool(self.initialized)
        return self._initialized_known

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_known = None  # re-read the loaded flag on the next training step

    def _generator(self) -> torch.Generator:
        """A CPU generator seeded from (seed, updates so far): the same on every rank at every update."""
        return torch.Generator().manual_seed(hash((self.seed, int(self.updates))) & (2**63 - 1))

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each float32 vector ``(n, c) -> (n,)``."""
        weight = self.weight.detach().float()
        if self.cosine:  # both sides unit-norm: the nearest code has the largest dot product
            return (vectors @ weight.T).argmax(-1)
        # ||v - w||² = ||v||² - 2 v·w + ||w||², and ||v||² is the same for every code
        return torch.addmm(weight.pow(2).sum(-1), vectors, weight.T, alpha=-2).argmin(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.weight).float()

    @torch.no_grad()
    def _replace(self, index: torch.Tensor, vectors: torch.Tensor) -> None:
        if self.cosine:
            vectors = F.normalize(vectors, dim=-1, eps=self.eps)
        self.weight.index_copy_(0, index, vectors.to(self.weight.dtype))
        if not self.learned:
            self.ema_sum.index_copy_(0, index, vectors.to(self.ema_sum.dtype))
            self.ema_count.index_fill_(0, index, 1.0)
        self.unused_updates.index_fill_(0, index, 0)

    @torch.compiler.disable  # runs once; reads the update count back to seed its draw
    @torch.no_grad()
    def initialize(self, vectors: torch.Tensor) -> None:
        """Set every code to an input vector of this batch (drawn across all processes)."""
        picked = _sample_rows(vectors, self.size, self._generator())
        self._replace(torch.arange(self.size, device=vectors.device), picked)
        self.initialized.fill_(True)
        self._initialized_known = True

    def dead_codes(self, threshold: int) -> torch.Tensor:
        return (self.unused_updates >= (threshold or DEAD_CODE_WINDOW)).sum().float()

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, codes: torch.Tensor, dead_code_threshold: int) -> torch.Tensor:
        """One training update from this step's ``vectors (n, c)`` and their ``codes (n,)`` on every process.

        Returns the number of dead codes found (0-dim float), restarted when a threshold is set.
        """
        ones = vectors.new_ones(codes.shape[0], 1)
        if self.learned:
            stats = vectors.new_zeros(self.size, 1).index_add_(0, codes, ones)  # per code: [count]
        else:  # per code: [sum of its vectors | count], reduced in one collective
            stats = vectors.new_zeros(self.size, self.dim + 1).index_add_(0, codes, torch.cat([vectors, ones], 1))
        if _world()[1] > 1:
            dist.all_reduce(stats)
        counts = stats[:, -1]
        if not self.learned:
            rate = 1.0 - self.ema_decay
            self.ema_count.lerp_(counts, rate)  # N_k <- γ N_k + (1 - γ) n_k
            self.ema_sum.lerp_(stats[:, :-1], rate)  # m_k <- γ m_k + (1 - γ) sum of the vectors coded k
            total = self.ema_count.sum()
            # Laplace smoothing keeps a code whose count decays towards 0 from dividing by ~0
            smoothed = (self.ema_count + self.eps) / (total + self.size * self.eps) * total
            weight = self.ema_sum / smoothed[:, None]  # e_k = m_k / N_k
            self.weight.copy_(F.normalize(weight, dim=-1, eps=self.eps) if self.cosine else weight)
        self.unused_updates.add_(1).masked_fill_(counts > 0, 0)
        self.updates.add_(1)
        found = self.dead_codes(dead_code_threshold)
        if dead_code_threshold:
            self._restart_dead(vectors, dead_code_threshold)
        return found

    @torch.compiler.disable  # how many codes to draw is data-dependent: one read back, outside any compiled graph
    @torch.no_grad()
    def _restart_dead(self, vectors: torch.Tensor, threshold: int) -> None:
        dead = (self.unused_updates >= threshold).nonzero().squeeze(1)
        if dead.numel():
            self._replace(dead, _sample_rows(vectors, dead.numel(), self._generator()))


# --------------------------------------------------------------------------- gradient estimators


def _rotate(e: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """Fifty et al. (2024), eq. 4: ``λ R e`` with ``λ = |q| / |e|`` and ``R`` the rotation taking ``e``'s
    direction to ``q``'s, both held constant: the value is ``q``, the gradient reaching ``e`` is ``λ Rᵀ g``.
    """
    e_const = e.detach()
    e_norm = e_const.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True)
    e_hat, q_hat = e_const / e_norm, q / q_norm.clamp_min(eps)
    r = F.normalize(e_hat + q_hat, dim=-1, eps=eps)
    # R = I - 2 r rᵀ + 2 q̂ êᵀ, applied to e without forming the c x c matrix
    rotated = e - 2 * r * (e * r).sum(-1, keepdim=True) + 2 * q_hat * (e * e_hat).sum(-1, keepdim=True)
    return rotated * (q_norm / e_norm)


# --------------------------------------------------------------------------- quantizers


class _Quantizer(nn.Module):
    """What both quantizers share: projections, the depth loop, losses, updates and metrics."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        depth: int,
        *,
        shared_codebook: bool,
        codebook_dim: int | None,
        distance: str,
        ema_decay: float | None,
        commitment_weight: float,
        rotation_trick: bool,
        dead_code_threshold: int,
        codebook_init: str,
        seed: int,
        eps: float,
    ):
        super().__init__()
        check_int(dim, "dim")
        check_int(codebook_size, "codebook_size")
        check_int(depth, "depth")
        if codebook_dim is not None:
            check_int(codebook_dim, "codebook_dim")
        if distance not in DISTANCES:
            raise ValueError(f"distance: expected one of {DISTANCES}, got {distance!r}")
        if distance == "cosine" and depth > 1:
            raise ValueError(
                "distance: residual quantization needs 'euclidean' codes (adding a unit-norm code cannot shrink "
                "a residual shorter than 1/2, so deeper codes would add error); use cosine with depth 1"
            )
        if ema_decay is not None:
            check_number(ema_decay, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        check_number(commitment_weight, "commitment_weight", low=0.0)
        if not isinstance(rotation_trick, bool):
            raise TypeError(f"rotation_trick: expected a bool, got {rotation_trick!r}")
        if not isinstance(shared_codebook, bool):
            raise TypeError(f"shared_codebook: expected a bool, got {shared_codebook!r}")
        check_int(dead_code_threshold, "dead_code_threshold", minimum=0)
        if codebook_init not in CODEBOOK_INITS:
            raise ValueError(f"codebook_init: expected one of {CODEBOOK_INITS}, got {codebook_init!r}")
        check_int(seed, "seed", minimum=0)
        check_number(eps, "eps", low=0.0, low_open=True)

        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.codebook_dim = codebook_dim or dim
        self.shared_codebook = shared_codebook
        self.cosine = distance == "cosine"
        self.commitment_weight, self.rotation_trick = commitment_weight, rotation_trick
        self.dead_code_threshold, self.eps = dead_code_threshold, eps
        projected = self.codebook_dim != dim
        # bias-free, so projecting each depth's code and summing equals projecting the sum
        self.project_in = nn.Linear(dim, self.codebook_dim, bias=False) if projected else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim, bias=False) if projected else nn.Identity()
        book = dict(cosine=self.cosine, ema_decay=ema_decay, init=codebook_init, eps=eps)
        count = 1 if shared_codebook else depth
        self.books = nn.ModuleList(
            Codebook(codebook_size, self.codebook_dim, seed=seed * 4096 + i, **book) for i in range(count)
        )

    def _books_by_depth(self) -> list[Codebook]:
        return [self.books[0]] * self.depth if self.shared_codebook else list(self.books)

    def _check_x(self, x: object) -> None:
        check_tensor(x, "x", dtype="float")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected vectors of size {self.dim} on the last axis, got shape {tuple(x.shape)}")

    def _check_codes(self, codes: object) -> None:
        check_ids(codes, "codes", self.codebook_size)
        if codes.ndim < 1 or codes.shape[-1] != self.depth:
            raise ValueError(f"codes: expected depth {self.depth} on the last axis, got shape {tuple(codes.shape)}")

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d)`` -> the float32 vectors the codebooks quantize, ``(n, c)``."""
        z = self.project_in(x).reshape(-1, self.codebook_dim).float()
        return F.normalize(z, dim=-1, eps=self.eps) if self.cosine else z

    def _assign(self, z: torch.Tensor, initialize: bool):
        """Codes ``(n, D)``, code vectors ``(n, D, c)`` and residuals ``(n, D, c)`` of ``z`` (detached)."""
        residual = z.detach()
        codes, vectors, residuals = [], [], []
        for book in self._books_by_depth():  # a loop over the D depths, each vectorised over n
            if initialize and not book.is_initialized():
                book.initialize(residual)
            code = book.nearest(residual)
            vector = book.lookup(code)  # carries the codebook's gradient when it is learned
            codes.append(code)
            vectors.append(vector)
            residuals.append(residual)
            residual = residual - vector.detach()  # r_{d+1} = r_d - e(k_d)
        return torch.stack(codes, 1), torch.stack(vectors, 1), torch.stack(residuals, 1)

    def _quantize(self, x: torch.Tensor) -> QuantizerOutput:
        """Forward over ``x (..., d)``; codes come back as ``(..., D)``."""
        self._check_x(x)
        if x.numel() == 0:
            raise ValueError(f"x: got no vectors to quantize (shape {tuple(x.shape)})")
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            z = self._targets(x)
            codes, vectors, residuals = self._assign(z, initialize=self.training)
            partial = vectors.cumsum(1)  # ẑ^(d) = sum_{d' <= d} e(k_d')
            quantized = partial[:, -1]
            commitment = (z[:, None] - partial.detach()).pow(2).mean()  # mean_d ||z - sg[ẑ^(d)]||²
            loss = self.commitment_weight * commitment
            if self.books[0].learned:
                loss = loss + (residuals - vectors).pow(2).mean()  # codebook loss ||sg[r_d] - e(k_d)||²
            # value: exactly ẑ (carrier - carrier.detach() is exactly 0); gradient: through the carrier
            carrier = _rotate(z, quantized.detach(), self.eps) if self.rotation_trick else z
            out = quantized.detach() + (carrier - carrier.detach())
            dead = self._update(codes, residuals) if self.training else self._dead_codes()
            metrics = self._metrics(codes, commitment.detach(), dead)
        out = self.project_out(out.reshape(*lead, self.codebook_dim).to(x.dtype))
        return QuantizerOutput(quantized=out, codes=codes.reshape(*lead, self.depth), loss=loss, metrics=metrics)

    def _update(self, codes: torch.Tensor, residuals: torch.Tensor) -> list[torch.Tensor]:
        """EMA / usage / restart updates of every codebook; dead codes found per codebook."""
        if self.shared_codebook:  # one codebook saw every depth's residuals: one update from all of them
            rows = residuals.reshape(-1, self.codebook_dim)
            return [self.books[0].update(rows, codes.reshape(-1), self.dead_code_threshold)]
        threshold = self.dead_code_threshold
        return [book.update(residuals[:, d], codes[:, d], threshold) for d, book in enumerate(self.books)]

    def _dead_codes(self) -> list[torch.Tensor]:
        return [book.dead_codes(self.dead_code_threshold) for book in self.books]

    def _metrics(self, codes: torch.Tensor, commitment: torch.Tensor, dead: list[torch.Tensor]) -> dict:
        n, depth = codes.shape
        k = self.codebook_size
        offsets = torch.arange(depth, device=codes.device) * k
        counts = torch.zeros(depth * k, device=codes.device).index_add_(
            0, (codes + offsets).reshape(-1), torch.ones(n * depth, device=codes.device)
        )
        counts = counts.view(depth, k)
        usage = (counts > 0).float().mean(1)
        probs = counts / n
        perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum(1))  # exp(entropy of code use)
        if self.shared_codebook:
            total = counts.sum(0) / (n * depth)
            overall = {
                "codebook_usage": (total > 0).float().mean(),
                "perplexity": torch.exp(-torch.special.xlogy(total, total).sum()),
            }
        else:
            overall = {"codebook_usage": usage.mean(), "perplexity": perplexity.mean()}
        metrics = {**overall, "dead_codes": torch.stack(dead).sum(), "commitment": commitment}
        if depth > 1:
            for d in range(depth):
                metrics[f"codebook_usage_d{d}"] = usage[d]
                metrics[f"perplexity_d{d}"] = perplexity[d]
                if not self.shared_codebook:
                    metrics[f"dead_codes_d{d}"] = dead[d]
        return {name: value.detach() for name, value in metrics.items()}

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        with torch.autocast(x.device.type, enabled=False):
            codes, _, _ = self._assign(self._targets(x), initialize=False)
        return codes.reshape(*x.shape[:-1], self.depth)

    def _code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Each depth's code vector in codebook space: ``codes (..., D) -> (..., D, c)``."""
        if self.shared_codebook:
            return F.embedding(codes, self.books[0].weight).float()
        # one table of every depth's codes: depth d's code k is row d * k_size + k
        table = torch.cat([book.weight for book in self.books]).float()
        offsets = torch.arange(self.depth, device=codes.device) * self.codebook_size
        return F.embedding(codes + offsets, table)

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Codebook space -> ``d`` (float32 unless the projection's weights are in another dtype)."""
        if isinstance(self.project_out, nn.Identity):
            return vectors
        with torch.autocast(vectors.device.type, enabled=False):
            return self.project_out(vectors.to(self.project_out.weight.dtype))


class VectorQuantizer(_Quantizer):
    """Nearest-code vector quantization (VQ-VAE) of ``x (..., d)`` with codes ``(...)``.

    ``forward(x) -> QuantizerOutput``; ``encode(x) -> codes``; ``decode(codes) -> (..., d)``;
    ``codebook``: the ``(k, c)`` code vectors. See the module docstring for the training behaviour.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        distance: str = "euclidean",
        ema_decay: float | None = 0.99,
        commitment_weight: float = 0.25,
        rotation_trick: bool = False,
        dead_code_threshold: int = 0,
        codebook_init: str = "data",
        seed: int = 0,
        eps: float = 1e-5,
    ):
        super().__init__(
            dim,
            codebook_size,
            1,
            shared_codebook=True,
            codebook_dim=codebook_dim,
            distance=distance,
            ema_decay=ema_decay,
            commitment_weight=commitment_weight,
            rotation_trick=rotation_trick,
            dead_code_threshold=dead_code_threshold,
            codebook_init=codebook_init,
            seed=seed,
            eps=eps,
        )

    @property
    def codebook(self) -> torch.Tensor:
        """The live ``(k, c)`` code vectors (a buffer with EMA, a parameter when learned)."""
        return self.books[0].weight

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        out = self._quantize(x)
        out.codes = out.codes.squeeze(-1)
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d) -> codes (...)`` (int64); never changes the codebook."""
        return self._encode(x).squeeze(-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (...) -> (..., d)``: the code vectors, projected back to ``d``."""
        check_ids(codes, "codes", self.codebook_size)
        return self._project(F.embedding(codes, self.books[0].weight).float())


class ResidualQuantizer(_Quantizer):
    """Residual quantization (RQ-VAE, Lee et al. 2022) of ``x (..., d)`` with codes ``(..., D)``.

    Each depth quantizes what the earlier depths left; the quantized vector is the sum of the ``D``
    code vectors. ``shared_codebook=True`` (the paper's choice) uses one codebook at every depth.

    ``forward(x) -> QuantizerOutput``; ``encode(x) -> codes (..., D)``; ``decode(codes) -> (..., d)``
    (the sum) or, with ``cumulative=True``, ``(..., D, d)`` partial sums (depths <= d for each d);
    ``embed(codes) -> (..., D, d)`` each depth's code vector; ``codebooks``: ``(D, k, c)``.
    Distance is euclidean (cosine codes only make sense at depth 1: use :class:`VectorQuantizer`).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        depth: int,
        *,
        shared_codebook: bool = True,
        codebook_dim: int | None = None,
        distance: str = "euclidean",
        ema_decay: float | None = 0.99,
        commitment_weight: float = 0.25,
        rotation_trick: bool = False,
        dead_code_threshold: int = 0,
        codebook_init: str = "data",
        seed: int = 0,
        eps: float = 1e-5,
    ):
        super().__init__(
            dim,
            codebook_size,
            depth,
            shared_codebook=shared_codebook,
            codebook_dim=codebook_dim,
            distance=distance,
            ema_decay=ema_decay,
            commitment_weight=commitment_weight,
            rotation_trick=rotation_trick,
            dead_code_threshold=dead_code_threshold,
            codebook_init=codebook_init,
            seed=seed,
            eps=eps,
        )

    @property
    def codebooks(self) -> torch.Tensor:
        """``(D, k, c)``: the codebook of each depth (the same one repeated when shared)."""
        if self.shared_codebook:
            return self.books[0].weight.unsqueeze(0).expand(self.depth, -1, -1)
        return torch.stack([book.weight for book in self.books])

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        return self._quantize(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., d) -> codes (..., D)`` (int64); never changes the codebooks."""
        return self._encode(x)

    def decode(self, codes: torch.Tensor, cumulative: bool = False) -> torch.Tensor:
        """``codes (..., D)`` -> the sum of their vectors ``(..., d)``, or partial sums ``(..., D, d)``."""
        self._check_codes(codes)
        vectors = self._code_vectors(codes)
        return self._project(vectors.cumsum(-2) if cumulative else vectors.sum(-2))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes (..., D) -> (..., D, d)``: each depth's code vector, not summed."""
        self._check_codes(codes)
        return self._project(self._code_vectors(codes))
