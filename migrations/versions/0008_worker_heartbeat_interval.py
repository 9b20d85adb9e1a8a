"""workers.heartbeat_interval: the interval each worker beats at

Reapers and the dashboard judged every worker by their own FARM_HEARTBEAT_INTERVAL. A worker host set to beat less
often than the scheduler's host had every run re-queued (and so run twice) after two of the scheduler's intervals.
Each worker now records its interval, and a run is stale only after two of the longer of the two.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 05:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_interval', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_interval')
