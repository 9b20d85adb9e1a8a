"""index experiments by (program_id, created_at)

`GET /programs/{id}/experiments?sort=created_at` sorted the whole program to return a page: 174 ms in
SQLite at 100,000 experiments; with the index the page is a walk of its first rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 18:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.create_index('ix_experiments_program_created', ['program_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_index('ix_experiments_program_created')
