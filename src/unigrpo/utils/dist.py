"""Plain ``torch.distributed`` for data-parallel RL: optional, explicit, testable on CPU with gloo.

- A run is distributed only when launched by ``torchrun`` with ``WORLD_SIZE > 1`` (gloo on CPU,
  nccl on CUDA). A single process never initialises a process group; every helper below is then
  the identity, so the single-process path has no distributed code in it at all.
- Data parallel: every rank holds the whole model, samples ``prompts_per_step / world`` prompts
  (``shard``), and gradients are averaged across ranks once per optimizer update
  (``average_gradients``). This is exactly what DDP computes (with ``no_sync`` on every
  micro-batch but the last), without DDP's backward/communication overlap. We do it explicitly
  because a unified model is driven through several protocol methods per backward
  (``forward_context`` + ``velocity`` x window steps), whereas DDP hooks into ``forward()``.
- The model prepares itself for data parallelism (``UnifiedModel.wrap`` / ``reduce_gradients``):
  the tiny model broadcasts rank 0's weights (``broadcast_parameters``) and averages gradients
  here (``average_gradients``); an FSDP2 adapter shards in ``wrap`` (``fully_shard`` +
  ``register_fsdp_forward_method`` for the protocol methods) and reduces gradients in backward.
  Its optimizer state is sharded too: checkpoints hold it gathered (``full_optimizer_state``,
  every rank) and a resume keeps each rank's shard of it (``load_optimizer_state``).
- Liveness: the process group is created with ``timeout=dist_timeout_s``, so a collective that
  waits on a rank that stopped responding raises instead of hanging forever; each rank also
  beats a heartbeat into the launcher's store (a thread, every second), so the rank that raises
  can name the rank that went silent (``as_rank_timeout``; docs/reliability.md).
- Collective order: the training loop calls each helper unconditionally, in the same order on
  every rank, whatever the data (reasoning lengths, rewards, non-finite losses), so ranks never
  wait on different collectives.
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "Dist",
    "all_gather_cat",
    "all_reduce_max",
    "all_reduce_sum",
    "any_flag",
    "as_rank_timeout",
    "average_gradients",
    "broadcast_parameters",
    "full_optimizer_state",
    "init",
    "load_optimizer_state",
    "reduce_metrics",
    "shard",
    "shutdown",
]


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank in [0, world), local rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


HEARTBEAT_S = 1.0
_heartbeat: dict = {}  # the running heartbeat: store, rank, world, timeout, stop event


def _store():
    """A client of the launcher's (torchrun's) store, separate from the process group's."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=5))


def _beat(rank: int, stop: threading.Event) -> None:
    try:
        store = _store()
        while not stop.is_set():
            store.set(f"unigrpo/alive/{rank}", repr(time.time()))
            stop.wait(HEARTBEAT_S)
    except Exception:  # noqa: BLE001 -- liveness reporting is best effort, never a failure itself
        return


