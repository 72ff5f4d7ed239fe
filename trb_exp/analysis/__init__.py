"""Analysis of finished runs: ``runstore`` (a study's runs as one versioned data file, ``runs.jsonl.gz``,
and back), ``runs`` (load them from run directories or data files, and group), ``stats`` (CIs, paired
differences, best checkpoints), ``report`` (the markdown sections), ``plots`` (PNG). ``python -m
trb_exp.compare`` is the CLI."""
