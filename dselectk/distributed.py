"""Synchronous data-parallel training over MPI: what ``dk.fit(..., comm=MPI.COMM_WORLD)`` does.

Launch one process per rank (``mpirun -n 4 python train.py``), build the same model on every rank
(same constructor arguments, seed included) and call ``fit`` with the communicator::

    from mpi4py import MPI
    model = dk.MMoE(100, n_tasks=2, gate=dk.gates.DSelectK(k=2), seed=0)
    dk.fit(model, X, Y, batch_size=1024, comm=MPI.COMM_WORLD)            # shard="rows"
    if MPI.COMM_WORLD.rank == 0:
        dk.save(model, "model.npz")

Each rank computes its share of every batch; after the backward, one in-place ``Allreduce`` of the
contiguous gradient slab (``model.slab.grad``) sums the shares, the embedding tables' sparse
gradients (the distinct ids of each share and their summed rows) are allgathered and merged in
rank order, and every rank takes the same optimizer step, so the parameters stay identical (a
checksum compares them every ``checksum_every`` steps and at the end: ParameterDriftError).

Sharding (``shard=``):

* ``"rows"`` (default): every rank passes the same X, Y (typically one memory map, so that each rank
  reads only its rows). Each global batch of ``batch_size`` rows -- shuffled with the common seed,
  as a single process would -- is cut into ``size`` contiguous parts (np.array_split); rank r trains
  on part r. The run is the single-process run of the same batch_size, to rounding.
* ``"given"``: each rank passes its own shard (any sizes; its own validation data too). There are
  ceil(N / batch_size) steps per epoch (N: all ranks' rows); each rank cuts its shuffled rows into
  that many nearly equal parts, one per step. Batch sources (generators, Sequences) are per rank by
  nature and go with ``"given"``: step i joins the ranks' batch i, and the sources must give the
  same number of batches.

Global-batch semantics. ``batch_size`` is the global batch: the result does not depend on the
number of ranks. Every loss of dselectk is a batch mean (sum_b w_b l_b / B, sample weights
included) and the DSelect-k per-example regularizers are batch means too; the static gates'
regularizers do not depend on the batch. Each rank therefore scales its gradient by rho = (its
rows) / (the global batch's rows) before the sum: the sum of the shares' gradients is the
gradient of the global batch mean, and the static regularizers' gradients, present on every
rank with weights rho summing to 1, count once. The random draws of training follow the global
batch, not the rank: dropout masks hash (seed, step, the row's position in the global batch)
and the noisy Top-k gate draws the global batch's noise and takes its rows, so 1 rank and 4 give
the same masks and noise (seeds derived per rank would instead make the run depend on the number of
ranks; with shard="given" only the shuffling is per rank, drawn from the common generator). A rank whose share of a batch is empty (a last batch with fewer rows
than ranks) runs one stand-in row with weight 0, so that its layers' random counters stay in step.

What is reduced: the training losses of the History (global batch means), the validation loss
and metrics (the rows of all ranks are gathered on rank 0 in rank order and the metrics computed
there once, so the AUC is the exact AUC of all rows, not an average of per-rank AUCs), the gate
diagnostics (expert weights and selected counts of per-example gates averaged over the global
batch; S(Z) binary only when it is on every rank), the expert FLOP counters (sums; each rank
decides on its share whether experts run on their rows only, so the executed count may differ
from one process's, which decides on the whole batch). Decisions are
taken once: callbacks see the same reduced logs on every rank, and rank 0's ``stop_training``
after each epoch is broadcast (EarlyStopping); divergence (a NaN loss on any rank) stops every
rank. Only rank 0 prints (``verbose`` is 0 elsewhere) and runs the callbacks with ``root_only``
(ModelCheckpoint, the progress bar): it alone writes files. At the start, rank 0's parameters,
optimizer state and random state are broadcast.

Failures. Before training the ranks compare the model (class, config, parameter layout), the fit
settings and the data's shapes (shard="rows": also the row count and a fingerprint of sampled
rows): a mismatch raises ValueError on every rank, naming the ranks and what differs. An
exception on one rank (bad data in its shard, a NaN, a callback) is held until the next point
where the ranks meet (the step's gradient sum, or the end of an epoch's phase) and then raised on
every rank: the failing rank raises its own exception, the others the same built-in exception
type (else :class:`RankError`) with that rank's message, so no rank is left waiting. A process
that dies (killed, out of memory, a crash in C) cannot say so: Open MPI's ``mpirun`` notices the
lost process and terminates the whole job (exit status non-zero), and the run continues from its
last ModelCheckpoint with ``fit(..., resume_from=path, comm=comm)`` (every rank reads the file:
keep it on a shared file system or copy it to every node). Outside fit, run scripts as ``python
-m mpi4py train.py`` so that an exception your own code raises on one rank aborts the job
instead of leaving the others waiting in a collective.

Costs per step: one Allreduce of the slab (4 bytes per float32 parameter), overlapped with one of
2 + 2T numbers (losses, failure flag, S(Z) flags); for embedding tables one small Allgather of the
id counts and two Allgatherv (ids, rows): each rank receives every rank's rows, which grows with
the number of ranks (a sparse reduce-scatter would not; not done here). A fit with a callback of
its own that overrides on_batch_end adds one small collective per step (the ranks must agree
before the next step whether it stopped training).
"""
from __future__ import annotations

