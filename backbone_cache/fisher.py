"""Batched, exact Fisher importance scores: the per-row reductions of the batch-1 loop, faster.

The batch-1 loop (`backbone_cache.importance`) backprops one example at a time, sums
`w.grad ** 2` over every target weight into full matrices F and then reduces them per row.
`fisher_scores` gives the same reductions from a few padded examples at a time: it sums the
examples' own losses, backprops once with every parameter frozen (no weight gradients), and
reads per-example quantities from hooks: each use's input (forward hook) and output gradient
(a tensor hook on the use's output).

For a linear use y = x W^T the per-example gradient is G_n = A_n^T B_n with A_n = dL_n/dy
[T, out] and B_n = x [T, in]; for an embedding use it is the same with A_n = one-hot(ids) [T, V]
and B_n = dL_n/dy [T, d]. A weight used several times (T5's tied embedding: encoder and decoder
lookups and the LM head) has the sum of its uses as gradient, i.e. A_n and B_n concatenated along
T, so the uses are combined before squaring, as in the batch-1 loop. With F = sum_n G_n * G_n:

- rows (`<linear>.rows`, sum_j F[i, j]): sum_n diag(A_n^T (B_n B_n^T) A_n), O(T^2 (in + out))
  per example without forming G_n (from G_n where that is cheaper: T > out * in / (out + in));
- columns (`<embedding>.columns`, sum_i F[i, j]): sum_n diag(B_n^T (A_n A_n^T) B_n); for
  one-hot rows A_n A_n^T is token equality, so no [T, V] matrix is formed;
- qkv (`<attention>.qkv`, sum_j F_q F_k F_v): the full F of q, k and v, from each G_n formed
  into one reused buffer (so it stays in cache) and squared into F (`addcmul_`), q, k and v of
  one input in one matmul; for very few tokens (T5's decoder) from one matmul over token pairs.

Requirements: eval mode (examples must not interact), losses that ignore padded positions (their
output gradients are then exactly zero), and every use of a target weight going through an
nn.Linear or nn.Embedding that holds it (a functional `F.linear(x, emb.weight)` is not seen).
An nn.Embedding subclass with its own forward is read only where that forward is the lookup times
a constant `embed_scale` (transformers' ScaledWordEmbedding: Gemma, BART); any other is refused.
A module applied to a tensor shared by the whole batch (BERT's position embeddings, T5's
relative attention bias) has no per-example gradient and is refused. Sums run in float32 (float64
for a float64 model; running row and column sums in float64): results equal the batch-1 loop to
float rounding. (bf16/fp16 factors are widened to float32 before their products, where the batch-1
loop squares bf16 gradients: the two agree to bf16 rounding. In float32, a batched forward may
flip a ReLU whose input is within rounding of zero, which moves a few scores by ~1e-4 relative.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from shared.families import ScoreTargets

QKV_NAMES = (("q", "k", "v"), ("query", "key", "value"))
PAIRS_MAX_TOKENS = 6  # below this, full F from token pairs (one matmul) beats forming each G_n


class NotPerExample(ValueError):
    """A scored weight has a use whose per-example gradient the hooks cannot read (the batch-1 loop can)."""


def default_targets(model: torch.nn.Module) -> ScoreTargets:
    """Columns of the input embeddings, rows of every other nn.Linear weight, qkv of every attention.

    An attention is a module with q/k/v (or query/key/value) nn.Linear children. A linear tied to
    the input embeddings (T5's LM head) is covered by the embeddings' columns. The keys are those
    `importance.row_scores` gave for a full Fisher dict, less the rows of embedding tables.
    """
    embeddings = model.get_input_embeddings()
    targets = ScoreTargets(rows=[], qkv=[], columns=[_module_name(model, embeddings)])
    seen = {id(embeddings.weight)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            targets.rows.append(name)
        for names in QKV_NAMES:
            if all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names):
                targets.qkv.append((name, *(f"{name}.{n}" for n in names)))
    return targets


def length_batches(lengths: Sequence[int], max_tokens: int = 2048, max_examples: int = 64) -> list[list[int]]:
    """Example indices grouped by length, longest first, with examples * longest <= max_tokens per group."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_examples and (len(batches[-1]) + 1) * int(lengths[batches[-1][0]]) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def fisher_scores(
    model: torch.nn.Module,
    batches: Iterable[Any],
    example_losses: Callable[[torch.nn.Module, Any], torch.Tensor],
    targets: ScoreTargets,
    quiet: bool = False,
    total: int | None = None,
) -> dict[str, torch.Tensor]:
    """Fisher scores of `targets` over all examples of `batches`, equal to the batch-1 loop's to float rounding.

    batches: a few examples each, in any form `example_losses(model, batch)` takes; it returns
    each example's own loss [N] (the loss the batch-1 loop differentiates), independent of padded
    positions and of the other examples. total: the number of examples (for the progress bar).
    Returns float32 CPU tensors keyed `<name>.rows`, `<name>.columns`, `<attention>.qkv`. Raises
    ValueError for a name that is no module of the right kind, a model in training mode, or a use
    that is not per example. Parameters' requires_grad flags are restored on return.
    """
    if model.training:
        raise ValueError("fisher_scores needs the model in eval mode (model.eval()): dropout would mix examples' gradients")
    weights, keys, jobs = _plan(model, targets)
    frozen = {p: p.requires_grad for p in model.parameters()}
    handles = [module.register_forward_hook(weight.hook(module)) for weight in weights.values() for module in weight.modules]
    seen = 0
    bar = tqdm(total=total, desc="fisher", unit="ex", disable=quiet, dynamic_ncols=True)
    try:
        for p in frozen:
            p.requires_grad_(False)
        for batch in batches:
            with torch.enable_grad():
                losses = example_losses(model, batch)
                if losses.dim() != 1:
                    raise ValueError(f"example_losses must return one loss per example, got shape {tuple(losses.shape)}")
                for weight in weights.values():
                    weight.start_backward(len(losses))
                if losses.requires_grad:
                    losses.sum().backward()
            for weight in weights.values():
                weight.finish_batch()
            jobs.run()
            seen += len(losses)
            bar.update(len(losses))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        for weight in weights.values():
            weight.segments.clear()
        jobs.pending.clear()
    if seen == 0:
        raise ValueError("fisher_scores got no examples")
    scores: dict[str, torch.Tensor] = {}
    for key, (kind, parts) in keys.items():
        if kind == "rows":
            scores[key] = parts[0].rows()
        elif kind == "columns":
            scores[key] = parts[0].columns()
        else:
            if kind == "fused":  # one fused q/k/v weight: its F cut into row chunks
                weight, chunks = parts
                parts = weight.full_matrix().chunk(chunks, 0)
            else:
                parts = [w.full_matrix() for w in parts]
            scores[key] = (parts[0] * parts[1] * parts[2]).sum(1)
    return {k: v.float().contiguous().cpu() for k, v in scores.items()}


