"""The training loop: the recipe (Trainer), its step, the engines, the meter and the guards."""
