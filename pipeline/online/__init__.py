"""Online baselines: the backbone runs at every training step (no cache).

Methods, registered by name in :mod:`pipeline.online.methods`:

* ``full`` — full fine-tuning of the backbone plus a task head;
* ``lora`` — LoRA adapters through ``peft`` on the frozen backbone, plus a task head;
* ``meft`` — reversible adapters (MEFT, Liao et al. 2023) for BERT-family encoders, trained
  through a custom autograd function that recomputes activations in the backward pass;
* ``read``, ``lst`` — stage two's side networks, fed by the frozen backbone (in ``eval()``)
  every step instead of a store.

They share stage two's data specs, heads, metrics, optimiser, schedule and seeds;
:func:`pipeline.online.train.run_online` is the training loop.
"""

from pipeline.online.train import OnlineConfig, run_online

__all__ = ["OnlineConfig", "run_online"]