def _start_heartbeat(rank: int, world: int, timeout_s: float) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(rank, stop), daemon=True, name="unigrpo-heartbeat")
    thread.start()
    _heartbeat.update(rank=rank, world=world, timeout_s=timeout_s, stop=stop, thread=thread)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    """torchrun SIGTERMs the other ranks when one ends (killed, crashed): one ``unigrpo:`` line
    naming it -- the rank whose heartbeat stopped (waited for up to 5 s: it goes silent after 3
    beats) -- instead of dying without a word. Exit 143, as SIGTERM's default would."""
    import sys

    me = _heartbeat.get("rank", "?")
    silent = _silent_others(me, 5 * HEARTBEAT_S) if _heartbeat else []
    who = (", ".join(f"rank {r} (no heartbeat for {a:.0f} s)" for r, a in silent) if silent
           else "no other rank was silent")
    print(f"unigrpo: rank {me}: stopped by the launcher (SIGTERM); {who}: a rank was killed or crashed; "
          "--resume continues from the last checkpoint", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # mid-collective: no clean-up can finish (the lock is taken over on --resume)


def silent_ranks(now: float | None = None) -> list[tuple[int, float]]:
    """(rank, seconds since its last heartbeat) of the ranks silent for > 3 heartbeats, oldest first."""
    store, now, out = _store(), now or time.time(), []
    for r in range(_heartbeat["world"]):
        key = f"unigrpo/alive/{r}"
        age = now - float(store.get(key).decode()) if store.check([key]) else float("inf")
        if age > 3 * HEARTBEAT_S:
            out.append((r, age))
    return sorted(out, key=lambda x: -x[1])


_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe")  # gloo's words


def _silent_others(me: int, wait_s: float) -> list[tuple[int, float]]:
    """``silent_ranks`` but this one, waiting up to ``wait_s`` for a rank that just died to go
    silent (3 missed beats); SIGTERM from the launcher is held meanwhile (main thread)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main and wait_s else None
    deadline, silent = time.monotonic() + wait_s, []
    try:
        while True:
            silent = [(r, a) for r, a in silent_ranks() if r != me]
            if silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.25 * HEARTBEAT_S)
    except Exception:  # noqa: BLE001 -- the store itself may be gone
        return silent
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def as_rank_timeout(err: BaseException):
    """A collective that failed because another rank stopped (its timeout) or ended (killed,
    crashed: gloo's "connection reset by peer") as a RankTimeout naming the silent rank(s); None
    for other errors."""
    from unigrpo.utils.errors import RankTimeout

    text = str(err).lower()
    gone = any(k in text for k in _PEER_GONE)
    if not _heartbeat or not gone and "timed out" not in text and "timeout" not in text:
        return None
    me, limit = _heartbeat["rank"], _heartbeat["timeout_s"]
    silent = _silent_others(me, 5 * HEARTBEAT_S if gone else 0.0)
    who = (", ".join(f"rank {r} (no heartbeat for {a:.0f} s)" for r, a in silent) if silent
           else "another rank (could not tell which)")
    if gone:
        return RankTimeout(f"rank {me}: {who} ended (killed or crashed): its connection closed in a collective; "
                           "--resume continues from the last checkpoint")
    return RankTimeout(f"rank {me}: {who} stopped responding; a collective waited dist_timeout_s={limit:g} s")


def init(device: str, timeout_s: float = 1800.0) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; else a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local)  # one GPU per process, by local rank
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    # torch 2.13: torch._dynamo imported AFTER the group exists (AdamW imports it lazily) keeps a
    # reference to the group, so its gloo threads outlive destroy_process_group and the process may
    # abort at exit ("terminate called without an active exception"; how often: docs/training.md).
    importlib.import_module("torch._dynamo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _start_heartbeat(rank, world, timeout_s)
    return Dist(rank, world, local), dev


def shutdown(d: Dist) -> None:
    """Leave the process group together (rank 0 may still be evaluating / saving)."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        if _heartbeat:  # stopped and joined: no store client left alive at interpreter exit
            _heartbeat["stop"].set()
            _heartbeat["thread"].join(timeout=5)
            _heartbeat.clear()


def shard(n: int, d: Dist) -> slice:
    """This rank's contiguous block of ``n`` items (``n`` must divide evenly over ranks)."""
    if n % d.world:
        raise ValueError(f"{n} items cannot be split evenly over {d.world} ranks")
    per = n // d.world
    return slice(d.rank * per, (d.rank + 1) * per)


def broadcast_parameters(model: torch.nn.Module, d: Dist) -> None:
    """Identical weights on every rank: rank 0's parameters and buffers (the tiny model's ``wrap``)."""
    if d.enabled:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Average ``.grad`` over ranks in one flattened all-reduce (DDP's gradient semantics).

    Only parameters whose grad is not None take part. Which ones are None depends on the config
    (frozen expert, CFG off -> unused null context), never on the data, so every rank sends the
    same layout. None grads stay None: AdamW then skips them exactly as in a single process.
    """
    if not d.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= d.world  # mean over ranks: each rank's loss is already a mean over its trajectories
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with every sharded (DTensor) state tensor gathered whole: a collective,
    every rank calls it (the state's layout depends on the config only). Without DTensors it is
    ``opt.state_dict()`` itself."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    if not any(isinstance(v, DTensor) for s in sd["state"].values() for v in s.values()):
        return sd
    return {**sd, "state": {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
                            for i, s in sd["state"].items()}}


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """``opt.load_state_dict`` of a ``full_optimizer_state``: the state of a sharded (DTensor)
    parameter becomes this rank's shard of it (every rank loaded the same full tensors: no
    collective); the scalar ``step`` stays a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]  # state keys index this order
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in s.items()}
    opt.load_state_dict({**sd, "state": state})


def all_gather_cat(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate equally shaped ``x`` [n, ...] of all ranks in rank order -> [world * n, ...]."""
    if not d.enabled:
        return x
    out = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _all_reduce_scalar(value, op, dtype: torch.dtype, device: torch.device | str):
    """One number reduced over ranks with ``op`` (every rank gets the result)."""
    t = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def all_reduce_max(value: int, d: Dist, device: torch.device | str = "cpu") -> int:
    """The maximum of an int over ranks (e.g. the padded token width, so shapes agree)."""
    return int(_all_reduce_scalar(value, dist.ReduceOp.MAX, torch.long, device)) if d.enabled else value


def all_reduce_sum(value: float, d: Dist, device: torch.device | str = "cpu") -> float:
    """The sum of a number over ranks (e.g. active tokens of a minibatch, for token_mean)."""
    return float(_all_reduce_scalar(float(value), dist.ReduceOp.SUM, torch.float64, device)) if d.enabled else value


def any_flag(flag: bool, d: Dist, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is True on any rank (ranks must take the same decision)."""
    return _all_reduce_scalar(float(flag), dist.ReduceOp.MAX, torch.float32, device) > 0 if d.enabled else flag


def reduce_metrics(metrics: dict[str, float], d: Dist, device: torch.device | str = "cpu") -> dict:
    """Combine per-rank scalar metrics: keys ending in ``_min`` / ``_max`` by min / max, the others
    by the mean over ranks. Every rank must hold the same keys (they depend on the config only)."""
    if not d.enabled:
        return dict(metrics)
    keys = sorted(metrics)  # same order on every rank
    out = {}
    for suffix, op in (("_min", dist.ReduceOp.MIN), ("_max", dist.ReduceOp.MAX), ("", dist.ReduceOp.SUM)):
        sel = [k for k in keys if k not in out and k.endswith(suffix)]
        if not sel:
            continue
        t = torch.tensor([float(metrics[k]) for k in sel], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        if op == dist.ReduceOp.SUM:
            t /= d.world
        out.update(zip(sel, t.tolist()))
    return {k: out[k] for k in metrics}
