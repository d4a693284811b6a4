"""Seeding and RNG state capture, so runs repeat on CPU and resume exactly."""

from __future__ import annotations

import logging
import random

import torch

from dfkd.engine.env import Env

log = logging.getLogger("dfkd")


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python and torch (all devices); each rank gets ``seed + rank`` so ranks synthesise different images."""
    seed = seed + rank
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """This process's tensor-only RNG state (loadable with ``torch.load(weights_only=True)``): the CPU generator and,
    on a GPU, the generator of this process's own device only (another machine may have fewer GPUs)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(env: Env) -> list[dict]:
    """Every rank's own RNG state, in rank order (each rank draws its own latents and augmentations)."""
    return env.all_gather_object(rng_state(env.device))


def restore_rng_states(saved: list[dict] | dict, env: Env, seed: int, epoch: int, source: object) -> None:
    """Give this rank the stream it had when ``saved`` was written. Written by another number of processes, the run
    continues on fresh streams (``seed``, ``epoch`` and rank), with a warning: it cannot repeat exactly."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == env.world_size:
        set_rng_state(states[env.rank], env.device)
        return
    log.warning(
        "%s was written by %d process(es), this run has %d: it continues on fresh random streams, so it will not "
        "repeat the uninterrupted run exactly",
        source,
        len(states),
        env.world_size,
    )
    seed_everything(seed + 1000 * epoch, env.rank)
