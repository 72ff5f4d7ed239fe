"""The trust-region solver's wing: ``ops`` (result type, NaN-free log-softmax, geometric mixture, KL, EOS merge),
``kernel`` (K / Var / log mu at a given beta), ``solver`` (the exact Newton solver and the bisection reference),
``device`` (the sync-free twin used inside decode engines). The public names live in :mod:`trb_exp.blending`."""
