"""Quickstart: an actor in its own process, called with tensors."""

import torch

from runtime import ActorSystem, actor


@actor
class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, t):
        return t * self.factor


with ActorSystem() as system:
    scaler = system.spawn(Scaler, 2.0, name="scaler")
    print("blocking call:", scaler.scale(torch.arange(4.0)))
    future = scaler.scale.remote(torch.ones(2, 2))
    print("future:       ", future.result(timeout=10))
    print("routes:       ", system.stats()["routes"])
