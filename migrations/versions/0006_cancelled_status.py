"""experiments.status 'cancelled': a run its program's stop (or finish) left unstarted

Stopping a program only flipped its status: its queued runs were claimed and trained all the same, and a proposed one
showed as queued forever. They are now cancelled with the stop. The status is a CHECK constraint (non-native
enums), which this replaces on experiments.status and results.outcome (the same enum in the models).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 21:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ('proposed', 'invalid', 'queued', 'running', 'succeeded', 'crashed', 'timed_out', 'refused', 'lost')
AFTER = (*BEFORE, 'cancelled')
CHECKS = (('experiments', 'status', 'ck_experiments_experiment_status'),
          ('results', 'outcome', 'ck_results_result_outcome'))


def _replace(values: tuple[str, ...]) -> None:
    for table, column, name in CHECKS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(op.f(name), type_='check')
            batch_op.create_check_constraint(op.f(name), f"{column} IN ({', '.join(repr(v) for v in values)})")


def upgrade() -> None:
    _replace(AFTER)


def downgrade() -> None:
    # the old schema has no word for a run that never ran: it becomes what it most resembles there, an invalid one
    op.execute("UPDATE experiments SET status = 'invalid' WHERE status = 'cancelled'")
    _replace(BEFORE)
