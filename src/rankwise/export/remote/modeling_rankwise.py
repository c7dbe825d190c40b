# Modeling code of a rankwise remote-code export: self-contained, it needs torch and transformers only,
# never rankwise. Load the directory with
#
#     AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
#
# The model is the transformers class named at the end of this file with some linear layers replaced by
# the structured layers below, as listed in ``config.rankwise_structure``:
#
#     {"format_version": 1,
#      "layers": {module name: {"kind": ..., "shape": [out, in], "bias": bool, "spec": {...}}},
#      "attributes": {module name: {attribute: value}}}
#
# Each layer computes y = W' x + b with W' (out, in) stored in the compact form of its kind; the tensor
# names are those of the checkpoint (safetensors), one set per layer:
#
#   linear             y = W x + b                          weight (out, in), bias
#   lowrank            y = B (A x) + b                      A.weight (k, in), B.weight (out, k), B.bias
#   sparse             y = S x + b                          values (out, z), cols (out, z) int16/int32
#                      (spec pattern "unstructured")        or, for pattern "2:4", positions (out, in/8) uint8:
#                                                           2-bit offsets in each group of 4 columns
#   lowrank-sparse     y = B (A x) + S x + b                A.weight, B.weight, S.values, S.cols|S.positions, bias
#   monarch            y = P2 B2 P1 B1 x + b                B1 (nb, l r, p), B2 (l, s, nb r), bias
#   blockdiag-lowrank  y = blockdiag(blocks) x + B(A x) + b blocks (nb, s, p), A.weight, B.weight, bias
#   kronecker          y = (sum_i A_i (x) B_i) x + b        A (r, m1, n1), B (r, m2, n2), bias
#   shared-basis       y = basis (coef x) + b               coef (k, in), bias; basis (out, k) stored once,
#                                                           by the group's owner (spec group, owner)
#
# "attributes" sets plain attributes of modules after the swap (e.g. a per-layer head count of a
# pruned attention module). "linear" is a dense layer whose shape differs from the config's (per-block
# widths of a pruned model).
from __future__ import annotations

import warnings

import torch
from torch import nn


class StructuredLayer(nn.Module):
    """Base: the shape, and the optional bias (a parameter named ``bias``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class LowRank(nn.Module):
    """``y = B (A x) + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


