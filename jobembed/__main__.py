"""``python -m jobembed``: the CLI, also for launchers that take a module (``torchrun -m jobembed finetune RUN``)."""

from jobembed.cli import app

app(prog_name="jobembed")