import builtins
import contextlib
import time
import zlib

import numpy as np

__all__ = ["RankError", "ParameterDriftError", "SHARDS", "mpi", "make_sync", "Local", "DataParallel"]

SHARDS = ("rows", "given")


def mpi():
    """mpi4py's MPI module (imported on first use)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as exc:  # not installed, or no MPI library to load
        raise ImportError(f"data-parallel training needs mpi4py and an MPI library ({type(exc).__name__}: {exc}): "
                          "pip install 'dselectk[mpi]', with Open MPI from the system packages (e.g. apt-get "
                          "install openmpi-bin libopenmpi-dev)") from None
    return MPI


class RankError(RuntimeError):
    """Another rank of a data-parallel fit raised an exception that is not a built-in type: every rank
    stops; this one says which rank and what it said."""


class ParameterDriftError(RuntimeError):
    """The ranks' parameters are no longer identical (a bug, or a non-deterministic reduction)."""


def make_sync(comm, shard="rows", checksum_every=100):
    """:class:`Local` for ``comm=None``, else a :class:`DataParallel` over the mpi4py communicator."""
    if comm is None:
        return LOCAL
    MPI = mpi()
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), got {type(comm).__name__}")
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    if checksum_every is not None and (isinstance(checksum_every, bool) or not isinstance(checksum_every, int)
                                       or checksum_every < 1):
        raise ValueError(f"checksum_every must be a positive int (steps) or None (at the end only), got "
                         f"{checksum_every!r}")
    return DataParallel(comm, shard, checksum_every)


def _binary_flags(model):
    """Per gate: True (S(Z) binary at the last forward), False, or None (not a DSelect-k gate)."""
    return [g.is_binary() if hasattr(g, "is_binary") else None for g in model.gates]


class Local:
    """The single-process twin of :class:`DataParallel`: each of fit's calls does the local work only."""

    rank, size, is_root, shard = 0, 1, True, None

    def all_ranks(self, what):
        return contextlib.nullcontext()

    def local(self, fn, *args):
        return fn(*args)

    call = local

    def start(self, model, train, val, signature):
        pass

    def steps(self, data, batch_size):
        return data.steps(batch_size)

    def batches(self, data, batch_size, rng):
        return data.batches(batch_size, rng)

    def eval_batches(self, data, batch_size):
        return data.batches(batch_size)

    def global_rows(self, batch, model):
        return contextlib.nullcontext()

    def sum_gradients(self, model, batch, local):
        return local

    def binary(self, model):
        return _binary_flags(model)

    def batch_mean(self, *values):
        return values

    def sum_counters(self, model):
        pass

    def epoch_logs(self):
        return {}

    def combine_evaluation(self, part, compute):
        return compute(part)

    def stop_after_batch(self, stop):
        return stop

    def root_decides(self, value):
        return value

    def check_parameters(self, model, step, final=False):
        pass