class Sparse(StructuredLayer):
    """``y = S x + b``, ``z`` kept entries per row: CSR product for few rows, one dense product for many."""

    densify_rows = 32

    def __init__(self, in_features: int, out_features: int, bias: bool, pattern: str = "unstructured",
                 nnz_per_row: int | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.pattern = pattern
        z = in_features // 2 if pattern == "2:4" else int(nnz_per_row)
        self.nnz_per_row = z
        self.values = nn.Parameter(torch.zeros(out_features, z))
        if pattern == "2:4":
            self.register_buffer("positions", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8))
        else:
            idx = torch.int16 if in_features <= 32768 else torch.int32
            self.register_buffer("cols", torch.zeros(out_features, z, dtype=idx))

    def columns(self) -> torch.Tensor:
        """Column of every stored value (out, z), int64; 2:4: ``4 * group + offset``."""
        if self.pattern != "2:4":
            return self.cols.to(torch.int64)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64, device=self.positions.device)
        offsets = ((self.positions.to(torch.int64)[..., None] >> shifts) & 3).reshape(self.out_features, -1)
        offsets = offsets[:, : self.nnz_per_row]
        return 4 * (torch.arange(self.nnz_per_row, device=offsets.device) // 2) + offsets

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ S^T`` (bias excluded)."""
        col = self.columns()
        rows = x.numel() // self.in_features
        if rows >= self.densify_rows:
            S = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
            S.scatter_(1, col, self.values)
            return x @ S.T.to(x.dtype)
        cdt = self.values.dtype if self.values.dtype in (torch.float32, torch.float64) else torch.float32
        crow = torch.arange(0, self.out_features * self.nnz_per_row + 1, self.nnz_per_row, dtype=torch.int32,
                            device=col.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            S = torch.sparse_csr_tensor(crow, col.to(torch.int32).reshape(-1), self.values.to(cdt).reshape(-1),
                                        (self.out_features, self.in_features), check_invariants=False)
        x2 = x.reshape(-1, self.in_features)
        y = (S @ x2.to(cdt).T).T
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(self.matmul(x))


class LowRankSparse(StructuredLayer):
    """``y = B (A x) + S x + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, pattern: str = "unstructured",
                 nnz_per_row: int | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        self.S = Sparse(in_features, out_features, False, pattern, nnz_per_row)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(self.B(self.A(x)) + self.S.matmul(x))


class Monarch(StructuredLayer):
    """``y = P2 B2 P1 B1 x + b``: ``x`` in ``nb`` input blocks of ``p``, two batched products."""

    def __init__(self, in_features: int, out_features: int, bias: bool, in_blocks: int, out_blocks: int,
                 rank: int = 1) -> None:
        super().__init__(in_features, out_features, bias)
        self.nb, self.l, self.r = int(in_blocks), int(out_blocks), int(rank)
        p, s = in_features // self.nb, out_features // self.l
        self.B1 = nn.Parameter(torch.zeros(self.nb, self.l * self.r, p))
        self.B2 = nn.Parameter(torch.zeros(self.l, s, self.nb * self.r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, r = self.nb, self.l, self.r
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        N = x2.shape[0]
        z = torch.bmm(x2.reshape(N, b, -1).transpose(0, 1), self.B1.transpose(1, 2))     # (b, N, l r)
        z = z.reshape(b, N, l, r).permute(2, 1, 0, 3).reshape(l, N, b * r)              # P1
        y = torch.bmm(z, self.B2.transpose(1, 2))                                         # (l, N, s)
        return self._add_bias(y.permute(1, 2, 0).reshape(*lead, self.out_features))       # P2


class BlockDiagLowRank(StructuredLayer):
    """``y = blockdiag(blocks) x + B (A x) + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, nblocks: int, rank: int) -> None:
        super().__init__(in_features, out_features, bias)
        nb = int(nblocks)
        self.blocks = nn.Parameter(torch.zeros(nb, out_features // nb, in_features // nb))
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, p = self.blocks.shape
        x2 = x.reshape(-1, self.in_features)
        N = x2.shape[0]
        y = self.B(self.A(x2))
        bd = torch.bmm(x2.reshape(N, b, p).transpose(0, 1), self.blocks.transpose(1, 2))  # (b, N, s)
        y = y.reshape(N, b, s) + bd.transpose(0, 1)
        return self._add_bias(y.reshape(*x.shape[:-1], self.out_features))


class Kronecker(StructuredLayer):
    """``y = (sum_i A_i (x) B_i) x + b``: ``(A (x) B) x = vec(A X B^T)`` with ``X`` = ``x`` as (n1, n2)
    row-major, in the cheaper order; the factors multiplied out first when that is cheaper (many rows)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, m1: int, n1: int, terms: int) -> None:
        super().__init__(in_features, out_features, bias)
        m1, n1, r = int(m1), int(n1), int(terms)
        self.A = nn.Parameter(torch.zeros(r, m1, n1))
        self.B = nn.Parameter(torch.zeros(r, out_features // m1, in_features // n1))

    def dense(self) -> torch.Tensor:
        r, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        return torch.einsum("iac,itd->atcd", self.A, self.B).reshape(m1 * m2, n1 * n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, m1, n1 = self.A.shape
        _, m2, n2 = self.B.shape
        m, n = self.out_features, self.in_features
        x2 = x.reshape(-1, n)
        N = x2.shape[0]
        b_first = m2 * n + m * n1 <= m1 * n + m * n2
        vec = r * (m2 * n + m * n1 if b_first else m1 * n + m * n2)
        if r * m * n + N * m * n < N * vec:
            y = x2 @ self.dense().T
        elif b_first:
            Z = x2.reshape(N * n1, n2) @ self.B.permute(2, 0, 1).reshape(n2, r * m2)
            Z = Z.reshape(N, n1, r, m2).permute(0, 2, 1, 3).reshape(N, r * n1, m2)
            y = torch.matmul(self.A.permute(1, 0, 2).reshape(m1, r * n1), Z)
        else:
            Z = torch.matmul(self.A.reshape(r * m1, n1), x2.reshape(N, n1, n2))
            Z = Z.reshape(N, r, m1, n2).permute(0, 2, 1, 3).reshape(N, m1, r * n2)
            y = torch.matmul(Z, self.B.permute(0, 2, 1).reshape(r * n2, m2))
        return self._add_bias(y.reshape(*x.shape[:-1], m))


class SharedBasis(StructuredLayer):
    """``y = basis (coef x) + b``; the basis is a parameter of the group's owner only, which every member
    reads (the checkpoint stores it once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, group: str = "",
                 owner: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.coef = nn.Parameter(torch.zeros(rank, in_features))
        self.group, self.owner = str(group), bool(owner)
        if self.owner:
            self.basis = nn.Parameter(torch.zeros(out_features, rank))
        self._owner: list[SharedBasis] = [self]  # a list: the owner is not registered twice as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias((x @ self.coef.T) @ self._owner[0].basis.T)


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


#: kind -> constructor(in_features, out_features, bias, **spec)
KINDS = {
    "linear": _linear,
    "lowrank": LowRank,
    "sparse": Sparse,
    "lowrank-sparse": LowRankSparse,
    "monarch": Monarch,
    "blockdiag-lowrank": BlockDiagLowRank,
    "kronecker": Kronecker,
    "shared-basis": SharedBasis,
}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def structurize(model: nn.Module, table: dict) -> nn.Module:
    """Swap in the layers of ``table["layers"]`` (empty; the checkpoint fills them) and set
    ``table["attributes"]``."""
    if int(table.get("format_version", 1)) > 1:
        raise ValueError(f"rankwise_structure format_version {table.get('format_version')} is newer than this "
                         "modeling file reads (1)")
    owners: dict[str, SharedBasis] = {}
    members: list[SharedBasis] = []
    for name, desc in table.get("layers", {}).items():
        kind = desc["kind"]
        if kind not in KINDS:
            raise ValueError(f"layer {name}: unknown kind {kind!r}; this modeling file reads {sorted(KINDS)}")
        out_f, in_f = (int(v) for v in desc["shape"])
        layer = KINDS[kind](in_f, out_f, bool(desc.get("bias", False)), **dict(desc.get("spec") or {}))
        if isinstance(layer, SharedBasis) and layer.owner:
            owners[layer.group] = layer
        elif isinstance(layer, SharedBasis):
            members.append(layer)
        _set_module(model, name, layer)
    for layer in members:
        if layer.group not in owners:
            raise ValueError(f"shared-basis group {layer.group!r} has no owner in rankwise_structure")
        layer._owner = [owners[layer.group]]
    for name, attrs in table.get("attributes", {}).items():
        mod = model.get_submodule(name) if name else model
        for key, value in attrs.items():
            setattr(mod, key, value)
    return model


# ---- the model classes of this export (written by rankwise below) ----
