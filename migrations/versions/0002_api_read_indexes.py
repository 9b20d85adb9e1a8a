"""indexes for the API's read paths

With 10,000 experiments in a program, the first page of experiments sorted a hash join of the
whole program (56 ms in Postgres alone); an index on (program_id, id) makes it a 50-row index walk.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 16:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = [
    ("ix_experiments_program_id_id", ["program_id", "id"]),
    ("ix_experiments_program_role", ["program_id", "role"]),
    ("ix_experiments_program_decision", ["program_id", "decision"]),
    ("ix_experiments_program_finished", ["program_id", "finished_at"]),
    ("ix_experiments_commit_sha", ["commit_sha"]),
    ("ix_experiments_parent_commit", ["parent_commit"]),
]


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        for name, cols in INDEXES:
            batch_op.create_index(name, cols, unique=False)


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        for name, _ in reversed(INDEXES):
            batch_op.drop_index(name)