LOCAL = Local()


def _exception_of(name, message, rank, size):
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or cls in (KeyError,):
        return RankError(f"rank {rank} of {size} raised {name}: {message}")
    try:
        return cls(f"rank {rank} of {size}: {message}")
    except Exception:  # a built-in whose constructor wants other arguments
        return RankError(f"rank {rank} of {size} raised {name}: {message}")


def _checksum(model):
    """CRC-32 of the parameter slab and the embedding tables, bit for bit."""
    crc = zlib.crc32(np.ascontiguousarray(model.slab.data))
    for t in model.embedding_tables():
        crc = zlib.crc32(np.ascontiguousarray(t), crc)
    return crc


def _parts(n, parts):
    """The sizes of np.array_split(range(n), parts)."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


class DataParallel:
    """fit's side of a data-parallel run over the communicator ``comm`` (see the module docstring)."""

    def __init__(self, comm, shard="rows", checksum_every=100):
        self.MPI = mpi()
        self.comm, self.shard, self.checksum_every = comm, shard, checksum_every
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self._pending = None  # an exception of this rank, held until the ranks next meet
        self._rho = 1.0  # this rank's share of the last step's global batch
        self._binary = None
        self._vote_after_batch = False
        self._given_rows = None  # shard="given", arrays: every rank's row count
        self._flops_carry = None
        self._comm_seconds = 0.0

    # --- failures: held, then raised on every rank ------------------------------------------------
    def _hold(self, exc):
        if self._pending is None:
            self._pending = exc

    def _raise_if_any(self, info=None):
        """Collective: every rank says whether it holds an exception; if one does, every rank raises
        (the lowest failing rank's exception: its own there, a rebuilt one elsewhere)."""
        mine = None if self._pending is None else (type(self._pending).__name__, str(self._pending))
        everyone = self.comm.allgather(mine if info is None else (mine, info))
        failures = [(r, f if info is None else f[0]) for r, f in enumerate(everyone)]
        failures = [(r, f) for r, f in failures if f is not None]
        if not failures:
            return everyone
        own, self._pending = self._pending, None
        first, (name, message) = failures[0]
        if first == self.rank:
            own.add_note(f"(raised on rank {self.rank} of {self.size}; every rank of the data-parallel fit stopped)")
            raise own
        raise _exception_of(name, message, first, self.size) from own

    @contextlib.contextmanager
    def all_ranks(self, what):
        """Runs a block of local work; an exception in it (or one held from before) is raised on
        every rank at its end. The block must not itself call collectives."""
        try:
            yield
        except Exception as exc:
            self._hold(exc)
        self._raise_if_any()

    def local(self, fn, *args):
        """fn(*args), its exception held (None returned) so that this rank still joins the next
        collective; skipped when an exception is already held."""
        if self._pending is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:
            self._hold(exc)
            return None

    call = local

    # --- before training -------------------------------------------------------------------------
    def start(self, model, train, val, signature):
        """Collective: the ranks agree on the model, settings and data (ValueError on every rank
        naming what differs), then take rank 0's parameters, optimizer state and random state."""
        from . import inputs as I

        try:
            signature = dict(signature, **self._data_signature(train, "X"))
            if val is not None:
                signature.update(self._data_signature(val, "validation_data"))
        except Exception as exc:
            self._hold(exc)
        everyone = [s for _, s in self._raise_if_any(signature)]
        differ = []
        for key in everyone[0]:
            if key.startswith("~"):  # may differ: each rank's own row count
                continue
            values = [s.get(key) for s in everyone]
            if any(v != values[0] for v in values):
                shown = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values) if v != values[0])
                differ.append(f"{key} (rank 0: {values[0]}; {shown})")
        if differ:
            raise ValueError("fit(comm=...): the ranks must train the same model with the same settings on data of "
                             "the same shapes, but they differ in " + "; ".join(differ))
        if self.shard == "given" and isinstance(train, I.ArrayData):
            self._given_rows = [s["~X rows"] for s in everyone]
            empty = [r for r, n in enumerate(self._given_rows) if n == 0]
            if empty:
                raise ValueError(f"fit(comm=..., shard='given'): ranks {empty} have no training rows")
        self._broadcast_model(model)
        self._vote_after_batch = any(type(cb).__module__ != "dselectk.callbacks" and _overrides(cb, "on_batch_end")
                                     for cb in getattr(model, "_callbacks", []))
        self._vote_after_batch = bool(self.comm.allreduce(int(self._vote_after_batch), op=self.MPI.MAX))
        if not self.is_root and hasattr(model, "flops"):
            model.flops = {k: 0 for k in model.flops}  # rank 0 carries the counts of earlier runs
        if hasattr(model, "flops"):
            self._flops_carry = dict(model.flops)

    def _data_signature(self, data, name):
        from . import inputs as I

        sig = {}
        if isinstance(data, I.BatchStream):
            if self.shard == "rows":
                raise ValueError(f"fit(comm=..., shard='rows') splits the rows of one {name} that every rank holds "
                                 "(arrays, memory maps, DataFrames); a batch source is read per rank: give each rank "
                                 "its own source with shard='given'")
            sig[f"{name} batches per epoch"] = data.steps()
            return sig
        sig[f"{name} row shape"] = _describe(data.X)
        sig[f"{name} targets"] = None if data.Y is None else [(a.shape[1:], str(a.dtype)) for a in data.Y]
        sig[f"{name} sample weights"] = None if data.W is None else [w is not None for w in data.W]
        if self.shard == "rows":
            sig[f"{name} rows"] = data.n_examples
            sig[f"{name} fingerprint"] = _fingerprint(data)
        elif name == "X":
            sig["~X rows"] = data.n_examples
        return sig

    def _broadcast_model(self, model):
        """Rank 0's parameters, tables, optimizer states and random state, on every rank."""
        from .checkpoint import SPARSE_STATE, _random_state

        self.comm.Bcast(model.slab.data, root=0)
        for t in model.embedding_tables():
            self.comm.Bcast(t, root=0)
        if model.optimizer is not None:
            state = self.comm.bcast(model.optimizer.state_dict() if self.is_root else None, root=0)
            if not self.is_root:
                model.optimizer.load_state_dict(state)
        sparse = model.sparse_optimizer
        if sparse is not None:
            scalars, lists = SPARSE_STATE[sparse.name]
            for k in scalars:
                setattr(sparse, k, self.comm.bcast(getattr(sparse, k), root=0))
            for k in lists:
                for a in getattr(sparse, k):
                    self.comm.Bcast(a, root=0)
        random = _random_state(model)
        states = self.comm.bcast([obj.bit_generator.state if isinstance(obj, np.random.Generator) else obj.step
                                  for _, obj in random], root=0)
        for (_, obj), state in zip(random, states):
            if isinstance(obj, np.random.Generator):
                obj.bit_generator.state = state
            else:
                obj.step = state

    # --- batches -------------------------------------------------------------------------------
    def steps(self, data, batch_size):
        if self._given_rows is not None:
            return -(-sum(self._given_rows) // batch_size)
        return data.steps(batch_size)

    def batches(self, data, batch_size, rng):
        """This rank's share of each global batch of the epoch (see the module docstring)."""
        from . import inputs as I

        if isinstance(data, I.BatchStream):
            yield from self._stream_batches(data, rng)
        elif self.shard == "rows":
            order = np.arange(data.n_examples) if rng is None else rng.permutation(data.n_examples)
            for start in range(0, data.n_examples, batch_size):
                idx = order[start:start + batch_size]
                sizes = _parts(idx.size, self.size)
                offset = sum(sizes[:self.rank])
                yield self._share(data, idx[offset:offset + sizes[self.rank]], idx, offset)
        else:
            steps = self.steps(data, batch_size)
            # a per-rank order drawn from the common generator: resumable from rank 0's checkpoint
            key = None if rng is None else int(rng.integers(2**63))
            n = data.n_examples
            order = np.arange(n) if key is None else np.random.default_rng(
                np.random.SeedSequence(key, spawn_key=(self.rank,))).permutation(n)
            shares = [_parts(rows, steps) for rows in self._given_rows]
            starts = np.cumsum([0] + shares[self.rank])
            for i in range(steps):
                sizes = [s[i] for s in shares]
                offset = sum(sizes[:self.rank])
                part = order[starts[i]:starts[i + 1]]
                yield self._share(data, part, order[:1], offset, sum(sizes))

    def _share(self, data, part, whole, offset, global_size=None):
        global_size = whole.size if global_size is None else global_size
        if part.size:
            return data.take(part, offset, global_size)
        return data.take(whole[:1], 0, global_size)._replace(size=0)  # a stand-in row, weight 0

    def _stream_batches(self, data, rng):
        """Step i joins the ranks' batch i; the sources must run out together."""
        it = iter(data.batches(None, rng))
        while True:
            batch, status = None, 0
            try:
                batch = next(it)
                status = batch.size
            except StopIteration:
                status = -1
            except Exception as exc:
                self._hold(exc)
            sizes = self._raise_if_any(status)
            sizes = [s[1] for s in sizes]
            if -1 in sizes:
                if all(s == -1 for s in sizes):
                    return
                ended = [r for r, s in enumerate(sizes) if s == -1]
                raise ValueError(f"fit(comm=..., shard='given'): the ranks' batch sources gave different numbers of "
                                 f"batches: ranks {ended} ran out while the others had more")
            yield batch._replace(offset=sum(sizes[:self.rank]), global_size=sum(sizes))

    def eval_batches(self, data, batch_size):
        """This rank's rows of the evaluation data: shard="rows" a contiguous block (so that rank
        order is row order), "given" all of its own."""
        from . import inputs as I

        if isinstance(data, I.BatchStream) and self.shard == "rows":
            raise ValueError("evaluate(comm=..., shard='rows') splits the rows of one X that every rank holds; a batch "
                             "source is read per rank: give each rank its own with shard='given'")
        if self.shard == "given":
            yield from data.batches(batch_size)
            return
        sizes = _parts(data.n_examples, self.size)
        first = sum(sizes[:self.rank])
        for start in range(first, first + sizes[self.rank], batch_size):
            yield data.take(slice(start, min(start + batch_size, first + sizes[self.rank])))

    @contextlib.contextmanager
    def global_rows(self, batch, model):
        """The rows' places in the global batch, for the layers' random draws; a stand-in row
        (an empty share) is not counted in the FLOP counters."""
        from .layers import global_rows

        counted = dict(model.flops) if batch.size == 0 and hasattr(model, "flops") else None
        rows = np.zeros(1, np.int64) if batch.size == 0 else batch.offset + np.arange(batch.size, dtype=np.int64)
        with global_rows(rows, batch.global_size):
            yield
        if counted is not None:
            model.flops = counted

    # --- the step ------------------------------------------------------------------------------
    def sum_gradients(self, model, batch, local):
        """Collective: scales this rank's gradients by rho = its rows / the global batch's rows and
        sums them over the ranks (one Allreduce of the slab, the losses and flags beside it; the
        tables' sparse gradients gathered and merged). Returns the global (total, per-task losses);
        an exception held on any rank is raised on every rank."""
        MPI, T = self.MPI, model.n_tasks
        rho = batch.size / batch.rows_in_step
        gates = len(model.gates)
        trailer = np.zeros(2 + T + gates)  # failed ranks, rho * total, rho * per-task, gates not binary
        if self._pending is not None:
            trailer[0] = 1
        else:
            total, per_task = local
            if rho != 1:
                np.multiply(model.slab.grad, rho, out=model.slab.grad, casting="unsafe")
            trailer[1] = rho * total
            trailer[2:2 + T] = rho * np.asarray(per_task, np.float64)
            flags = _binary_flags(model)
            trailer[2 + T:] = [0 if (f is None or f or batch.size == 0) else 1 for f in flags]
        t0 = time.perf_counter()
        request = self.comm.Iallreduce(MPI.IN_PLACE, trailer, op=MPI.SUM)
        self.comm.Allreduce(MPI.IN_PLACE, model.slab.grad, op=MPI.SUM)
        request.Wait()
        self._comm_seconds += time.perf_counter() - t0
        if trailer[0] > 0:
            self._raise_if_any()
        self._rho = rho
        self._binary = [None if f is None else bool(trailer[2 + T + t] == 0)
                        for t, f in enumerate(_binary_flags(model))]
        if model.input_layer is not None:
            t0 = time.perf_counter()
            self._sum_sparse(model.input_layer.tables, rho)
            self._comm_seconds += time.perf_counter() - t0
        return float(trailer[1]), [float(v) for v in trailer[2:2 + T]]

    def epoch_logs(self):
        """Collective: {"comm_time": the seconds rank 0 spent in the steps' gradient sums this
        epoch} (waiting for slower ranks included)."""
        seconds, self._comm_seconds = self._comm_seconds, 0.0
        return {"comm_time": self.comm.bcast(seconds, root=0)}

    def _sum_sparse(self, tables, rho):
        """Every rank's (ids, rows) of each table's sparse gradient, gathered and merged in rank
        order (an id in several shares gets the sum, accumulated in float64), on every rank."""
        MPI = self.MPI
        grads = []
        for e in tables:
            ids, rows = e.grad if e.grad is not None else (np.zeros(0, np.int64), np.zeros((0, e.dim), e.table.dtype))
            grads.append((np.ascontiguousarray(ids, np.int64),
                          np.ascontiguousarray(rows if rho == 1 else rows * rows.dtype.type(rho))))
        counts = np.zeros((self.size, len(tables)), np.int64)
        self.comm.Allgather(np.array([g[0].size for g in grads], np.int64), counts)
        for j, (e, (ids, rows)) in enumerate(zip(tables, grads)):
            n = counts[:, j]
            all_ids = np.empty(int(n.sum()), np.int64)
            all_rows = np.empty((int(n.sum()), e.dim), rows.dtype)
            self.comm.Allgatherv(ids, [all_ids, n, MPI.INT64_T])
            self.comm.Allgatherv(rows, [all_rows, n * e.dim, MPI.FLOAT if rows.dtype == np.float32 else MPI.DOUBLE])
            e.grad = _merge(all_ids, all_rows) if all_ids.size else None

    def binary(self, model):
        return self._binary if self._binary is not None else _binary_flags(model)

    def batch_mean(self, *values):
        """Collective: values that are means over this rank's share of the last batch, as means
        over the global batch."""
        flat = np.concatenate([np.asarray(v, np.float64).reshape(-1) for v in values]) * self._rho
        self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        out, i = [], 0
        for v in values:
            size = np.asarray(v).size
            out.append(flat[i:i + size].reshape(np.shape(v)))
            i += size
        return tuple(out)

    def sum_counters(self, model):
        """Collective: the expert FLOP counters summed over the ranks (on every rank)."""
        if self._flops_carry is None:
            return
        keys = sorted(model.flops)
        new = np.array([model.flops[k] - self._flops_carry[k] for k in keys], np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, new, op=self.MPI.SUM)
        model.flops = {k: int(self._flops_carry[k] + v) for k, v in zip(keys, new)}
        self._flops_carry = dict(model.flops)

    def combine_evaluation(self, part, compute):
        """Collective: every rank's evaluation part gathered on rank 0 in rank order, ``compute``d
        there once, the result broadcast."""
        parts = self.comm.gather(part, root=0)
        result, failure = None, None
        if self.is_root:
            try:
                result = compute(_concatenate_parts(parts))
            except Exception as exc:
                failure = exc
        result, info = self.comm.bcast((result, None if failure is None else (type(failure).__name__, str(failure))),
                                       root=0)
        if info is not None:
            if failure is not None:
                raise failure
            raise _exception_of(*info, 0, self.size)
        return result

    def stop_after_batch(self, stop):
        """Collective when a callback of the user's could stop training (or fail) after a batch:
        rank 0's decision, and any held exception, reach every rank before the next step."""
        if not self._vote_after_batch:
            return stop
        votes = self._raise_if_any(bool(stop))
        return votes[0][1]

    def root_decides(self, value):
        return self.comm.bcast(value, root=0)

    def check_parameters(self, model, step, final=False):
        """Collective every ``checksum_every`` steps (and at the end): the ranks' parameters must be
        identical bit for bit; ParameterDriftError on every rank if not."""
        if not final and (self.checksum_every is None or step % self.checksum_every):
            return
        sums = self.comm.allgather(_checksum(model))
        if any(s != sums[0] for s in sums):
            bad = [r for r, s in enumerate(sums) if s != sums[0]]
            raise ParameterDriftError(
                f"after step {step} the parameters of ranks {bad} differ from rank 0's (CRC-32 {sums}): the ranks "
                "drifted apart. Something changed one rank's parameters outside the synchronized step (a callback?), "
                "or the MPI reduction gave ranks different sums")


def _overrides(cb, hook):
    from .callbacks import Callback

    inner = getattr(cb, "inner", None)  # the step protocol's wrapper
    if inner is not None:
        return hasattr(inner, "on_step_end")
    return getattr(type(cb), hook, None) is not getattr(Callback, hook)


def _describe(X):
    if isinstance(X, dict):
        return {k: _describe(v) for k, v in sorted(X.items())}
    return None if X is None else [list(X.shape[1:]), str(X.dtype)]


def _fingerprint(data):
    """CRC-32 of up to 64 rows spread over the data (X, Y, weights): the same X on every rank?"""
    idx = np.unique(np.linspace(0, data.n_examples - 1, min(data.n_examples, 64)).astype(np.int64))
    batch = data.take(idx)
    crc = 0
    for a in _arrays(batch.X) + list(batch.Y or []) + [w for w in (batch.W or []) if w is not None]:
        crc = zlib.crc32(np.ascontiguousarray(a), crc)
    return crc


def _arrays(X):
    return [X[k] for k in sorted(X) if X[k] is not None] if isinstance(X, dict) else [X]


def _merge(ids, rows):
    """(unique ids, summed rows) of concatenated sparse gradients, summed in the given order."""
    order = np.argsort(ids, kind="stable")
    ids, rows = ids[order], rows[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return ids[starts], np.add.reduceat(rows, starts, axis=0, dtype=np.float64).astype(rows.dtype)


def _concatenate_parts(parts):
    """The evaluation parts of the ranks as one (see trainer._evaluation_part)."""
    first = parts[0]
    merged = dict(sums=sum(p["sums"] for p in parts), N=sum(p["N"] for p in parts))
    for key in ("raw", "ys"):
        merged[key] = [[a for p in parts for a in p[key][t]] for t in range(len(first[key]))]
    merged["ws"] = [w for p in parts for w in p["ws"]]
    return merged
