"""A sparse matrix that multiplies torch tensors fast on both devices.

On the CPU the matrices are scipy CSR (float32 values, int32 indices: construction, slicing and the preconditioner
setup use scipy), and the products go through a torch CSR view of the same arrays: with int32 indices torch's
kernel uses every thread: on 2 cores, a 58 M non-zero matrix times 2 columns takes 37 ms against scipy's 144 ms
(single-threaded), times 1 column 28 ms against 45 ms. With int64 indices torch is slower (107 ms). With one
thread and one column scipy is 15 % faster and is used. On CUDA the matrices are torch CSR tensors. Callers see one
interface.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch


def _torch_view(mat: sp.csr_matrix) -> torch.Tensor | None:
    """A torch CSR tensor sharing ``mat``'s arrays (int32 indices), or None when they do not fit in int32."""
    if mat.nnz >= 2**31 - 1:
        return None
    indptr = torch.from_numpy(mat.indptr.astype(np.int32, copy=False))
    indices = torch.from_numpy(mat.indices.astype(np.int32, copy=False))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": a note for developers, not for users
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(indptr, indices, torch.from_numpy(mat.data), mat.shape,
                                       check_invariants=False)


class SparseMatrix:
    """A [rows, cols] float32 sparse matrix built from COO triplets (duplicates are summed).

    Products take and return torch tensors on ``device``; the transpose is kept explicitly (CSR both ways).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int],
                 device: torch.device, *, symmetric: bool = False):
        """``symmetric``: the triplets describe a symmetric matrix, so the transpose is the matrix itself (kept once)."""
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = torch.device(device)
        self._views: dict[bool, torch.Tensor | None] = {}  # CPU: torch CSR views for the products, made on first use
        if self.device.type == "cpu":
            mat = sp.csr_matrix(
                (vals.detach().cpu().numpy().astype(np.float32), (rows.cpu().numpy(), cols.cpu().numpy())),
                shape=self.shape,
            )
            mat.sum_duplicates()
            self._fwd, self._adj = mat, (mat if symmetric else mat.T.tocsr())
            self.nnz = int(mat.nnz)
        else:
            coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals.float(), self.shape).coalesce()
            self._fwd = coo.to_sparse_csr()
            self._adj = self._fwd if symmetric else coo.t().coalesce().to_sparse_csr()
            self.nnz = int(coo.values().numel())

    @classmethod
    def from_scipy(cls, mat: sp.csr_matrix, device: torch.device, *, symmetric: bool = False) -> "SparseMatrix":
        """A matrix from a scipy CSR matrix (kept as it is, float32, on the CPU; copied to torch CSR on CUDA)."""
        mat = mat.tocsr().astype(np.float32, copy=False)
        if not mat.has_sorted_indices:
            mat.sort_indices()
        self = cls.__new__(cls)
        self.shape = (int(mat.shape[0]), int(mat.shape[1]))
        self.device = torch.device(device)
        self._views = {}
        self.nnz = int(mat.nnz)
        if self.device.type == "cpu":
            self._fwd = mat
            self._adj = mat if symmetric else mat.T.tocsr()
        else:
            self._fwd = torch.sparse_csr_tensor(torch.as_tensor(mat.indptr, dtype=torch.long),
                                                torch.as_tensor(mat.indices, dtype=torch.long),
                                                torch.as_tensor(mat.data), self.shape, device=self.device)
            self._adj = self._fwd if symmetric else self._fwd.t().to_sparse_csr()
        return self

    @classmethod
    def from_csr(cls, indptr: torch.Tensor, indices: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int],
                 device: torch.device) -> "SparseMatrix":
        """A matrix from CSR arrays (torch tensors; rows in order, no duplicate columns within a row)."""
        if torch.device(device).type == "cpu":
            mat = sp.csr_matrix((vals.numpy().astype(np.float32, copy=False),
                                 indices.numpy().astype(np.int32, copy=False), indptr.numpy()), shape=shape)
            return cls.from_scipy(mat, device)
        self = cls.__new__(cls)
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = torch.device(device)
        self._views = {}
        self._fwd = torch.sparse_csr_tensor(indptr.long(), indices.long(), vals.float(), self.shape)
        self._adj = self._fwd.t().to_sparse_csr()
        self.nnz = int(vals.numel())
        return self

    def _mul(self, transpose: bool, x: torch.Tensor) -> torch.Tensor:
        mat = self._adj if transpose else self._fwd
        if self.device.type != "cpu":
            return mat @ x
        if x.shape[-1] > 1 or torch.get_num_threads() > 1:
            if transpose not in self._views:
                self._views[transpose] = _torch_view(mat)
            if self._views[transpose] is not None:
                return self._views[transpose] @ x.detach().float().contiguous()
        return torch.from_numpy(np.ascontiguousarray(mat @ x.detach().numpy()))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for x [cols, V] -> [rows, V]."""
        return self._mul(False, x)

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for y [rows, V] -> [cols, V]."""
        return self._mul(True, y)

    def to_scipy(self) -> sp.csr_matrix:
        """The matrix as a scipy CSR matrix (a view on the CPU; copied from the GPU)."""
        if self.device.type == "cpu":
            return self._fwd
        return sp.csr_matrix((self._fwd.values().cpu().numpy(), self._fwd.col_indices().cpu().numpy(),
                              self._fwd.crow_indices().cpu().numpy()), shape=self.shape)

    def column_sq_sums(self) -> torch.Tensor:
        """[cols] sum over rows of A^2 (the diagonal of A^T A)."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.asarray(self._fwd.multiply(self._fwd).sum(axis=0)).ravel().astype(np.float32))
        vals = self._fwd.values()
        return torch.zeros(self.shape[1], device=self.device).index_add_(0, self._fwd.col_indices(), vals * vals)

    def diagonal(self) -> torch.Tensor:
        """[min(rows, cols)] the main diagonal."""
        if self.device.type == "cpu":
            return torch.from_numpy(self._fwd.diagonal().astype(np.float32))
        coo = self._fwd.to_sparse_coo()
        on = coo.indices()[0] == coo.indices()[1]
        return torch.zeros(min(self.shape), device=self.device).index_add_(0, coo.indices()[0][on], coo.values()[on])
