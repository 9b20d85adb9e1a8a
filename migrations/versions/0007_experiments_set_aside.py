"""experiments.set_aside: a run its change's decision set aside as a broken measurement

The policy sets aside a run that trips a sanity guard and that the change's other runs do not bear out, and judges
the change on the rest; but a kept change's set-aside run went on counting as a run of the new head (in the mean
later candidates were judged against) and in the noise estimate. The decision now marks it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 23:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('set_aside', sa.Boolean(), server_default=sa.text('false'), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_column('set_aside')
