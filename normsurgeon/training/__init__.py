"""Training-time helpers for the seed methods (the model surgery itself lives in ``passes``).

- :class:`EqualizeCallback`: ENorm interleaved with SGD (one sweep every k optimizer steps), with
  the optimizer's momentum buffers rescaled inversely to their weights.
- :func:`revisited_param_groups`: the "Revisiting BN" update rule (norm scales at lr/100, no weight
  decay on norm affines or biases).
- :func:`proxy_norm_param_groups`: proxy norm's parameter groups (gamma, beta, beta~, gamma~ out of
  the normal weight decay; beta~/gamma~ with their own).
- :func:`gamma_decay_penalty`: weight decay pulling norm gamma toward 1 and beta toward 0.
"""
from normsurgeon.training.equalize_callback import EqualizeCallback
from normsurgeon.training.param_groups import gamma_decay_penalty, proxy_norm_param_groups, revisited_param_groups

__all__ = ["EqualizeCallback", "gamma_decay_penalty", "proxy_norm_param_groups", "revisited_param_groups"]
