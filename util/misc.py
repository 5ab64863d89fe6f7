"""Distributed setup, metric smoothing, the index sharding of the loop, and the data-loading processes'
behaviour (they end with the trainer; their input errors reach it as one line)."""

import ctypes
import datetime
import math
import os
import signal
import sys
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from util.cli import UsageError, set_rank

# ---------------------------------------------------------------------------------------------------
# processes


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_ranks(dist_on_itp: bool, local_rank_arg: int):
    """(rank, world size, local rank) as the launcher gave them, or None for a single process.

    torchrun (and torch.distributed.launch) set RANK / WORLD_SIZE / LOCAL_RANK; `srun` sets the
    SLURM_* variables instead; Open MPI (`--dist_on_itp`, MAE's ITP clusters) its OMPI_* ones.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", max(local_rank_arg, 0)))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local
    if dist_on_itp:
        return (
            int(env["OMPI_COMM_WORLD_RANK"]),
            int(env["OMPI_COMM_WORLD_SIZE"]),
            int(env["OMPI_COMM_WORLD_LOCAL_RANK"]),
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed(device_name: str, dist_url: str = "env://", dist_on_itp: bool = False, local_rank_arg: int = -1):
    """Joins the process group the launcher set up (if any) and picks this process's device.

    nccl on CUDA, gloo otherwise. From here on only rank 0 logs (util.cli.set_rank). Returns
    (DistInfo, torch.device).
    """
    ranks = _launcher_ranks(dist_on_itp, local_rank_arg)
    info = DistInfo() if ranks is None else DistInfo(*ranks)
    set_rank(info.rank)
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu")
        device = torch.device("cuda", info.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if info.distributed:
        if dist_url == "env://":
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise UsageError(
                    f"distributed run with {info.world_size} processes needs {missing} in the "
                    "environment (torchrun sets them; under srun export them, see "
                    "scripts/train_slurm.sh)"
                )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=dist_url,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    return info, device


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---------------------------------------------------------------------------------------------------
# data order


class ShardSampler(torch.utils.data.Sampler):
    """Global indices [start, end) dealt round-robin to the ranks, in order.

    With per-rank batches of b, the ranks' k-th batches together are the contiguous block
    [start + k*b*W, start + (k+1)*b*W): a global batch does not depend on the number of processes, so
    one process and W processes see the same samples per step, and a run can start at any global
    sample (resume mid-epoch). Randomness comes from the dataset, which draws each item from
    (seed, epoch, index), so no shuffling is needed.
    """

    def __init__(self, start: int, end: int, rank: int = 0, world_size: int = 1):
        if (end - start) % world_size:
            raise ValueError(f"[{start}, {end}) does not split evenly over {world_size} ranks")
        self.start, self.end, self.rank, self.world_size = start, end, rank, world_size

    def __iter__(self):
        return iter(range(self.start + self.rank, self.end, self.world_size))

    def __len__(self):
        return (self.end - self.start) // self.world_size


# ---------------------------------------------------------------------------------------------------
# data-loading processes

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def end_with_trainer(trainer_pid: int, worker_id: int):
    """DataLoader worker_init_fn (bind the trainer's pid with functools.partial): on Linux the worker
    ends when the trainer does, even on kill -9, instead of lingering until PyTorch's watchdog notices
    (seconds later); elsewhere only the Ctrl-C part applies. A Ctrl-C in a terminal reaches the whole
    process group: the worker ignores it, as the trainer stops cleanly and needs its batches until then."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    # The kernel sends SIGKILL when the worker's parent dies: the trainer, or with the forkserver start
    # method the server, which ends with the trainer. prctl cannot fail with these arguments.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not process_alive(trainer_pid):  # it died before prctl took effect: no signal will come
        os._exit(0)


def process_alive(pid: int) -> bool:
    """Whether a process runs (Linux). A killed process stays a zombie until its parent collects it, so
    existing is not enough: /proc/<pid>/stat gives its state."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]  # the name in parentheses may hold spaces
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # zombie, dead


@dataclass(frozen=True)
class CarriedUsageError:
    """A UsageError of a worker, handed to the trainer as data. Raised in a worker, it would arrive as
    "Caught UsageError in DataLoader worker process 0" followed by the worker's whole traceback (PyTorch
    re-raises it with that text as its message), while its one line is all the user needs."""

    message: str


class CarryUsageErrors(torch.utils.data.Dataset):
    """The dataset as a DataLoader should see it: an item whose reading raises UsageError (e.g. a
    damaged slice file) becomes a CarriedUsageError."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UsageError as error:
            return CarriedUsageError(str(error))


def collate_carrying_errors(samples: list):
    """DataLoader collate_fn: default_collate, or the first CarriedUsageError among the samples."""
    carried = [sample for sample in samples if isinstance(sample, CarriedUsageError)]
    return carried[0] if carried else default_collate(samples)


