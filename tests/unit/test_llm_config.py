"""Which key the LLM proposer hands litellm."""

from __future__ import annotations

from farm.settings import Settings
from scheduler.llm import LLMConfig


def test_hosted_provider_without_key_lets_litellm_use_provider_variables():
    cfg = LLMConfig.resolve({}, Settings(llm_model="anthropic/claude-sonnet-4-5"))
    assert cfg.api_key is None


def test_local_server_without_key_gets_placeholder():
    cfg = LLMConfig.resolve({}, Settings(llm_model="openai/smollm2", llm_api_base="http://127.0.0.1:9/v1"))
    assert cfg.api_key == "none"


def test_configured_key_wins():
    cfg = LLMConfig.resolve({"api_key": "k-program"}, Settings(llm_model="openai/x", llm_api_key="k-farm"))
    assert cfg.api_key == "k-program"
    assert LLMConfig.resolve({}, Settings(llm_model="openai/x", llm_api_key="k-farm")).api_key == "k-farm"
