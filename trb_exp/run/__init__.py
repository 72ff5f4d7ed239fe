"""The run wing: train state and checkpoints (``state``), which checkpoint to resume (``resume``), run
directories (``rundir``) and stop signals (``preempt``)."""
