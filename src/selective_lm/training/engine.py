"""The engine under the training loop: processes, wrapping, compile, autocast, micro-batch sizing, gradient sync.

None of this changes what a run learns (the science lives in the trainer, selection and loss);
all of it is outside the run hash, so a run may resume under another engine setting.

- Processes: accelerate's `Accelerator` (one process, or DDP under `accelerate launch`).
- Wrapping: DDP through `accelerate.prepare`, or FSDP2 (`train.parallel=fsdp`) over every
  decoder layer and the root with torch's `fully_shard` (accelerate routes its own FSDP plugin
  to GPUs only; a launch with accelerate's FSDP config takes this path too).
- Compile (`train.compile`): `torch.compile` of every decoder layer (`dynamic=False`), the unit
  FSDP2 shards and transformers checkpoints, so it composes with both (checkpointing: see
  `compile_layers`); on by `auto` on CUDA, off on CPU (inductor's CPU code is no faster for
  these models, and its compile costs a minute).
  The head and the selection stay eager (their shapes are static since the loss path lost its host
  syncs; compiling them is untried).
- Micro-batches (`train.micro_batch_size`): one forward carries whole selection units of
  `train.batch_size` rows, `k` of them with `k` dividing `train.grad_accum`; `auto` is one unit
  on CPU and, on CUDA, the largest `k` whose forward and backward fit (`probe_rows`, remembered
  per device, model and shape under `$SLM_CACHE`).
- Gradients: the loss is a sum over selected tokens; `finish_gradients` scales the summed
  gradients by world / (tokens selected in the whole step) with one fused op, and clips, with
  no host sync: the trainer reads the step's statistics and the gradient norm in one transfer.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..config.sections import TRACKERS
from ..errors import UserError, first_line
from ..files import write_json


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (the classes its `_no_split_modules` names): what FSDP2 shards and compile fuses."""
    layer_types = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    return [m for m in model.modules() if type(m).__name__ in layer_types]


def compiles(setting: str | bool, device: torch.device) -> bool:
    """Whether `train.compile` (auto, true, false) compiles on `device`: auto compiles on CUDA only."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_layers(model: torch.nn.Module) -> int:
    """`torch.compile` every decoder layer in place, one static shape each (no recompiles per step); their count."""
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"train.compile: {type(model).__name__} names no decoder layer class (_no_split_modules) "
                        "to compile; set train.compile=false")
    # Under gradient checkpointing (transformers checkpoints inside the layer's forward), dynamo traces the
    # checkpoint as one op, which refuses a forward that sets a global: transformers' attention does (kernels'
    # CompileableContextVar, restored when the forward returns), and the whole layer would silently run eager.
    # Its recompute in backward needs no replay of such a setting, so allow it (where this torch has the flag).
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def check_launch() -> None:
    """Refuse `accelerate launch --cpu --num_processes N` (N > 1) that started one process: without MPI accelerate
    runs one process then, which would train N times fewer tokens per step than asked, silently."""
    env = os.environ
    mpi = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in env and "WORLD_SIZE" not in env \
            and not any(k in env for k in mpi):
        raise UserError("`accelerate launch --cpu --num_processes N` started one process (several CPU processes need "
                        "MPI there): launch with `--multi_gpu --num_processes N` and CUDA_VISIBLE_DEVICES= instead")


def uses_bf16(mixed_precision: str, device: torch.device) -> bool:
    """`train.mixed_precision` (auto, bf16, no) on `device`: auto is bf16 on CUDA, float32 elsewhere."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def to_device(array: np.ndarray, device: torch.device, dtype: np.dtype | None = None) -> torch.Tensor:
    """A host array on `device` without a host sync: pinned and copied asynchronously on CUDA.

    A pageable host-to-device copy waits for the GPU's queue to drain; a pinned one does not, so
    the host can prepare the next micro-batch while the GPU works.
    """
    tensor = torch.from_numpy(np.asarray(array, dtype=dtype))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate's dependency

    return psutil.virtual_memory().available


def installed_trackers(names: Sequence[str]) -> list[str]:
    """`train.report_to`'s trackers, 'all' as every installed one; one not installed is refused naming its package
    (accelerate would drop it with a debug message: a run would go untracked unnoticed)."""
    import accelerate
    from accelerate.tracking import get_available_trackers

    installed = [n for n in TRACKERS if n in {str(t) for t in get_available_trackers()}]
    if "all" in names:
        return installed
    for name in names:
        if name not in installed:
            raise UserError(f"train.report_to={name}: {TRACKERS[name]} is not installed (or accelerate "
                            f"{accelerate.__version__} does not drive it): pip install {TRACKERS[name]}, or drop it "
                            "from train.report_to")
    return list(names)