class _FullJobs:
    """The batch's full-F work, run after its backward pass: F += sum_n (A_n^T B_n)^2.

    Weights whose uses read the same input tensor (q, k and v of one attention) share one
    concatenated F, so each example needs one matmul and one squared add for all of them."""

    def __init__(self):
        self.pending: list[tuple[_Weight, torch.Tensor, torch.Tensor]] = []
        self.fused: dict[tuple[int, ...], torch.Tensor] = {}
        self.buffers: dict[tuple, torch.Tensor] = {}

    def add(self, weight: _Weight, a: torch.Tensor, b: torch.Tensor) -> None:
        self.pending.append((weight, a, b))

    def run(self) -> None:
        groups: dict[tuple, list[tuple[_Weight, torch.Tensor, torch.Tensor]]] = {}
        for weight, a, b in self.pending:
            groups.setdefault((b.data_ptr(), tuple(b.shape), b.stride(), b.dtype, b.device), []).append((weight, a, b))
        self.pending = []
        for members in groups.values():
            b = members[0][2]
            full = self._fused(tuple(w for w, _, _ in members), b) if len(members) > 1 else None
            if full is not None:
                self._accumulate(full, torch.cat([a for _, a, _ in members], 2), b)
                continue
            for weight, a, b in members:
                if weight.full is None:
                    weight.full = torch.zeros(weight.shape, dtype=a.dtype, device=a.device)
                self._accumulate(weight.full, a, b)

    def _fused(self, weights: tuple[_Weight, ...], b: torch.Tensor) -> torch.Tensor | None:
        """The shared F of these weights (each weight's F a slice of it), made on first sight."""
        key = tuple(id(w) for w in weights)
        if key not in self.fused:
            if any(w.full is not None for w in weights):
                return None
            full = torch.zeros(sum(w.shape[0] for w in weights), b.shape[-1], dtype=b.dtype, device=b.device)
            start = 0
            for w in weights:
                w.full, start = full[start : start + w.shape[0]], start + w.shape[0]
            self.fused[key] = full
        return self.fused[key]

    def _accumulate(self, full: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Few tokens (T <= PAIRS_MAX_TOKENS, e.g. T5's decoder): one matmul over token pairs,
        sum_{t <= t'} (2 - [t = t']) (a_t * a_t') (b_t * b_t')^T. Otherwise each G_n is formed into
        one reused buffer (which stays in cache) and squared into F, over its tokens up to the last
        with a nonzero output gradient (padding excluded)."""
        tokens = a.shape[1]
        if tokens <= PAIRS_MAX_TOKENS:
            ti, tj = torch.triu_indices(tokens, tokens, device=a.device)
            weight = (2.0 - (ti == tj).to(b.dtype)).unsqueeze(-1)
            pa = (a[:, ti] * a[:, tj]).reshape(-1, full.shape[0])
            pb = (b[:, ti] * b[:, tj] * weight).reshape(-1, full.shape[1])
            full.addmm_(pa.T, pb)
            return
        key = (tuple(full.shape), a.dtype, a.device)
        g = self.buffers.get(key)
        if g is None:
            g = self.buffers[key] = torch.empty(full.shape, dtype=a.dtype, device=a.device)
        live = (a != 0).any(-1)  # padded (and unused) positions have a zero output gradient: skip them
        lengths = torch.where(live.any(1), tokens - live.flip(1).int().argmax(1), 0).tolist()
        for n, length in enumerate(lengths):
            if length:
                torch.mm(a[n, :length].T, b[n, :length], out=g)
                full.addcmul_(g, g)


class _Segment:
    """One use of a weight in one forward: the factors of its per-example gradient G_n = A_n^T B_n."""

    def __init__(self, module_name: str, embedding: bool, data: torch.Tensor, padding_idx: int | None = None,
                 scale: float = 1.0):
        self.module_name, self.embedding, self.data = module_name, embedding, data  # ids (embedding) or input x (linear)
        self.padding_idx, self.scale = padding_idx, scale  # scale: a scaled lookup's factor (dL/dW rows = scale * dL/dy)
        self.grad: torch.Tensor | None = None

    def factors(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [N, T, rows] or ids [N, T], B [N, T, cols])."""
        assert self.grad is not None
        if self.embedding:
            ids, grad = self.data.reshape(n, -1), self.grad.reshape(n, -1, self.grad.shape[-1])
            if self.padding_idx is not None:  # nn.Embedding gives its padding row no gradient
                grad = grad * (ids != self.padding_idx).unsqueeze(-1).to(grad.dtype)
            if self.scale != 1.0:
                grad = _wide(grad) * self.scale
            return ids, grad
        return self.grad.reshape(n, -1, self.grad.shape[-1]), self.data.reshape(n, -1, self.data.shape[-1])


class _Weight:
    """One target weight: its uses (modules sharing it), what to score, and the running sums."""

    def __init__(self, name: str, weight: torch.Tensor, modules: list[tuple[str, torch.nn.Module]], jobs: _FullJobs):
        self.name, self.shape, self.jobs = name, tuple(weight.shape), jobs
        self.modules = [m for _, m in modules]
        self.module_names = {id(m): n for n, m in modules}
        self.embedding_use = any(isinstance(m, torch.nn.Embedding) for m in self.modules)
        self.want_rows = self.want_columns = self.want_full = False
        self.segments: list[_Segment] = []
        self.pending = 0
        self.n = 0
        self.full: torch.Tensor | None = None
        self.row_sum: torch.Tensor | float = 0.0  # float64 tensors on the data's device once added to
        self.column_sum: torch.Tensor | float = 0.0

    def hook(self, module: torch.nn.Module) -> Callable:
        embedding, module_name = isinstance(module, torch.nn.Embedding), self.module_names[id(module)]

        def forward_hook(_module, inputs, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            replaced = not output.requires_grad
            if replaced:  # nothing upstream needs gradients: start the graph here
                output = output.detach().requires_grad_(True)
            segment = _Segment(module_name, embedding, inputs[0].detach(), getattr(module, "padding_idx", None),
                               _lookup_scale(module) if embedding else 1.0)
            self.segments.append(segment)

            def grad_hook(grad: torch.Tensor) -> None:
                segment.grad = grad.detach()
                self.pending -= 1
                if self.pending == 0:
                    self.reduce()

            output.register_hook(grad_hook)
            return output if replaced else None

        return forward_hook

    def start_backward(self, n: int) -> None:
        """Check that every use of this batch is per example, before the backward pass."""
        for segment in self.segments:
            if segment.data.dim() < (1 if segment.embedding else 2) or segment.data.shape[0] != n:
                raise NotPerExample(
                    f"{segment.module_name} is applied to a tensor of shape {tuple(segment.data.shape)}, not to each of the "
                    f"batch's {n} examples: its per-example gradients cannot be read from one backward pass"
                )
        self.n, self.pending = n, len(self.segments)

    def finish_batch(self) -> None:
        if self.segments:  # some uses got no gradient (not on the loss's path): they add zero
            self.reduce()

    def reduce(self) -> None:
        """Add this batch's contribution from the uses that got a gradient, then forget the batch."""
        used = [s for s in self.segments if s.grad is not None]
        self.segments, self.pending = [], 0
        if not used:
            return
        n = self.n
        parts = [s.factors(n) for s in used]
        dense = [(a, b) for (a, b), s in zip(parts, used) if not s.embedding]
        sparse = [(ids, b) for (ids, b), s in zip(parts, used) if s.embedding]
        tokens = sum(b.shape[1] for _, b in parts)
        rows, cols = self.shape
        if self.want_full or (not sparse and self.want_rows and tokens * (rows + cols) > rows * cols):
            self.jobs.add(self, _wide(_cat([x for x, _ in dense])), _wide(_cat([y for _, y in dense])))
            return
        b = _wide(_cat([b for _, b in parts]))
        if self.want_rows:  # dense uses only (checked in _plan)
            a = _wide(_cat([a for a, _ in dense]))
            self.row_sum = self.row_sum + (torch.bmm(torch.bmm(b, b.transpose(1, 2)), a) * a).sum((0, 1)).double()
        if self.want_columns:
            gram = self._gram([(x if s.embedding else _wide(x), s.embedding) for (x, _), s in zip(parts, used)], b.dtype)
            self.column_sum = self.column_sum + (torch.bmm(gram, b) * b).sum((0, 1)).double()

    @staticmethod
    def _gram(factors: list[tuple[torch.Tensor, bool]], dtype: torch.dtype) -> torch.Tensor:
        """A_n A_n^T [N, T, T] of the concatenated A factors; one-hot (ids) factors never form [T, V]."""
        blocks = []
        for x, x_ids in factors:
            row = []
            for y, y_ids in factors:
                if x_ids and y_ids:
                    row.append((x.unsqueeze(2) == y.unsqueeze(1)).to(dtype))
                elif x_ids:  # one-hot(x) . y^T = y[n, t', x[n, t]]
                    row.append(torch.gather(y, 2, x.unsqueeze(1).expand(-1, y.shape[1], -1)).transpose(1, 2).to(dtype))
                elif y_ids:
                    row.append(torch.gather(x, 2, y.unsqueeze(1).expand(-1, x.shape[1], -1)).to(dtype))
                else:
                    row.append(torch.bmm(x, y.transpose(1, 2)).to(dtype))
            blocks.append(torch.cat(row, 2))
        return torch.cat(blocks, 1)

    def full_matrix(self) -> torch.Tensor:
        return self.full.cpu() if self.full is not None else torch.zeros(self.shape)

    def rows(self) -> torch.Tensor:
        return self._total(self.row_sum, 1, self.shape[0])

    def columns(self) -> torch.Tensor:
        return self._total(self.column_sum, 0, self.shape[1])

    def _total(self, partial: torch.Tensor | float, dim: int, size: int) -> torch.Tensor:
        """The Gram-path sum plus the full-F path's reduction, float64 on the CPU."""
        total = torch.zeros(size, dtype=torch.float64)
        if isinstance(partial, torch.Tensor):
            total += partial.cpu()
        if self.full is not None:
            total += self.full.double().sum(dim).cpu()
        return total


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenated along the token dimension (no copy for one)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _lookup_scale(module: torch.nn.Embedding) -> float:
    """The constant a scaled embedding multiplies its lookups by, rounded to its weight's dtype as its forward does."""
    scale = getattr(module, "embed_scale", None)
    if type(module).forward is torch.nn.Embedding.forward or scale is None:
        return 1.0
    return float(torch.as_tensor(scale).to(module.weight.dtype))


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _resolve(model: torch.nn.Module, name: str, parent: str | None = None) -> tuple[str, torch.nn.Module]:
    """The module called `parent.name` or `name`; a ValueError with similar names if there is none."""
    modules = dict(model.named_modules())
    for candidate in ([f"{parent}.{name}"] if parent else []) + [name]:
        if candidate in modules:
            return candidate, modules[candidate]
    hint = sorted(n for n in modules if n and n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1])[:3]
    raise ValueError(f"no module named {name!r} in {type(model).__name__}" + (f" (e.g. {', '.join(hint)})" if hint else ""))


def _plan(model: torch.nn.Module, targets: ScoreTargets) -> tuple[dict[int, _Weight], dict[str, tuple[str, list]], _FullJobs]:
    """One _Weight per target weight (with every module that uses it), and what each output key reads."""
    users: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    holders: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, module))
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding) and isinstance(weight, torch.Tensor):
            if all(m is not module for _, m in users.get(id(weight), [])):
                users.setdefault(id(weight), []).append((mname, module))
    weights: dict[int, _Weight] = {}
    jobs = _FullJobs()

    def weight_of(name: str, parent: str | None, kinds: tuple[type, ...], role: str) -> _Weight:
        full_name, module = _resolve(model, name, parent)
        if not isinstance(module, kinds):
            raise ValueError(f"{role} target {full_name!r} is a {type(module).__name__}, not {' or '.join(k.__name__ for k in kinds)}")
        w = module.weight
        if w.dim() != 2:
            raise ValueError(f"{role} target {full_name!r} has a {w.dim()}-D weight")
        if id(w) not in weights:
            others = [n for n, m in holders.get(id(w), []) if not isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
            if others:
                raise NotPerExample(f"the weight of {full_name!r} is also held by {others[0]} ({type(dict(holders[id(w)])[others[0]]).__name__}), "
                                 "whose per-example gradient is unknown")
            weights[id(w)] = _Weight(full_name, w, users[id(w)], jobs)
        return weights[id(w)]

    keys: dict[str, tuple[str, list]] = {}
    for name in targets.rows:
        weight = weight_of(name, None, (torch.nn.Linear,), "rows")
        weight.want_rows = True
        keys[f"{name}.rows"] = ("rows", [weight])
    for name in targets.columns:
        weight = weight_of(name, None, (torch.nn.Embedding, torch.nn.Linear), "columns")
        weight.want_columns = True
        keys[f"{name}.columns"] = ("columns", [weight])
    for attention, *qkv in targets.qkv:
        _resolve(model, attention)
        if len(qkv) == 2:  # (attention, fused, chunks): one weight whose rows are q, k and v
            weight = weight_of(qkv[0], attention, (torch.nn.Linear,), "qkv")
            weight.want_full = True
            keys[f"{attention}.qkv"] = ("fused", [weight, int(qkv[1])])
            continue
        parts = [weight_of(name, attention, (torch.nn.Linear,), "qkv") for name in qkv]
        for weight in parts:
            weight.want_full = True
        keys[f"{attention}.qkv"] = ("qkv", parts)
    for weight in weights.values():
        custom = [m for m in weight.modules if isinstance(m, torch.nn.Embedding)
                  and type(m).forward is not torch.nn.Embedding.forward and getattr(m, "embed_scale", None) is None]
        if custom:
            raise NotPerExample(f"{weight.name} is used by {type(custom[0]).__name__}, an embedding with its own forward "
                                "(not a scaled lookup): its per-example gradient is unknown")
        if any(isinstance(m, torch.nn.Embedding) and m.scale_grad_by_freq for m in weight.modules):
            raise NotPerExample(f"{weight.name} is an embedding that scales its gradient by token frequency: not supported")
        if weight.embedding_use and (weight.want_rows or weight.want_full):
            raise NotPerExample(f"{weight.name} shares its weight with an embedding table (a tied weight): only its columns "
                             "can be scored; name the embedding in ScoreTargets.columns")
    return weights, keys, jobs
