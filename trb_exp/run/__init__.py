"""The run wing: train state and checkpoints (``state``), which checkpoint to resume (``resume``), run
directories (``rundir``), stop signals (``preempt``) and what a run ran on (``environment``)."""
