"""Drop-ins for other training libraries. ``trb_exp.integrations.trl``: TRL's DistillationTrainer and GKD
(install with ``pip install -e ".[trl]"``; see docs/trl.md)."""
