"""Analysis of finished runs: ``runs`` (load and group), ``stats`` (CIs, paired differences, best
checkpoints), ``report`` (the markdown sections), ``plots`` (PNG). ``python -m trb_exp.compare`` is the CLI."""
