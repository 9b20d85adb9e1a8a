"""workers.slots: the jobs a worker holds at once

A GPU worker with two slots starts the next candidate (python, torch import, compile) while the
current one trains, and the device gate (worker/gate.py) gives the device to one timed run at a
time. The scheduler sizes each class's queue by the live workers' slots.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('slots', sa.Integer(), server_default='1', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('slots')
