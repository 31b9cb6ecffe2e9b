"""A run's checkpoints: trainable weights, optimizer, scheduler, RNG streams, the self-reference copy.

Checkpoints gather the trainable weights and the optimizer state in full on the main process
(torch.distributed.checkpoint's state-dict API), so a run resumes on any number of processes and
under DDP or FSDP2 alike. Only the newest checkpoint is kept; every write is atomic, and the temp
files a kill cut off are removed before a run resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import UserError
from ..files import atomic_dir, atomic_path, write_json
from ..store.layout import RunDir
from .models import base_model_location
from .selfref import SelfReference


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (named_parameters: a tied head appears once, as its embedding)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _state_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def latest_checkpoint(run: RunDir) -> Path | None:
    """The run's newest full checkpoint (only the newest is kept; a kill may leave an older one beside it)."""
    found = sorted(run.checkpoints.glob("step-[0-9]*"))
    return found[-1] if found else None


def rng_state() -> dict[str, torch.Tensor | None]:
    """The RNG streams dropout draws from: CPU, and the current CUDA device's (exact resume on GPUs)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


class Checkpoints:
    """Save and load one run's state; every rank calls each method (they are collectives), the main one writes."""

    def __init__(self, run: RunDir, engine: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, self_ref: SelfReference | None, main: bool) -> None:
        self.run, self.engine, self.model, self.optimizer = run, engine, model, optimizer
        self.scheduler, self.self_ref, self.main = scheduler, self_ref, main

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights under the model's own names, in full on the main process (a collective)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.tensor import DTensor

        names = trainable(self.model)
        if not any(isinstance(p, DTensor) for p in names.values()):
            # Whole on every process (one process, DDP): a copy, without the state-dict API's walk over every
            # module for each parameter (14 ms a call on the smoke model, more than its training step).
            return {k: p.detach().to("cpu", copy=True).contiguous() for k, p in names.items()}
        state = get_model_state_dict(self.engine, options=_state_options(cpu_offload=True, ignore_frozen_params=True))
        return {k: v.contiguous() for k, v in ((k.removeprefix("model."), v) for k, v in state.items()) if k in names}

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Trainable weights, optimizer (gathered in full), scheduler, RNG (CPU and CUDA)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = self.trainable_state()
        optim = get_optimizer_state_dict(self.engine, self.optimizer, options=_state_options(cpu_offload=True))
        own = self.self_ref.state_dict() if self.self_ref is not None else None
        if not self.main:
            return
        path = self.run.checkpoint(step)
        with atomic_dir(path) as tmp:
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            if own is not None:
                save_file(own, str(tmp / "reference.safetensors"))
            write_json(tmp / "state.json", {**state, "step": step})
        for old in self.run.checkpoints.glob("step-*"):  # keep only the newest full checkpoint
            if old.name != path.name:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.run)

    def load(self, path: Path) -> dict[str, Any]:
        """Every rank reads the full checkpoint and keeps its part (the out dir is shared by the ranks)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        weights = load_file(path / "trainable.safetensors")
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        if set(weights) != set(trainable(self.model)) or not isinstance(optim.get("state"), dict) \
                or not all(isinstance(k, str) for k in optim["state"]):
            raise UserError(f"checkpoint {path} does not match this run's model or version: delete "
                            f"{self.run.path} to restart")
        set_state_dict(self.engine, self.optimizer, model_state_dict={f"model.{k}": v for k, v in weights.items()},
                       optim_state_dict=optim, options=_state_options(strict=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        if self.self_ref is not None:
            self.self_ref.load_state_dict(load_file(path / "reference.safetensors"))
        return json.loads((path / "state.json").read_text())

    def snapshot(self, step: int) -> None:
        """Trainable weights only, for the paper's trajectory analysis."""
        weights = self.trainable_state()
        if self.main:
            with atomic_path(self.run.snapshot(step)) as tmp:
                save_file(weights, str(tmp))

    def remove_partial_writes(self) -> None:
        """Temp files and dirs (`.<name>.*.tmp`) of atomic writes that a kill cut off: never complete, never read."""
        for tmp in sorted(self.run.path.rglob(".*.tmp")) if self.run.path.is_dir() else []:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def save_final(self, tokenizer: Any, model_cfg: ModelConfig, merge: bool) -> None:
        """The adapter (PEFT format, and merged into `merged/` if asked) or the whole model (HF format).

        The adapter's config names the base model's id or directory and revision (PEFT writes null for a model it
        cannot name, a `random:` one), so that `AutoPeftModelForCausalLM` loads the adapter alone.
        """
        weights = self.trainable_state()
        if not self.main:
            return
        if model_cfg.lora:
            config = self.model.peft_config["default"]
            config.base_model_name_or_path = base_model_location(model_cfg, self.model.config.vocab_size)
            config.revision = model_cfg.revision
            with atomic_dir(self.run.adapter_dir) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
            if merge:  # never sharded: the config refuses merge with fsdp
                with atomic_dir(self.run.merged_dir) as tmp:
                    self.model.merge_and_unload().save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
        else:
            with atomic_dir(self.run.model_dir) as tmp:
                self.model.save_pretrained(tmp, state_dict=weights)
                tokenizer.save_pretrained(tmp)