class Engine:
    """One run's processes and engine settings; the trainer asks it to wrap, sync, scale and size."""

    def __init__(self, t: TrainConfig, project_dir: str) -> None:
        from accelerate import Accelerator

        check_launch()
        cuda = torch.cuda.is_available()
        self.t, self.project_dir = t, project_dir
        self.bf16 = uses_bf16(t.mixed_precision, torch.device("cuda" if cuda else "cpu"))
        self.trackers = installed_trackers(t.report_to)
        # Precision is ours (autocast()), not accelerate's: its state is one per process and refuses a second
        # setting, while one process may train runs of both (a float32 smoke run, then a bf16 study).
        self.acc = Accelerator(  # creates nothing on disk: the trackers start in fit(), after validation
            cpu=not cuda, mixed_precision="no",
            log_with=[n for n in self.trackers if n != "tensorboard"] or None, project_dir=project_dir,
        )
        self.device = self.acc.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.module: torch.nn.Module | None = None  # the wrapped SelectiveLM, after wrap()
        self.compiled = 0  # decoder layers compiled

    def start_trackers(self, project: str, run: str, first_step: int, params: dict[str, Any]) -> None:
        """Start `train.report_to`'s trackers (they log from the main process only): TensorBoard in `<run dir>/tb/`,
        hiding the events a killed run logged from `first_step` on (purge_step); the others under `project` (the out
        dir's name), W&B and MLflow naming the run, each given the run's settings as parameters. A tracker that
        cannot start (no server, no login) is one line, before the first step."""
        from accelerate.tracking import TensorBoardTracker

        if "tensorboard" in self.trackers:
            self.acc.log_with.append(TensorBoardTracker("tb", self.project_dir, purge_step=first_step))
        kwargs = {"wandb": {"name": run, "dir": self.project_dir}, "mlflow": {"run_name": run}}
        try:
            self.acc.init_trackers(project, init_kwargs=kwargs)
            for tracker in self.acc.trackers:
                if tracker.name != "tensorboard":  # TensorBoard's hparams would add a directory per start under tb/
                    tracker.store_init_configuration(params)
        except Exception as e:  # the trackers' own errors: a missing login, an unreachable server, a bad URI
            raise UserError(f"train.report_to={','.join(self.trackers)}: a tracker did not start: "
                            f"{first_line(e)}") from None

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def fsdp(self) -> bool:
        """FSDP asked by the config or by accelerate's FSDP launch config; one process has nothing to shard."""
        from accelerate.utils import DistributedType

        asked = self.t.parallel == "fsdp" or self.acc.distributed_type == DistributedType.FSDP
        return asked and self.world > 1

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """Compile the decoder layers (train.compile), then DDP through accelerate or FSDP2 (module docstring)."""
        from accelerate.utils import DistributedType

        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("DeepSpeed is not supported: launch with DDP (the default) or set train.parallel=fsdp")
        if compiles(self.t.compile, self.device):
            self.compiled = compile_layers(module)
        if not self.fsdp:
            self.module = self.acc.prepare(module)
            return self.module
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # public from torch 2.6
            raise UserError(f"train.parallel=fsdp needs FSDP2 (torch >= 2.6; this is {torch.__version__}): "
                            "upgrade torch or use train.parallel=ddp") from None
        layers = decoder_layers(module)
        if not layers:
            raise UserError(f"train.parallel=fsdp: {type(module).__name__} names no decoder layer class "
                            "(_no_split_modules) to shard; use train.parallel=ddp")
        for layer in layers:
            fully_shard(layer)
        self.module = fully_shard(module)
        return self.module

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast under bf16 precision (`uses_bf16`), else nothing: float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @contextlib.contextmanager
    def grad_sync(self, sync: bool) -> Iterator[None]:
        """Reduce gradients over ranks only at the step's last micro-batch; the others accumulate locally."""
        if sync or self.world == 1:
            yield
        elif self.fsdp:
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        else:
            with self.acc.no_sync(self.module):
                yield

    def reshard(self) -> None:
        """FSDP2 keeps the root's gathered weights after a forward; free them (the self-reference swap needs it)."""
        if self.fsdp:
            self.module.reshard()

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """The step's statistics summed over ranks (on the device: no host sync)."""
        return self.acc.reduce(stats, reduction="sum") if self.world > 1 else stats

    def finish_gradients(self, params: Sequence[torch.Tensor], n_selected: torch.Tensor,
                         max_norm: float) -> torch.Tensor:
        """Scale the summed gradients to the true mean over the step's selected tokens, clip; the norm (a tensor).

        The engine averaged over ranks, so x world / n_selected. One foreach op on the device, no
        host sync; FSDP's sharded gradients (DTensors) take the 0-d scale as a replicated value.
        """
        grads = [p.grad for p in params if p.grad is not None]
        scale = self.world / n_selected.clamp_min(1.0)
        if grads:
            sharded = hasattr(grads[0], "device_mesh")
            if sharded:
                from torch.distributed.tensor.experimental import implicit_replication

                with implicit_replication():
                    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
            else:
                torch._foreach_mul_(grads, scale.to(device=grads[0].device, dtype=grads[0].dtype))
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm or float("inf"), foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shards
            norm = norm.full_tensor()
        return norm.detach().to(self.device, torch.float64)

    def optimizer(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW: fused on CUDA (one kernel for every parameter), foreach elsewhere."""
        fused = self.device.type == "cuda" and not self.fsdp
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)

    def micro_units(self, probe: Callable[[int], None], key: dict[str, Any]) -> int:
        """Selection units per forward (`train.micro_batch_size` / `train.batch_size`); see the module docstring."""
        b, a = self.t.batch_size, self.t.grad_accum
        setting = self.t.micro_batch_size
        if setting != "auto":
            if setting % b or a % (setting // b):
                raise UserError(f"train.micro_batch_size={setting} must be a multiple k of train.batch_size ({b}) "
                                f"with k dividing train.grad_accum ({a}): a forward carries whole selection units")
            return setting // b
        if self.device.type != "cuda" or a == 1:
            return 1
        choices = [k for k in range(1, a + 1) if a % k == 0]
        return probe_rows(probe, choices, {**key, "unit_rows": b}, self.device) or 1


def _memory_key(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return f"{props.name}|{props.total_memory}"


def probe_rows(try_size: Callable[[int], None], choices: Sequence[int], key: dict[str, Any],
               device: torch.device) -> int | None:
    """The largest of `choices` (ascending) for which `try_size` runs without running out of GPU memory.

    Remembered under `$SLM_CACHE/batch_sizes.json`, keyed by the device and `key`, so each model
    and shape is probed once per machine. Sizes are tried upwards (a failed size is never worth
    retrying above), each after emptying the allocator's cache, in eager mode (compiled code uses
    no more memory); None if even the smallest fails.
    """
    from ..data.assets import cache_dir, file_lock

    path = cache_dir() / "batch_sizes.json"
    entry = json.dumps({**key, "device": _memory_key(device)}, sort_keys=True)
    with file_lock(path.with_name(".batch_sizes.lock")):
        known = json.loads(path.read_text()) if path.is_file() else {}
    if entry in known and known[entry] in choices:
        return known[entry]
    best = None
    # Eager, also where layers are compiled: a size tried must not cost a compile (nor a cache entry) of its own.
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    for size in choices:
        torch.cuda.empty_cache()
        try:
            with stance("force_eager") if stance is not None else contextlib.nullcontext():
                try_size(size)
        except torch.cuda.OutOfMemoryError:
            break
        best = size
    torch.cuda.empty_cache()
    if best is not None:
        with file_lock(path.with_name(".batch_sizes.lock")):
            known = json.loads(path.read_text()) if path.is_file() else {}
            write_json(path, {**known, entry: best})
    return best


def frozen_batch_size(setting: int | str, cpu_default: int, try_size: Callable[[int], None],
                      key: dict[str, Any], device: torch.device, limit: int) -> int:
    """`scoring.batch_size` / `eval.batch_size`: N, or `auto` = `cpu_default` on CPU and the largest power of two
    up to `limit` rows whose no-grad forward fits on CUDA (with the head's chunked logits: memory grows slowly)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return cpu_default
    choices = [1 << i for i in range(max(1, limit).bit_length()) if 1 << i <= limit] or [1]
    return probe_rows(try_size, choices, key, device) or 1
