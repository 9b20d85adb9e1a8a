"""index results by val_bpb

A program's best kept result (`GET /programs/{id}`) hash-joined every result of the table and
sorted them (6.2 ms in Postgres at 10,000 experiments); walking an index on val_bpb stops at the
first kept row of the program (0.36 ms).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 17:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.create_index('ix_results_val_bpb', ['val_bpb'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index('ix_results_val_bpb')
