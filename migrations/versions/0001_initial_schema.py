"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 15:20:49.329962
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from farm.models import utcnow

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('token_hash', sa.String(length=128), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('name', name=op.f('uq_api_tokens_name')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_table('programs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('slug', sa.String(length=100), nullable=False),
    sa.Column('instructions', sa.Text(), nullable=False),
    sa.Column('template', sa.String(length=200), nullable=False),
    sa.Column('template_digest', sa.String(length=64), nullable=True),
    sa.Column('editable_files', sa.JSON(), nullable=False),
    sa.Column('profile', sa.String(length=32), nullable=False),
    sa.Column('hw_class', sa.String(length=64), nullable=False),
    sa.Column('time_budget', sa.Float(), nullable=False),
    sa.Column('proposer', sa.JSON(), nullable=False),
    sa.Column('policy', sa.JSON(), nullable=False),
    sa.Column('stop_rules', sa.JSON(), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('status', sa.Enum('active', 'paused', 'stopped', 'finished', name='program_status', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('branch', sa.String(length=200), nullable=False),
    sa.Column('root_commit', sa.String(length=64), nullable=True),
    sa.Column('head_commit', sa.String(length=64), nullable=True),
    sa.Column('head_experiment_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.CheckConstraint('time_budget > 0', name=op.f('ck_programs_time_budget_positive')),
    sa.CheckConstraint('weight > 0', name=op.f('ck_programs_weight_positive')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_programs')),
    sa.UniqueConstraint('slug', name=op.f('uq_programs_slug'))
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('host', sa.String(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('gpu_index', sa.Integer(), nullable=True),
    sa.Column('gpu_name', sa.String(length=200), nullable=True),
    sa.Column('gpu_memory_mb', sa.Float(), nullable=True),
    sa.Column('driver_version', sa.String(length=64), nullable=True),
    sa.Column('hw_class', sa.String(length=64), nullable=False),
    sa.Column('torch_version', sa.String(length=64), nullable=True),
    sa.Column('cuda_version', sa.String(length=64), nullable=True),
    sa.Column('sandbox', sa.String(length=200), nullable=False),
    sa.Column('sandbox_ok', sa.Boolean(), nullable=False),
    sa.Column('current_experiment_id', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.Column('last_heartbeat', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_table('experiments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('program_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.Enum('baseline', 'candidate', 'confirmation', name='experiment_role', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('parent_commit', sa.String(length=64), nullable=False),
    sa.Column('commit_sha', sa.String(length=64), nullable=True),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('diff', sa.Text(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=True),
    sa.Column('proposer_kind', sa.String(length=32), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('rationale', sa.Text(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('replicate_of', sa.Integer(), nullable=True),
    sa.Column('repair_of', sa.Integer(), nullable=True),
    sa.Column('hw_class', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Enum('proposed', 'invalid', 'queued', 'running', 'succeeded', 'crashed', 'timed_out', 'refused', 'lost', name='experiment_status', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('decision', sa.Enum('keep', 'discard', name='decision', native_enum=False, create_constraint=True, length=24), nullable=True),
    sa.Column('retry_count', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.JSON(), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('progress', sa.Float(), nullable=True),
    sa.Column('current_loss', sa.Float(), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("decision IS NULL OR status = 'succeeded'", name=op.f('ck_experiments_decision_needs_success')),
    sa.CheckConstraint('retry_count >= 0', name=op.f('ck_experiments_retry_count_nonnegative')),
    sa.ForeignKeyConstraint(['program_id'], ['programs.id'], name=op.f('fk_experiments_program_id_programs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['repair_of'], ['experiments.id'], name=op.f('fk_experiments_repair_of_experiments'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['replicate_of'], ['experiments.id'], name=op.f('fk_experiments_replicate_of_experiments'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], name=op.f('fk_experiments_worker_id_workers'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_experiments'))
    )
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_experiments_program_id'), ['program_id'], unique=False)
        batch_op.create_index('ix_experiments_program_status', ['program_id', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_experiments_replicate_of'), ['replicate_of'], unique=False)
        batch_op.create_index(batch_op.f('ix_experiments_status'), ['status'], unique=False)
        batch_op.create_index('uq_experiments_program_content', ['program_id', 'content_hash'], unique=True, postgresql_where=sa.text("replicate_of IS NULL AND role <> 'baseline' AND content_hash IS NOT NULL"), sqlite_where=sa.text("replicate_of IS NULL AND role <> 'baseline' AND content_hash IS NOT NULL"))

    # programs and workers point back at experiments: add those keys once experiments exists
    with op.batch_alter_table('programs', schema=None) as batch_op:
        batch_op.create_foreign_key(batch_op.f('fk_programs_head_experiment_id_experiments'), 'experiments',
                                    ['head_experiment_id'], ['id'], ondelete='SET NULL')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_foreign_key(batch_op.f('fk_workers_current_experiment_id_experiments'), 'experiments',
                                    ['current_experiment_id'], ['id'], ondelete='SET NULL')

    op.create_table('decisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('program_id', sa.Integer(), nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('decision', sa.Enum('keep', 'discard', name='decision_value', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('policy', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('head_before', sa.String(length=64), nullable=True),
    sa.Column('head_after', sa.String(length=64), nullable=True),
    sa.Column('statistics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_decisions_experiment_id_experiments'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['program_id'], ['programs.id'], name=op.f('fk_decisions_program_id_programs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_decisions')),
    sa.UniqueConstraint('experiment_id', name=op.f('uq_decisions_experiment_id'))
    )
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_decisions_program_id'), ['program_id'], unique=False)

    op.create_table('llm_calls',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('program_id', sa.Integer(), nullable=True),
    sa.Column('experiment_id', sa.Integer(), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('latency_s', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_llm_calls_experiment_id_experiments'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['program_id'], ['programs.id'], name=op.f('fk_llm_calls_program_id_programs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_llm_calls'))
    )
    with op.batch_alter_table('llm_calls', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_llm_calls_program_id'), ['program_id'], unique=False)

    op.create_table('results',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('experiment_id', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('outcome', sa.Enum('proposed', 'invalid', 'queued', 'running', 'succeeded', 'crashed', 'timed_out', 'refused', 'lost', name='result_outcome', native_enum=False, create_constraint=True, length=24), nullable=False),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('val_bpb', sa.Float(), nullable=True),
    sa.Column('test_bpb', sa.Float(), nullable=True),
    sa.Column('training_seconds', sa.Float(), nullable=True),
    sa.Column('total_seconds', sa.Float(), nullable=True),
    sa.Column('startup_seconds', sa.Float(), nullable=True),
    sa.Column('eval_seconds', sa.Float(), nullable=True),
    sa.Column('peak_vram_mb', sa.Float(), nullable=True),
    sa.Column('mfu_percent', sa.Float(), nullable=True),
    sa.Column('total_tokens_m', sa.Float(), nullable=True),
    sa.Column('num_steps', sa.Integer(), nullable=True),
    sa.Column('num_params_m', sa.Float(), nullable=True),
    sa.Column('depth', sa.Integer(), nullable=True),
    sa.Column('gpu_name', sa.String(length=200), nullable=True),
    sa.Column('hw_class', sa.String(length=64), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=False),
    sa.Column('log_tail', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=utcnow(), nullable=False),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiments.id'], name=op.f('fk_results_experiment_id_experiments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_results')),
    sa.UniqueConstraint('experiment_id', name=op.f('uq_results_experiment_id'))
    )


def downgrade() -> None:
    op.drop_table('results')
    with op.batch_alter_table('llm_calls', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_llm_calls_program_id'))

    op.drop_table('llm_calls')
    with op.batch_alter_table('decisions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_decisions_program_id'))

    op.drop_table('decisions')
    with op.batch_alter_table('experiments', schema=None) as batch_op:
        batch_op.drop_index('uq_experiments_program_content', postgresql_where=sa.text("replicate_of IS NULL AND role <> 'baseline' AND content_hash IS NOT NULL"), sqlite_where=sa.text("replicate_of IS NULL AND role <> 'baseline' AND content_hash IS NOT NULL"))
        batch_op.drop_index(batch_op.f('ix_experiments_status'))
        batch_op.drop_index(batch_op.f('ix_experiments_replicate_of'))
        batch_op.drop_index('ix_experiments_program_status')
        batch_op.drop_index(batch_op.f('ix_experiments_program_id'))

    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_workers_current_experiment_id_experiments'), type_='foreignkey')
    with op.batch_alter_table('programs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_programs_head_experiment_id_experiments'), type_='foreignkey')
    op.drop_table('experiments')
    op.drop_table('workers')
    op.drop_table('programs')
    op.drop_table('api_tokens')