class RaiseCarriedErrors:
    """Iterates a DataLoader built with CarryUsageErrors and collate_carrying_errors; a carried error is
    raised here, in the trainer, as the UsageError it was in the worker."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch, CarriedUsageError):
                raise UsageError(batch.message)
            yield batch


# ---------------------------------------------------------------------------------------------------
# metrics


class SmoothedValue:
    """A series: its latest value, the mean over a recent window and the mean over everything."""

    def __init__(self, window: int = 20):
        self.recent = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1):
        self.recent.append(value)
        self.total += value * n
        self.count += n

    @property
    def value(self) -> float:
        return self.recent[-1] if self.recent else float("nan")

    @property
    def avg(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


class MetricLogger:
    """Named SmoothedValues and the console progress line."""

    def __init__(self, window: int = 20):
        self.meters = defaultdict(lambda: SmoothedValue(window))

    def update(self, **values):
        for name, value in values.items():
            self.meters[name].update(float(value))

    def averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def progress_line(self, header: str, step: int, total: int, global_batch: int, skipped: int) -> str:
        step_time = self.meters["step_time"].avg
        eta = datetime.timedelta(seconds=int(step_time * (total - step)))
        parts = [f"{header} [{step:>{len(str(total))}}/{total}]", f"eta {eta}"]
        for name in ("loss", "lr", "grad_norm"):
            meter = self.meters[name]
            parts.append(f"{name} {meter.value:.4g} ({meter.avg:.4g})")
        parts.append(f"samples/s {global_batch / step_time:.1f}")
        parts.append(f"data {self.meters['data_time'].avg:.3f}s")
        parts.append(f"skipped {skipped}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max mem {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
        return "  ".join(parts)


class EpochTotals:
    """An epoch's statistics over all its steps, when several runs trained parts of it (a resume
    mid-epoch): each average is kept with the number of steps it covers, and parts combine weighted by
    those. Every checkpoint holds the totals of its epoch's steps so far (as_dict: a plain dict), so the
    epoch's line in log.txt covers all of them, across kills and resumes.

    A part comes from the statistics train_one_epoch returns (of_stats); `stats` gives the whole epoch in
    the same layout.
    """

    # train_one_epoch's statistics that are not averages over steps.
    NOT_AVERAGED = ("lr", "skipped_steps", "steps", "stop")

    def __init__(self, steps: int = 0, skipped_steps: int = 0, means: dict | None = None):
        self.steps = steps
        self.skipped_steps = skipped_steps
        self.means = {name: list(mean_and_steps) for name, mean_and_steps in (means or {}).items()}

    @classmethod
    def of_stats(cls, stats: dict) -> "EpochTotals":
        steps = stats["steps"]
        # A non-finite average (e.g. every step of the part had a NaN loss) would spoil the whole epoch's.
        means = {
            name: [value, steps]
            for name, value in stats.items()
            if name not in cls.NOT_AVERAGED and math.isfinite(value)
        }
        return cls(steps, stats["skipped_steps"], means)

    def __add__(self, later: "EpochTotals") -> "EpochTotals":
        means = {name: list(mean_and_steps) for name, mean_and_steps in self.means.items()}
        for name, (mean, steps) in later.means.items():
            if name not in means:  # taken as it is, bit for bit: a run without a resume logs what it did
                means[name] = [mean, steps]
                continue
            earlier, earlier_steps = means[name]
            total = earlier_steps + steps
            means[name] = [earlier + (mean - earlier) * steps / total, total]
        return EpochTotals(self.steps + later.steps, self.skipped_steps + later.skipped_steps, means)

    def stats(self, latest: dict) -> dict:
        """train_one_epoch's layout over all the steps; the lr and the stop flag are the latest part's."""
        averages = {name: mean for name, (mean, _) in self.means.items()}
        return {
            **averages,
            "lr": latest["lr"],
            "skipped_steps": self.skipped_steps,
            "steps": self.steps,
            "stop": latest["stop"],
        }

    def as_dict(self) -> dict:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps, "means": self.means}

    @classmethod
    def from_dict(cls, saved) -> "EpochTotals":
        """The totals a checkpoint holds; none (a checkpoint of an older version) start empty."""
        return cls(**saved) if saved else cls()


# ---------------------------------------------------------------------------------------------------
# sinks


class RunLogger:
    """Rank 0's sinks for scalars and images: TensorBoard in `log_dir` and, if asked, wandb."""

    def __init__(self, log_dir: str = "", wandb_project: str = "", config: dict | None = None):
        self.tensorboard = None
        self.wandb = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

            os.makedirs(log_dir, exist_ok=True)
            self.tensorboard = SummaryWriter(log_dir=log_dir)
        if wandb_project:
            self.wandb = _start_wandb(wandb_project, config or {}, log_dir or None)

    def scalars(self, values: dict, step: int):
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, name: str, picture: torch.Tensor, step: int):
        """picture: (3, H, W) in [0, 1]."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(name, picture, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(picture.permute(1, 2, 0).numpy())}, step=step)

    def flush(self):
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(project: str, config: dict, folder):
    try:
        import wandb
    except ImportError:
        raise UsageError(
            "--wandb needs the wandb package (pip install wandb); run without --wandb to log to TensorBoard only"
        ) from None
    return wandb.init(project=project, config=config, dir=folder)
